"""Building blocks that own their (fused, tensor-parallel-sharded) parameters and know how to load HF tensors into them.

Every parameter carries a `weight_loader(param, hf_tensor, shard_id=None)`; the model loader
only maps HF names to (parameter, shard_id) and calls it, at start-up and for RL weight updates.
Column-parallel layers shard the output dim over tp ranks, row-parallel layers the input dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check_shape(param_name: str, expected: torch.Size | tuple, got: torch.Size) -> None:
    if tuple(expected) != tuple(got):
        raise ValueError(f"weight {param_name}: shape {tuple(got)} does not match the engine's {tuple(expected)}")


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    """Copy a full (unsharded) HF tensor into a parameter of the same shape."""
    _check_shape(getattr(param, "hf_name", "?"), param.shape, loaded.shape)
    param.data.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split over tp ranks; this rank holds rows [rank*out/tp, (rank+1)*out/tp)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if out_features % tp_size:
            raise ValueError(f"out_features {out_features} is not divisible by tp_size {tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(torch.empty(out_features // tp_size, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features // tp_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Load this rank's rows of the full HF tensor."""
        rows = param.shape[0]
        _check_shape("column-parallel", (rows * self.tp_size, *param.shape[1:]), loaded.shape)
        param.data.copy_(loaded.narrow(0, self.tp_rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stored as one matrix (gate_up_proj); shard_id = part index."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(in_features, sum(out_sizes), bias, tp_rank, tp_size)
        self.out_sizes = [s // tp_size for s in out_sizes]  # per-rank size of each part

    def part_slices(self) -> list[tuple[int, int]]:
        """(offset, size) of each part inside this rank's fused rows."""
        offsets = [0]
        for s in self.out_sizes[:-1]:
            offsets.append(offsets[-1] + s)
        return list(zip(offsets, self.out_sizes))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Load part `shard_id` (its full HF tensor) into its rows of the fused parameter."""
        offset, size = self.part_slices()[shard_id]
        _check_shape(f"part {shard_id}", (size * self.tp_size, *param.shape[1:]), loaded.shape)
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v projections fused; heads split over tp ranks (kv heads replicated when fewer than ranks)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp_rank: int = 0, tp_size: int = 1):
        if num_heads % tp_size:
            raise ValueError(f"num_attention_heads {num_heads} is not divisible by tp_size {tp_size}")
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // num_kv_heads)
        self.head_dim = head_dim
        sizes = [self.num_heads * head_dim, self.num_kv_heads * head_dim, self.num_kv_heads * head_dim]
        super().__init__(hidden_size, [s * tp_size for s in sizes], bias, tp_rank, tp_size)
        self.out_sizes = sizes

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Load the full HF q_proj / k_proj / v_proj tensor (shard_id "q", "k", "v") into this rank's rows."""
        part = "qkv".index(shard_id)
        offset, size = self.part_slices()[part]
        heads = self.num_heads if part == 0 else self.num_kv_heads
        ranks_sharing = 1 if part == 0 else self.kv_replicas
        total_heads = heads * self.tp_size // ranks_sharing
        _check_shape(f"{shard_id}_proj", (total_heads * self.head_dim, *param.shape[1:]), loaded.shape)
        start = (self.tp_rank // ranks_sharing) * size
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, start, size))


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split over tp ranks (the partial sums would be all-reduced)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if in_features % tp_size:
            raise ValueError(f"in_features {in_features} is not divisible by tp_size {tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:  # added once, by rank 0
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = default_weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Load this rank's input columns of the full HF tensor."""
        cols = param.shape[1]
        _check_shape("row-parallel", (param.shape[0], cols * self.tp_size), loaded.shape)
        param.data.copy_(loaded.narrow(1, self.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        return F.linear(x, self.weight, bias)


class Embedding(nn.Module):
    """Token embedding table (replicated over tp ranks)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight (HF's order of operations)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half layout), cos/sin cached in float32 for every position."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        inv_freq = _scale_inv_freq(inv_freq, scaling)
        freqs = torch.arange(max_position, dtype=torch.int64).float()[:, None] * inv_freq[None, :]  # [pos, d/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """Rotate q [T, H, D] and k [T, KVH, D] by their positions [T]."""
        cos = torch.cat([self.cos[positions]] * 2, dim=-1)[:, None, :]  # [T, 1, D]
        sin = torch.cat([self.sin[positions]] * 2, dim=-1)[:, None, :]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype)).to(x.dtype)


def _scale_inv_freq(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    """Apply HF rope_scaling ("default", "linear" or "llama3") to the inverse frequencies."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported; expected 'default', 'linear' or 'llama3'")

"""Building blocks that own their (fused, tensor-parallel-sharded) parameters and know how to load HF tensors into them.

Every parameter carries a `weight_target(param, hf_shape, shard_id=None) -> WeightSlice` (which view of
it takes which slice of the full HF tensor; None after the checks when another rank holds all of it, as an
expert of another expert-parallel rank) and `weight_loader(param, hf_tensor, shard_id=None)`, which
applies it; the model loader maps HF names to (parameter, shard_id) and plans each update from the
targets once (`loader.WeightPlan`), at start-up and for RL weight updates.
Its inverse, `unshard(pieces, shard_id=None)`, rebuilds the full HF tensor from every rank's piece.
Column-parallel layers shard the output dim over tp ranks, row-parallel layers the input dim (and
all-reduce their output), vocab-parallel embedding and LM head the vocabulary (all-reduce of the
masked lookup, all-gather of the logits). `tp` is the engine's TPGroup, None for one rank.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from inference_engine import ops
from inference_engine.models import fp8
from inference_engine.parallel import check_tp_shape

if TYPE_CHECKING:
    from inference_engine.parallel import TPGroup


def _check_shape(param_name: str, expected: torch.Size | tuple, got: torch.Size) -> None:
    if tuple(expected) != tuple(got):
        raise ValueError(f"weight {param_name}: shape {tuple(got)} does not match the engine's {tuple(expected)}")


class WeightSlice(NamedTuple):
    """Where one full HF tensor goes: `dst` (a view of the parameter) takes `loaded.narrow(dim, start, length)`.

    `dim` None takes all of `loaded`; `pad` (padding rows of a vocab shard) is zeroed on every load.
    """

    dst: torch.Tensor
    dim: int | None = None
    start: int = 0
    length: int = 0
    pad: torch.Tensor | None = None

    def source(self, loaded: torch.Tensor) -> torch.Tensor:
        """The part of the full HF tensor `loaded` that this rank's `dst` holds (a view)."""
        return loaded if self.dim is None else loaded.narrow(self.dim, self.start, self.length)

    def load(self, loaded: torch.Tensor) -> None:
        """Copy that part into `dst` (and zero `pad`)."""
        self.dst.copy_(self.source(loaded))
        if self.pad is not None:
            self.pad.zero_()


def default_weight_target(param: nn.Parameter, shape: torch.Size, shard_id=None) -> WeightSlice:
    """A full (unsharded) HF tensor of `shape` fills the whole parameter."""
    _check_shape(getattr(param, "hf_name", "?"), param.shape, shape)
    return WeightSlice(param.data)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    """Copy a full (unsharded) HF tensor into a parameter of the same shape."""
    default_weight_target(param, loaded.shape, shard_id).load(loaded)


def replicated_unshard(pieces: list[torch.Tensor], shard_id=None) -> torch.Tensor:
    """The full tensor of a parameter every rank holds whole: rank 0's copy."""
    return pieces[0]


def _rank_size(tp: TPGroup | None) -> tuple[int, int]:
    return (0, 1) if tp is None else (tp.rank, tp.size)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split over tp ranks; this rank holds rows [rank*out/tp, (rank+1)*out/tp)."""

    fp8_block = 0  # > 0: e4m3 weight with weight_scale_inv per fp8_block x fp8_block block (models/fp8.py)
    fp8_kernels = None  # models.fp8.KernelChoice: the tuned FP8 kernels of this shape (EngineConfig.fp8_kernel_configs)

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup | None = None):
        super().__init__()
        self.tp_rank, self.tp_size = _rank_size(tp)
        if out_features % self.tp_size:
            raise ValueError(f"out_features {out_features} is not divisible by tp_size {self.tp_size}")
        self.weight = nn.Parameter(torch.empty(out_features // self.tp_size, in_features), requires_grad=False)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features // self.tp_size), requires_grad=False)
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_target, param.weight_loader = self.weight_target, self.weight_loader
                param.unshard = self.unshard

    def weight_target(self, param: nn.Parameter, shape: torch.Size, shard_id=None) -> WeightSlice:
        """This rank's rows of the full HF tensor fill the parameter."""
        rows = param.shape[0]
        _check_shape("column-parallel", (rows * self.tp_size, *param.shape[1:]), shape)
        return WeightSlice(param.data, 0, self.tp_rank * rows, rows)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Load this rank's slice of the full HF tensor (see `weight_target`)."""
        self.weight_target(param, loaded.shape, shard_id).load(loaded)

    def unshard(self, pieces: list[torch.Tensor], shard_id=None) -> torch.Tensor:
        """The full HF tensor from every rank's rows (of part shard_id), in rank order."""
        return torch.cat(pieces, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_block:
            return fp8.linear(x, self.weight, self.weight_scale_inv, self.fp8_block, self.bias,
                              kernels=self.fp8_kernels)
        return ops.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stored as one matrix (gate_up_proj); shard_id = part index."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp: TPGroup | None = None):
        super().__init__(in_features, sum(out_sizes), bias, tp)
        self.out_sizes = [s // self.tp_size for s in out_sizes]  # per-rank size of each part

    def part_slices(self) -> list[tuple[int, int]]:
        """(offset, size) of each part inside this rank's fused rows."""
        offsets = [0]
        for s in self.out_sizes[:-1]:
            offsets.append(offsets[-1] + s)
        return list(zip(offsets, self.out_sizes))

    def weight_target(self, param: nn.Parameter, shape: torch.Size, shard_id=None) -> WeightSlice:
        """Part `shard_id` (its full HF tensor) goes into its rows of the fused parameter."""
        offset, size = self.part_slices()[shard_id]
        _check_shape(f"part {shard_id}", (size * self.tp_size, *param.shape[1:]), shape)
        return WeightSlice(param.data.narrow(0, offset, size), 0, self.tp_rank * size, size)


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v projections fused; heads split over tp ranks (each kv head replicated on tp / kv ranks when fewer)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TPGroup | None = None):
        tp_size = _rank_size(tp)[1]
        check_tp_shape(num_heads, num_kv_heads, tp_size)
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // num_kv_heads)  # ranks that hold the same kv head
        self.head_dim = head_dim
        sizes = [self.num_heads * head_dim, self.num_kv_heads * head_dim, self.num_kv_heads * head_dim]
        super().__init__(hidden_size, [s * tp_size for s in sizes], bias, tp)
        self.out_sizes = sizes

    def weight_target(self, param: nn.Parameter, shape: torch.Size, shard_id=None) -> WeightSlice:
        """The full HF q_proj / k_proj / v_proj tensor (shard_id "q", "k", "v") goes into this rank's rows."""
        part = "qkv".index(shard_id)
        offset, size = self.part_slices()[part]
        heads = self.num_heads if part == 0 else self.num_kv_heads
        ranks_sharing = 1 if part == 0 else self.kv_replicas
        total_heads = heads * self.tp_size // ranks_sharing
        _check_shape(f"{shard_id}_proj", (total_heads * self.head_dim, *param.shape[1:]), shape)
        start = (self.tp_rank // ranks_sharing) * size
        return WeightSlice(param.data.narrow(0, offset, size), 0, start, size)

    def unshard(self, pieces: list[torch.Tensor], shard_id=None) -> torch.Tensor:
        """The full q / k / v tensor; replicated kv heads are taken once (from the first rank holding each)."""
        return torch.cat(pieces if shard_id == "q" else pieces[::self.kv_replicas], dim=0)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split over tp ranks; the partial products are all-reduced."""

    fp8_block = 0  # > 0: FP8 weight (see ColumnParallelLinear)
    fp8_kernels = None  # see ColumnParallelLinear

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup | None = None):
        super().__init__()
        self.tp = tp
        self.tp_rank, self.tp_size = _rank_size(tp)
        if in_features % self.tp_size:
            raise ValueError(f"in_features {in_features} is not divisible by tp_size {self.tp_size}")
        self.weight = nn.Parameter(torch.empty(out_features, in_features // self.tp_size), requires_grad=False)
        self.weight.weight_target, self.weight.weight_loader = self.weight_target, self.weight_loader
        self.weight.unshard = self.unshard
        self.bias = None
        if bias:  # replicated, added once (by rank 0) before the all-reduce
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader, self.bias.unshard = default_weight_loader, replicated_unshard

    def weight_target(self, param: nn.Parameter, shape: torch.Size, shard_id=None) -> WeightSlice:
        """This rank's input columns of the full HF tensor fill the parameter."""
        cols = param.shape[1]
        _check_shape("row-parallel", (param.shape[0], cols * self.tp_size), shape)
        return WeightSlice(param.data, 1, self.tp_rank * cols, cols)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Load this rank's input columns of the full HF tensor."""
        self.weight_target(param, loaded.shape, shard_id).load(loaded)

    def unshard(self, pieces: list[torch.Tensor], shard_id=None) -> torch.Tensor:
        """The full HF weight from every rank's columns, in rank order."""
        return torch.cat(pieces, dim=1)

    def forward(self, x: torch.Tensor, silu_mul: bool = False) -> torch.Tensor:
        """x W^T (+ b), all-reduced; silu_mul: x is [T, 2 in] = [gate | up] and the input is silu(gate) * up."""
        bias = self.bias if self.tp_rank == 0 else None
        if self.fp8_block:
            out = fp8.linear(x, self.weight, self.weight_scale_inv, self.fp8_block, bias, silu_mul=silu_mul,
                             kernels=self.fp8_kernels)
            return out if self.tp is None or self.tp_size == 1 else self.tp.all_reduce(out)
        out = ops.silu_and_mul_linear(x, self.weight, bias) if silu_mul else ops.linear(x, self.weight, bias)
        return out if self.tp is None or self.tp_size == 1 else self.tp.all_reduce(out)


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over tp ranks (each holds ceil(vocab / tp) rows, the last zero-padded).

    A lookup gives zeros for ids outside this rank's rows; the all-reduce adds the one rank's real row.
    """

    fp8_block = 0  # > 0: an FP8 LM head (see ColumnParallelLinear); never for an embedding that is looked up
    fp8_kernels = None  # see ColumnParallelLinear

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup | None = None):
        super().__init__()
        self.tp = tp
        self.tp_rank, self.tp_size = _rank_size(tp)
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // self.tp_size)
        self.start = self.tp_rank * self.rows  # first vocab id of this rank
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)
        self.weight.weight_target, self.weight.weight_loader = self.weight_target, self.weight_loader
        self.weight.unshard = self.unshard

    def weight_target(self, param: nn.Parameter, shape: torch.Size, shard_id=None) -> WeightSlice:
        """This rank's vocabulary rows of the full [vocab, hidden] HF tensor; padding rows are zeroed."""
        _check_shape("vocab-parallel", (self.vocab_size, param.shape[1]), shape)
        n = max(0, min(self.rows, self.vocab_size - self.start))
        return WeightSlice(param.data[:n], 0, self.start, n, param.data[n:] if n < self.rows else None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Load this rank's vocabulary rows of the full [vocab, hidden] HF tensor; padding rows are zero."""
        self.weight_target(param, loaded.shape, shard_id).load(loaded)

    def unshard(self, pieces: list[torch.Tensor], shard_id=None) -> torch.Tensor:
        """The full [vocab, hidden] HF tensor from every rank's rows, padding dropped."""
        return torch.cat(pieces, dim=0)[:self.vocab_size]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings [T, hidden] of token ids [T]."""
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)  # [T]
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[:, None], 0)
        return self.tp.all_reduce(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] of hidden [N, hidden] against this table (tied LM head), gathered over ranks."""
        if self.fp8_block:
            local = fp8.linear(hidden, self.weight, self.weight_scale_inv, self.fp8_block, out_dtype=torch.float32,
                               kernels=self.fp8_kernels)
        else:
            local = ops.linear(hidden, self.weight, out_dtype=torch.float32)  # [N, rows]
        if self.tp_size == 1:
            return local
        return torch.cat(self.tp.all_gather(local), dim=-1)[:, :self.vocab_size]


class ParallelLMHead(VocabParallelEmbedding):
    """The untied output projection [vocab, hidden], vocabulary split over tp ranks like the embedding."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        raise TypeError("ParallelLMHead computes logits(hidden), it does not embed token ids")


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight (HF's order of operations)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with residual, (norm(x + residual), x + residual) in one fused op."""
        return ops.rms_norm(x, self.weight, self.eps, residual)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables (rotate-half layout): cos / sin [max_position, head_dim / 2] in float32.

    Applied by `inference_engine.ops.qk_norm_rope`, fused with the q/k norm.
    """

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        inv_freq = _scale_inv_freq(inv_freq, scaling)
        freqs = torch.arange(max_position, dtype=torch.int64).float()[:, None] * inv_freq[None, :]  # [pos, d/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)


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

"""Fused ops of the decoder layer (RMSNorm, q/k norm + RoPE, SiLU-and-mul, skinny linears), of the sampler (greedy
pick, truncation, seeded draws) and of the step's set-up (each request's KV slots gathered from the table).

Each function runs one triton kernel where triton can (CUDA tensors, or any tensors when the process
started with TRITON_INTERPRET=1) and otherwise its torch specification in `reference.py`, which CPU
engines use. Both paths compute the same function (tests/test_ops.py).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch

from inference_engine.kv_cache import is_fp8
from inference_engine.ops import reference

__all__ = ["GEMV_MAX_ROWS", "context_slots", "greedy", "linear", "linear_greedy", "qk_norm_rope", "reference",
           "rms_norm", "runs_triton", "seeded_race", "silu_and_mul", "silu_and_mul_linear", "truncate",
           "truncation_threshold"]

GEMV_MAX_ROWS = 1  # linears of at most this many rows run the triton GEMV where triton runs (batch-1 decode); on an
# H100 it reads the 8B shape's weights at 82-106% of copy bandwidth where cuBLAS reaches 68-95%, but at 8 rows it was
# 2-4x slower than cuBLAS (docs/benchmarks.md)


@functools.cache
def _triton_ops() -> ModuleType | None:
    """The triton implementation module, or None when triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    from inference_engine.ops import triton_ops

    return triton_ops


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def runs_triton(device: torch.device | str) -> bool:
    """Whether the ops run their triton kernels (not the torch reference) for tensors on device."""
    kind = torch.device(device).type
    if kind == "cpu" and not _interpreting():
        return False  # decided without importing triton: CPU engines never pay for it
    return kind in ("cpu", "cuda") and _triton_ops() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * RMSNorm(x) [..., N]; with residual, (weight * RMSNorm(x + residual), x + residual)."""
    if runs_triton(x.device):
        return _triton_ops().rms_norm(x, weight, eps, residual)
    if residual is None:
        return reference.rms_norm(x, weight, eps)
    return reference.add_rms_norm(x, residual, weight, eps)


def qk_norm_rope(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                 num_heads: int, num_kv_heads: int, head_dim: int, q_weight: torch.Tensor | None = None,
                 k_weight: torch.Tensor | None = None, eps: float = 1e-6,
                 kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 kv_inv_scale: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, H, D], k [T, KVH, D] (RMSNorm per head when weights are given, then RoPE at positions [T]) and v of qkv.

    kv_cache = (k_buffer, v_buffer [slots, KVH, D], loc [T]): k and v are also written to the cache at slots loc;
    an e4m3 cache takes kv_inv_scale = (1 / k_scale, 1 / v_scale) [KVH] float32 (kv_cache.quantize_kv)."""
    if (q_weight is None) != (k_weight is None):
        raise ValueError("qk_norm_rope needs both q_weight and k_weight, or neither")
    if kv_cache is not None and (kv_inv_scale is not None) != is_fp8(kv_cache[0].dtype):
        raise ValueError(f"a KV cache of {kv_cache[0].dtype} takes kv_inv_scale "
                         f"{'(1 / k_scale, 1 / v_scale)' if is_fp8(kv_cache[0].dtype) else 'None'}")
    impl = _triton_ops() if runs_triton(qkv.device) else reference
    return impl.qk_norm_rope(qkv, positions, cos_table, sin_table, num_heads, num_kv_heads, head_dim, q_weight,
                             k_weight, eps, kv_cache, kv_inv_scale)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [T, 2I] = [gate | up]; returns [T, I]."""
    if runs_triton(gate_up.device):
        return _triton_ops().silu_and_mul(gate_up)
    return reference.silu_and_mul(gate_up)


def _skinny(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS and runs_triton(x.device)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias), in out_dtype (default x's; rounded to x's dtype first).

    The triton GEMV for M <= GEMV_MAX_ROWS where triton runs (batch-1 decode reads each weight once at
    about copy bandwidth), else F.linear (cuBLAS on CUDA)."""
    if _skinny(x):
        return _triton_ops().linear(x, weight, bias, out_dtype=out_dtype)
    return reference.linear(x, weight, bias, out_dtype)


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The argmax [B] of float32 logits [B, V] (the lowest id among ties) and its log-prob [B] (T = 1).

    One triton pass over the logits where triton runs, else argmax + logsumexp."""
    if logits.dim() == 2 and runs_triton(logits.device):
        return _triton_ops().greedy(logits)
    return reference.greedy(logits)


def linear_greedy(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 logits [M, N] of x [M, K] @ weight [N, K]^T (an LM head), each row's argmax [M] and its log-prob [M].

    For M <= GEMV_MAX_ROWS where triton runs, the GEMV also reduces its blocks and one small kernel picks each
    row's winner (no further passes over the logits); else linear, argmax and logsumexp. Ties: the lowest id."""
    if _skinny(x):
        return _triton_ops().linear_greedy(x, weight)
    logits = reference.linear(x, weight, out_dtype=torch.float32)
    return logits, *greedy(logits)


def silu_and_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul(gate_up [M, 2I]) @ weight [N, I]^T (+ bias): one triton GEMV for few rows, else the two ops."""
    if _skinny(gate_up):
        return _triton_ops().linear(gate_up, weight, bias, silu_mul=True)
    return reference.linear(silu_and_mul(gate_up), weight, bias)


def context_slots(table: torch.Tensor, rows: torch.Tensor, kv_indptr: torch.Tensor, total: int,
                  max_len: int) -> torch.Tensor:
    """kv_indices [total]: each request's KV slots (its row of the req_to_token table) back to back; see reference."""
    if runs_triton(table.device):
        return _triton_ops().context_slots(table, rows, kv_indptr, total, max_len)
    return reference.context_slots(table, rows, kv_indptr, total, max_len)


def seeded_race(probs: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Token [B] drawn from each row of probs [B, V] with noise fixed by the row's (seed, offset): see reference."""
    if runs_triton(probs.device):
        return _triton_ops().seeded_race(probs, seeds, offsets)
    return reference.seeded_race(probs, seeds, offsets)


def _truncation_args(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> bool:
    """Whether the triton kernel takes these arguments (float32 probs where triton runs); raises on bad shapes."""
    if probs.dim() != 2:
        raise ValueError(f"truncation takes probs [B, V], got shape {tuple(probs.shape)}")
    for name, t in (("top_k", top_k), ("top_p", top_p), ("min_p", min_p)):
        if t.shape != probs.shape[:1]:
            raise ValueError(f"{name} must have shape [B] = {tuple(probs.shape[:1])}, got {tuple(t.shape)}")
    return probs.dtype == torch.float32 and runs_triton(probs.device)


def truncation_threshold(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                         min_p: torch.Tensor) -> torch.Tensor:
    """The smallest probability [B] each row of probs [B, V] keeps under top-k / top-p / min-p: see reference."""
    if _truncation_args(probs, top_k, top_p, min_p):
        return _triton_ops().truncation_threshold(probs, top_k, top_p, min_p)[0]
    return reference.truncation_threshold(probs, top_k, top_p, min_p)


def truncate(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """probs [B, V] with what top-k / top-p / min-p drop set to 0: one sort-free kernel (float32, where triton runs)."""
    if _truncation_args(probs, top_k, top_p, min_p):
        return _triton_ops().truncation_threshold(probs, top_k, top_p, min_p, write=True)[1]
    return reference.truncate(probs, top_k, top_p, min_p)

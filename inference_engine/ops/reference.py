"""The torch specification of the fused ops: what the triton kernels must compute, and what CPU engines run.

Every function rounds where HF transformers rounds (bf16 / fp16 results of each elementwise op, norms in
float32 cast back before the weight), so a low-precision engine step matches HF's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * RMSNorm(x) over the last dim, normalised in float32 and cast back before the weight."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the pre-norm block's residual add and the next norm."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [T, heads, D] by float32 cos / sin [T, D/2] (cast to x's dtype first, as HF does)."""
    cos = torch.cat([cos, cos], dim=-1)[:, None, :].to(x.dtype)  # [T, 1, D]
    sin = torch.cat([sin, sin], dim=-1)[:, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def qk_norm_rope(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                 num_heads: int, num_kv_heads: int, head_dim: int, q_weight: torch.Tensor | None,
                 k_weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split qkv [T, (H + 2 KVH) * D] into q [T, H, D], k [T, KVH, D] (per-head RMSNorm if weights, then RoPE) and v."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(-1, num_heads, head_dim)  # [T, H, D]
    k = k.view(-1, num_kv_heads, head_dim)  # [T, KVH, D]
    v = v.view(-1, num_kv_heads, head_dim)
    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    cos, sin = cos_table[positions], sin_table[positions]  # [T, D/2] float32
    return rope(q, cos, sin), rope(k, cos, sin), v


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2I] laid out [gate | up]; returns [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up

"""Triton kernels of the fused ops (one launch each), computing exactly what `reference.py` specifies.

Each kernel rounds intermediate values to the activation dtype where the reference (and HF) does, so
bf16 results agree with the torch path to the last bit up to float32 reduction order. None of them
reads tensor values on the host: all are safe inside CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro, n_cols,
                     eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # residual' = x + residual, rounded to the activation dtype like a torch add
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round(x, dtype: tl.constexpr):
    return x.to(dtype).to(tl.float32)


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, stride_t, stride_table,
                         eps, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HALF: tl.constexpr, BLOCK: tl.constexpr, HAS_NORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)  # q heads first, then k heads (they are adjacent in the qkv row)
    is_q = head < NUM_HEADS
    dt: tl.constexpr = q_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    src = qkv_ptr + t * stride_t + head * HEAD_DIM
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)  # first half of the head
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)  # second half
    if HAS_NORM:
        inv_rms = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / HEAD_DIM + eps)
        w1 = tl.where(is_q, tl.load(qw_ptr + offs, mask=mask, other=0.0), tl.load(kw_ptr + offs, mask=mask, other=0.0))
        w2 = tl.where(is_q, tl.load(qw_ptr + HALF + offs, mask=mask, other=0.0),
                      tl.load(kw_ptr + HALF + offs, mask=mask, other=0.0))
        x1 = _round(w1.to(tl.float32) * _round(x1 * inv_rms, dt), dt)
        x2 = _round(w2.to(tl.float32) * _round(x2 * inv_rms, dt), dt)
    pos = tl.load(pos_ptr + t)
    c = _round(tl.load(cos_ptr + pos * stride_table + offs, mask=mask, other=0.0), dt)
    s = _round(tl.load(sin_ptr + pos * stride_table + offs, mask=mask, other=0.0), dt)
    out1 = (_round(x1 * c, dt) + _round(-x2 * s, dt)).to(dt)
    out2 = (_round(x2 * c, dt) + _round(x1 * s, dt)).to(dt)
    q_dst = q_ptr + (t * NUM_HEADS + tl.minimum(head, NUM_HEADS - 1)) * HEAD_DIM
    k_dst = k_ptr + (t * NUM_KV_HEADS + tl.maximum(head - NUM_HEADS, 0)) * HEAD_DIM
    q_mask = offs < tl.where(is_q, HALF, 0)  # the head's output goes to q or to k
    k_mask = offs < tl.where(is_q, 0, HALF)
    tl.store(q_dst + offs, out1, mask=q_mask)
    tl.store(q_dst + HALF + offs, out2, mask=q_mask)
    tl.store(k_dst + offs, out1, mask=k_mask)
    tl.store(k_dst + HALF + offs, out2, mask=k_mask)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    dt: tl.constexpr = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    act = _round(gate / (1.0 + tl.exp(-gate)), dt)
    tl.store(out_ptr + row * stride_o + offs, (act * up).to(dt), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D [rows, last dim] tensor with unit stride in the last dim."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused (residual add +) RMSNorm; see reference.rms_norm / add_rms_norm."""
    shape, n = x.shape, x.shape[-1]
    x2 = _rows(x)
    out = torch.empty_like(x2)
    block = triton.next_power_of_2(n)
    warps = 4 if block <= 1024 else 8
    if residual is None:
        _rms_norm_kernel[(x2.shape[0],)](x2, x2, weight, out, out, x2.stride(0), 0, out.stride(0), 0, n, eps,
                                         HAS_RESIDUAL=False, BLOCK=block, num_warps=warps)
        return out.view(shape)
    r2 = _rows(residual)
    res_out = torch.empty_like(x2)
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, res_out, x2.stride(0), r2.stride(0), out.stride(0),
                                     res_out.stride(0), n, eps, HAS_RESIDUAL=True, BLOCK=block, num_warps=warps)
    return out.view(shape), res_out.view(shape)


def qk_norm_rope(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                 num_heads: int, num_kv_heads: int, head_dim: int, q_weight: torch.Tensor | None,
                 k_weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused per-head q/k RMSNorm and RoPE in one launch; see reference.qk_norm_rope."""
    qkv = _rows(qkv)
    tokens = qkv.shape[0]
    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)  # [T, H, D]
    k = torch.empty(tokens, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)  # [T, KVH, D]
    half = head_dim // 2
    has_norm = q_weight is not None
    if tokens:
        _qk_norm_rope_kernel[(tokens, num_heads + num_kv_heads)](
            qkv, positions, cos_table, sin_table, q_weight if has_norm else qkv, k_weight if has_norm else qkv,
            q, k, qkv.stride(0), cos_table.stride(0), eps, NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
            HEAD_DIM=head_dim, HALF=half, BLOCK=triton.next_power_of_2(half), HAS_NORM=has_norm, num_warps=1)
    kv_start = (num_heads + num_kv_heads) * head_dim
    v = qkv[:, kv_start:kv_start + num_kv_heads * head_dim].view(-1, num_kv_heads, head_dim)
    return q, k, v


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Fused silu(gate) * up; see reference.silu_and_mul."""
    x = _rows(gate_up)
    n = x.shape[-1] // 2
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if x.shape[0]:
        _silu_and_mul_kernel[(x.shape[0], triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n,
                                                                  BLOCK=block, num_warps=4)
    return out.view(*gate_up.shape[:-1], n)

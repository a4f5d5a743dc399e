"""Triton kernels of `trainer.fused` on CUDA: SwiGLU and q/k norm + RoPE, forward and backward.

The compiled (torch.compile) SwiGLU backward read the fused `[gate | up]` input through a generated
cat/split index map and ran at 2.5x its memory-bound time on the H100. These kernels tile the rows
in column blocks, so every load and store is a contiguous, coalesced run:

- forward: out = silu(gate) * up, fp32 math, one read of [gate | up] and one write of out;
- backward: d gate = dy * up * silu'(gate), d up = dy * silu(gate), with
  silu'(g) = s (1 + g (1 - s)), s = sigmoid(g); one read of [gate | up] and dy, one write of
  [d gate | d up].

The q/k RMSNorm + RoPE kernels (`QKNormRoPE`) read megatron's fused qkv row once and write q, k
and v (forward), or read dq, dk, dv and the saved qkv and write d qkv plus per-token partial sums of
the norm weights' gradients (backward). Normalised values stay fp32 until the rotation (the eager
form rounds them to bf16 in between). Both replace `torch.compile`d functions whose host-side
wrappers cost about 1 ms per call (dynamic-shape guards, AOT autograd), which left the GPU idle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_row = x_ptr + row * 2 * n_cols
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(x_ptr, dy_ptr, dx_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_row = x_ptr + row * 2 * n_cols
    dx_row = dx_ptr + row * 2 * n_cols
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    d_gate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(dx_row + cols, d_gate.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_row + n_cols + cols, (dy * silu).to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(rows: int, n_cols: int) -> tuple[int, int]:
    return rows, triton.cdiv(n_cols, _BLOCK)


def swiglu_forward(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a contiguous gate_up [..., 2I] = [gate | up]; returns [..., I] in its dtype."""
    n_cols = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], n_cols, dtype=gate_up.dtype, device=gate_up.device)
    rows = out.numel() // max(1, n_cols)
    if rows:
        _swiglu_fwd_kernel[_grid(rows, n_cols)](gate_up, out, n_cols, BLOCK=_BLOCK, num_warps=4)
    return out


def swiglu_backward(gate_up: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """d loss / d gate_up [..., 2I] from the saved (contiguous) gate_up and grad_out [..., I]."""
    grad_out = grad_out.contiguous()
    n_cols = grad_out.shape[-1]
    grad = torch.empty_like(gate_up)
    rows = grad_out.numel() // max(1, n_cols)
    if rows:
        _swiglu_bwd_kernel[_grid(rows, n_cols)](gate_up, grad_out, grad, n_cols, BLOCK=_BLOCK, num_warps=4)
    return grad


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up with the triton kernels above; saves only its input."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate_up = gate_up.contiguous()
        ctx.save_for_backward(gate_up)
        return swiglu_forward(gate_up)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        return swiglu_backward(gate_up, grad_out)


# ----------------------------------------------------------------------------------------------
# q/k RMSNorm + rotate-half RoPE of megatron's fused qkv, split into q, k, v
# ----------------------------------------------------------------------------------------------
# One program per token. Its mixed qkv row holds, per query group g, q_per_group q heads, then the
# group's k head and v head. The q heads of a token are one contiguous [groups * q_per_group, hn]
# block of q (k and v likewise), so each pass moves three blocks; rows gather from / scatter to
# mixed by group. Every head is handled as its two halves (lo = [:hn/2], hi = [hn/2:]): rotate-half
# RoPE then mixes lo with hi elementwise and every load and store is a contiguous run.


@triton.jit
def _rope_tables(cos_ptr, sin_ptr, pos, half, D: tl.constexpr):
    """cos and sin [1, D/2] x 2 (lo, hi halves) of the token at position pos."""
    row = pos * D
    return (tl.load(cos_ptr + row + half), tl.load(cos_ptr + row + D // 2 + half),
            tl.load(sin_ptr + row + half), tl.load(sin_ptr + row + D // 2 + half))


@triton.jit
def _rope_halves(x_lo, x_hi, w_lo, w_hi, cos_lo, cos_hi, sin_lo, sin_hi, eps, D: tl.constexpr,
                 HAS_NORM: tl.constexpr):
    """Normed (optional) and rotated halves of rows x [R, D/2] x 2, fp32."""
    z_lo, z_hi = x_lo, x_hi
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(x_lo * x_lo, axis=1) + tl.sum(x_hi * x_hi, axis=1)) / D + eps)[:, None]
        z_lo, z_hi = x_lo * rstd * w_lo, x_hi * rstd * w_hi
    return z_lo * cos_lo - z_hi * sin_lo, z_hi * cos_hi + z_lo * sin_hi  # z * cos + rotate_half(z) * sin


@triton.jit
def _rope_halves_grad(x_lo, x_hi, dy_lo, dy_hi, w_lo, w_hi, cos_lo, cos_hi, sin_lo, sin_hi, eps, D: tl.constexpr,
                      HAS_NORM: tl.constexpr):
    """(d x lo, d x hi, d w lo, d w hi summed over rows) of `_rope_halves` for incoming dy halves."""
    dz_lo = dy_lo * cos_lo + dy_hi * sin_hi  # RoPE's transpose
    dz_hi = dy_hi * cos_hi - dy_lo * sin_lo
    dx_lo, dx_hi = dz_lo, dz_hi
    dw_lo, dw_hi = tl.sum(dz_lo * 0.0, axis=0), tl.sum(dz_hi * 0.0, axis=0)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(x_lo * x_lo, axis=1) + tl.sum(x_hi * x_hi, axis=1)) / D + eps)[:, None]
        n_lo, n_hi = x_lo * rstd, x_hi * rstd
        dn_lo, dn_hi = dz_lo * w_lo, dz_hi * w_hi
        mean = ((tl.sum(dn_lo * n_lo, axis=1) + tl.sum(dn_hi * n_hi, axis=1)) / D)[:, None]
        dx_lo, dx_hi = rstd * (dn_lo - n_lo * mean), rstd * (dn_hi - n_hi * mean)
        dw_lo, dw_hi = tl.sum(dz_lo * n_lo, axis=0), tl.sum(dz_hi * n_hi, axis=0)
    return dx_lo, dx_hi, dw_lo, dw_hi


@triton.jit
def _heads_fwd(src, mask, w_ptr, dst, half, cos_lo, cos_hi, sin_lo, sin_hi, eps, D: tl.constexpr,
               HAS_NORM: tl.constexpr):
    """Rows of heads at src [R, 1] (masked) normed with weight w_ptr (optional) and rotated, stored at dst."""
    x_lo = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    x_hi = tl.load(src + D // 2 + half, mask=mask, other=0.0).to(tl.float32)
    w_lo, w_hi = tl.load(w_ptr + half).to(tl.float32), tl.load(w_ptr + D // 2 + half).to(tl.float32)
    y_lo, y_hi = _rope_halves(x_lo, x_hi, w_lo, w_hi, cos_lo, cos_hi, sin_lo, sin_hi, eps, D, HAS_NORM)
    tl.store(dst + half, y_lo.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + D // 2 + half, y_hi.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _heads_bwd(x, dx, mask, dy, w_ptr, dw, half, cos_lo, cos_hi, sin_lo, sin_hi, eps, D: tl.constexpr,
               HAS_NORM: tl.constexpr):
    """`_heads_fwd`'s backward for rows of heads at x [R, 1] (masked) and incoming dy: d x to dx, d weight to dw."""
    x_lo = tl.load(x + half, mask=mask, other=0.0).to(tl.float32)
    x_hi = tl.load(x + D // 2 + half, mask=mask, other=0.0).to(tl.float32)
    dy_lo = tl.load(dy + half, mask=mask, other=0.0).to(tl.float32)
    dy_hi = tl.load(dy + D // 2 + half, mask=mask, other=0.0).to(tl.float32)
    w_lo, w_hi = tl.load(w_ptr + half).to(tl.float32), tl.load(w_ptr + D // 2 + half).to(tl.float32)
    dx_lo, dx_hi, dw_lo, dw_hi = _rope_halves_grad(x_lo, x_hi, dy_lo, dy_hi, w_lo, w_hi, cos_lo, cos_hi, sin_lo,
                                                   sin_hi, eps, D, HAS_NORM)
    tl.store(dx + half, dx_lo.to(dx.dtype.element_ty), mask=mask)
    tl.store(dx + D // 2 + half, dx_hi.to(dx.dtype.element_ty), mask=mask)
    if HAS_NORM:
        tl.store(dw + half, dw_lo[None, :])
        tl.store(dw + D // 2 + half, dw_hi[None, :])


@triton.jit
def _qk_norm_rope_fwd_kernel(mixed_ptr, cos_ptr, sin_ptr, wq_ptr, wk_ptr, q_ptr, k_ptr, v_ptr, tokens_per_pos, eps,
                             G: tl.constexpr, P: tl.constexpr, D: tl.constexpr, GP_BLOCK: tl.constexpr,
                             G_BLOCK: tl.constexpr, HAS_NORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    half = tl.arange(0, D // 2)[None, :]
    row_base = mixed_ptr + t * (G * (P + 2) * D)
    pos = t // tokens_per_pos
    cos_lo, cos_hi, sin_lo, sin_hi = _rope_tables(cos_ptr, sin_ptr, pos, half, D)
    # q heads: block row i is q head i of the token, from mixed row (i // P) * (P + 2) + i % P
    qi = tl.arange(0, GP_BLOCK)[:, None]
    qm = qi < G * P
    src = row_base + ((qi // P) * (P + 2) + qi % P) * D
    _heads_fwd(src, qm, wq_ptr, q_ptr + t * (G * P * D) + qi * D, half, cos_lo, cos_hi, sin_lo, sin_hi, eps, D,
               HAS_NORM)
    # k heads (mixed row g * (P + 2) + P) and v heads (the row after)
    gi = tl.arange(0, G_BLOCK)[:, None]
    gm = gi < G
    src = row_base + (gi * (P + 2) + P) * D
    dst = t * (G * D) + gi * D
    _heads_fwd(src, gm, wk_ptr, k_ptr + dst, half, cos_lo, cos_hi, sin_lo, sin_hi, eps, D, HAS_NORM)
    cols = tl.arange(0, D)[None, :]
    tl.store(v_ptr + dst + cols, tl.load(src + D + cols, mask=gm, other=0.0), mask=gm)


@triton.jit
def _qk_norm_rope_bwd_kernel(mixed_ptr, cos_ptr, sin_ptr, wq_ptr, wk_ptr, dq_ptr, dk_ptr, dv_ptr, dmixed_ptr,
                             dwq_ptr, dwk_ptr, tokens_per_pos, eps, G: tl.constexpr, P: tl.constexpr,
                             D: tl.constexpr, GP_BLOCK: tl.constexpr, G_BLOCK: tl.constexpr,
                             HAS_NORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    half = tl.arange(0, D // 2)[None, :]
    row_off = t * (G * (P + 2) * D)
    pos = t // tokens_per_pos
    cos_lo, cos_hi, sin_lo, sin_hi = _rope_tables(cos_ptr, sin_ptr, pos, half, D)
    out_ty = dmixed_ptr.dtype.element_ty
    # q heads
    qi = tl.arange(0, GP_BLOCK)[:, None]
    qm = qi < G * P
    src = row_off + ((qi // P) * (P + 2) + qi % P) * D
    _heads_bwd(mixed_ptr + src, dmixed_ptr + src, qm, dq_ptr + t * (G * P * D) + qi * D, wq_ptr, dwq_ptr + t * D,
               half, cos_lo, cos_hi, sin_lo, sin_hi, eps, D, HAS_NORM)
    # k heads, then v heads (a copy of dv into its rows)
    gi = tl.arange(0, G_BLOCK)[:, None]
    gm = gi < G
    src = row_off + (gi * (P + 2) + P) * D
    dy = t * (G * D) + gi * D
    _heads_bwd(mixed_ptr + src, dmixed_ptr + src, gm, dk_ptr + dy, wk_ptr, dwk_ptr + t * D, half, cos_lo, cos_hi,
               sin_lo, sin_hi, eps, D, HAS_NORM)
    cols = tl.arange(0, D)[None, :]
    tl.store(dmixed_ptr + src + D + cols, tl.load(dv_ptr + dy + cols, mask=gm, other=0.0).to(out_ty), mask=gm)


def qk_norm_rope_supported(mixed_qkv: torch.Tensor, head_dim: int, cos: torch.Tensor) -> bool:
    """Whether the kernels take this call: CUDA, power-of-two head_dim >= 16, cos/sin [s, 1, 1, head_dim]."""
    return (mixed_qkv.is_cuda and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and cos.dim() == 4
            and cos.shape[1] == 1 and cos.shape[-1] == head_dim and cos.shape[0] == mixed_qkv.shape[0])


class QKNormRoPE(torch.autograd.Function):
    """q/k RMSNorm (optional) + RoPE of mixed qkv [s, b, groups, (q_per_group + 2) hn] -> q, k, v (triton)."""

    @staticmethod
    def forward(ctx, mixed_qkv, q_per_group: int, head_dim: int, cos, sin, q_weight, k_weight, eps: float):
        s, b, groups, width = mixed_qkv.shape
        if width != (q_per_group + 2) * head_dim:
            raise ValueError(f"mixed qkv width {width} != (q_per_group {q_per_group} + 2) x head_dim {head_dim}")
        mixed_qkv = mixed_qkv.contiguous()
        cos, sin = cos.reshape(s, head_dim).float().contiguous(), sin.reshape(s, head_dim).float().contiguous()
        has_norm = q_weight is not None
        wq = q_weight if has_norm else cos  # placeholders without a norm: read (>= head_dim values), not used
        wk = k_weight if has_norm else cos
        q = mixed_qkv.new_empty(s, b, groups * q_per_group, head_dim)
        k, v = mixed_qkv.new_empty(s, b, groups, head_dim), mixed_qkv.new_empty(s, b, groups, head_dim)
        meta = dict(G=groups, P=q_per_group, D=head_dim, GP_BLOCK=triton.next_power_of_2(groups * q_per_group),
                    G_BLOCK=triton.next_power_of_2(groups), HAS_NORM=has_norm)
        if s * b:
            _qk_norm_rope_fwd_kernel[(s * b,)](mixed_qkv, cos, sin, wq, wk, q, k, v, b, eps, **meta, num_warps=4)
        ctx.save_for_backward(mixed_qkv, cos, sin, wq, wk)
        ctx.meta, ctx.eps, ctx.has_norm = meta, eps, has_norm
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        mixed_qkv, cos, sin, wq, wk = ctx.saved_tensors
        s, b, groups, _ = mixed_qkv.shape
        head_dim = ctx.meta["D"]
        dmixed = torch.empty_like(mixed_qkv)
        rows = s * b
        dwq = torch.empty(rows if ctx.has_norm else 1, head_dim, dtype=torch.float32, device=mixed_qkv.device)
        dwk = torch.empty_like(dwq)
        dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()  # autograd materialises unused ones as zeros
        if rows:
            _qk_norm_rope_bwd_kernel[(rows,)](mixed_qkv, cos, sin, wq, wk, dq, dk, dv, dmixed, dwq, dwk, b, ctx.eps,
                                              **ctx.meta, num_warps=4)
        if not ctx.has_norm:
            return dmixed, None, None, None, None, None, None, None
        return (dmixed, None, None, None, None, dwq.sum(0).to(wq.dtype), dwk.sum(0).to(wk.dtype), None)

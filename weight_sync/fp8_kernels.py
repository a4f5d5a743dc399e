"""The blockwise weight quantisation of `weight_sync.fp8` as one triton kernel (CUDA).

`quantize_weight`'s torch form reads and writes the weight about ten times (abs, amax, a float32 copy, the
multiply, the clamp, the e4m3 cast, the crop to shape): on the Qwen3-8B shape that made a colocated FP8 push 7.7x
the bf16 push on an H100. Here one program quantises one `block x block` block: it reads the block once (bf16 or
float32), takes its amax, and writes the e4m3 block and its scale straight into their destinations -- the engine's
FP8 parameter (a row range of it, or one expert of a stack) or a fresh tensor on the sender. Same arithmetic as the
specification, bit for bit: amax of |w| in float32, `scale = amax / 448` and `1 / scale` by IEEE division
(`div_rn`), `w * (1 / scale)` in float32, clamped, rounded to e4m3 to nearest even (the `_quant_group` of the
engine's activation kernel, verified bit-identical on an H100).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _weight_quant_kernel(w_ptr, q_ptr, s_ptr, N, K, stride_we, stride_wn, stride_qe, stride_qn, stride_se,
                         stride_sn, BLOCK: tl.constexpr, FP8_MAX_C: tl.constexpr, TINY_C: tl.constexpr):
    bn = tl.program_id(0)
    bk = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    rows = bn.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cols = bk * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + e * stride_we + rows[:, None] * stride_wn + cols[None, :], mask=mask, other=0.0)
    w = w.to(tl.float32)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
    scale = tl.where(amax > TINY_C, tl.math.div_rn(amax, FP8_MAX_C), 1.0)
    inv = tl.math.div_rn(1.0, scale)  # IEEE-rounded, once per block
    q = tl.minimum(tl.maximum(w * inv, -FP8_MAX_C), FP8_MAX_C).to(tl.float8e4nv)
    tl.store(q_ptr + e * stride_qe + rows[:, None] * stride_qn + cols[None, :], q, mask=mask)
    tl.store(s_ptr + e * stride_se + bn * stride_sn + bk, scale)


def quantize_weight_into(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block: int, fp8_max: float,
                         tiny: float) -> None:
    """Quantise w [N, K] or [E, N, K] (bf16 / fp16 / float32, CUDA) into e4m3 q of its shape and float32 scale
    [(E,) ceil(N/B), ceil(K/B)], both CUDA views whose last dimension is contiguous (any row / expert stride)."""
    if w.stride(-1) != 1:
        w = w.contiguous()
    w3, q3, s3 = (t if t.dim() == 3 else t.unsqueeze(0) for t in (w, q, scale))
    experts, n, k = w3.shape
    if q3.shape != w3.shape or s3.shape != (experts, triton.cdiv(n, block), triton.cdiv(k, block)):
        raise ValueError(f"quantize_weight_into: weight {tuple(w.shape)} does not fit q {tuple(q.shape)} and scale "
                         f"{tuple(scale.shape)} in blocks of {block}")
    if q3.stride(-1) != 1 or s3.stride(-1) != 1:
        raise ValueError("quantize_weight_into: q and scale need a contiguous last dimension")
    if w3.numel() == 0:
        return
    grid = (triton.cdiv(n, block), triton.cdiv(k, block), experts)
    _weight_quant_kernel[grid](w3, q3, s3, n, k, w3.stride(0), w3.stride(1), q3.stride(0), q3.stride(1),
                               s3.stride(0), s3.stride(1), BLOCK=block, FP8_MAX_C=fp8_max, TINY_C=tiny,
                               num_warps=8 if block >= 128 else 4)

"""Triton split-KV decode attention (flash-decoding) over the paged KV buffers.

Stage 1 runs one program per (request, kv head, split): it attends the query heads that
share that kv head (GQA group, padded to BLOCK_H rows for tl.dot) to its split of the
request's slots and writes the normalised partial output and its log-sum-exp (base 2).
Stage 2 runs one program per (request, head) and merges the splits' partial states.

CUDA-graph safety: both grids depend only on the batch size, the head counts and
num_kv_splits, all known on the host. Each program reads its request's KV length from
kv_indptr inside the kernel and sizes its split from it (split_len = cdiv(kv_len, splits)),
so a captured launch replays correctly when the engine rewrites kv_indptr/kv_indices in
place for the next step; splits that get no keys write lse = -inf and drop out of the merge.

FP8 KV cache (KV_FP8): the buffers hold e4m3, converted to q's dtype as they are loaded (exact: every e4m3
value is a bf16 / fp16 / fp32 value); the kv head's K scale folds into the logit scale and its V scale
multiplies the split's normalised output, so the kernel attends over `buffer * scale` (kv_cache.dequantize_kv).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inference_engine.ops import pdl
from inference_engine.ops.triton_ops import gdc_launch_dependents, gdc_wait

_LOG2E = 1.4426950408889634


@triton.jit
def kv_head_scales(qk_scale, k_scale_ptr, v_scale_ptr, kv_head, KV_FP8: tl.constexpr):
    """(logit scale, output scale) for kv head kv_head: an FP8 cache's K scale folds into the logit scale and its V
    scale multiplies the normalised output (the kernels attend over `buffer * scale`); (qk_scale, 1) otherwise."""
    v_scale = 1.0
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)
    return qk_scale, v_scale


@triton.jit
def attend_slots(q, k_ptr, v_ptr, slots_ptr, lo, hi, kv_head, qk_scale, stride_ks, stride_kh, stride_vs, stride_vh,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of the query rows q [R, BLOCK_D] over kv head kv_head's keys and values at the slots
    slots_ptr[lo:hi]: (acc [R, BLOCK_D] unnormalised, l [R] its normaliser, m [R] the running max), logits in base 2
    (qk_scale = sm_scale * log2(e), times the K scale of an FP8 cache); l = 0 for rows of an empty range. Shared by the
    decode and shared-prefix kernels."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    m_i = tl.full([q.shape[0]], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([q.shape[0]], dtype=tl.float32)
    acc = tl.zeros([q.shape[0], BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n  # [BLOCK_N]
        mask_n = pos < hi
        slots = tl.load(slots_ptr + pos, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(
            k_ptr + slots[None, :] * stride_ks + kv_head * stride_kh + offs_d[:, None],
            mask=mask_n[None, :] & mask_d[:, None],
            other=0.0,
        ).to(q.dtype)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [R, BLOCK_N], base-2 logits
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        v = tl.load(
            v_ptr + slots[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        ).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [num_slots, H_kv, D]
    v_ptr,  # [num_slots, H_kv, D]
    kv_indptr_ptr,  # [B + 1]
    kv_indices_ptr,  # [total_kv]
    kv_skip_ptr,  # [B] int32: leading slots of each request not attended here (HAS_SKIP only)
    k_scale_ptr,  # [H_kv] fp32 (KV_FP8 only)
    v_scale_ptr,  # [H_kv] fp32 (KV_FP8 only)
    part_out_ptr,  # [B, H, NUM_SPLITS, BLOCK_D] fp32
    part_lse_ptr,  # [B, H, NUM_SPLITS] fp32
    qk_scale,  # sm_scale * log2(e)
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if USE_PDL:  # see ops/pdl.py: q and the new token's k/v come from the kernels before
        gdc_launch_dependents()
        gdc_wait()

    kv_start = tl.load(kv_indptr_ptr + b).to(tl.int64)
    kv_len = tl.load(kv_indptr_ptr + b + 1).to(tl.int64) - kv_start
    if HAS_SKIP:  # a shared prefix attended by shared_prefix.py: only the slots after it
        skip = tl.load(kv_skip_ptr + b).to(tl.int64)
        kv_start += skip
        kv_len -= skip
    split_len = tl.cdiv(kv_len, NUM_SPLITS)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_h  # [BLOCK_H]
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM

    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :],
        other=0.0,
    )  # [BLOCK_H, BLOCK_D]

    qk_scale, v_scale = kv_head_scales(qk_scale, k_scale_ptr, v_scale_ptr, kv_head, KV_FP8)

    acc, l_i, m_i = attend_slots(q, k_ptr, v_ptr, kv_indices_ptr + kv_start, lo, hi, kv_head, qk_scale, stride_ks,
                                 stride_kh, stride_vs, stride_vh, BLOCK_N, BLOCK_D, HEAD_DIM, PRECISION)

    has_keys = l_i > 0
    out = tl.where(has_keys[:, None], acc * (v_scale / tl.where(has_keys, l_i, 1.0))[:, None], 0.0)
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    row = (b * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split  # [BLOCK_H]
    tl.store(part_out_ptr + row[:, None] * BLOCK_D + offs_d[None, :], out, mask=mask_h[:, None])
    tl.store(part_lse_ptr + row, lse, mask=mask_h)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr,  # [B, H, NUM_SPLITS, BLOCK_D] fp32
    part_lse_ptr,  # [B, H, NUM_SPLITS] fp32
    out_ptr,  # [B, H, D]
    lse_ptr,  # [B, H] fp32: the base-2 log-sum-exp of all the splits (HAS_LSE only)
    stride_ob,
    stride_oh,
    stride_lb,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_LSE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    row = (b * tl.num_programs(1) + head) * NUM_SPLITS + offs_s  # [BLOCK_S]

    lse = tl.load(part_lse_ptr + row, mask=mask_s, other=float("-inf"))  # [BLOCK_S]
    parts = tl.load(part_out_ptr + row[:, None] * BLOCK_D + offs_d[None, :], mask=mask_s[:, None], other=0.0)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no keys at all: every weight is 0, output 0
    w = tl.exp2(lse - m)  # [BLOCK_S]
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)  # [BLOCK_D]
    tl.store(out_ptr + b * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    if HAS_LSE:
        tl.store(lse_ptr + b * stride_lb + head, tl.where(total > 0, m + tl.log2(tl.where(total > 0, total, 1.0)),
                                                          float("-inf")))


def triton_decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    out: torch.Tensor,
    num_kv_splits: int,
    kv_scale: tuple[torch.Tensor, torch.Tensor] | None = None,
    kv_skip: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch both decode stages for q [B, H, D] into out [B, H, D] (arguments already checked); e4m3 buffers come
    with kv_scale = (k_scale, v_scale) [KVH] float32. kv_skip [B] int32: leading slots of each request left out;
    lse [B, H] float32: written with each row's base-2 log-sum-exp."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    group = num_heads // num_kv_heads
    if batch == 0:
        return out
    for name, t in (("q", q), ("k_buffer", k_buffer), ("v_buffer", v_buffer), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous head_dim (stride 1), got strides {t.stride()}")
    on_gpu = q.is_cuda
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_h = max(16, triton.next_power_of_2(group))
    block_n = 64 if on_gpu else 16  # the interpreter runs every lane in numpy: keep tiles small there
    part_out = torch.empty((batch, num_heads, num_kv_splits, block_d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch, num_heads, num_kv_splits), dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    k_scale, v_scale = kv_scale if kv_scale is not None else (part_lse, part_lse)  # unread unless KV_FP8
    _decode_split_kernel[(batch, num_kv_heads, num_kv_splits)](
        q, k_buffer, v_buffer, kv_indptr, kv_indices, part_lse if kv_skip is None else kv_skip, k_scale, v_scale,
        part_out, part_lse,
        sm_scale * _LOG2E,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        GROUP=group, HEAD_DIM=head_dim, NUM_SPLITS=num_kv_splits,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision, KV_FP8=kv_scale is not None,
        HAS_SKIP=kv_skip is not None, **({"num_warps": 4, "num_stages": 2} if on_gpu else {}), **pdl.launch(q.device),
    )  # fmt: skip
    _decode_merge_kernel[(batch, num_heads)](
        part_out, part_lse, out, part_lse if lse is None else lse, out.stride(0), out.stride(1),
        0 if lse is None else lse.stride(0), HEAD_DIM=head_dim, NUM_SPLITS=num_kv_splits,
        BLOCK_S=triton.next_power_of_2(num_kv_splits), BLOCK_D=block_d, HAS_LSE=lse is not None,
        **pdl.launch(q.device),
    )  # fmt: skip
    return out

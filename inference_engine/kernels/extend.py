"""Triton extend (prefill with a cached prefix) attention over the paged KV buffers.

One program per (request, head, block of BLOCK_M query tokens) streams the request's keys
in blocks of BLOCK_N with an online softmax (fp32, base 2). The new tokens' K/V must
already be in the buffers: keys come only from kv_indices, prefix and new alike.

CUDA-graph safety: the grid is (B, H, cdiv(max_q_len, BLOCK_M)) with max_q_len an upper
bound passed by the caller; programs past their request's q_len exit at once, and each
program reads its lengths from qo_indptr/kv_indptr inside the kernel.

FP8 KV cache (KV_FP8): e4m3 keys and values are converted to q's dtype as they are loaded (exact); the kv
head's K scale folds into the logit scale and its V scale multiplies the normalised output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inference_engine.kernels.decode import _LOG2E, kv_head_scales


@triton.jit
def _attend_key_block(
    acc,  # [BLOCK_M, BLOCK_D] fp32
    l_i,  # [BLOCK_M] fp32
    m_i,  # [BLOCK_M] fp32, base 2
    q,  # [BLOCK_M, BLOCK_D]
    q_pos,  # [BLOCK_M]
    start,
    end,
    indices_ptr,  # this request's kv_indices
    k_head_ptr,  # k_buffer at the kv head
    v_head_ptr,  # v_buffer at the kv head
    stride_ks,
    stride_vs,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """Fold keys [start, start + BLOCK_N) into the online-softmax state; CAUSAL masks by end and position."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_n = pos < end
    slots = tl.load(indices_ptr + pos, mask=mask_n, other=0).to(tl.int64)
    k = tl.load(
        k_head_ptr + slots[None, :] * stride_ks + offs_d[:, None], mask=mask_n[None, :] & mask_d[:, None], other=0.0
    ).to(q.dtype)  # [BLOCK_D, BLOCK_N] (an e4m3 cache: converted, exactly)
    s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], base-2 logits
    if CAUSAL:
        s = tl.where(mask_n[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if CAUSAL:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    v = tl.load(
        v_head_ptr + slots[:, None] * stride_vs + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0
    ).to(q.dtype)  # [BLOCK_N, BLOCK_D]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, l_i, m_new


@triton.jit
def _extend_kernel(
    q_ptr,  # [Nq, H, D]
    k_ptr,  # [num_slots, H_kv, D]
    v_ptr,  # [num_slots, H_kv, D]
    out_ptr,  # [Nq, H, D]
    qo_indptr_ptr,  # [B + 1]
    kv_indptr_ptr,  # [B + 1]
    kv_indices_ptr,  # [total_kv]
    k_scale_ptr,  # [H_kv] fp32 (KV_FP8 only)
    v_scale_ptr,  # [H_kv] fp32 (KV_FP8 only)
    qk_scale,  # sm_scale * log2(e)
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    block_m = tl.program_id(2)
    kv_head = head // GROUP

    q_start = tl.load(qo_indptr_ptr + b).to(tl.int64)
    q_len = tl.load(qo_indptr_ptr + b + 1).to(tl.int64) - q_start
    if block_m * BLOCK_M >= q_len:
        return
    kv_start = tl.load(kv_indptr_ptr + b).to(tl.int64)
    kv_len = tl.load(kv_indptr_ptr + b + 1).to(tl.int64) - kv_start
    prefix_len = kv_len - q_len
    qk_scale, v_scale = kv_head_scales(qk_scale, k_scale_ptr, v_scale_ptr, kv_head, KV_FP8)

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the request
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    q_pos = prefix_len + offs_m  # [BLOCK_M] absolute positions

    q = tl.load(
        q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    indices_ptr, k_head_ptr, v_head_ptr = (
        kv_indices_ptr + kv_start, k_ptr + kv_head * stride_kh, v_ptr + kv_head * stride_vh
    )
    # keys before the block's first query position are visible to every row: no masking there
    unmasked_end = (prefix_len + block_m * BLOCK_M) // BLOCK_N * BLOCK_N
    for start in range(0, unmasked_end, BLOCK_N):
        acc, l_i, m_i = _attend_key_block(
            acc, l_i, m_i, q, q_pos, start, unmasked_end, indices_ptr, k_head_ptr, v_head_ptr, stride_ks, stride_vs,
            qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION, CAUSAL=False,
        )  # fmt: skip
    kv_end = tl.minimum(kv_len, prefix_len + (block_m + 1) * BLOCK_M)  # keys past the block's last query stay unread
    for start in range(unmasked_end, kv_end, BLOCK_N):
        acc, l_i, m_i = _attend_key_block(
            acc, l_i, m_i, q, q_pos, start, kv_end, indices_ptr, k_head_ptr, v_head_ptr, stride_ks, stride_vs, qk_scale,
            HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION, CAUSAL=True,
        )  # fmt: skip

    out = acc * (v_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
    tl.store(
        out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


def _block_config(block_d: int, on_gpu: bool) -> tuple[int, int, dict]:
    """(BLOCK_M, BLOCK_N, launch options) for a head size; small tiles for the interpreter (numpy per lane)."""
    if not on_gpu:
        return 16, 16, {}
    if block_d <= 128:
        return 64, 64, {"num_warps": 4, "num_stages": 3}  # best or near-best of 7 configs on H100, bf16 D=128
    return 32, 32, {"num_warps": 4, "num_stages": 2}


def triton_extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    out: torch.Tensor,
    max_q_len: int,
    kv_scale: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Launch the extend kernel for packed q [Nq, H, D] into out [Nq, H, D] (arguments already checked); e4m3
    buffers come with kv_scale = (k_scale, v_scale) [KVH] float32."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    batch = qo_indptr.numel() - 1
    if batch == 0 or max_q_len == 0 or q.shape[0] == 0:
        return out
    for name, t in (("q", q), ("k_buffer", k_buffer), ("v_buffer", v_buffer), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous head_dim (stride 1), got strides {t.stride()}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, launch_options = _block_config(block_d, q.is_cuda)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (batch, num_heads, triton.cdiv(max_q_len, block_m))
    k_scale, v_scale = kv_scale if kv_scale is not None else (qo_indptr, qo_indptr)  # unread unless KV_FP8
    _extend_kernel[grid](
        q, k_buffer, v_buffer, out, qo_indptr, kv_indptr, kv_indices, k_scale, v_scale,
        sm_scale * _LOG2E,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), out.stride(0), out.stride(1),
        GROUP=num_heads // k_buffer.shape[1], HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision, KV_FP8=kv_scale is not None,
        **launch_options,
    )  # fmt: skip
    return out

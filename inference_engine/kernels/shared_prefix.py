"""Triton shared-prefix decode attention: a group's common prefix read once for all of its requests.

GRPO samples n responses per prompt; the n requests hold the prompt's KV in the same pages (the radix cache), and a
plain decode kernel reads those pages n times a step. Decode with shared prefixes is therefore split in two (a
cascade, as flashinfer's MultiLevelCascadeAttentionWrapper does it): the decode kernel attends each request to the
slots after its group's prefix (the suffix) and returns the log-sum-exp of its logits; this kernel then attends
every request of a chunk (up to MEMBERS requests of one group) to the prefix at once, one program per (chunk, kv
head) with the chunk's query heads of that kv head stacked into the rows of one tl.dot, and merges the two partial
states in place: out = (w_p * o_p + w_s * o_s) / (w_p + w_s), w = 2^(lse - max lse).

The prefix's slots are read from the chunk's first member's kv_indices (every member holds the same slots there).
A chunk with prefix length 0 is padding: its programs do nothing, so the grid may be sized for a CUDA graph's
largest batch and the chunks refilled in place before each replay.

FP8 KV cache (KV_FP8): as in decode.py, the K scale folds into the logit scale and the V scale multiplies the
normalised output. LSEs are base 2 of the logits times sm_scale (flashinfer's and decode.py's convention).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inference_engine.kernels.decode import _LOG2E, attend_slots, kv_head_scales


@triton.jit
def _shared_prefix_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [num_slots, H_kv, D]
    v_ptr,  # [num_slots, H_kv, D]
    kv_indptr_ptr,  # [B + 1]
    kv_indices_ptr,  # [total_kv]
    k_scale_ptr,  # [H_kv] fp32 (KV_FP8 only)
    v_scale_ptr,  # [H_kv] fp32 (KV_FP8 only)
    members_ptr,  # [C, MEMBERS] int32: request indices, -1 padding
    prefix_len_ptr,  # [C] int32: the chunk's prefix tokens, 0 for a padding chunk
    out_ptr,  # [B, H, D]: the suffix's output in, the merged output out
    lse_ptr,  # [B, H] fp32: the suffix's base-2 log-sum-exp
    qk_scale,  # sm_scale * log2(e)
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_oh,
    stride_lb,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MEMBERS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    chunk = tl.program_id(0)
    kv_head = tl.program_id(1)
    prefix_len = tl.load(prefix_len_ptr + chunk)
    if prefix_len > 0:
        offs_m = tl.arange(0, BLOCK_M)  # row = member * GROUP + head in the kv head's group
        offs_d = tl.arange(0, BLOCK_D)
        member = offs_m // GROUP
        req = tl.load(members_ptr + chunk * MEMBERS + member, mask=member < MEMBERS, other=-1).to(tl.int64)
        valid = req >= 0
        req = tl.where(valid, req, 0)
        heads = kv_head * GROUP + offs_m % GROUP  # [BLOCK_M]
        mask_d = offs_d < HEAD_DIM
        mask_q = valid[:, None] & mask_d[None, :]
        q = tl.load(q_ptr + req[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_q, other=0.0)  # [BLOCK_M, BLOCK_D]
        leader = tl.load(members_ptr + chunk * MEMBERS).to(tl.int64)
        kv_start = tl.load(kv_indptr_ptr + leader).to(tl.int64)

        qk_scale, v_scale = kv_head_scales(qk_scale, k_scale_ptr, v_scale_ptr, kv_head, KV_FP8)

        acc, l_i, m_i = attend_slots(q, k_ptr, v_ptr, kv_indices_ptr + kv_start, 0, prefix_len, kv_head, qk_scale,
                                     stride_ks, stride_kh, stride_vs, stride_vh, BLOCK_N, BLOCK_D, HEAD_DIM, PRECISION)

        lse_p = m_i + tl.log2(l_i)  # prefix_len > 0: every row has keys
        o_p = acc * (v_scale / l_i)[:, None]
        out_rows = out_ptr + req[:, None] * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        o_s = tl.load(out_rows, mask=mask_q, other=0.0).to(tl.float32)
        lse_s = tl.load(lse_ptr + req * stride_lb + heads, mask=valid, other=0.0)
        m = tl.maximum(lse_p, lse_s)
        w_p = tl.exp2(lse_p - m)
        w_s = tl.exp2(lse_s - m)
        merged = (o_p * w_p[:, None] + o_s * w_s[:, None]) / (w_p + w_s)[:, None]
        tl.store(out_rows, merged.to(out_ptr.dtype.element_ty), mask=mask_q)


def triton_shared_prefix_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    members: torch.Tensor,
    prefix_lens: torch.Tensor,
    sm_scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_scale: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Merge each chunk's prefix attention into out [B, H, D] (its suffix attention, lse [B, H] base 2), in place."""
    num_chunks, num_members = members.shape
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_buffer.shape[1]
    group = num_heads // num_kv_heads
    if num_chunks == 0:
        return out
    on_gpu = q.is_cuda
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = max(16, triton.next_power_of_2(num_members * group))
    block_n = 64 if on_gpu else 16  # the interpreter runs every lane in numpy: keep tiles small there
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    k_scale, v_scale = kv_scale if kv_scale is not None else (lse, lse)  # unread unless KV_FP8
    _shared_prefix_kernel[(num_chunks, num_kv_heads)](
        q, k_buffer, v_buffer, kv_indptr, kv_indices, k_scale, v_scale, members, prefix_lens, out, lse,
        sm_scale * _LOG2E,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        GROUP=group, HEAD_DIM=head_dim, MEMBERS=num_members, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        PRECISION=precision, KV_FP8=kv_scale is not None,
        **({"num_warps": 4, "num_stages": 2} if on_gpu else {}),
    )  # fmt: skip
    return out

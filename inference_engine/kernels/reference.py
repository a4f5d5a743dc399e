"""Pure-torch paged attention: the specification of the triton kernels and their CPU fallback.

KV layout (shared with the engine's KV pool): per layer `k_buffer`, `v_buffer` of shape
[num_slots, num_kv_heads, head_dim], in q's dtype or in e4m3 with float32 `k_scale`, `v_scale` [num_kv_heads]
(an fp8 KV cache: the keys and values are `buffer * scale`, kv_cache.dequantize_kv). Request b owns the slots
`kv_indices[kv_indptr[b]:kv_indptr[b + 1]]`, in order of position. Its new (query) tokens are
`q[qo_indptr[b]:qo_indptr[b + 1]]`; they are the LAST q_len_b of its kv_len_b positions (their
K/V is already written), so query i sits at position kv_len_b - q_len_b + i and attends to
positions <= its own. Decode is the case q_len_b = 1 for every request.
"""

from __future__ import annotations

import math

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)


def check_attention_args(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor | None,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    out: torch.Tensor | None,
    kv_scale: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Check shapes, dtypes and devices (never values, so no host sync); raise ValueError naming the bad one.

    kv_scale = (k_scale, v_scale) [num_kv_heads] float32 goes with e4m3 buffers, and only with them."""
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
    if k_buffer.dim() != 3 or v_buffer.shape != k_buffer.shape:
        raise ValueError(
            f"k_buffer {tuple(k_buffer.shape)} and v_buffer {tuple(v_buffer.shape)} "
            "must both be [num_slots, num_kv_heads, head_dim]"
        )
    fp8 = k_buffer.dtype == torch.float8_e4m3fn
    if fp8 != (kv_scale is not None):
        raise ValueError(f"KV buffers of {k_buffer.dtype} take kv_scale " +
                         ("(k_scale, v_scale) [num_kv_heads] float32" if fp8 else "None"))
    for name, buf in (("k_buffer", k_buffer), ("v_buffer", v_buffer)):
        if buf.dtype != (torch.float8_e4m3fn if fp8 else q.dtype):
            raise ValueError(f"{name} dtype {buf.dtype} differs from q dtype {q.dtype}; cast one of them")
        if buf.device != q.device:
            raise ValueError(f"{name} is on {buf.device} but q is on {q.device}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q dtype {q.dtype} is not supported; use one of {_FLOAT_DTYPES}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_buffer.shape[1]
    for name, scale in zip(("k_scale", "v_scale"), kv_scale or ()):
        if scale.shape != (num_kv_heads,) or scale.dtype != torch.float32 or scale.device != q.device:
            raise ValueError(f"{name} must be [{num_kv_heads}] float32 on {q.device}, got {tuple(scale.shape)} "
                             f"{scale.dtype} on {scale.device}")
    if k_buffer.shape[2] != head_dim:
        raise ValueError(f"q head_dim {head_dim} differs from the KV buffers' head_dim {k_buffer.shape[2]}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    indptrs = [("kv_indptr", kv_indptr)] + ([("qo_indptr", qo_indptr)] if qo_indptr is not None else [])
    for name, t in indptrs + [("kv_indices", kv_indices)]:
        if t.dim() != 1 or t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor, got shape {tuple(t.shape)} dtype {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if kv_indptr.numel() < 1:
        raise ValueError("kv_indptr must have batch_size + 1 entries, got an empty tensor")
    if qo_indptr is not None and qo_indptr.numel() != kv_indptr.numel():
        raise ValueError(
            f"qo_indptr has {qo_indptr.numel()} entries but kv_indptr has {kv_indptr.numel()}; "
            "both must be batch_size + 1"
        )
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(
            f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), "
            f"got ({tuple(out.shape)}, {out.dtype}, {out.device})"
        )


def check_kv_metadata(
    qo_indptr: torch.Tensor | None, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, num_slots: int, num_q_tokens: int
) -> None:
    """Check the index values (reads them on the host: call once per batch, not per layer); raise ValueError."""
    kv_ptr = kv_indptr.tolist()
    q_ptr = qo_indptr.tolist() if qo_indptr is not None else list(range(len(kv_ptr)))
    for name, ptr in (("kv_indptr", kv_ptr), ("qo_indptr", q_ptr)):
        if ptr[0] != 0 or any(b < a for a, b in zip(ptr, ptr[1:])):
            raise ValueError(f"{name} must start at 0 and never decrease, got {ptr}")
    if kv_ptr[-1] > kv_indices.numel():
        raise ValueError(f"kv_indptr ends at {kv_ptr[-1]} but kv_indices has only {kv_indices.numel()} entries")
    if q_ptr[-1] != num_q_tokens:
        raise ValueError(f"qo_indptr ends at {q_ptr[-1]} but q has {num_q_tokens} tokens")
    for b in range(len(kv_ptr) - 1):
        q_len, kv_len = q_ptr[b + 1] - q_ptr[b], kv_ptr[b + 1] - kv_ptr[b]
        if q_len > kv_len:
            raise ValueError(f"request {b} has {q_len} query tokens but only {kv_len} KV slots; "
                             "write KV before attention")
    used = kv_indices[: kv_ptr[-1]]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_slots):
        raise ValueError(f"kv_indices hold slots in [{int(used.min())}, {int(used.max())}], valid is [0, {num_slots})")


def attention_reference(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    kv_scale: tuple[torch.Tensor, torch.Tensor] | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal paged attention of packed queries q [Nq, H, D] over their requests' KV slots -> [Nq, H, D].

    e4m3 buffers come with kv_scale = (k_scale, v_scale) [num_kv_heads] and are dequantised first. lse [Nq, H]
    float32, if given, gets each row's log-sum-exp in base 2 of the logits times scale (the kernels' convention)."""
    check_attention_args(q, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices, out, kv_scale)
    check_kv_metadata(qo_indptr, kv_indptr, kv_indices, k_buffer.shape[0], q.shape[0])
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // k_buffer.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if out is None:
        out = torch.empty_like(q)
    q_ptr, kv_ptr = qo_indptr.tolist(), kv_indptr.tolist()
    for b in range(len(kv_ptr) - 1):
        q_len, kv_len = q_ptr[b + 1] - q_ptr[b], kv_ptr[b + 1] - kv_ptr[b]
        if q_len == 0:
            continue
        slots = kv_indices[kv_ptr[b] : kv_ptr[b + 1]].long()
        qb = q[q_ptr[b] : q_ptr[b + 1]].to(compute_dtype).transpose(0, 1)  # [H, q_len, D]
        kb, vb = k_buffer[slots].to(compute_dtype), v_buffer[slots].to(compute_dtype)  # [kv_len, KVH, D]
        if kv_scale is not None:
            kb, vb = kb * kv_scale[0][:, None].to(compute_dtype), vb * kv_scale[1][:, None].to(compute_dtype)
        kb = kb.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, kv_len, D]
        vb = vb.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, kv_len, D]
        scores = torch.matmul(qb, kb.transpose(1, 2)) * scale  # [H, q_len, kv_len]
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        kv_pos = torch.arange(kv_len, device=q.device)
        scores = scores.masked_fill(kv_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if lse is not None:
            lse[q_ptr[b] : q_ptr[b + 1]] = (torch.logsumexp(scores, dim=-1) / math.log(2)).transpose(0, 1).float()
        out[q_ptr[b] : q_ptr[b + 1]] = torch.matmul(probs, vb).transpose(0, 1).to(q.dtype)  # [q_len, H, D]
    return out


def shared_prefix_reference(
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
    """The specification of kernels/shared_prefix.py: for each chunk c (members[c] request indices, -1 padding;
    prefix_lens[c] tokens, 0 for padding), attend its decode queries q [B, H, D] to the first prefix_lens[c] slots
    of its first member's context and merge that with their suffix attention (out [B, H, D], lse [B, H] base 2) in
    place."""
    group = q.shape[1] // k_buffer.shape[1]
    kv_ptr = kv_indptr.tolist()
    for chunk, n in zip(members.tolist(), prefix_lens.tolist()):
        reqs = [r for r in chunk if r >= 0]
        if n == 0 or not reqs:
            continue
        slots = kv_indices[kv_ptr[reqs[0]] : kv_ptr[reqs[0]] + n].long()
        kb, vb = k_buffer[slots].float(), v_buffer[slots].float()  # [n, KVH, D]
        if kv_scale is not None:
            kb, vb = kb * kv_scale[0][:, None], vb * kv_scale[1][:, None]
        kb, vb = kb.repeat_interleave(group, dim=1), vb.repeat_interleave(group, dim=1)  # [n, H, D]
        index = torch.tensor(reqs, device=q.device)
        scores = torch.einsum("mhd,nhd->mhn", q[index].float(), kb) * sm_scale  # [M, H, n]
        lse_p = torch.logsumexp(scores, dim=-1) / math.log(2)  # [M, H] base 2
        o_p = torch.einsum("mhn,nhd->mhd", torch.softmax(scores, dim=-1), vb)
        lse_s = lse[index]
        m = torch.maximum(lse_p, lse_s)
        w_p, w_s = torch.exp2(lse_p - m)[..., None], torch.exp2(lse_s - m)[..., None]
        out[index] = ((w_p * o_p + w_s * out[index].float()) / (w_p + w_s)).to(out.dtype)
    return out

"""Paged attention for the engine: triton decode/extend kernels on GPU, the torch reference on CPU.

`decode_attention` and `extend_attention` run the triton kernels where triton can run them
(CUDA tensors, or any tensors when the kernels were built under TRITON_INTERPRET=1) and
otherwise `attention_reference`, the pure-torch specification. Layout and causality are
described in `reference.py`. The triton paths never read tensor values on the host, so they
can be captured in CUDA graphs as long as `num_kv_splits` (decode) and `max_q_len` (extend)
are passed explicitly; `check_kv_metadata` validates index values once per batch.
"""

from __future__ import annotations

import functools
import itertools
import importlib.util
import math
import os
from types import ModuleType

import torch

from inference_engine.kernels.reference import (
    attention_reference,
    check_attention_args,
    check_kv_metadata,
    shared_prefix_reference,
)

__all__ = [
    "attention_reference",
    "check_kv_metadata",
    "decode_attention",
    "default_num_kv_splits",
    "extend_attention",
    "runs_triton",
    "shared_prefix_attention",
]

MAX_KV_SPLITS = 64


@functools.cache
def _triton_kernels() -> tuple[ModuleType, ModuleType, ModuleType, bool] | None:
    """(decode module, extend module, shared-prefix module, interpreted?) or None when triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    from triton.runtime import JITFunction

    from inference_engine.kernels import decode, extend, shared_prefix

    return decode, extend, shared_prefix, not isinstance(decode._decode_split_kernel, JITFunction)


def runs_triton(device: torch.device | str) -> bool:
    """Whether the attention functions run the triton kernels (not the torch reference) for tensors on device."""
    device = torch.device(device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on", "yes"):
        return False  # decided without importing triton: CPU engines never pay for it
    if device.type not in ("cpu", "cuda"):
        return False
    kernels = _triton_kernels()
    if kernels is None:
        return False
    interpreted = kernels[3]
    return interpreted or device.type == "cuda"


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_kv_splits(batch_size: int, num_kv_heads: int, device: torch.device | str) -> int:
    """KV splits per request so that batch_size * num_kv_heads * splits covers about two waves of SMs."""
    device = torch.device(device)
    if device.type != "cuda":
        return 2
    programs = 2 * _multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(32, -(-programs // max(1, batch_size * num_kv_heads))))


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    num_kv_splits: int | None = None,
    kv_scale: tuple[torch.Tensor, torch.Tensor] | None = None,
    kv_skip: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per request, q [B, H, D], over its KV slots (its own included) -> [B, H, D].

    e4m3 buffers come with kv_scale = (k_scale, v_scale) [KVH] float32, applied inside the kernel. kv_skip [B]
    int32 leaves out each request's first kv_skip[b] slots (a shared prefix, `shared_prefix_attention`); lse [B, H]
    float32, if given, gets each row's base-2 log-sum-exp (what `shared_prefix_attention` merges with)."""
    check_attention_args(q, k_buffer, v_buffer, None, kv_indptr, kv_indices, out, kv_scale)
    batch = q.shape[0]
    if kv_indptr.numel() != batch + 1:
        raise ValueError(f"decode q has {batch} requests but kv_indptr has {kv_indptr.numel()} entries; "
                         f"need {batch + 1}")
    if num_kv_splits is not None and (not isinstance(num_kv_splits, int) or not 1 <= num_kv_splits <= MAX_KV_SPLITS):
        raise ValueError(f"num_kv_splits must be an int in [1, {MAX_KV_SPLITS}] or None, got {num_kv_splits!r}")
    scale = 1.0 / math.sqrt(q.shape[2]) if sm_scale is None else float(sm_scale)
    if not runs_triton(q.device):
        if kv_skip is not None:  # the slots after each request's skipped prefix, gathered on the host
            ptr, skip = kv_indptr.tolist(), kv_skip.tolist()
            kv_indices = torch.cat([kv_indices[ptr[b] + skip[b]:ptr[b + 1]] for b in range(batch)])
            kv_indptr = torch.tensor([0, *itertools.accumulate(ptr[b + 1] - ptr[b] - skip[b] for b in range(batch))],
                                     dtype=kv_indptr.dtype, device=q.device)
        qo_indptr = torch.arange(batch + 1, dtype=kv_indptr.dtype, device=q.device)
        return attention_reference(q, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices, scale, out, kv_scale,
                                   lse)
    if num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(batch, k_buffer.shape[1], q.device)
    decode = _triton_kernels()[0]
    out = torch.empty_like(q) if out is None else out
    return decode.triton_decode_attention(q, k_buffer, v_buffer, kv_indptr, kv_indices, scale, out, num_kv_splits,
                                          kv_scale, kv_skip, lse)


def shared_prefix_attention(
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
    """Merge shared-prefix attention into a decode batch's suffix attention, in place: chunk c's requests
    members[c] (int32 [C, M], -1 padding) attend to the first prefix_lens[c] (int32 [C], 0 = padding chunk) slots of
    members[c][0]'s context, and out [B, H, D] / lse [B, H] (their attention to the rest, `decode_attention` with
    kv_skip and lse) become the attention to the whole context. See kernels/shared_prefix.py."""
    if not runs_triton(q.device):
        return shared_prefix_reference(q, k_buffer, v_buffer, kv_indptr, kv_indices, members, prefix_lens, sm_scale,
                                       out, lse, kv_scale)
    return _triton_kernels()[2].triton_shared_prefix_attention(q, k_buffer, v_buffer, kv_indptr, kv_indices, members,
                                                               prefix_lens, sm_scale, out, lse, kv_scale)


def extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    max_q_len: int | None = None,
    kv_scale: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of packed new tokens q [Nq, H, D] over cached prefix + themselves -> [Nq, H, D].

    max_q_len bounds every request's new-token count; leave it None only outside CUDA graph
    capture (it is then read from qo_indptr, a host sync). e4m3 buffers come with kv_scale =
    (k_scale, v_scale) [KVH] float32, applied inside the kernel.
    """
    check_attention_args(q, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices, out, kv_scale)
    if max_q_len is not None and (not isinstance(max_q_len, int) or max_q_len < 0):
        raise ValueError("max_q_len must be None or a non-negative int bounding every request's new tokens, "
                         f"got {max_q_len!r}")
    scale = 1.0 / math.sqrt(q.shape[2]) if sm_scale is None else float(sm_scale)
    if not runs_triton(q.device):
        return attention_reference(q, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices, scale, out, kv_scale)
    if max_q_len is None:
        max_q_len = int((qo_indptr[1:] - qo_indptr[:-1]).max()) if qo_indptr.numel() > 1 else 0
    extend = _triton_kernels()[1]
    out = torch.empty_like(q) if out is None else out
    return extend.triton_extend_attention(q, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices, scale, out,
                                          max_q_len, kv_scale)

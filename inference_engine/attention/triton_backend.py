"""Attention through Kiln's triton paged kernels (inference_engine.kernels): split-KV decode, and extend for the rest.

On CUDA the triton kernels run; elsewhere the same calls fall back to the kernels' torch reference,
so this backend also runs (slowly) on CPU. Decode batches use `decode_attention`; a batch with any
multi-token request uses `extend_attention` for all of its requests. `triton_metadata` and
`triton_attention` are also what the flashinfer backend calls for the decode batches it hands to
the triton split-KV kernel (EngineConfig.decode_attention).

Shared-prefix decode (EngineConfig.shared_prefix_decode, attention/shared_prefix.py): the decode kernel skips each
grouped request's prefix and returns its log-sum-exp, and `shared_prefix_attention` attends each chunk of the
group to the prefix once and merges the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference_engine.attention.base import AttentionBackend
from inference_engine.attention.shared_prefix import PrefixChunks
from inference_engine.forward_batch import ForwardBatch
from inference_engine.kernels import decode_attention, default_num_kv_splits, extend_attention, shared_prefix_attention


@dataclass
class TritonMetadata:
    """What the kernels need beyond the ForwardBatch: the split count (decode) or the longest extend."""

    decode: bool
    num_kv_splits: int  # decode only
    max_q_len: int  # extend only
    prefix: PrefixChunks | None = None  # decode only: shared-prefix chunks


def triton_metadata(fb: ForwardBatch, num_kv_heads: int, device: torch.device,
                    prefix: PrefixChunks | None = None) -> TritonMetadata:
    """The kernels' metadata of batch fb; for decode it depends on the batch size only (and the shared-prefix chunks,
    held in fixed buffers under a graph), so a graph captures it."""
    if fb.is_decode:
        return TritonMetadata(True, default_num_kv_splits(fb.batch_size, num_kv_heads, device), 1, prefix)
    return TritonMetadata(False, 1, max(fb.extend_lens))


def triton_attention(q: torch.Tensor, layer, fb: ForwardBatch, md: TritonMetadata) -> torch.Tensor:
    """Attention output [T, H, D] of q [T, H, D] over the pool through the triton kernels (k, v already stored)."""
    k_buf, v_buf = fb.kv_pool.k_buffer[layer.layer_id], fb.kv_pool.v_buffer[layer.layer_id]  # [slots, KVH, D]
    kv_scale = fb.kv_pool.layer_scales(layer.layer_id)  # fp8 cache: applied inside the kernels
    out = torch.empty_like(q)  # [T, H, D]
    if md.decode and md.prefix is not None:  # the suffixes, then each chunk's shared prefix merged in
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        decode_attention(q, k_buf, v_buf, fb.kv_indptr, fb.kv_indices, layer.scaling, out,
                         num_kv_splits=md.num_kv_splits, kv_scale=kv_scale, kv_skip=md.prefix.skip, lse=lse)
        return shared_prefix_attention(q, k_buf, v_buf, fb.kv_indptr, fb.kv_indices, md.prefix.members,
                                       md.prefix.lens, layer.scaling, out, lse, kv_scale)
    if md.decode:
        return decode_attention(q, k_buf, v_buf, fb.kv_indptr, fb.kv_indices, layer.scaling, out,
                                num_kv_splits=md.num_kv_splits, kv_scale=kv_scale)
    return extend_attention(q, k_buf, v_buf, fb.qo_indptr, fb.kv_indptr, fb.kv_indices, layer.scaling, out,
                            max_q_len=md.max_q_len, kv_scale=kv_scale)


class TritonAttentionBackend(AttentionBackend):
    """Paged attention over the pool's [num_slots, KVH, D] buffers, indexed by ForwardBatch.kv_indices."""

    supports_fp8_kv = True

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        chunks = self.decode_chunks(fb)
        fb.attn_metadata = triton_metadata(fb, self.num_kv_heads, self.device,
                                           None if chunks is None else self.shared.on_device(chunks))

    def init_graph_metadata(self, fb: ForwardBatch, capture: bool) -> None:
        if capture:  # the split count depends on the batch size only, so it is fixed per graph
            prefix = self.shared.graph_chunks(fb.batch_size) if self.shared is not None else None
            fb.attn_metadata = triton_metadata(fb, self.num_kv_heads, self.device, prefix)
        elif self.shared is not None:
            self.shared.fill_graph(self.decode_chunks(fb), fb.batch_size)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer, fb: ForwardBatch) -> torch.Tensor:
        return triton_attention(q, layer, fb, fb.attn_metadata)

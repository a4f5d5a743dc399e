"""Attention through flashinfer's paged kernels: decode, paged prefill (cached prefixes) and ragged prefill.

The pool's per-layer buffers [num_slots, KVH, D] are viewed as flashinfer's NHD paged layout
[num_pages, page_size, KVH, D]; this works because page p is exactly slots [p*P, (p+1)*P) and a
request's position j always sits at offset j % P of its page (KVPool.alloc_extend keeps that).
Each batch is planned once (from host copies of its lengths) and the plan serves every layer:
  - decode (one new token per request): BatchDecodeWithPagedKVCacheWrapper;
  - extend where no request has KV yet (fresh prompts): BatchPrefillWithRaggedKVCacheWrapper over
    the new k/v directly;
  - any other extend (cached prefixes, mixed decode + prefill): BatchPrefillWithPagedKVCacheWrapper
    over each request's whole context, the new tokens' k/v written to the pool first.
Decode graphs use one use_cuda_graph=True decode wrapper per captured batch size, re-planned
before each replay into its fixed index buffers, except when the step decodes the same requests as
the step before and none of them starts a page (`ForwardBatch.same_pages`: 15 of 16 steps at page
16): the decode plan depends on the page counts only, so the plan and the page table are kept and
only the last-page lengths are written.

Decode batches of at most `triton_decode_max_bs` requests (EngineConfig.decode_attention; under a graph,
the captured size decides) skip flashinfer and run Kiln's triton split-KV kernel through the triton
backend's own functions: it sizes its splits from each request's length inside the kernel, so it needs
no plan, and at small batches it beats flashinfer's graph decode, which pads its split grid to the
whole GPU and then merges (docs/benchmarks.md). Prefill and extend batches always run flashinfer.

FP8 KV cache: the wrappers are planned with kv_data_type float8_e4m3fn (q and output stay in the model dtype).
flashinfer takes one k_scale / v_scale per call, the pool has one per kv head, so the K scale is folded into
q (each query head times its kv head's scale) and the V scale into the output (`_scaled`); both are device
tensors read inside the step, so graphs see new scales without a recapture. Every extend runs the paged
wrapper over the pool (no ragged path over the new tokens' unquantised k/v), so a prompt attends to the same
e4m3 values whether it was computed now or found in the radix cache.

Shared-prefix decode (EngineConfig.shared_prefix_decode, attention/shared_prefix.py): the decode wrapper is planned
over each request's pages after its group's prefix (whole pages: a prefix ends at a tree node) and returns its
log-sum-exp; `shared_prefix_attention` then attends each chunk of the group to the prefix once and merges the two.
Under graphs the chunks live in fixed buffers, refilled with the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference_engine.attention.base import AttentionBackend
from inference_engine.attention.shared_prefix import PrefixChunks
from inference_engine.attention.triton_backend import TritonMetadata, triton_attention, triton_metadata
from inference_engine.forward_batch import ForwardBatch
from inference_engine.kernels import shared_prefix_attention
from kiln_common.tensors import to_device

WORKSPACE_BYTES = 128 * 2**20  # flashinfer's recommended float workspace, shared by all wrappers
PREFILL_BACKEND = "fa2"  # one well-known JIT build on every architecture


@dataclass
class PageTable:
    """A batch's contexts in flashinfer's paged form."""

    indptr: torch.Tensor  # [B+1] int32, host: page offsets
    indices: torch.Tensor  # [num_pages] int32, device: page ids in position order
    last_page_len: torch.Tensor  # [B] int32, host: tokens in each request's last page


@dataclass
class FlashInferMetadata:
    """The planned wrapper of this batch and how to call it."""

    kind: str  # "decode", "ragged" or "paged"
    wrapper: object
    prefix: PrefixChunks | None = None  # decode only: shared-prefix chunks (on the device)


def page_table(fb: ForwardBatch, page_size: int, skip: torch.Tensor | None = None) -> PageTable:
    """Page ids of each request's context, gathered from fb.kv_indices on the device (no host sync); with skip
    ([B] host int32, whole pages), each request's pages after its first skip[b] tokens."""
    seq_lens = fb.seq_lens_cpu  # [B] host
    start = fb.kv_indptr[:-1]
    if skip is not None:
        if bool((skip % page_size).any()):
            raise ValueError(f"a shared prefix must be whole pages of {page_size}, got {skip.tolist()}")
        seq_lens = seq_lens - skip
        start = start + to_device(skip, start.device)
    num_pages = (seq_lens + page_size - 1) // page_size
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), num_pages.cumsum(0)])
    total = int(indptr[-1])
    dev = fb.kv_indices.device
    pages_d = num_pages.to(dev, non_blocking=True)
    first = start.repeat_interleave(pages_d, output_size=total)  # each page's request start
    page_no = torch.arange(total, device=dev) - indptr[:-1].to(dev, non_blocking=True).repeat_interleave(
        pages_d, output_size=total)
    indices = (fb.kv_indices[first + page_no * page_size] // page_size).to(torch.int32)
    last = ((seq_lens - 1) % page_size + 1).to(torch.int32)
    return PageTable(indptr.to(torch.int32), indices, last)


class FlashInferAttentionBackend(AttentionBackend):
    """flashinfer decode / prefill wrappers, planned once per batch (CUDA, bfloat16 or float16 only)."""

    supports_fp8_kv = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device,
                 page_size: int = 1, dtype: torch.dtype = torch.bfloat16, triton_decode_max_bs: int = 0,
                 decode_tensor_cores: bool = False, shared_prefix_decode: bool = False):
        super().__init__(num_heads, num_kv_heads, head_dim, device, page_size, dtype, triton_decode_max_bs,
                         decode_tensor_cores, shared_prefix_decode)
        if torch.device(device).type != "cuda":
            raise ValueError(f"attention_backend 'flashinfer' needs a CUDA device, got {device!r}; "
                             "use 'torch' or 'triton'")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"attention_backend 'flashinfer' supports dtype bfloat16 or float16, got {dtype}")
        try:
            import flashinfer
        except ImportError as exc:
            raise ValueError("attention_backend 'flashinfer' needs the flashinfer-python package "
                             "(pip install 'kiln[gpu]')") from exc
        self.fi = flashinfer
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.decode_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                          use_tensor_cores=decode_tensor_cores)
        self.paged_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                          backend=PREFILL_BACKEND)
        self.ragged_wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD",
                                                                            backend=PREFILL_BACKEND)
        self.graph_wrappers: dict[int, object] = {}
        self.graph_last_page_len: dict[int, torch.Tensor] = {}  # [bs] int32, each wrapper's buffer
        self.graph_planned_bs: int | None = None  # the graph wrapper whose plan the shared index buffer holds
        self.sm_scale = head_dim ** -0.5
        self.planned = torch.cuda.Event()  # recorded after each plan's copies (see _plan)

    def _plan(self, wrapper, *args, **kwargs) -> None:
        """wrapper.plan(...), once the previous plan's copy out of its pinned buffer has run.

        A plan fills a pinned host buffer and queues its copy to the device; with overlap scheduling the
        host plans step k+1 while step k is queued, so it must not refill that buffer before the copy ran."""
        self.planned.synchronize()
        wrapper.plan(*args, **kwargs)
        self.planned.record(torch.cuda.current_stream(self.device))

    def _plan_decode(self, wrapper, pages: PageTable, kv_dtype: torch.dtype) -> None:
        self._plan(wrapper, pages.indptr, pages.indices, pages.last_page_len, self.num_heads, self.num_kv_heads,
                   self.head_dim, self.page_size, q_data_type=self.dtype, kv_data_type=kv_dtype,
                   sm_scale=self.sm_scale)

    def decodes_with_triton(self, batch_size: int) -> bool:
        """Whether a decode batch of batch_size requests (a graph's captured size) runs the triton split-KV kernel."""
        return batch_size <= self.triton_decode_max_bs

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        extend_lens = torch.tensor(fb.extend_lens, dtype=torch.int32)
        chunks = self.decode_chunks(fb)
        prefix = None if chunks is None else self.shared.on_device(chunks)
        if fb.is_decode and self.decodes_with_triton(fb.batch_size):
            fb.attn_metadata = triton_metadata(fb, self.num_kv_heads, self.device, prefix)
            return
        kv_dtype = fb.kv_pool.dtype
        if fb.is_decode:
            pages = page_table(fb, self.page_size, None if chunks is None else chunks.skip)
            self._plan_decode(self.decode_wrapper, pages, kv_dtype)
            fb.attn_metadata = FlashInferMetadata("decode", self.decode_wrapper, prefix)
            return
        qo_indptr = torch.cat([torch.zeros(1, dtype=torch.int32), extend_lens.cumsum(0, dtype=torch.int32)])
        if not fb.kv_pool.quantized and torch.equal(fb.seq_lens_cpu, extend_lens.long()):  # no earlier KV
            self._plan(self.ragged_wrapper, qo_indptr, qo_indptr, self.num_heads, self.num_kv_heads, self.head_dim,
                       causal=True, sm_scale=self.sm_scale, q_data_type=self.dtype, kv_data_type=self.dtype)
            fb.attn_metadata = FlashInferMetadata("ragged", self.ragged_wrapper)
            return
        pages = page_table(fb, self.page_size)
        self._plan(self.paged_wrapper, qo_indptr, pages.indptr, pages.indices, pages.last_page_len, self.num_heads,
                   self.num_kv_heads, self.head_dim, self.page_size, causal=True, sm_scale=self.sm_scale,
                   q_data_type=self.dtype, kv_data_type=kv_dtype)
        fb.attn_metadata = FlashInferMetadata("paged", self.paged_wrapper)

    def init_cuda_graph_state(self, max_bs: int, max_context: int) -> None:
        max_pages = max_bs * -(-max_context // self.page_size)
        # shared: one replay at a time
        self.graph_indices = torch.zeros(max_pages, dtype=torch.int32, device=self.device)
        self.graph_wrappers, self.graph_last_page_len, self.graph_planned_bs = {}, {}, None
        super().init_cuda_graph_state(max_bs, max_context)

    def init_graph_metadata(self, fb: ForwardBatch, capture: bool) -> None:
        bs = fb.batch_size
        prefix = self.shared.graph_chunks(bs) if self.shared is not None and capture else None
        if self.decodes_with_triton(bs):  # fixed per batch size: the kernel reads the graph's kv_indptr / kv_indices
            if capture:
                fb.attn_metadata = triton_metadata(fb, self.num_kv_heads, self.device, prefix)
            elif self.shared is not None:
                self.shared.fill_graph(self.decode_chunks(fb), bs)
            return
        if capture:
            self.graph_last_page_len[bs] = torch.zeros(bs, dtype=torch.int32, device=self.device)
            self.graph_wrappers[bs] = self.fi.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self.decode_tensor_cores,
                paged_kv_indptr_buffer=torch.zeros(bs + 1, dtype=torch.int32, device=self.device),
                paged_kv_indices_buffer=self.graph_indices,
                paged_kv_last_page_len_buffer=self.graph_last_page_len[bs])
            fb.attn_metadata = FlashInferMetadata("decode", self.graph_wrappers[bs], prefix)
        elif fb.same_pages and self.graph_planned_bs == bs:  # same pages, each one token longer: keep the plan
            last = ((fb.seq_lens_cpu - 1) % self.page_size + 1).to(torch.int32)  # [bs]
            self.graph_last_page_len[bs].copy_(to_device(last, self.device))
            if self.shared is not None:  # the same requests in the same order: the same shared-prefix chunks too
                self.shared.count_again()
            return
        chunks = None if capture else self.decode_chunks(fb)
        if self.shared is not None and not capture:
            self.shared.fill_graph(chunks, bs)
        pages = page_table(fb, self.page_size, None if chunks is None else chunks.skip)
        self._plan_decode(self.graph_wrappers[bs], pages, fb.kv_pool.dtype)
        self.graph_planned_bs = None if capture else bs

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer, fb: ForwardBatch) -> torch.Tensor:
        md: FlashInferMetadata | TritonMetadata = fb.attn_metadata
        if isinstance(md, TritonMetadata):
            return triton_attention(q, layer, fb, md)
        k_buf, v_buf = fb.kv_pool.k_buffer[layer.layer_id], fb.kv_pool.v_buffer[layer.layer_id]  # k, v stored
        if md.kind == "ragged":
            return md.wrapper.run(q, k.contiguous(), v.contiguous())  # v is a strided view of the qkv output
        paged_shape = (-1, self.page_size, self.num_kv_heads, self.head_dim)  # [num_pages, P, KVH, D]
        scales = fb.kv_pool.layer_scales(layer.layer_id)
        if md.prefix is not None:  # the suffixes (planned so), then each chunk's shared prefix merged in
            paged = (k_buf.view(paged_shape), v_buf.view(paged_shape))
            out, lse = md.wrapper.run(q if scales is None else scale_by_kv_head(q, scales[0]), paged, return_lse=True)
            if scales is not None:
                out = scale_by_kv_head(out, scales[1])
            return shared_prefix_attention(q, k_buf, v_buf, fb.kv_indptr, fb.kv_indices, md.prefix.members,
                                           md.prefix.lens, self.sm_scale, out, lse, scales)
        if scales is None:
            return md.wrapper.run(q, (k_buf.view(paged_shape), v_buf.view(paged_shape)))
        k_scale, v_scale = scales
        out = md.wrapper.run(scale_by_kv_head(q, k_scale), (k_buf.view(paged_shape), v_buf.view(paged_shape)))
        return scale_by_kv_head(out, v_scale)


def scale_by_kv_head(x: torch.Tensor, kv_scale: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] times the float32 scale [KVH] of each query head's kv head (heads grouped per kv head, as GQA
    lays them out), multiplied in float32 and rounded to x's dtype once; one kernel (the scale broadcast over the
    group, no repeated copy of it), as each decode step runs this twice per layer."""
    grouped = x.unflatten(1, (kv_scale.shape[0], -1))   # [T, KVH, G, D], a view
    out = torch.empty(grouped.shape, dtype=x.dtype, device=x.device)
    torch.mul(grouped, kv_scale[None, :, None, None], out=out)
    return out.flatten(1, 2)

"""Decode steps as CUDA graphs: capture the model once per batch size, replay with the batch padded to the next size.

The graphs read static buffers (token ids, positions, output slots, lengths, KV indices) that
`replay` refills with each step's values; padding requests have one token of context in slot 0
(the pool's padding page) and write their K/V there. Attention metadata lives in backend-owned
fixed buffers re-planned before every replay (`AttentionBackend.init_graph_metadata`). The graph
also holds the LM head (float32 logits of every row) and greedy sampling (argmax and its log-prob; at
batch 1 the LM head's GEMV reduces its blocks toward them, `ops.linear_greedy`): an all-greedy batch
takes its tokens from the graph, any other batch samples from its logits
right after it (`sampler.sample`, batched on the device).

On a CPU device nothing is captured and `replay` runs the model on the same static buffers, so
the padding and buffer logic is exercised by CPU tests too.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import torch

from inference_engine.attention.base import AttentionBackend
from inference_engine.forward_batch import ForwardBatch
from inference_engine.kv_cache import KVPool

log = logging.getLogger(__name__)
_warmup_streams: dict[torch.device, torch.cuda.Stream] = {}


def warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream per device on which every capture warms up. A new stream per capture would cost memory
    on each re-capture: torch keeps a cuBLAS workspace per (handle, stream) for the life of the process."""
    if device not in _warmup_streams:
        _warmup_streams[device] = torch.cuda.Stream(device)
    return _warmup_streams[device]


class ForwardOutput(NamedTuple):
    """A forward pass's hidden states; a decode graph's replay also gives every row's logits and greedy pick."""

    hidden: torch.Tensor  # [T, hidden]
    logits: torch.Tensor | None = None  # [B, vocab] float32 (decode graphs)
    greedy_tokens: torch.Tensor | None = None  # [B] int64 argmax
    greedy_logprobs: torch.Tensor | None = None  # [B] float32 log-prob of the argmax (T = 1)

    def rows(self, index: torch.Tensor | slice) -> "ForwardOutput":
        """The same outputs for rows `index` of every tensor."""
        return ForwardOutput(*(None if t is None else t[index] for t in self))


def capture_batch_sizes(max_bs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 16 up to max_bs (max_bs itself always included)."""
    sizes = [bs for bs in (1, 2, 4, 8) if bs < max_bs] + list(range(16, max_bs, 16)) + [max_bs]
    return sorted(set(sizes))


class CudaGraphRunner:
    """Captured decode forward passes of a model for batch sizes up to max_bs, contexts up to max_context."""

    def __init__(self, model: torch.nn.Module, attn_backend: AttentionBackend, kv_pool: KVPool, max_bs: int,
                 max_context: int, device: torch.device):
        self.model, self.attn_backend, self.kv_pool, self.device = model, attn_backend, kv_pool, device
        self.batch_sizes = capture_batch_sizes(max_bs)
        self.max_bs = max_bs

        def ints(n: int) -> torch.Tensor:
            return torch.zeros(n, dtype=torch.int64, device=device)

        self.input_ids, self.positions, self.out_cache_loc = ints(max_bs), ints(max_bs), ints(max_bs)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int64, device=device)
        self.qo_indptr = torch.arange(max_bs + 1, dtype=torch.int64, device=device)
        self.kv_indptr = torch.arange(max_bs + 1, dtype=torch.int64, device=device)
        self.kv_indices = ints(max_bs * max_context)  # [max_bs * max_context] slots, zeros = the padding slot
        self.batches: dict[int, ForwardBatch] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, ForwardOutput] = {}
        attn_backend.init_cuda_graph_state(max_bs, max_context)
        self.capture()

    def _static_batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:bs], positions=self.positions[:bs], out_cache_loc=self.out_cache_loc[:bs],
            qo_indptr=self.qo_indptr[:bs + 1], kv_indptr=self.kv_indptr[:bs + 1], kv_indices=self.kv_indices,
            seq_lens=self.seq_lens[:bs], seq_lens_cpu=torch.ones(bs, dtype=torch.int64), extend_lens=[1] * bs,
            kv_pool=self.kv_pool, attn_backend=self.attn_backend)

    def capture(self) -> None:
        """Capture one graph per batch size, largest first, all in one memory pool."""
        start = time.perf_counter()
        cuda = self.device.type == "cuda"
        pool = torch.cuda.graph_pool_handle() if cuda else None
        for bs in reversed(self.batch_sizes):
            fb = self._static_batch(bs)
            self.attn_backend.init_graph_metadata(fb, capture=True)
            self.batches[bs] = fb
            if not cuda:
                continue
            side = warmup_stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: triton / JIT compilation and autotuning happen outside capture
                for _ in range(2):
                    self._step(fb)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self._step(fb)
            self.graphs[bs] = graph
        if cuda:
            torch.cuda.synchronize(self.device)
        log.info("captured decode graphs for batch sizes %s in %.1f s", self.batch_sizes, time.perf_counter() - start)

    def _step(self, fb: ForwardBatch) -> ForwardOutput:
        """What a graph computes: hidden states, float32 logits and the greedy token with its log-prob, per row."""
        hidden = self.model(fb)  # [bs, hidden]
        return ForwardOutput(hidden, *self.model.logits_and_greedy(hidden))  # logits [bs, vocab] float32

    def can_run(self, fb: ForwardBatch) -> bool:
        """Whether fb is a decode batch a captured graph covers."""
        return fb.is_decode and fb.batch_size <= self.max_bs

    def replay(self, fb: ForwardBatch) -> ForwardOutput:
        """Outputs of decode batch fb's B rows (KV written to the pool), through the graph of the next size up."""
        b = fb.batch_size
        bs = next(size for size in self.batch_sizes if size >= b)
        total = int(fb.seq_lens_cpu.sum())
        for static, value, pad in ((self.input_ids, fb.input_ids, 0), (self.positions, fb.positions, 0),
                                   (self.out_cache_loc, fb.out_cache_loc, 0), (self.seq_lens, fb.seq_lens, 1)):
            static[:b].copy_(value)
            static[b:bs].fill_(pad)
        self.kv_indptr[:b + 1].copy_(fb.kv_indptr)
        self.kv_indptr[b + 1:bs + 1] = torch.arange(total + 1, total + 1 + bs - b, device=self.device)
        self.kv_indices[:total].copy_(fb.kv_indices)
        self.kv_indices[total:total + bs - b].zero_()
        static_fb = self.batches[bs]
        static_fb.seq_lens_cpu = torch.cat([fb.seq_lens_cpu, torch.ones(bs - b, dtype=torch.int64)])
        static_fb.same_pages = fb.same_pages
        shared = fb.prefix_keys is not None  # padding requests share no prefix
        static_fb.prefix_keys = fb.prefix_keys + [-1] * (bs - b) if shared else None
        static_fb.prefix_lens = fb.prefix_lens + [0] * (bs - b) if shared else None
        self.attn_backend.init_graph_metadata(static_fb, capture=False)
        if bs in self.graphs:
            self.graphs[bs].replay()
            return self.outputs[bs].rows(slice(0, b))
        return self._step(static_fb).rows(slice(0, b))

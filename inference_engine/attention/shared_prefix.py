"""Shared-prefix decode (EngineConfig.shared_prefix_decode): which requests of a decode batch share a prefix.

A request's first `prefix_len` tokens sit in the slots of its radix-tree path, up to its node `last_node`
(KVManager: admitted with the matched prefix, switched to the tree's slots when its prefill's pages were cached
first by another request). Requests with the same `last_node` therefore hold exactly the same slots for those
tokens: GRPO's n samples of one prompt do, once the first of them has cached the prompt. `prefix_chunks` groups a
decode batch's requests by that node (the ForwardBatch's `prefix_keys` / `prefix_lens`, filled by the
BatchBuilder) and cuts each group of two or more into chunks of at most `members` requests; the backends then
attend each request to its slots after the prefix (decode with `kv_skip`) and each chunk to its prefix once
(`kernels.shared_prefix_attention`), which merges the two.

Grouping by the node is exact, not a heuristic: a wrong grouping would be a wrong answer, not a slow one. It
can miss sharing (two requests whose nodes differ but whose paths overlap share nothing here), never invent it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln_common.tensors import to_device

MIN_PREFIX_TOKENS = 32  # a shorter common prefix is left to the decode kernel


@dataclass
class PrefixChunks:
    """A decode batch's shared-prefix chunks: on the host from `prefix_chunks`, on the device for the kernels (fixed
    buffers under a CUDA graph)."""

    members: torch.Tensor  # [C, M] int32 request indices in the batch, -1 padding
    lens: torch.Tensor  # [C] int32 prefix tokens of each chunk (0: a padding chunk)
    skip: torch.Tensor  # [B] int32 each request's prefix tokens attended by its chunk (0: none)


def chunk_members(num_heads: int, num_kv_heads: int) -> int:
    """Requests per chunk: the chunk's query heads of one kv head are the rows of one tl.dot, at most 64 of them."""
    return max(1, min(8, 64 // (num_heads // num_kv_heads)))


def prefix_chunks(keys: list[int], lens: list[int], members: int, min_tokens: int = MIN_PREFIX_TOKENS
                  ) -> PrefixChunks | None:
    """Chunks of the requests whose key (their prefix's tree node) two or more of them share, prefixes of at least
    min_tokens tokens; None when there are none. lens[i] is request i's prefix length (its node's depth)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (key, n) in enumerate(zip(keys, lens)):
        if n >= min_tokens:  # keyed by the length too: a node's depth never changes (a split keeps the node object
            groups.setdefault((key, n), []).append(i)  # as the lower part), but the grouping need not rely on it
    rows: list[list[int]] = []
    chunk_lens: list[int] = []
    skip = [0] * len(keys)
    for reqs in groups.values():
        if len(reqs) < 2:
            continue
        for start in range(0, len(reqs), members):
            part = reqs[start:start + members]
            if len(part) < 2:  # a lone tail reads its prefix itself
                continue
            rows.append(part + [-1] * (members - len(part)))
            chunk_lens.append(lens[part[0]])
            for i in part:
                skip[i] = lens[i]
    if not rows:
        return None
    return PrefixChunks(torch.tensor(rows, dtype=torch.int32), torch.tensor(chunk_lens, dtype=torch.int32),
                        torch.tensor(skip, dtype=torch.int32))


class SharedPrefixState:
    """A backend's shared-prefix metadata: fresh device tensors per eager batch, fixed buffers under CUDA graphs."""

    def __init__(self, num_heads: int, num_kv_heads: int, device: torch.device):
        self.members = chunk_members(num_heads, num_kv_heads)
        self.device = device
        self.graph: PrefixChunks | None = None  # CUDA graphs' fixed buffers (init_graph_state)
        # decode request-steps seen and those read through a chunk (Engine.metrics: how often it engaged)
        self.requests_total = self.grouped_total = 0
        self._last = (0, 0)

    def chunks(self, fb) -> PrefixChunks | None:
        """The chunks of decode batch fb (None without prefix keys or sharing); counted."""
        if fb.prefix_keys is None:
            return None
        chunks = prefix_chunks(fb.prefix_keys, fb.prefix_lens, self.members)
        real = len(fb.prefix_keys) - fb.prefix_keys.count(-1)  # a graph's padding requests have key -1
        self._last = (real, 0 if chunks is None else int((chunks.skip > 0).sum()))
        self.count_again()
        return chunks

    def count_again(self) -> None:
        """Count a step that reuses the last chunks (a graph replay that keeps its plan)."""
        self.requests_total += self._last[0]
        self.grouped_total += self._last[1]

    def on_device(self, chunks: PrefixChunks) -> PrefixChunks:
        """Host chunks copied to the device in one transfer."""
        c, b = chunks.lens.numel(), chunks.skip.numel()
        flat = to_device(torch.cat([chunks.members.flatten(), chunks.lens, chunks.skip]), self.device)
        members, lens, skip = flat.split([c * self.members, c, b])
        return PrefixChunks(members.view(c, self.members), lens, skip)

    def init_graph_state(self, max_bs: int) -> None:
        """Buffers for graphs of up to max_bs requests: at most max_bs // 2 chunks (two requests or more each)."""
        self.graph = PrefixChunks(torch.full((_slots(max_bs), self.members), -1, dtype=torch.int32, device=self.device),
                                  torch.zeros(_slots(max_bs), dtype=torch.int32, device=self.device),
                                  torch.zeros(max_bs, dtype=torch.int32, device=self.device))

    def graph_chunks(self, bs: int) -> PrefixChunks:
        """The fixed buffers a graph of bs requests captures (every chunk slot a graph of bs could need)."""
        self.fill_graph(None, bs)  # no chunk left from another batch size while the capture warms up
        return PrefixChunks(self.graph.members[:_slots(bs)], self.graph.lens[:_slots(bs)], self.graph.skip[:bs])

    def fill_graph(self, chunks: PrefixChunks | None, bs: int) -> None:
        """Write a replay's chunks into the buffers of the graph of bs requests (no chunk: all padding)."""
        slots = _slots(bs)
        padded = PrefixChunks(torch.full((slots, self.members), -1, dtype=torch.int32),
                              torch.zeros(slots, dtype=torch.int32), torch.zeros(bs, dtype=torch.int32))
        if chunks is not None:
            c, b = chunks.lens.numel(), chunks.skip.numel()
            padded.members[:c], padded.lens[:c], padded.skip[:b] = chunks.members, chunks.lens, chunks.skip
        padded = self.on_device(padded)
        for buffer, value in ((self.graph.members, padded.members), (self.graph.lens, padded.lens),
                              (self.graph.skip, padded.skip)):
            buffer[:len(value)].copy_(value)


def _slots(bs: int) -> int:
    """Chunk slots a decode batch of bs requests can need (each chunk has two requests or more)."""
    return max(1, bs // 2)

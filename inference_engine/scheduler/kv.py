"""Request KV: each running request's row in req_to_token, its slots in the KV pool, its prefix in the radix cache.

A request is admitted with the longest cached prefix it matched, whose slots it shares and keeps locked
through its tree node. Every step allocates slots for its new tokens: a decode inside its open page takes
the next slot; otherwise the pool allocates page-wise, evicting the radix cache (LRU) when short. With
prefix sharing on, the full pages a prefill chunk completes go into the tree right away, locked by the
request, so that later requests match them while it still runs. On release the computed full pages go to
the tree and the rest back to the pool; KV computed before the last flush (an older `epoch`) is never cached.
"""

from __future__ import annotations

import torch

from inference_engine.config import EngineConfig
from inference_engine.model_runner import ModelRunner
from inference_engine.radix_cache import RadixCache, TreeNode
from inference_engine.request import Req
from kiln_common.tensors import to_device


class KVManager:
    """Allocates, shares with the radix cache and frees the KV of the engine's requests."""

    def __init__(self, config: EngineConfig, runner: ModelRunner, tree: RadixCache):
        self.page_size = config.page_size
        self.share_prefixes = not (config.disable_radix_cache or config.disable_prefix_sharing)
        self.kv_pool = runner.kv_pool
        self.req_to_token = runner.req_to_token
        self.device = runner.device
        self.tree = tree

    def admit(self, req: Req, prefix: torch.Tensor, node: TreeNode, n: int, reserve: int) -> bool:
        """Give req a row, its cached prefix (locked through node) and slots for its next n tokens.

        False, holding nothing, when no row is free or the pool (with what eviction can free) has fewer
        than n + reserve slots."""
        row = self.req_to_token.alloc()
        if row is None:
            return False
        self.tree.inc_lock(node)
        if self.kv_pool.available_size() + self.tree.evictable_size < n + reserve:
            self.tree.dec_lock(node)
            self.req_to_token.free(row)
            return False
        req.row, req.kv_len, req.prefix_len, req.last_node = row, len(prefix), len(prefix), node
        req.last_slot = int(prefix[-1]) if len(prefix) else -1
        req.slots = prefix.tolist()
        req.cache_epoch = self.tree.epoch
        if len(prefix):
            self.req_to_token.req_to_token[row, :len(prefix)] = to_device(prefix, self.device)
        if not self.extend(req, n):
            self.release(req, cache=False)
            return False
        return True

    def extend(self, req: Req, n: int) -> bool:
        """Allocate KV slots for req's next n tokens (evicting cache if needed); False if the pool is full."""
        if n == 1 and req.kv_len % self.page_size:  # a decode inside its open page: the next slot
            req.last_slot += 1
            req.new_slots = [req.last_slot]
            req.slots.append(req.last_slot)
            return True
        slots = self.kv_pool.alloc_extend(req.kv_len, n, req.last_slot)
        if slots is None:
            self.tree.evict(n + self.page_size)
            slots = self.kv_pool.alloc_extend(req.kv_len, n, req.last_slot)
        if slots is None:
            return False
        req.new_slots = slots.tolist()  # recorded in req_to_token by BatchBuilder.forward_batch, for the whole batch
        req.slots.extend(req.new_slots)
        req.last_slot = req.new_slots[-1]
        return True

    def cache_prefills(self, prefills: list[tuple[Req, int]]) -> None:
        """With prefix sharing on: insert the full pages that this step's prefill chunks (request, chunk start)
        completed, locked by their requests."""
        if not self.share_prefixes:
            return
        for req, first in prefills:
            if req.row is not None:  # still running (finished requests cached their whole sequence)
                self._cache_prefill(req, first)

    def _cache_prefill(self, req: Req, first: int) -> None:
        """Insert the page-aligned prefix a prefill chunk (starting at position first) completed, locked by req."""
        page = self.page_size
        start, end = req.prefix_len, req.kv_len // page * page
        if end <= start or start != first // page * page or req.cache_epoch != self.tree.epoch:
            return  # no new full page, a decode came in between, or the KV predates a flush
        own = torch.tensor(req.slots[start:end], dtype=torch.int64)  # [end - start] this request's slots
        already, node, tree_slots = self.tree.insert_below(req.last_node, req.tokens(start, end), own)
        if already:  # another request cached these pages first: switch to its slots and free ours
            self.kv_pool.free_slots(own[:already])
            self.req_to_token.req_to_token[req.row, start:start + already] = to_device(tree_slots, self.device)
            req.slots[start:start + already] = tree_slots.tolist()
            if start + already == req.kv_len:
                req.last_slot = int(tree_slots[-1])
        self.tree.inc_lock(node)
        self.tree.dec_lock(req.last_node)
        req.last_node, req.prefix_len = node, end

    def release(self, req: Req, cache: bool) -> None:
        """Free req's row and KV: computed full pages go to the radix cache (if cache), the rest back to the pool.

        Slots allocated past kv_len (a step that failed, or a lookahead step given back) are freed too."""
        if req.row is None:
            return
        slots = torch.tensor(req.slots, dtype=torch.int64)  # host copy: no wait for the device
        node = req.last_node
        if cache and not self.tree.disabled and req.cache_epoch == self.tree.epoch:
            aligned = req.kv_len // self.page_size * self.page_size
            already = self.tree.insert(req.tokens(0, req.kv_len), slots[:req.kv_len])
            self.kv_pool.free_slots(slots[req.prefix_len:max(already, req.prefix_len)])
            self.kv_pool.free_slots(slots[aligned:])
        else:
            self.kv_pool.free_slots(slots[req.prefix_len:])
        self.tree.dec_lock(node)
        self.req_to_token.free(req.row)
        req.row, req.kv_len, req.prefix_len, req.last_node, req.last_slot = None, 0, 0, None, -1
        req.slots = []

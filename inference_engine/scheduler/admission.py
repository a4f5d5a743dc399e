"""Admission: which requests run each step, and with how many new tokens.

Running requests go first (oldest first): one token for a decode, a chunk of the `chunked_prefill_size`
budget for a prefill. When the KV pool runs dry the radix cache is evicted (LRU) and, if that is not
enough, the newest running requests are retracted: their computed KV is handed to the radix cache and
they re-enter the queue with prompt + generated tokens, keeping their sampling state. Then waiting
requests are admitted (fcfs, or longest cached prefix first with `lpm`) while the budget,
`max_running_requests` and the pool allow, keeping a page per running request in reserve.

Prefix sharing (GRPO sends each prompt n times as separate requests): a running prefill's pages go into
the radix tree chunk by chunk (`KVManager.cache_prefills`), so requests admitted later match them while
it still runs; and a waiting request whose uncached prefix a running prefill covers (all of it, or at
least `prefix_sharing_min_tokens` tokens) waits a step for it instead of computing it again.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

from inference_engine.config import EngineConfig
from inference_engine.request import Req
from inference_engine.scheduler.kv import KVManager

if TYPE_CHECKING:
    from inference_engine.scheduler.scheduler import SchedulerStats

log = logging.getLogger(__name__)
LPM_MAX_QUEUE = 128  # longer queues fall back to fcfs (matching every waiting prompt costs too much)
MAX_PREFIX_DEFERRALS = 16  # a request waits for other requests' prefills at most this many times (no starvation)
MAX_DEFERRED_PER_STEP = 128  # admission stops after deferring this many requests in one step (bounded scan)


def page_prefix_hashes(tokens: list[int], page_size: int) -> list[int]:
    """Chained hashes of the full pages of tokens: entry k identifies tokens[:(k + 1) * page_size].

    Used only to decide whether a request waits a step: a collision can delay it, never change its output.
    """
    hashes, h = [], 0
    for start in range(0, len(tokens) - page_size + 1, page_size):
        h = hash((h, tuple(tokens[start:start + page_size])))
        hashes.append(h)
    return hashes


def match_key(req: Req) -> list[int]:
    """Tokens a cached prefix may cover: all but the last (whose logits are needed), none if prompt log-probs are
    pending."""
    if req.wants_prompt_logprobs:
        return []
    return req.tokens(0, req.fill_len - 1)


class Admission:
    """The waiting queue and the running set; picks each step's (request, new tokens)."""

    def __init__(self, config: EngineConfig, kv: KVManager, stats: SchedulerStats):
        self.config = config
        self.kv = kv
        self.stats = stats
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self._admissions = 0

    def next_batch(self) -> list[tuple[Req, int]]:
        """(request, new tokens) for this step, KV slots allocated (recorded in req_to_token with the batch)."""
        budget = self.config.chunked_prefill_size
        batch: list[tuple[Req, int]] = []
        retracted = False
        for req in sorted(self.running, key=lambda r: r.admitted):
            if req.row is None:  # retracted while making room for an older one
                continue
            if req.pending and len(req.output_ids) + req.pending >= req.max_new_tokens:
                continue  # its last token is on the way: nothing more to compute
            remaining = req.fill_len + req.pending - req.kv_len
            n = 1 if remaining == 1 else min(remaining, budget)
            if n == 0:
                continue
            while not self.kv.extend(req, n):
                retracted = True
                victim = max(self.running, key=lambda r: r.admitted)
                self._retract(victim)
                if victim is req:
                    break
            else:
                batch.append((req, n))
                if remaining > 1:
                    budget -= n
        if not retracted:
            self._admit(batch, budget)
        return batch

    def release(self, req: Req, cache: bool) -> None:
        """Take req out of the running set and free its KV (computed full pages to the radix cache if cache)."""
        if self.running and req in self.running:
            self.running.remove(req)
        self.kv.release(req, cache)

    def _admit(self, batch: list[tuple[Req, int]], budget: int) -> None:
        tree = self.kv.tree
        if self.config.schedule_policy == "lpm" and len(self.waiting) <= LPM_MAX_QUEUE:
            lengths = {id(r): len(tree.match_prefix(match_key(r))[0]) for r in self.waiting}
            self.waiting = deque(sorted(self.waiting, key=lambda r: -lengths[id(r)]))
        prefills = self._running_prefill_hashes() if self.kv.share_prefixes and self.waiting else None
        deferred: list[Req] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            req = self.waiting[0]
            key = match_key(req)
            prefix, node = tree.match_prefix(key)
            if prefills is not None and self._wait_for_prefill(req, key, len(prefix), prefills):
                deferred.append(self.waiting.popleft())
                if len(deferred) >= MAX_DEFERRED_PER_STEP:
                    break
                continue
            n = min(req.fill_len - len(prefix), budget)
            reserve = self.config.page_size * (len(self.running) + 1)  # next step's decodes
            if not self.kv.admit(req, prefix, node, n, reserve):
                break
            self.waiting.popleft()
            if req.cached_tokens is None:
                req.cached_tokens = len(prefix)
                self.stats.prompt_tokens += req.prompt_len
                self.stats.cached_tokens += len(prefix)
            self._admissions += 1
            req.admitted = self._admissions
            self.running.append(req)
            batch.append((req, n))
            budget -= n
            if prefills is not None:
                prefills.update(page_prefix_hashes(req.tokens(0, req.fill_len), self.config.page_size))
        self.waiting.extendleft(reversed(deferred))

    def _running_prefill_hashes(self) -> set[int]:
        """Page-prefix hashes of the sequences running requests are prefilling (their KV lands in the tree)."""
        hashes: set[int] = set()
        for req in self.running:
            if req.fill_len - req.kv_len > 1 and req.cache_epoch == self.kv.tree.epoch:
                hashes.update(page_prefix_hashes(req.tokens(0, req.fill_len), self.config.page_size))
        return hashes

    def _wait_for_prefill(self, req: Req, key: list[int], cached: int, prefills: set[int]) -> bool:
        """Whether req should stay queued this step because a running prefill will extend its cached prefix."""
        if not prefills or req.deferrals >= MAX_PREFIX_DEFERRALS:
            return False
        page = self.config.page_size
        hashes = page_prefix_hashes(key, page)
        shared = page * next((k + 1 for k in range(len(hashes) - 1, -1, -1) if hashes[k] in prefills), 0)
        gain, uncached = shared - cached, len(key) // page * page - cached
        if gain <= 0 or gain < min(self.config.prefix_sharing_min_tokens, uncached):
            return False  # worth a step's wait: all of its uncached prefix, or at least min_tokens of it
        req.deferrals += 1
        self.stats.deferred_admissions += 1
        return True

    def _retract(self, req: Req) -> None:
        """Give a running request's KV to the cache and put it back at the front of the queue."""
        log.info("KV pool full: retracting request %s (%d tokens)", req.rid, req.fill_len)
        self.stats.num_retractions += 1
        self.release(req, cache=True)
        self.waiting.appendleft(req)

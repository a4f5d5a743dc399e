"""Scheduler: continuous batching with chunked prefill, radix-cache reuse, retraction, sampling and finishing.

Every step, each scheduled request extends its context by some tokens: one for a decode, a chunk
of its prompt for a prefill; both kinds share one forward pass. Running requests go first (oldest
first), then waiting ones are admitted while the prefill token budget, the running-request limit
and the KV pool allow. When the pool runs dry the radix cache is evicted (LRU) and, if that is not
enough, the newest running requests are retracted: their computed KV is handed to the radix cache
and they re-enter the queue with prompt + generated tokens, keeping their sampling state.

Prefix sharing (GRPO sends each prompt n times as separate requests): after every prefill step the
request's page-aligned prefix goes into the radix tree, locked by it, so requests admitted later match
it while it still runs; and a waiting request whose uncached prefix a running prefill covers (all of
it, or at least `prefix_sharing_min_tokens` tokens) waits a step for it instead of computing it again.

Overlap scheduling (on unless `disable_overlap_schedule`): a step is launched (forward and sampling
queued on the device, the sampled tokens scattered into a per-row device buffer and copied to pinned
host memory behind an event) and the host goes on to schedule and launch the next step before it
reads them. A request whose last token is still on its way decodes it straight from the device
buffer (`Req.pending`, a placeholder id in the host batch); the host appends the token, checks the
stop conditions and streams one step late. A request that turns out to have finished had one step
too many: its sampled token is dropped and the KV position of that step given back (`Req.lookahead`),
so outputs and the radix cache are exactly those of the step-by-step path, which is the same code
with each step read right after its launch.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections import deque
from dataclasses import dataclass

import torch

from inference_engine import ops
from inference_engine.config import EngineConfig
from inference_engine.forward_batch import ForwardBatch
from kiln_common.tensors import to_device
from inference_engine.model_runner import ModelRunner
from inference_engine.radix_cache import RadixCache
from inference_engine.request import Req
from inference_engine.sampler import SampleOutput, SamplingBatch, sample

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


SEED_MASK = 2**63 - 1  # request seeds as non-negative int64


@dataclass
class LaunchedStep:
    """Sampled tokens of a launched step on their way to the host (pinned copies, complete once `done` is)."""

    reqs: list[Req]  # the requests that sampled, one per row
    tokens: torch.Tensor  # [B] int64, host
    logprobs: torch.Tensor  # [B] float32, host
    top_logprobs: torch.Tensor | None  # [B, k] float32, host
    top_ids: torch.Tensor | None  # [B, k] int64, host
    done: torch.cuda.Event | None  # recorded after the copies (CUDA); None: the copies were synchronous

    @classmethod
    def start(cls, reqs: list[Req], out: SampleOutput) -> "LaunchedStep":
        """Queue the device -> host copies of out without waiting for them."""
        def host(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to("cpu", non_blocking=True)  # pinned destination on CUDA

        done = None
        copies = host(out.tokens), host(out.logprobs), host(out.top_logprobs), host(out.top_ids)
        if out.tokens.is_cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(out.tokens.device))
        return cls(reqs, *copies, done)

    def wait(self) -> None:
        """Block until the copies are complete (the one device -> host wait of a step)."""
        if self.done is not None:
            self.done.synchronize()


@dataclass
class SchedulerStats:
    """Counters for /metrics and tests."""

    num_steps: int = 0
    num_retractions: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefill_tokens: int = 0  # tokens computed by prefill steps (prompts, and re-prefills after retraction)
    deferred_admissions: int = 0  # times a request waited for another request's prefill of a shared prefix
    generated_tokens: int = 0
    finished_requests: int = 0
    failed_batches: int = 0


class Scheduler:
    """Owns the request queues, the radix cache and the sampling of one engine; driven by Engine's thread."""

    def __init__(self, config: EngineConfig, runner: ModelRunner, tokenizer, eos_token_ids: set[int]):
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.kv_pool = runner.kv_pool
        self.req_to_token = runner.req_to_token
        self.device = runner.device
        self.tree = RadixCache(config.page_size, self.kv_pool.free_slots, disabled=config.disable_radix_cache)
        self.share_prefixes = not (config.disable_radix_cache or config.disable_prefix_sharing)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.stats = SchedulerStats()
        self.weight_version = 0
        self.seed_stream = random.Random(config.random_seed)  # seeds of the rows whose request has none
        self.overlap = not config.disable_overlap_schedule
        self.token_buf = torch.zeros(config.max_running_requests, dtype=torch.int64, device=self.device)  # by row:
        # the request's latest sampled token, where the next step reads a pending one
        self._in_flight: LaunchedStep | None = None
        self._last_decode: list[int] | None = None  # admission ids of the previous step's decode batch
        self._admissions = 0
        self._token_times: deque[tuple[float, int]] = deque(maxlen=256)

    # ----------------------------------------------------------------- queue management
    def add(self, req: Req) -> None:
        """Queue a request (already validated)."""
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._in_flight)

    def sync(self) -> None:
        """Read the in-flight step's tokens (overlap), so that every request's state is up to date."""
        launched, self._in_flight = self._in_flight, None
        if launched is not None:
            self._resolve(launched)

    def abort(self, rid: str | None) -> int:
        """Finish the requests of group rid (all when None) with finish_reason abort; returns how many."""
        hit = [r for r in [*self.waiting, *self.running] if rid is None or r.group == rid]
        for req in hit:
            self._finish(req, "abort", message="aborted by request")
        return len(hit)

    def flush_cache(self) -> None:
        """Empty the radix cache (locked prefixes of running requests are freed when those finish)."""
        self.tree.reset()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the recent steps."""
        if len(self._token_times) < 2:
            return 0.0
        (t0, _), (t1, _) = self._token_times[0], self._token_times[-1]
        count = sum(n for _, n in list(self._token_times)[1:])
        return count / (t1 - t0) if t1 > t0 else 0.0

    # ----------------------------------------------------------------- one step
    def step(self) -> None:
        """Schedule and launch one forward pass with its sampling; read the tokens of the previous one (overlap) or of this one."""
        batch = self._schedule()
        launched = None
        if batch:
            self.stats.num_steps += 1
            try:
                launched = self._launch(batch)
            except Exception as exc:  # a bad batch must not kill the loop: its requests end with the error
                self._fail([req for req, _ in batch], exc, "forward step")
        if self.overlap:
            launched, self._in_flight = self._in_flight, launched
        if launched is not None:
            self._resolve(launched)
        for req, _ in batch:
            req.lookahead = False  # its input token is known now: the KV of this step stays

    def _fail(self, reqs: list[Req], exc: Exception, what: str) -> None:
        log.exception("%s failed; aborting its %d request(s)", what, len(reqs))
        self.stats.failed_batches += 1
        for req in reqs:
            if not req.finished:
                self._finish(req, "abort", message=f"engine error: {type(exc).__name__}: {exc}", cache=False)

    def _schedule(self) -> list[tuple[Req, int]]:
        """(request, new tokens) for this step, KV slots allocated and recorded in req_to_token."""
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
            while not self._extend(req, n):
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

    def _admit(self, batch: list[tuple[Req, int]], budget: int) -> None:
        if self.config.schedule_policy == "lpm" and len(self.waiting) <= LPM_MAX_QUEUE:
            lengths = {id(r): len(self.tree.match_prefix(self._match_key(r))[0]) for r in self.waiting}
            self.waiting = deque(sorted(self.waiting, key=lambda r: -lengths[id(r)]))
        prefills = self._running_prefill_hashes() if self.share_prefixes and self.waiting else None
        deferred: list[Req] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            req = self.waiting[0]
            key = self._match_key(req)
            prefix, node = self.tree.match_prefix(key)
            if prefills is not None and self._wait_for_prefill(req, key, len(prefix), prefills):
                deferred.append(self.waiting.popleft())
                if len(deferred) >= MAX_DEFERRED_PER_STEP:
                    break
                continue
            row = self.req_to_token.alloc()
            if row is None:
                break
            self.tree.inc_lock(node)
            n = min(req.fill_len - len(prefix), budget)
            reserve = self.config.page_size * (len(self.running) + 1)  # next step's decodes
            if self.kv_pool.available_size() + self.tree.evictable_size < n + reserve:
                self.tree.dec_lock(node)
                self.req_to_token.free(row)
                break
            req.row, req.kv_len, req.prefix_len, req.last_node = row, len(prefix), len(prefix), node
            req.last_slot = int(prefix[-1]) if len(prefix) else -1
            req.slots = prefix.tolist()
            req.cache_epoch = self.tree.epoch
            if len(prefix):
                self.req_to_token.req_to_token[row, :len(prefix)] = to_device(prefix, self.device)
            if not self._extend(req, n):
                self._release(req, cache=False)
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
            if req.fill_len - req.kv_len > 1 and req.cache_epoch == self.tree.epoch:
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

    def _match_key(self, req: Req) -> list[int]:
        """Tokens a cached prefix may cover: all but the last (whose logits are needed), none if prompt log-probs are pending."""
        if req.wants_prompt_logprobs:
            return []
        return req.tokens(0, req.fill_len - 1)

    def _extend(self, req: Req, n: int) -> bool:
        """Allocate KV slots for req's next n tokens (evicting cache if needed); False if the pool is full."""
        if n == 1 and req.kv_len % self.config.page_size:  # a decode inside its open page: the next slot
            req.last_slot += 1
            req.new_slots = [req.last_slot]
            req.slots.append(req.last_slot)
            return True
        slots = self.kv_pool.alloc_extend(req.kv_len, n, req.last_slot)
        if slots is None:
            self.tree.evict(n + self.config.page_size)
            slots = self.kv_pool.alloc_extend(req.kv_len, n, req.last_slot)
        if slots is None:
            return False
        req.new_slots = slots.tolist()  # recorded in req_to_token by _forward_batch, for the whole batch at once
        req.slots.extend(req.new_slots)
        req.last_slot = req.new_slots[-1]
        return True

    def _retract(self, req: Req) -> None:
        """Give a running request's KV to the cache and put it back at the front of the queue."""
        log.info("KV pool full: retracting request %s (%d tokens)", req.rid, req.fill_len)
        self.stats.num_retractions += 1
        self._release(req, cache=True)
        self.waiting.appendleft(req)

    def _release(self, req: Req, cache: bool) -> None:
        """Free req's row and KV: computed full pages go to the radix cache (if cache), the rest back to the pool.

        Slots allocated past kv_len (a step that failed, or a lookahead step given back) are freed too."""
        if req.row is None:
            return
        if self.running and req in self.running:
            self.running.remove(req)
        slots = torch.tensor(req.slots, dtype=torch.int64)  # host copy: no wait for the device
        node = req.last_node
        if cache and not self.tree.disabled and req.cache_epoch == self.tree.epoch:
            aligned = req.kv_len // self.config.page_size * self.config.page_size
            already = self.tree.insert(req.tokens(0, req.kv_len), slots[:req.kv_len])
            self.kv_pool.free_slots(slots[req.prefix_len:max(already, req.prefix_len)])
            self.kv_pool.free_slots(slots[aligned:])
        else:
            self.kv_pool.free_slots(slots[req.prefix_len:])
        self.tree.dec_lock(node)
        self.req_to_token.free(req.row)
        req.row, req.kv_len, req.prefix_len, req.last_node, req.last_slot = None, 0, 0, None, -1
        req.slots = []

    # ----------------------------------------------------------------- forward and sampling
    def _launch(self, batch: list[tuple[Req, int]]) -> LaunchedStep | None:
        """Queue the forward pass and sampling of batch on the device; the sampled tokens come back with the result."""
        is_prefill = [n > 1 or req.kv_len < req.prompt_len for req, n in batch]  # anything but a decode
        prefills = [(req, req.kv_len) for (req, _), p in zip(batch, is_prefill) if p]  # (request, chunk start)
        self.stats.prefill_tokens += sum(n for (_, n), p in zip(batch, is_prefill) if p)
        ends = itertools.accumulate(n for _, n in batch)
        sampling = [(req, end - 1) for (req, n), end in zip(batch, ends)  # (request, its last token's row)
                    if req.kv_len + n == req.fill_len + req.pending
                    and req.max_new_tokens > len(req.output_ids) + req.pending]
        fb, sample_rows, sample_reqs_rows = self._forward_batch(batch, sampling)
        for req, n in batch:
            req.kv_len += n
        out = self.runner.forward(fb)
        hidden = out.hidden  # [T, hidden]
        prefill_only = [req for req, _ in batch if req.kv_len == req.fill_len and req.max_new_tokens == 0]
        self._prompt_logprobs(batch, fb, hidden)
        launched = None
        if sampling:
            reqs = [r for r, _ in sampling]
            rows = out if len(sampling) == fb.num_tokens else out.rows(sample_rows)  # decode: no gather
            sb = self._sampling_batch(reqs)
            if rows.logits is None:  # eager forward: the LM head runs here
                sampled = sample(self.runner.logits(rows.hidden), sb)
            elif sb.plain_greedy:  # the decode graph already picked
                sampled = SampleOutput(rows.greedy_tokens, rows.greedy_logprobs, None, None)
            else:
                sampled = sample(rows.logits, sb)
            self.token_buf[sample_reqs_rows] = sampled.tokens  # where the next step reads them before the host does
            launched = LaunchedStep.start(reqs, sampled)
            for req in reqs:
                req.pending += 1
        for req in prefill_only:
            self._finish(req, "length")
        if self.share_prefixes:
            for req, first in prefills:
                if req.row is not None:  # still running (finished requests cached their whole sequence)
                    self._cache_prefill(req, first)
        return launched

    def _cache_prefill(self, req: Req, first: int) -> None:
        """Insert the page-aligned prefix a prefill chunk (starting at position first) completed, locked by req."""
        page = self.config.page_size
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

    def _forward_batch(self, batch: list[tuple[Req, int]], sampling: list[tuple[Req, int]]
                       ) -> tuple[ForwardBatch, torch.Tensor, torch.Tensor]:
        """The batch's tensors, sent to the device in one copy; this step's slots recorded in req_to_token.

        Also returns, on the device, the token rows [S] that sample and their requests' rows [S]. A request
        whose input token is still pending (overlap) gets it from token_buf on the device."""
        ids: list[int] = []
        positions: list[int] = []
        lookahead = False
        decode = [req.admitted for req, n in batch if n == 1]
        same_pages = (len(decode) == len(batch) and decode == self._last_decode
                      and all(req.kv_len % self.config.page_size for req, _ in batch))  # no token starts a page
        self._last_decode = decode if len(decode) == len(batch) else None
        for req, n in batch:
            if req.pending:  # a decode of the token sampled last step: known on the device only
                assert n == 1, f"request {req.rid} has a pending token but extends by {n}"
                ids.append(-1)
                req.lookahead = lookahead = True
            else:
                ids.extend(req.tokens(req.kv_len, req.kv_len + n))
            positions.extend(range(req.kv_len, req.kv_len + n))
        extend_lens = [n for _, n in batch]
        seq_lens = [req.kv_len + n for req, n in batch]
        num_tokens, bs, ns = len(ids), len(batch), len(sampling)
        slots = [slot for req, _ in batch for slot in req.new_slots]
        qo_indptr = [0, *itertools.accumulate(extend_lens)]  # prefix sums on the host: no device kernels for them
        kv_indptr = [0, *itertools.accumulate(seq_lens)]
        host = torch.tensor(ids + positions + extend_lens + seq_lens + qo_indptr + kv_indptr
                            + [req.row for req, _ in batch] + slots + [row for _, row in sampling]
                            + [req.row for req, _ in sampling], dtype=torch.int64)
        (input_ids, positions_d, extend_d, seq_lens_d, qo_indptr_d, kv_indptr_d, rows_d, out_cache_loc, sample_rows,
         sample_req_rows) = to_device(host, self.device).split(
            [num_tokens, num_tokens, bs, bs, bs + 1, bs + 1, bs, num_tokens, ns, ns])
        table = self.req_to_token.req_to_token
        if num_tokens == bs:  # one token per request (decode): each token's request row is its request's
            token_rows = rows_d
        else:
            token_rows = rows_d.repeat_interleave(extend_d, output_size=num_tokens)  # [T] each token's request row
        table[token_rows, positions_d] = out_cache_loc
        if lookahead:
            input_ids = torch.where(input_ids >= 0, input_ids, self.token_buf[token_rows])
        fb = ForwardBatch(
            input_ids=input_ids,
            positions=positions_d,
            out_cache_loc=out_cache_loc,
            qo_indptr=qo_indptr_d,
            kv_indptr=kv_indptr_d,
            kv_indices=ops.context_slots(table, rows_d, kv_indptr_d, kv_indptr[-1], max(seq_lens, default=0)),
            seq_lens=seq_lens_d,
            seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int64),
            extend_lens=extend_lens,
            kv_pool=self.kv_pool,
            attn_backend=self.runner.attn_backend,
            same_pages=same_pages,
        )
        return fb, sample_rows, sample_req_rows

    def _prompt_logprobs(self, batch: list[tuple[Req, int]], fb: ForwardBatch, hidden: torch.Tensor) -> None:
        """Log-probs of prompt tokens (of the temperature-scaled distribution) for requests that asked."""
        starts = [0, *itertools.accumulate(fb.extend_lens)][:-1]
        for (req, n), start in zip(batch, starts):
            if not req.sampling.return_prompt_logprobs or len(req.input_logprobs) >= req.prompt_len:
                continue
            first = req.kv_len - n  # position of the chunk's first token
            if not req.input_logprobs:
                req.input_logprobs.append(None)
            lo = max(first, len(req.input_logprobs) - 1)  # hidden position p predicts prompt token p + 1
            hi = min(req.kv_len, req.prompt_len - 1)
            if hi <= lo:
                continue
            logits = self.runner.logits(hidden[start + lo - first:start + hi - first])
            temperature = req.sampling.temperature if not req.sampling.greedy else 1.0
            targets = torch.tensor(req.origin_input_ids[lo + 1:hi + 1], device=self.device)
            lp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, targets[:, None])[:, 0]
            req.input_logprobs.extend(lp.tolist())

    def _sampling_batch(self, reqs: list[Req]) -> SamplingBatch:
        dev, vocab = self.device, self.runner.spec.vocab_size
        sps = [r.sampling for r in reqs]

        def col(values, dtype=torch.float32):
            return to_device(torch.tensor(values, dtype=dtype), dev)

        # output tokens still on the device (overlap): (batch index, token) pairs for the penalties
        pending = [i for i, r in enumerate(reqs) if r.pending]
        if pending and any(sp.repetition_penalty != 1.0 or sp.frequency_penalty or sp.presence_penalty for sp in sps):
            pending_idx = col(pending, torch.int64)
            pending_tok = self.token_buf[col([reqs[i].row for i in pending], torch.int64)]
        rep = freq = pres = seen = counts = None
        if any(sp.repetition_penalty != 1.0 for sp in sps):
            rep = col([sp.repetition_penalty for sp in sps])
            seen = torch.zeros(len(reqs), vocab, dtype=torch.bool, device=dev)
            for i, r in enumerate(reqs):
                seen[i, col(r.tokens(0, r.fill_len), torch.int64)] = True
            if pending:
                seen[pending_idx, pending_tok] = True
        if any(sp.frequency_penalty or sp.presence_penalty for sp in sps):
            freq = col([sp.frequency_penalty for sp in sps])
            pres = col([sp.presence_penalty for sp in sps])
            counts = torch.zeros(len(reqs), vocab, device=dev)
            for i, r in enumerate(reqs):
                if r.output_ids:
                    counts[i].index_add_(0, col(r.output_ids, torch.int64), torch.ones(len(r.output_ids), device=dev))
            if pending:
                counts.index_put_((pending_idx, pending_tok), torch.ones(len(pending), device=dev), accumulate=True)
        params = to_device(torch.tensor(  # [B, 5] in one copy
            [[1.0 if sp.greedy else sp.temperature, sp.greedy, vocab if sp.top_k == -1 else sp.top_k, sp.top_p,
              sp.min_p] for sp in sps], dtype=torch.float64), dev)
        base = self.seed_stream.getrandbits(62)  # unseeded rows: fresh draws every step
        draws = to_device(torch.tensor(  # [B, 2]: (seed, draw number); a seeded request replays its stream
            [[base + i if r.seed is None else r.seed & SEED_MASK,
              len(r.output_ids) + r.pending] for i, r in enumerate(reqs)], dtype=torch.int64), dev)
        return SamplingBatch(
            temperatures=params[:, 0].float(),
            greedy=params[:, 1].bool(),
            top_k=params[:, 2].long(),
            top_p=params[:, 3].float(),
            min_p=params[:, 4].float(),
            repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres,
            seen_mask=seen, output_counts=counts,
            seeds=draws[:, 0], offsets=draws[:, 1],
            top_logprobs_num=max(r.sampling.top_logprobs_num if r.return_logprob else 0 for r in reqs),
            all_greedy=all(sp.greedy for sp in sps),
            truncates=any(sp.top_k not in (-1, vocab) or sp.top_p < 1.0 or sp.min_p > 0.0 for sp in sps),
        )

    def _resolve(self, launched: LaunchedStep) -> None:
        """Append a launched step's sampled tokens (waiting for their copy), check stop conditions, stream."""
        try:
            launched.wait()
        except Exception as exc:  # an asynchronous device error surfaces here
            for req in launched.reqs:
                req.pending -= 1
            self._fail(launched.reqs, exc, "sampling step")
            return
        tokens, logprobs = launched.tokens.tolist(), launched.logprobs.tolist()
        top_lp = launched.top_logprobs.tolist() if launched.top_logprobs is not None else None
        top_ids = launched.top_ids.tolist() if launched.top_ids is not None else None
        appended = 0
        for i, req in enumerate(launched.reqs):
            req.pending -= 1
            if req.finished:  # ended (stop, abort) while its token was on the way: the token is dropped
                continue
            appended += 1
            try:
                tok = tokens[i]
                req.output_ids.append(tok)
                if req.return_logprob:
                    req.output_logprobs.append(logprobs[i])
                    if req.sampling.top_logprobs_num:
                        k = req.sampling.top_logprobs_num
                        req.output_top_logprobs.append(list(zip(top_lp[i][:k], top_ids[i][:k])))
                self._check_finished(req, tok)
                if not req.finished and req.stream and req.on_output is not None:
                    req.on_output(req, False)
            except Exception as exc:  # one request's failure (e.g. in a stop check) ends only that request
                log.exception("request %s failed", req.rid)
                self._finish(req, "abort", message=f"engine error: {type(exc).__name__}: {exc}", cache=False)
        self.stats.generated_tokens += appended
        self._token_times.append((time.monotonic(), appended))

    def _check_finished(self, req: Req, tok: int) -> None:
        sp = req.sampling
        if not sp.ignore_eos and tok in self.eos_token_ids:
            self._finish(req, "stop", matched=tok)
        elif tok in sp.stop_token_ids:
            self._finish(req, "stop", matched=tok)
        elif sp.stop and (matched := self._match_stop_string(req)) is not None:
            self._finish(req, "stop", matched=matched)
        elif len(req.output_ids) >= req.max_new_tokens:
            self._finish(req, "length")

    def _match_stop_string(self, req: Req) -> str | None:
        """The stop string that the newest token completed, if any."""
        window = max(len(s.encode()) for s in req.sampling.stop) + 1  # every token adds at least one byte
        tail = self.tokenizer.decode(req.output_ids[-window:], skip_special_tokens=req.sampling.skip_special_tokens)
        found = [(tail.rfind(s) + len(s), s) for s in req.sampling.stop if s in tail]
        return min(found)[1] if found else None

    def _finish(self, req: Req, kind: str, matched=None, message: str | None = None, cache: bool = True) -> None:
        """End a request: record the reason, free (or cache) its KV, release n>1 children, report it."""
        if req.lookahead:  # the step in flight computes KV for its final token: give that position back
            req.lookahead = False
            req.kv_len -= 1
        req.finish(kind, matched, message)
        req.weight_version = self.weight_version
        self._release(req, cache=cache)
        if req in self.waiting:
            self.waiting.remove(req)
        self.stats.finished_requests += 1
        for child in req.children:
            if kind == "abort":
                child.finish("abort", message=message)
                child.weight_version = self.weight_version
                if child.on_output is not None:
                    child.on_output(child, True)
        if kind != "abort":
            self.waiting.extendleft(reversed(req.children))
        req.children = []
        if req.on_output is not None:
            req.on_output(req, True)

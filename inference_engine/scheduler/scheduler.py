"""Scheduler: the step loop of continuous batching with chunked prefill, and the overlap of host and device.

Every step, each scheduled request extends its context by some tokens: one for a decode, a chunk of its
prompt for a prefill; both kinds share one forward pass. A step is: pick the requests and allocate their
KV (`Admission`, `KVManager`), build the batch's tensors (`BatchBuilder`), run the forward pass, sample,
and bring the tokens back to their requests (`OutputProcessor`). The scheduler also ends requests
(`_finish`: KV to the radix cache, n > 1 children into the queue, the final report) and serves the
engine's control calls between steps (abort, flush, sync).

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
import time
from collections import deque
from dataclasses import dataclass

import torch

from inference_engine.config import EngineConfig
from inference_engine.model_runner import ModelRunner
from inference_engine.radix_cache import RadixCache
from inference_engine.request import Req
from inference_engine.sampler import SampleOutput, sample
from inference_engine.scheduler.admission import Admission
from inference_engine.scheduler.batch import BatchBuilder
from inference_engine.scheduler.kv import KVManager
from inference_engine.scheduler.output import LaunchedStep, OutputProcessor, prompt_logprobs

log = logging.getLogger(__name__)


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
    weight_update_requeues: int = 0  # running requests whose KV a weight update dropped (re-prefilled)
    step_requests: int = 0  # requests in the steps' batches (summed): divided by num_steps, the mean batch
    step_seconds: float = 0.0  # wall time of the steps that had work (scheduling, launch, waiting for the result)


class Scheduler:
    """Runs one engine's steps over its parts (admission, KV, batches, outputs); driven by Engine's thread."""

    def __init__(self, config: EngineConfig, runner: ModelRunner, tokenizer, eos_token_ids: set[int]):
        self.config = config
        self.runner = runner
        self.kv_pool = runner.kv_pool
        self.req_to_token = runner.req_to_token
        self.tree = RadixCache(config.page_size, self.kv_pool.free_slots, disabled=config.disable_radix_cache)
        self.stats = SchedulerStats()
        self.weight_version = 0
        self.overlap = not config.disable_overlap_schedule
        self.token_buf = torch.zeros(config.max_running_requests, dtype=torch.int64, device=runner.device)  # by row:
        # the request's latest sampled token, where the next step reads a pending one
        self.kv = KVManager(config, runner, self.tree)
        self.admission = Admission(config, self.kv, self.stats)
        self.batches = BatchBuilder(config, runner, self.token_buf)
        self.outputs = OutputProcessor(tokenizer, eos_token_ids, self._finish)
        self._in_flight: LaunchedStep | None = None
        self._token_times: deque[tuple[float, int]] = deque(maxlen=256)

    @property
    def waiting(self) -> deque[Req]:
        """Queued requests, next to admit first."""
        return self.admission.waiting

    @property
    def running(self) -> list[Req]:
        """Admitted requests (holding a row and KV)."""
        return self.admission.running

    # ----------------------------------------------------------------- queue management
    def add(self, req: Req) -> None:
        """Queue a request (already validated)."""
        self.waiting.append(req)

    def has_work(self) -> bool:
        """Whether any request is queued, running or has a step in flight."""
        return bool(self.waiting or self.running or self._in_flight)

    def sync(self) -> None:
        """Read the in-flight step's tokens (overlap), so that every request's state is up to date."""
        launched, self._in_flight = self._in_flight, None
        if launched is not None:
            self._resolve(launched)

    def abort(self, rid: str | None, message: str = "aborted by request") -> int:
        """Finish the requests of group rid (all when None) with finish_reason abort (and `message`); returns how
        many."""
        hit = [r for r in [*self.waiting, *self.running] if rid is None or r.group == rid]
        for req in hit:
            self._finish(req, "abort", message=message)
        return len(hit)

    def flush_cache(self) -> None:
        """Empty the radix cache (locked prefixes of running requests are freed when those finish)."""
        self.tree.reset()

    def requeue_running(self) -> int:
        """Drop the KV of every running request (computed with the weights just replaced) and queue it again, first,
        with its generated tokens: its next step re-prefills prompt + output with the new weights, so every token
        sampled after a weight update is the new weights' exactly. Call it after `sync` and `flush_cache`; returns
        how many."""
        running = sorted(self.running, key=lambda r: r.admitted)
        for req in running:
            self.admission.release(req, cache=False)
        self.waiting.extendleft(reversed(running))
        self.stats.weight_update_requeues += len(running)
        return len(running)

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the recent steps."""
        if len(self._token_times) < 2:
            return 0.0
        (t0, _), (t1, _) = self._token_times[0], self._token_times[-1]
        count = sum(n for _, n in list(self._token_times)[1:])
        return count / (t1 - t0) if t1 > t0 else 0.0

    # ----------------------------------------------------------------- one step
    def step(self) -> None:
        """Schedule and launch one forward pass with its sampling; read the tokens of the previous one (overlap) or
        of this one."""
        start = time.perf_counter()
        batch = self.admission.next_batch()
        launched = None
        if batch:
            self.stats.num_steps += 1
            self.stats.step_requests += len(batch)
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
        if batch or launched is not None:
            self.stats.step_seconds += time.perf_counter() - start

    def _launch(self, batch: list[tuple[Req, int]]) -> LaunchedStep | None:
        """Queue the forward pass and sampling of batch on the device; the sampled tokens come back with the
        result."""
        is_prefill = [n > 1 or req.kv_len < req.prompt_len for req, n in batch]  # anything but a decode
        prefills = [(req, req.kv_len) for (req, _), p in zip(batch, is_prefill) if p]  # (request, chunk start)
        self.stats.prefill_tokens += sum(n for (_, n), p in zip(batch, is_prefill) if p)
        ends = itertools.accumulate(n for _, n in batch)
        sampling = [(req, end - 1) for (req, n), end in zip(batch, ends)  # (request, its last token's row)
                    if req.kv_len + n == req.fill_len + req.pending
                    and req.max_new_tokens > len(req.output_ids) + req.pending]
        fb, sample_rows, sample_reqs_rows = self.batches.forward_batch(batch, sampling)
        for req, n in batch:
            req.kv_len += n
        out = self.runner.forward(fb)
        hidden = out.hidden  # [T, hidden]
        prefill_only = [req for req, _ in batch if req.kv_len == req.fill_len and req.max_new_tokens == 0]
        prompt_logprobs(batch, fb, hidden, self.runner)
        launched = None
        if sampling:
            reqs = [r for r, _ in sampling]
            rows = out if len(sampling) == fb.num_tokens else out.rows(sample_rows)  # decode: no gather
            sb = self.batches.sampling_batch(reqs)
            if rows.logits is None:  # eager forward: the LM head runs here
                sampled = sample(self.runner.logits(rows.hidden), sb)
            elif sb.plain_greedy:  # the decode graph already picked
                sampled = SampleOutput(rows.greedy_tokens, rows.greedy_logprobs, None, None)
            else:
                sampled = sample(rows.logits, sb)
            self.token_buf[sample_reqs_rows] = sampled.tokens  # where the next step reads them before the host does
            launched = LaunchedStep.start(reqs, sampled, self.weight_version)
            for req in reqs:
                req.pending += 1
        for req in prefill_only:
            self._finish(req, "length")
        self.kv.cache_prefills(prefills)
        return launched

    def _resolve(self, launched: LaunchedStep) -> None:
        """Wait for a launched step's tokens, then append them to their requests (stop checks, streaming)."""
        try:
            launched.wait()
        except Exception as exc:  # an asynchronous device error surfaces here
            for req in launched.reqs:
                req.pending -= 1
            self._fail(launched.reqs, exc, "sampling step")
            return
        appended = self.outputs.process(launched)
        self.stats.generated_tokens += appended
        self._token_times.append((time.monotonic(), appended))

    # ----------------------------------------------------------------- ending requests
    def _fail(self, reqs: list[Req], exc: Exception, what: str) -> None:
        """End the unfinished requests of a failed step (what: which part failed) with the error."""
        log.exception("%s failed; aborting its %d request(s)", what, len(reqs))
        self.stats.failed_batches += 1
        for req in reqs:
            if not req.finished:
                self._finish(req, "abort", message=f"engine error: {type(exc).__name__}: {exc}", cache=False)

    def _finish(self, req: Req, kind: str, matched=None, message: str | None = None, cache: bool = True) -> None:
        """End a request: record the reason, free (or cache) its KV, release n>1 children, report it."""
        if req.lookahead:  # the step in flight computes KV for its final token: give that position back
            req.lookahead = False
            req.kv_len -= 1
        req.finish(kind, matched, message)
        req.weight_version = self.weight_version
        if req.sampling.return_routed_experts and req.row is not None and cache:  # from its KV slots, before they go
            # every token but the last was forwarded by a step already read back, except for a prefill-only request
            # (max_new_tokens 0) ended right after its step's launch
            req.routed_experts = self.runner.routed_experts(req.slots[:min(req.kv_len, req.fill_len - 1)],
                                                            forward_done=req.max_new_tokens > 0)
        self.admission.release(req, cache=cache)
        if req in self.waiting:
            self.waiting.remove(req)
        self.stats.finished_requests += 1
        for child in req.children:
            if kind == "abort":
                child.finish("abort", message=message)
                child.weight_version = self.weight_version
                if child.on_output is not None:
                    child.on_output(child, True)
                    child.on_output = None
        if kind != "abort":
            self.waiting.extendleft(reversed(req.children))
        req.children = []
        if req.on_output is not None:  # its last call: dropped, so that a finished request (kept for its cached
            req.on_output(req, True)   # prefix or stats) does not hold the caller's closure, nor through it the Engine
            req.on_output = None

"""Engine: SGLang-style offline engine API over a scheduler loop that runs in one background thread.

Public methods are thread-safe: requests and control operations (weight updates, pause, memory
release, flush) go through an inbox the loop drains between steps, so nothing ever changes
mid-forward. Results come back through callbacks that wake a waiting thread or an asyncio loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

import torch

from inference_engine.config import EngineConfig
from inference_engine.model_runner import ModelRunner
from inference_engine.request import Req
from inference_engine.sampling_params import SamplingParams
from inference_engine.scheduler import Scheduler
from kiln_common import routed_experts
from kiln_common.errors import EngineNotServingError
from weight_sync import ColocatedBucket, SharedBucket, WeightReceiver, checksum_report, open_bucket

log = logging.getLogger(__name__)
NamedTensorPairs = Iterable[tuple[str, torch.Tensor]]
IDLE_WAIT_S = 0.5
STOP_TIMEOUT_S = 60.0  # shutdown waits this long for the scheduler thread to finish its step
RELEASED_MESSAGE = ("the engine's memory is released (release_memory): it serves no requests until resume_memory(); "
                    "send the request to another engine or retry after the resume")


class Engine:
    """In-process inference engine: implements `inference_engine.control.EngineControl` (generation, abort,
    flush, the RL control surface, information)."""

    def __init__(self, model_path: str | None = None, device: str = "cpu", dtype: str = "float32",
                 config: EngineConfig | None = None, **kwargs):
        if config is None:
            unknown = sorted(set(kwargs) - set(EngineConfig.field_names()))
            if unknown:
                raise ValueError(f"unknown Engine option(s) {unknown}; valid ones are {EngineConfig.field_names()}")
            if model_path is None:
                raise ValueError("Engine needs model_path (a local HF model folder)")
            config = EngineConfig(model_path=str(model_path), device=device, dtype=dtype, **kwargs)
        self.config = config
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path or config.model_path)
        self.runner = ModelRunner(config)
        self.spec = self.runner.spec
        self.context_length = self.runner.context_length
        # A longer prompt text cannot fit the context (twice the characters of context_length of the vocabulary's
        # longest token): it is refused before it is tokenised, which for megabytes of text takes seconds.
        self.max_prompt_chars = 2 * self.context_length * max(map(len, self.tokenizer.get_vocab()))
        try:
            self.scheduler = Scheduler(config, self.runner, self.tokenizer, self._eos_token_ids())
        except BaseException:
            self.runner.shutdown()
            raise
        self._receiver = WeightReceiver(tp_rank=0)  # weight-update groups, colocated storages, drain
        self._inbox: queue.Queue = queue.Queue()
        self._paused = False
        self._update_phases: dict[str, float] = {}   # seconds of the last weight update's phases, for metrics()
        self._released: dict[str, bool] = {}
        # (seconds the loop waited with nothing to step on, start of the wait in progress or None): one tuple, replaced
        # whole, so that metrics() read from another thread sees a consistent pair
        self._idle: tuple[float, float | None] = (0.0, None)
        self._closed = False
        self._last_progress = time.monotonic()   # the last step, or the last moment without runnable work (health)
        self._start_time = time.time()   # metrics' start_time_seconds: a reader of the counters sees a restart
        device = self.runner.device
        if device.type == "cuda" and device.index is None:  # "cuda": the device current while the runner was built
            device = torch.device("cuda", torch.cuda.current_device())
        self._thread = threading.Thread(target=self._loop, args=(device,), name="kiln-engine-scheduler", daemon=True)
        self._thread.start()

    def _eos_token_ids(self) -> set[int]:
        ids = set(self.spec.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        gen_cfg = Path(self.config.model_path, "generation_config.json")
        if gen_cfg.is_file():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return ids

    # ----------------------------------------------------------------- the loop
    def _loop(self, device: torch.device) -> None:
        if device.type == "cuda":  # a new thread starts on cuda:0; triton launches on the current device
            torch.cuda.set_device(device)
        while True:
            busy = self._runnable()
            if not busy:
                self._last_progress = time.monotonic()
                self._idle = (self._idle[0], time.perf_counter())
            try:
                item = self._inbox.get(block=not busy, timeout=None if busy else IDLE_WAIT_S)
            except queue.Empty:
                item = None
            if not busy:
                total, since = self._idle
                self._idle = (total + time.perf_counter() - since, None)
            while item is not None:
                if item[0] != "add":  # control operations see every request up to date (overlap: none in flight)
                    self.scheduler.sync()
                if item[0] == "stop":
                    self.scheduler.abort(None)
                    return
                self._handle(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            if self._runnable():
                self.scheduler.step()
                self._last_progress = time.monotonic()

    def _runnable(self) -> bool:
        """Whether the scheduler has work it may step on (not paused, memory not released)."""
        return self.scheduler.has_work() and not self._paused and not self._released

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "add":
            for req in item[1]:
                self.scheduler.add(req)
            if self._released:   # queued just before release_memory ran: refused like the requests after it
                for group in {req.group for req in item[1]}:
                    self.scheduler.abort(group, message=RELEASED_MESSAGE)
        elif kind == "abort":
            self.scheduler.abort(item[1])
        elif kind == "call":
            _, fn, future = item
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the scheduler thread between steps and return its result (or raise its error)."""
        self._check_open()
        if threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        self._inbox.put(("call", fn, future))
        return future.result()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("engine is shut down")
        if not self._thread.is_alive():
            raise EngineNotServingError("the engine's scheduler thread is not running (its log says why); the "
                                        "engine cannot serve requests or control calls any more")

    def _check_serving(self) -> None:
        """Refuse a request at once while the memory is released (it would wait for resume_memory otherwise)."""
        self._check_open()
        if self._released:
            raise EngineNotServingError(RELEASED_MESSAGE)
        missing = self.runner.unfilled
        if missing:
            raise EngineNotServingError(f"the engine's weights were discarded (release_memory(keep_weights=False)) "
                                        f"and {len(missing)} weight(s) have not been loaded since, e.g. "
                                        f"{sorted(missing)[:3]}; push every weight first")

    @staticmethod
    def _raise_if_refused(outputs: list[Req]) -> None:
        """A request that slipped in while release_memory ran was ended with RELEASED_MESSAGE: raise it."""
        if any((r.finish_reason or {}).get("message") == RELEASED_MESSAGE for r in outputs):
            raise EngineNotServingError(RELEASED_MESSAGE)

    # ----------------------------------------------------------------- requests
    def _build_requests(self, prompt, input_ids, sampling_params, return_logprob, rid, stream,
                        on_output: Callable[[Req, bool], None]) -> tuple[list[Req], list[Req], bool]:
        """Validate a (batch) call; returns (requests to queue, requests whose outputs are returned, is_batch)."""
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt (text) or input_ids (token ids)")
        if prompt is not None:
            is_batch = isinstance(prompt, list)
            ids_list = self.tokenize(prompt if is_batch else [prompt])
        else:
            if not isinstance(input_ids, list):
                raise ValueError(f"input_ids must be a list of ints or a list of lists of ints, got "
                                 f"{type(input_ids).__name__}")
            is_batch = bool(input_ids) and isinstance(input_ids[0], list)
            ids_list = input_ids if is_batch else [input_ids]
        count = len(ids_list)
        if count == 0:
            raise ValueError("empty batch: no prompts given")
        _check_arg("sampling_params", sampling_params, (dict, SamplingParams, type(None)))
        _check_arg("return_logprob", return_logprob, (bool,))
        _check_arg("rid", rid, (str, type(None)))
        sps = sampling_params if isinstance(sampling_params, list) else [sampling_params] * count
        logprob_flags = return_logprob if isinstance(return_logprob, list) else [return_logprob] * count
        if isinstance(rid, list):
            rids = rid
        elif rid is None:
            rids = [uuid.uuid4().hex for _ in range(count)]
        else:
            rids = [rid] if not is_batch else [f"{rid}-{i}" for i in range(count)]
        if len(sps) != count or len(logprob_flags) != count or len(rids) != count:
            raise ValueError(f"batch of {count} prompts: sampling_params, return_logprob and rid must be single "
                             f"values or lists of {count}")
        queued, outputs = [], []
        for i, (ids, sp_dict, want_lp, group) in enumerate(zip(ids_list, sps, logprob_flags, rids)):
            sp = sp_dict if isinstance(sp_dict, SamplingParams) else SamplingParams.from_dict(sp_dict)
            sp = sp.for_vocab(self.spec.vocab_size)
            self._validate_ids(ids, i)
            if sp.return_routed_experts and not self.spec.num_moe_layers:
                raise ValueError(f"return_routed_experts: {self.config.model_path!r} is a dense {self.spec.family} "
                                 "model; only mixture-of-experts models route tokens to experts")
            if sp.top_logprobs_num > self.spec.vocab_size:
                raise ValueError(f"top_logprobs_num {sp.top_logprobs_num} exceeds the vocabulary "
                                 f"({self.spec.vocab_size})")
            max_new = min(sp.max_new_tokens, self.context_length - len(ids))
            samples = []
            for j in range(sp.n):
                seed = None if sp.seed is None else sp.seed + j  # sample j of a seeded request: its own stream
                child_rid = group if sp.n == 1 else f"{group}-{j}"
                samples.append(Req(child_rid, list(ids), sp, return_logprob=bool(want_lp), max_new_tokens=max_new,
                                   stream=stream, group=group, on_output=on_output, seed=seed))
            outputs.extend(samples)
            if sp.n > 1 and not self.config.disable_radix_cache:  # prefill once, then the samples fork off the cache
                parent = Req(f"{group}-prefill", list(ids), SamplingParams(max_new_tokens=0), max_new_tokens=0,
                             group=group)
                parent.children = samples
                queued.append(parent)
            else:
                queued.extend(samples)
        return queued, outputs, is_batch or any(r.sampling.n > 1 for r in outputs)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of prompts; a non-string, a lone surrogate or more than `max_prompt_chars` characters raise
        ValueError naming the prompt (checked before tokenising)."""
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError("prompt (text) must be a string or a list of strings")
        for i, text in enumerate(texts):
            if len(text) > self.max_prompt_chars:
                raise ValueError(f"prompt {i} (text) has {len(text)} characters; more than {self.max_prompt_chars} "
                                 f"cannot fit the context_length of {self.context_length} tokens")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"prompt {i} (text) holds a lone surrogate at character {exc.start} "
                                 f"({text[exc.start]!r}); send valid UTF-8") from None
        return [self.tokenizer(t)["input_ids"] for t in texts]

    def _validate_ids(self, ids, index: int) -> None:
        """Checked with C-level passes (type set, min, max): a multi-turn request re-sends its whole conversation."""
        if not isinstance(ids, list) or not set(map(type, ids)) <= {int}:  # ints only: bool, float, numpy ints refused
            raise ValueError(f"prompt {index}: input_ids must be a list of ints")
        if not ids:
            raise ValueError(f"prompt {index} is empty; give at least one token")
        if min(ids) < 0 or max(ids) >= self.spec.vocab_size:
            bad = next(t for t in ids if not 0 <= t < self.spec.vocab_size)
            raise ValueError(f"prompt {index}: token id {bad} is outside the vocabulary [0, {self.spec.vocab_size})")
        if len(ids) >= self.context_length:
            raise ValueError(f"prompt {index} has {len(ids)} tokens; the context_length is {self.context_length} "
                             "(prompt plus at least one generated token must fit)")

    def generate(self, prompt: str | list[str] | None = None, input_ids: list[int] | list[list[int]] | None = None,
                 sampling_params: dict | list[dict] | None = None, return_logprob: bool | list[bool] = False,
                 rid: str | list[str] | None = None) -> dict | list[dict]:
        """Generate for one prompt (returns a dict) or a batch / n > 1 (returns a list, n dicts per prompt)."""
        self._check_serving()
        done = threading.Event()
        results: dict[int, dict] = {}
        lock = threading.Lock()

        def on_output(req: Req, finished: bool) -> None:
            if finished:
                with lock:
                    results[id(req)] = self.make_output(req)
                    if len(results) == len(outputs):
                        done.set()

        queued, outputs, many = self._build_requests(prompt, input_ids, sampling_params, return_logprob, rid,
                                                     False, on_output)
        self._inbox.put(("add", queued))
        while not done.wait(IDLE_WAIT_S):
            if not self._thread.is_alive():
                raise RuntimeError("engine scheduler thread is not running")
            self.runner.check_alive()
        self._raise_if_refused(outputs)
        ordered = [results[id(r)] for r in outputs]
        return ordered if many else ordered[0]

    async def async_generate(self, prompt: str | list[str] | None = None,
                             input_ids: list[int] | list[list[int]] | None = None,
                             sampling_params: dict | list[dict] | None = None,
                             return_logprob: bool | list[bool] = False, rid: str | list[str] | None = None,
                             stream: bool = False) -> dict | list[dict] | AsyncIterator[dict]:
        """Like generate, awaitable; with stream=True returns an async iterator of cumulative outputs (with "index")."""
        self._check_serving()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_output(req: Req, finished: bool) -> None:
            out = self.make_output(req)
            loop.call_soon_threadsafe(events.put_nowait, (req, finished, out))

        queued, outputs, many = self._build_requests(prompt, input_ids, sampling_params, return_logprob, rid,
                                                     stream, on_output)
        index = {id(r): i for i, r in enumerate(outputs)}
        self._inbox.put(("add", queued))
        if stream:
            return self._stream(events, outputs, index)
        results: dict[int, dict] = {}
        try:
            while len(results) < len(outputs):
                req, finished, out = await events.get()
                if finished:
                    results[id(req)] = out
        except asyncio.CancelledError:
            self._abort_unfinished(outputs)
            raise
        self._raise_if_refused(outputs)
        ordered = [results[id(r)] for r in outputs]
        return ordered if many else ordered[0]

    async def _stream(self, events: asyncio.Queue, outputs: list[Req], index: dict[int, int]) -> AsyncIterator[dict]:
        remaining = len(outputs)
        try:
            while remaining:
                req, finished, out = await events.get()
                out["index"] = index[id(req)]
                remaining -= finished
                yield out
        finally:
            if remaining:
                self._abort_unfinished(outputs)

    def _abort_unfinished(self, outputs: list[Req]) -> None:
        for group in {r.group for r in outputs if not r.finished}:
            self.abort(group)

    def make_output(self, req: Req) -> dict:
        """SGLang's output dict of a request as it stands (called on the scheduler thread)."""
        sp = req.sampling
        reason = req.finish_reason
        ids = req.output_ids
        if reason and isinstance(reason.get("matched"), int) and not sp.no_stop_trim and reason["type"] == "stop":
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=sp.skip_special_tokens)
        if reason and isinstance(reason.get("matched"), str) and not sp.no_stop_trim:
            cut = text.find(reason["matched"])
            text = text[:cut] if cut >= 0 else text
        meta: dict[str, Any] = {
            "id": req.rid,
            "prompt_tokens": req.prompt_len,
            "completion_tokens": len(req.output_ids),
            "cached_tokens": req.cached_tokens or 0,
            "finish_reason": reason,
            "weight_version": req.weight_version if req.weight_version is not None else self.weight_version,
            # the version each output token was sampled under, run-length: [[version, count], ...]
            "output_token_weight_versions": [list(run) for run in req.output_versions],
        }
        if req.return_logprob:
            meta["output_token_logprobs"] = [(lp, t, None) for lp, t in zip(req.output_logprobs, req.output_ids)]
            if sp.top_logprobs_num:
                meta["output_top_logprobs"] = [[(lp, t, None) for lp, t in row] for row in req.output_top_logprobs]
            if sp.return_prompt_logprobs:
                meta["input_token_logprobs"] = [(lp, t, None) for lp, t in zip(req.input_logprobs,
                                                                               req.origin_input_ids)]
        if req.error:
            meta["error"] = req.error
        if req.routed_experts is not None:
            meta["routed_experts"] = routed_experts.encode(req.routed_experts)
        return {"text": text, "output_ids": list(req.output_ids), "meta_info": meta}

    def abort(self, rid: str | None = None, abort_all: bool = False) -> None:
        """Abort the request (or n-sample group) rid, or every request with abort_all; they finish with "abort"."""
        if rid is None and not abort_all:
            raise ValueError("abort needs a rid, or abort_all=True")
        self._inbox.put(("abort", None if abort_all else rid))

    def flush_cache(self) -> bool:
        """Empty the radix cache."""
        return self._call(self.scheduler.flush_cache) or True

    # ----------------------------------------------------------------- RL control surface
    @property
    def weight_version(self) -> int:
        """The version of the weights the engine holds (0 until the first update)."""
        return self.scheduler.weight_version

    def _commit_weights(self, load: Callable[[], Any], weight_version: int, phases: dict[str, float],
                        pause: bool = False, resume: bool = False) -> int:
        """Run load (on the scheduler thread), flush the radix cache and set the weight version.

        `pause` / `resume`: stop stepping before the load / step again after it, also when it fails (one
        push's first / last message); the seconds of "load" and "flush" go into `phases`.
        """
        if pause:
            self._paused = True
        try:
            self._check_weights_resident()
            start = time.perf_counter()
            load()
            loaded = time.perf_counter()
            self.scheduler.flush_cache()
            self.scheduler.requeue_running()   # in-flight requests go on with the new weights, their KV recomputed
            self.scheduler.weight_version = weight_version
            phases["load"], phases["flush"] = loaded - start, time.perf_counter() - loaded
            return self.scheduler.weight_version
        finally:
            if resume:
                self._paused = False

    def _check_weights_resident(self) -> None:
        if self._released.get("weights"):
            raise RuntimeError("weights are released; call resume_memory() before updating them")

    def _apply_weights(self, load: Callable[[], Any], weight_version: int, phases: dict[str, float] | None = None,
                       pause: bool = False, resume: bool = False) -> int:
        """`_commit_weights` on the scheduler thread; its phases, with "queue" (the wait for the thread), become
        the last update's."""
        phases = {} if phases is None else phases
        start = time.perf_counter()

        def commit() -> int:
            phases["queue"] = time.perf_counter() - start
            return self._commit_weights(load, weight_version, phases, pause, resume)

        try:
            return self._call(commit)
        finally:
            phases.setdefault("total", time.perf_counter() - start)
            self._update_phases = phases

    def _load_and_wait(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full HF-named tensors (every tp rank its shard) and wait for the copies."""
        self.runner.load_weights(named_tensors)
        if self.runner.device.type == "cuda":   # the copies read a colocated sender's memory: done before it reuses it
            torch.cuda.current_stream(self.runner.device).synchronize()

    def update_weights_from_tensor(self, named_tensors: ColocatedBucket | SharedBucket | NamedTensorPairs,
                                   weight_version: int) -> int:
        """Update weights from a colocated bucket (shared handles) or (hf_name, tensor) pairs; bad names raise
        before anything changes.

        A `ColocatedBucket` may carry its push's pause and continue: pause (after a drain, if that is the
        mode), load, flush, set the version and continue are then one call on the scheduler thread.
        """
        version = _check_version(weight_version)
        if isinstance(named_tensors, ColocatedBucket):
            return self._update_colocated(named_tensors, version)
        named = open_bucket(named_tensors) if isinstance(named_tensors, SharedBucket) else list(named_tensors)
        bad = [entry for entry in named if not (isinstance(entry, tuple) and len(entry) == 2 and
                                                isinstance(entry[0], str) and isinstance(entry[1], torch.Tensor))]
        if bad:
            raise ValueError(f"update_weights_from_tensor expects (hf_name, tensor) pairs; bad entries: {bad[:3]}")
        return self._apply_weights(lambda: self._load_and_wait(named), version)

    def _update_colocated(self, bucket: ColocatedBucket, weight_version: int) -> int:
        """One message of a colocated push; its phases (drain, open, queue, load, flush, close, total) kept for
        metrics()."""
        start = time.perf_counter()
        phases: dict[str, float] = {}
        if bucket.pause is not None:
            self._receiver.drain(bucket.pause, self._busy_requests)   # checks the mode; "drain" waits
            phases["drain"] = time.perf_counter() - start

        def load(named: list[tuple[str, torch.Tensor]]) -> int:
            return self._apply_weights(lambda: self._load_and_wait(named), weight_version, phases,
                                       pause=bucket.pause is not None, resume=bucket.resume)

        if not bucket.names:   # the sender closes storages it kept open: nothing to load, no new version
            self._receiver.receive_colocated(bucket, load)
            return self.weight_version
        try:
            return self._receiver.receive_colocated(bucket, load, phases)
        finally:
            phases["total"] = time.perf_counter() - start
            self._update_phases = phases

    def update_weights_from_disk(self, model_path: str, weight_version: int) -> int:
        """Load every weight of an HF folder with the same architecture."""
        version = _check_version(weight_version)
        return self._apply_weights(lambda: self.runner.load_checkpoint(model_path), version)

    def named_hf_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Engine weights under HF names, unfused (views: clone to keep)."""
        return self._call(self.runner.named_hf_tensors)

    def _busy_requests(self) -> int:
        return len(self.scheduler.running) + len(self.scheduler.waiting)

    def pause_generation(self, mode: str = "pause") -> None:
        """Stop stepping after the current step ("pause": in-flight requests keep their state; "drain": first
        wait until none is running or queued)."""
        self._receiver.drain(mode, self._busy_requests)
        self._call(lambda: setattr(self, "_paused", True))   # a request that slipped in after the drain is paused

    def continue_generation(self) -> None:
        """Resume stepping after pause_generation."""
        self._call(lambda: setattr(self, "_paused", False))

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str = "auto", timeout_s: float = 300.0) -> None:
        """Join a trainer's weight-update group: tp rank r as group rank rank_offset + r; blocks until every rank
        arrived."""
        arguments = _arguments(locals())

        def join():
            self.runner.tell_workers("init_weights_update_group", arguments)
            self._receiver.join_group(**arguments)
        self._call(join)

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]], group_name: str, weight_version: int) -> int:
        """Receive one bucket broadcast by the group's rank 0 (each tp rank its own copy, loading its shard);
        returns the version."""
        arguments = _arguments(locals())
        version = _check_version(weight_version)

        def receive():
            self._check_weights_resident()
            self.runner.tell_workers("update_weights_from_distributed", arguments)
            named = self._receiver.receive_distributed(group_name, names, dtypes, shapes)
            phases: dict[str, float] = {}
            self._update_phases = phases
            return self._commit_weights(lambda: self.runner.load_weights_local(named), version, phases)
        return self._call(receive)

    def destroy_weights_update_group(self, group_name: str) -> None:
        """Leave the named weight-update group (every tp rank)."""
        def leave():
            self._receiver.leave_group(group_name)  # an unknown name raises before the workers hear
            self.runner.tell_workers("destroy_weights_update_group", {"group_name": group_name})
        self._call(leave)

    def weight_checksums(self) -> dict[str, dict]:
        """{hf_name: checksum dict} of the engine's full weights (weight_sync's verification)."""
        return checksum_report(self.named_hf_tensors())

    def release_memory(self, weights: bool = False, keep_weights: bool = True) -> None:
        """Free the KV pool (and with weights=True the weights' device memory); only while no request is queued or
        running.

        keep_weights=False discards the weights instead of keeping them in host memory: the caller pushes every
        weight before the engine generates again (requests are refused until it has, saying which are missing)."""
        def release():
            if self.scheduler.has_work():
                raise RuntimeError(f"cannot release memory with {len(self.scheduler.running)} running and "
                                   f"{len(self.scheduler.waiting)} queued requests; wait or abort them first")
            self.scheduler.flush_cache()
            self.runner.release_memory(weights, keep_weights)
            self._released["kv_cache"] = True
            if weights:
                self._released["weights"] = True
        self._call(release)

    def resume_memory(self, weights: bool = True, kv_cache: bool = True) -> None:
        """Take back what was released of the weights and / or the KV pool (weights first: the RL loop resumes them
        alone to push into them, then the KV pool); requests are served again once both are back."""
        def resume():
            back = {"weights": weights and self._released.pop("weights", False),
                    "kv_cache": kv_cache and self._released.pop("kv_cache", False)}
            if any(back.values()):
                self.runner.resume_memory(**back)
        self._call(resume)

    # ----------------------------------------------------------------- info
    def get_model_info(self) -> dict:
        """Model path, family and sizes."""
        return {"model_path": self.config.model_path, "tokenizer_path": self.config.tokenizer_path or
                self.config.model_path, "family": self.spec.family, "is_generation": True,
                "context_length": self.context_length, "vocab_size": self.spec.vocab_size,
                "tp_size": self.config.tp_size, "weight_version": self.weight_version}

    def health(self) -> dict:
        """The engine's liveness report (read without locking, from any thread); `ok` is False, with `reason`, when
        it is shut down, its scheduler thread or a tp worker is gone, or it has had work but made no step for
        `stall_timeout_s` (stalled). Released memory is reported, not a failure: the engine is alive and refuses
        requests at once until resume_memory()."""
        s = self.scheduler
        reasons = []
        alive = self._thread.is_alive()
        if self._closed:
            reasons.append("the engine is shut down")
        elif not alive:
            reasons.append("the scheduler thread is not running (its log says why)")
        workers_alive = True
        try:
            self.runner.check_alive()
        except RuntimeError as exc:
            workers_alive = False
            reasons.append(str(exc))
        stall = time.monotonic() - self._last_progress if self._runnable() else 0.0
        if stall > self.config.stall_timeout_s:
            reasons.append(f"stalled: no scheduler step for {stall:.1f}s with {len(s.running)} running and "
                           f"{len(s.waiting)} queued requests (stall_timeout_s {self.config.stall_timeout_s:g})")
        return {"ok": not reasons, "status": "unhealthy" if reasons else "ok", "reason": "; ".join(reasons) or None,
                "scheduler_alive": alive, "tp_workers_alive": workers_alive, "stall_s": round(stall, 3),
                "stall_timeout_s": self.config.stall_timeout_s, "memory_released": bool(self._released),
                "weights_released": bool(self._released.get("weights")),
                "weights_missing": len(self.runner.unfilled), "paused": self._paused,
                "weight_version": self.weight_version, "running": len(s.running), "queued": len(s.waiting)}

    def metrics(self) -> dict:
        """Load and cache numbers (read without locking: a snapshot, possibly a step old)."""
        s = self.scheduler
        pool, store = self.runner.kv_pool, self.runner.param_store
        idle, since = self._idle
        shared = self.runner.attn_backend.shared
        return {
            "num_running_requests": len(s.running),
            "num_queued_requests": len(s.waiting),
            "kv_cache_usage": (pool.capacity - pool.available_size()) / pool.capacity,
            "radix_cache_tokens": s.tree.evictable_size + s.tree.protected_size,
            "cache_hit_rate": s.stats.cached_tokens / s.stats.prompt_tokens if s.stats.prompt_tokens else 0.0,
            "generation_tokens_per_second": s.tokens_per_second(),
            "prompt_tokens_total": s.stats.prompt_tokens,
            "cached_tokens_total": s.stats.cached_tokens,
            "prefill_tokens_total": s.stats.prefill_tokens,
            "generated_tokens_total": s.stats.generated_tokens,
            "finished_requests_total": s.stats.finished_requests,
            "retractions_total": s.stats.num_retractions,
            "start_time_seconds": self._start_time,   # when this engine started (its counters count from then)
            "steps_total": s.stats.num_steps,   # forward steps; with step_requests_total the mean batch
            "step_requests_total": s.stats.step_requests,
            "step_seconds_total": s.stats.step_seconds,   # wall time of the steps with work (per step: host + device)
            "weight_update_requeues_total": s.stats.weight_update_requeues,
            "idle_seconds_total": idle + (time.perf_counter() - since if since is not None else 0.0),   # waits
            # with nothing to step on (no request, paused or released): a rollout's wall time minus it is the engine's
            "weight_version": s.weight_version,
            "weight_sync_storages_open": self._receiver.shared.open_count(),   # colocated senders' storages mapped
            "weight_sync_handles_opened_total": self._receiver.shared.opened_total,
            "weights_kept_releases_total": store.releases["kept"] if store else 0,   # weights to host memory
            "weights_discarded_releases_total": store.releases["discarded"] if store else 0,   # refilled by a push
            # shared-prefix decode (EngineConfig.shared_prefix_decode): decode request-steps, and those whose prefix
            # was read once for their group
            "shared_prefix_decode_requests_total": shared.requests_total if shared else 0,
            "shared_prefix_grouped_requests_total": shared.grouped_total if shared else 0,
            "paused": self._paused,
            "weight_update_phases_s": dict(self._update_phases),   # the last update call's seconds per phase
        }

    # ----------------------------------------------------------------- lifecycle
    def shutdown(self) -> None:
        """Abort everything in flight, stop the scheduler thread, leave weight-update groups and stop the tp workers."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(("stop",))
        self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():  # stuck in a step (a collective whose peer is gone): no graceful stop is possible
            self.runner.shutdown(graceful=False)
            raise RuntimeError(f"engine scheduler thread did not stop within {STOP_TIMEOUT_S:g} s (blocked in a "
                               "step); tensor-parallel workers were killed")
        self._receiver.close()
        self.runner.shutdown()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        if getattr(self, "_thread", None) is not None and not getattr(self, "_closed", True):
            self.shutdown()



def _check_arg(name: str, value: Any, kinds: tuple[type, ...]) -> None:
    """ValueError naming `name` unless value is one of kinds, or a list of them."""
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, kinds) for v in items):
        bad = next(v for v in items if not isinstance(v, kinds))
        raise ValueError(f"{name} must be {' or '.join(k.__name__ for k in kinds if k is not type(None))} (or a "
                         f"list of them), got {type(bad).__name__}")


def _check_version(weight_version: int) -> int:
    """The weight version an update sets: an int, required (a missing or non-int version is a TypeError)."""
    if not isinstance(weight_version, int) or isinstance(weight_version, bool):
        raise TypeError(f"weight_version must be an int (the version the new weights get), got {weight_version!r}")
    return weight_version


def _arguments(local_vars: dict[str, Any]) -> dict[str, Any]:
    """A control method's arguments by name (its `locals()` at entry, without self), as the tp workers get them."""
    return {name: value for name, value in local_vars.items() if name != "self"}

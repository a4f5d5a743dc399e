"""RolloutManager: one step of rollouts -- prompts x n samples through the generate function, rewards, filters.

A step launches groups (a prompt sampled n times, sharing a group_index) with at most
--rollout-concurrency generate calls in flight per engine, scores each finished group, and keeps it
unless a sample failed or the dynamic sampling filter drops it; dropped groups are
refilled by further sampling rounds (at most --max-oversampling-rounds). When the batch
is full or --rollout-deadline passes, the engines abort what is still running; those
groups go back to a buffer and are served first next step -- with --partial-rollout they
keep their tokens (the engine continues from prompt + partial response), otherwise they
restart from the prompt. Multi-agent samples of one prompt leave with a group_index per role
(group baselines compare a role only with itself). Resumed samples keep each token's weight version;
with --offpolicy-tokens mask the tokens older than a sample's newest leave the loss.

--async-mode fully (docs/async.md): `start_stream` / `next_batch` / `stop_stream` replace `generate`: groups are
generated continuously, at most --max-staleness batches ahead of the trainer, and handed out earliest deadline first
(a group launched at version u is due by u + --max-staleness; the trainer waits for due groups still generating), so
every trained token is within --max-staleness versions of the trainer's. The driver wraps this class in a Ray
actor.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from rollout.client import EngineClient
from rollout.config import EnvConfig, RolloutConfig
from rollout.data import PromptDataset
from rollout.eval_config import DEFAULT_EVAL_SET, EvalSet
from rollout.filters import scalar_reward
from rollout.generate import GenerateArgs
from kiln_common.atomic_io import atomic_torch_save
from kiln_common.logs import progress_bar
from kiln_common.plugins import load_function
from rollout.rewards import RewardScorer
from rollout.router import Router
from rollout.staleness import mask_offpolicy_tokens, staleness
from kiln_common.sample import DEFAULT_POLICY, Sample, Status


logger = logging.getLogger(__name__)

_DONE = (Status.COMPLETED, Status.TRUNCATED)
FAILURE_LOG_LIMIT = 20   # failed samples logged one by one per step (all engines down would log every sample)


class DataExhausted(RuntimeError):
    """Every epoch of the prompt data has been served."""


@dataclass
class RolloutBatch:
    """One step's trainable samples (complete groups, ordered by group then index), metrics and failures."""

    step: int
    samples: list[Sample]
    metrics: dict[str, float]
    failed: list[Sample] = field(default_factory=list)

    def groups(self) -> list[list[Sample]]:
        """Samples grouped by group_index, in order."""
        groups: dict[int, list[Sample]] = {}
        for s in self.samples:
            groups.setdefault(s.group_index, []).append(s)
        return list(groups.values())

    def by_policy(self) -> dict[str, list[Sample]]:
        """Samples split by the policy that trains on them (multi-agent)."""
        out: dict[str, list[Sample]] = {}
        for s in self.samples:
            out.setdefault(s.policy, []).append(s)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what --save-debug-rollout-data writes)."""
        return {"step": self.step, "samples": [s.to_dict() for s in self.samples], "metrics": dict(self.metrics),
                "failed": [s.to_dict() for s in self.failed]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RolloutBatch":
        return cls(step=d["step"], samples=[Sample.from_dict(s) for s in d["samples"]], metrics=dict(d["metrics"]),
                   failed=[Sample.from_dict(s) for s in d.get("failed", [])])


@dataclass
class _EvalTask:
    """One eval set ready to run: its prompts, its rollout config (reward, eval sampling), params and scorer."""

    spec: EvalSet
    data: PromptDataset
    config: RolloutConfig
    params: dict[str, Any]
    scorer: RewardScorer


@dataclass
class _Group:
    prompt: Sample  # the prompt (tokens = prompt ids, no response)
    samples: list[Sample]  # its trajectories: n, or more when a generate function returns lists


@dataclass
class _Stream:
    """--async-mode fully: the producer task, the groups in flight and ready, the trainer's weight version."""

    version: int   # the trainer's weight version as of the last next_batch
    start_version: int
    task: asyncio.Task | None = None
    launched: int = 0   # groups launched and not dropped (failed, filtered, stale): what the staleness bound counts
    inflight: dict[asyncio.Future, _Group] = field(default_factory=dict)
    started: dict[int, int] = field(default_factory=dict)   # group_index -> the version current at its launch
    ready: list[_Group] = field(default_factory=list)   # scored groups, in the order they finished
    failed: list[Sample] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"dropped_filter": 0, "dropped_failed": 0,
                                                            "dropped_stale": 0})
    changed: asyncio.Event = field(default_factory=asyncio.Event)   # a group finished or the stream ended
    capacity: asyncio.Event = field(default_factory=asyncio.Event)   # the bound may allow another launch
    exhausted: bool = False
    last_batch: float = field(default_factory=time.monotonic)


def _fresh(prompt: Sample, index: int) -> Sample:
    sample = copy.deepcopy(prompt)
    sample.index = index
    return sample


class RolloutManager:
    """Owns the prompt data and a Router over the engines; `generate(step)` returns a scored RolloutBatch.

    `clients` is one policy's engines (a Router or clients), or {policy: Router | clients} for several
    policies; generate functions get them all as `args.clients` and the first one as `args.client`,
    and `env_config` (an `rollout.config.EnvConfig`) as `args.env_config`. `eval_data` is the eval set 'default'
    (the run's eval settings); `eval_sets` adds (EvalSet, its PromptDataset) pairs of --eval-config.
    """

    def __init__(self, config: RolloutConfig, data: PromptDataset | None,
                 clients: Router | Sequence[EngineClient] | Mapping[str, Router | Sequence[EngineClient]],
                 tokenizer: Any, eval_data: PromptDataset | None = None,
                 env_config: EnvConfig | None = None,
                 eval_sets: Sequence[tuple[EvalSet, PromptDataset]] = ()) -> None:
        self.config = config
        self.data = data
        self.eval_data = eval_data
        by_policy = clients if isinstance(clients, Mapping) else {DEFAULT_POLICY: clients}
        if not by_policy:
            raise ValueError("RolloutManager needs the engines of at least one policy")
        self.routers = {name: c if isinstance(c, Router) else Router(
            c, page_size=config.router_page_size, balance_threshold=config.router_balance_threshold)
            for name, c in by_policy.items()}
        self._check_policies = isinstance(clients, Mapping)  # named policies: samples must name one of them
        self.default_policy = next(iter(self.routers))  # what samples train unless the generate function says
        self.router = self.routers[self.default_policy]
        self.args = GenerateArgs(client=self.router, tokenizer=tokenizer, config=config, clients=self.routers,
                                 env_config=env_config)
        self.generate_fn = load_function(config.custom_generate_function_path)
        if not inspect.iscoroutinefunction(self.generate_fn):
            raise TypeError(f"generate function {config.custom_generate_function_path} must be "
                            f"`async def fn(args, sample, sampling_params)`")
        self.scorer = RewardScorer(config, self.args)
        self.filter_fn = (load_function(config.dynamic_sampling_filter_path)
                          if config.dynamic_sampling_filter_path else None)
        self.post_process_fn = (load_function(config.custom_reward_post_process_path)
                                if config.custom_reward_post_process_path else None)
        self._next_index = 0
        self._next_group = 0
        self._buffer: list[_Group] = []  # groups left over from the last step, served first
        self._stopping = False
        self._inflight: set[asyncio.Task] = set()
        self._stream: _Stream | None = None   # --async-mode fully
        self._failures_logged = 0   # this step's; beyond FAILURE_LOG_LIMIT they are only counted
        self.eval_tasks: dict[str, _EvalTask] = {}
        pairs = ([(EvalSet(DEFAULT_EVAL_SET, ""), eval_data)] if eval_data is not None else []) + list(eval_sets)
        for spec, dataset in pairs:
            if spec.name in self.eval_tasks:
                raise ValueError(f"eval set {spec.name!r} is given twice")
            self.eval_tasks[spec.name] = self._eval_task(spec, dataset)

    @property
    def max_in_flight(self) -> int:
        """Generate calls in flight at most: --rollout-concurrency per engine, over every policy's engines."""
        return self.config.rollout_concurrency * sum(len(router.clients) for router in self.routers.values())

    # ---- one step -------------------------------------------------------------------------------------------

    async def generate(self, step: int) -> RolloutBatch:
        """Roll out --rollout-batch-size groups of --n-samples-per-prompt scored samples."""
        cfg = self.config
        if cfg.load_debug_rollout_data:
            return self.load_debug(cfg.load_debug_rollout_data.format(step=step))
        if self.data is None and not self._buffer:
            raise ValueError("RolloutManager has no prompt data (pass a PromptDataset)")
        start = time.monotonic()
        for router in self.routers.values():
            if not all(router.healthy):
                await router.check_health()
            router.take_stats()
        deadline = start + cfg.rollout_deadline if cfg.rollout_deadline else None
        target = cfg.rollout_batch_size
        sem = asyncio.Semaphore(self.max_in_flight)
        accepted: list[_Group] = []
        failed: list[Sample] = []
        counts = {"dropped_filter": 0, "dropped_failed": 0, "returned_to_buffer": 0, "rounds": 0,
                  "resumed": sum(1 for g in self._buffer if any(s.response_length for s in g.samples))}
        self._stopping = False
        self._failures_logged = 0
        pbar = progress_bar(0, f"rollout {step}", "sample", cfg.progress)   # drawn by the driver on a terminal only

        def settle(group: _Group) -> None:
            samples = group.samples
            if any(s.status == Status.FAILED for s in samples):
                counts["dropped_failed"] += 1
                failed.extend(s for s in samples if s.status == Status.FAILED)
            elif not all(s.status in _DONE for s in samples) or len(accepted) >= target:
                self._return_to_buffer(group)
                counts["returned_to_buffer"] += 1
            elif not self._has_scalar_rewards(group, failed):
                counts["dropped_failed"] += 1
            elif self.filter_fn is not None and not self._keep(group, failed, counts):
                counts["dropped_filter"] += 1
            else:
                accepted.append(group)

        try:
            while len(accepted) < target and counts["rounds"] <= cfg.max_oversampling_rounds:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                groups = self._take_groups(max(target - len(accepted), cfg.over_sampling_batch_size or 0))
                if not groups:
                    break
                counts["rounds"] += 1
                pbar.total += sum(len(g.samples) for g in groups)
                pbar.refresh()
                pending = {asyncio.ensure_future(self._run_group(g, sem, pbar)) for g in groups}
                while pending:
                    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                    done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        settle(task.result())
                    if pending and (len(accepted) >= target or (deadline is not None and time.monotonic() >= deadline)):
                        for group in await self._stop(pending):
                            settle(group)
                        pending = set()
        finally:
            pbar.close()
            self._stopping = False
        if not accepted and not failed and counts["rounds"] == 0:
            raise DataExhausted(f"the prompt data is exhausted after {self.data.epoch if self.data else 0} epoch(s)")
        if len(accepted) < target:
            logger.warning("step %d: only %d of %d groups (dropped %d by the filter, %d for failures, %d rounds)",
                           step, len(accepted), target, counts["dropped_filter"], counts["dropped_failed"],
                           counts["rounds"])
        return self._make_batch(step, accepted, failed, counts, time.monotonic() - start)

    def _make_batch(self, step: int, accepted: list[_Group], failed: list[Sample], counts: dict[str, int],
                    elapsed: float) -> RolloutBatch:
        """The step's RolloutBatch of accepted groups: ordered, off-policy tokens masked (--offpolicy-tokens mask),
        roles separated, metrics; saved with --save-debug-rollout-data."""
        cfg = self.config
        accepted.sort(key=lambda g: g.prompt.group_index)
        samples = [s for g in accepted for s in sorted(g.samples, key=lambda s: s.index)]
        masked = sum(mask_offpolicy_tokens(s) for s in samples) if cfg.offpolicy_tokens == "mask" else 0
        metrics = self._metrics(samples, failed, counts, elapsed)   # the scorer's rewards
        if self.post_process_fn is not None and samples:
            post = self._post_process_rewards(samples)
            if post is None:  # the hook failed: so did this step's samples (marked), the run goes on
                failed, samples = failed + samples, []
                metrics = self._metrics(samples, failed, counts, elapsed)
            else:
                metrics["rollout/post_processed_reward_mean"] = post
        metrics["rollout/offpolicy_masked_tokens"] = masked
        self._separate_roles(samples)
        batch = RolloutBatch(step=step, samples=samples, failed=failed, metrics=metrics)
        if cfg.save_debug_rollout_data:
            self.save_debug(batch, cfg.save_debug_rollout_data.format(step=step))
        return batch

    # ---- fully asynchronous: a continuous stream of groups ----------------------------------------------------

    async def start_stream(self, version: int) -> None:
        """--async-mode fully: start generating groups continuously (at most --max-staleness batches ahead of the
        trainer at weight `version`); `next_batch` takes them."""
        if self._stream is not None:
            raise RuntimeError("the rollout stream is already running")
        if self.data is None and not self._buffer:
            raise ValueError("RolloutManager has no prompt data (pass a PromptDataset)")
        for router in self.routers.values():
            if not all(router.healthy):
                await router.check_health()
            router.take_stats()
        self._stream = st = _Stream(version=version, start_version=version)
        st.task = asyncio.ensure_future(self._produce(st))
        st.task.add_done_callback(lambda _: st.changed.set())   # a producer that failed wakes next_batch to raise

    async def _produce(self, st: "_Stream") -> None:
        """Launch groups while fewer than (version - start_version + max_staleness + 1) x batch size have been
        launched and not dropped (AReaL's bound: a group starts at most max_staleness versions before it is due)."""
        cfg = self.config
        sem = asyncio.Semaphore(self.max_in_flight)
        pbar = progress_bar(0, "rollout stream", "sample", False)
        while True:
            while st.launched >= (st.version - st.start_version + cfg.max_staleness + 1) * cfg.rollout_batch_size:
                st.capacity.clear()
                await st.capacity.wait()
            groups = self._take_groups(1)
            if not groups:
                st.exhausted = True
                st.changed.set()
                return
            st.launched += 1
            task = asyncio.ensure_future(self._run_group(groups[0], sem, pbar))
            st.inflight[task] = groups[0]
            st.started[groups[0].prompt.group_index] = st.version
            task.add_done_callback(self._settle_streamed)

    def _settle_streamed(self, task: asyncio.Future) -> None:
        """A streamed group finished: ready, or failed / filtered (dropped, and a replacement may start)."""
        st = self._stream
        if st is None or task not in st.inflight:
            return
        group = st.inflight.pop(task)
        if task.cancelled():
            return
        if task.exception() is not None:
            error = task.exception()
            for s in group.samples:
                self._failed(s, f"{type(error).__name__}: {error}")
        samples = group.samples
        if any(s.status == Status.FAILED for s in samples):
            st.counts["dropped_failed"] += 1
            st.failed.extend(s for s in samples if s.status == Status.FAILED)
        elif not all(s.status in _DONE for s in samples):
            return   # aborted by stop_stream
        elif not self._has_scalar_rewards(group, st.failed):
            st.counts["dropped_failed"] += 1
        elif self.filter_fn is not None and not self._keep(group, st.failed, st.counts):
            st.counts["dropped_filter"] += 1
        else:
            st.ready.append(group)
            st.changed.set()
            return
        st.launched -= 1   # dropped: a replacement may start
        st.started.pop(group.prompt.group_index, None)
        st.changed.set()
        st.capacity.set()

    async def next_batch(self, step: int, version: int) -> RolloutBatch:
        """The next --rollout-batch-size ready groups, oldest launches first, whose every sample is within
        --max-staleness of the trainer's weight `version`; waits for the groups in flight that were launched
        --max-staleness or more versions ago (the next version would put them past the bound), so that groups are
        not dropped; one past the bound all the same is dropped and counted (rollout/stale_dropped_groups). Starts
        the stream if needed."""
        cfg = self.config
        if self._stream is None:
            await self.start_stream(version)
        st = self._stream
        st.version = version
        st.capacity.set()
        start = time.monotonic()
        while True:
            ready = {id(g) for g in st.ready}
            for group in [g for g in st.ready if any(staleness(s, version) > cfg.max_staleness for s in g.samples)]:
                st.ready.remove(group)   # a safety net: the wait below keeps groups from getting this old
                st.started.pop(group.prompt.group_index, None)
                st.counts["dropped_stale"] += 1
                st.launched -= 1
                st.capacity.set()
            if len(st.ready) >= cfg.rollout_batch_size and all(id(g) in ready for g in self._urgent(st, version)):
                break
            if st.task.done() and st.task.exception() is not None:
                raise st.task.exception()
            if st.exhausted and not st.inflight:
                if not st.ready:
                    raise DataExhausted(f"the prompt data is exhausted after "
                                        f"{self.data.epoch if self.data else 0} epoch(s)")
                logger.warning("step %d: only %d of %d groups (the prompt data is exhausted)", step, len(st.ready),
                               cfg.rollout_batch_size)
                break
            st.changed.clear()
            await st.changed.wait()
        st.ready.sort(key=lambda g: st.started.get(g.prompt.group_index, version))   # earliest deadlines first
        accepted, st.ready = st.ready[:cfg.rollout_batch_size], st.ready[cfg.rollout_batch_size:]
        for group in accepted:
            st.started.pop(group.prompt.group_index, None)
        counts = {**st.counts, "returned_to_buffer": 0, "resumed": 0, "rounds": 0}
        failed, st.failed = st.failed, []
        st.counts = dict.fromkeys(st.counts, 0)
        now = time.monotonic()
        batch = self._make_batch(step, accepted, failed, counts, now - st.last_batch)
        st.last_batch = now
        batch.metrics.update({"rollout/time_s": now - start, "rollout/stale_dropped_groups": counts["dropped_stale"],
                              "rollout/ready_groups": len(st.ready), "rollout/inflight_groups": len(st.inflight)})
        return batch

    def _urgent(self, st: _Stream, version: int) -> list[_Group]:
        """The groups this batch must hold so that no group passes the bound later (earliest deadline first).

        A group launched at version u must be trained by version u + K (its deadline). If the k-th earliest
        deadline d_k among the groups not yet trained leaves fewer batches (d_k - version + 1) than it needs
        (k / batch size), this batch takes the k - (d_k - version) x batch earliest ones; the launch bound keeps
        that at most one batch. Ties: ready groups first (no wait for an in-flight group that a ready one can
        stand in for)."""
        cfg, size = self.config, self.config.rollout_batch_size
        ready = {id(g) for g in st.ready}
        pending = sorted([*st.ready, *st.inflight.values()],
                         key=lambda g: (st.started.get(g.prompt.group_index, version), id(g) not in ready))
        need = 0
        for k, g in enumerate(pending, start=1):
            deadline = st.started.get(g.prompt.group_index, version) + cfg.max_staleness
            need = max(need, k - (deadline - version) * size)
        return pending[:need]

    async def stop_stream(self) -> None:
        """Stop the stream: abort the engines' requests, cancel what is left; ready groups are discarded."""
        st, self._stream = self._stream, None
        if st is None:
            return
        st.task.cancel()
        pending = set(st.inflight)
        st.inflight.clear()
        if pending:
            await self._stop(pending)
        self._stopping = False
        await asyncio.gather(st.task, return_exceptions=True)

    def _separate_roles(self, samples: list[Sample]) -> None:
        """Give each role of a prompt's group its own group_index, so group baselines (GRPO, RLOO) never mix roles.

        Multi-agent samples name their role in metadata["role"]; the first role of a group keeps the
        prompt's group_index, every other role gets a new one; metadata["prompt_group"] keeps the prompt's.
        """
        first_role: dict[int, str] = {}
        role_groups: dict[tuple[int, str], int] = {}
        for s in samples:
            role = s.metadata.get("role")
            if role is None:
                continue
            s.metadata["prompt_group"] = s.group_index
            if first_role.setdefault(s.group_index, role) == role:
                continue
            if (s.group_index, role) not in role_groups:
                role_groups[(s.group_index, role)] = self._next_group
                self._next_group += 1
            s.group_index = role_groups[(s.group_index, role)]

    def _has_scalar_rewards(self, group: _Group, failed: list[Sample]) -> bool:
        """True if every sample's reward gives a scalar (--reward-key); otherwise the group is failed."""
        try:
            for s in group.samples:
                scalar_reward(s, self.config.reward_key)
            return True
        except (KeyError, ValueError, TypeError) as e:
            message = str(e.args[0]) if e.args else repr(e)
            for s in group.samples:
                s.status, s.error = Status.FAILED, message
            failed.extend(group.samples)
            return False

    def _post_process_rewards(self, samples: list[Sample]) -> float | None:
        """--custom-reward-post-process-path over the batch: each sample's reward becomes the hook's value (the
        scorer's kept in metadata['raw_reward']); the mean, or None (samples marked failed) if the hook raised or
        did not answer one finite number per sample."""
        path = self.config.custom_reward_post_process_path
        try:
            rewards = [float(r) for r in self.post_process_fn(self.args, samples)]
            if len(rewards) != len(samples) or not all(math.isfinite(r) for r in rewards):
                raise ValueError(f"it must return one finite number per sample: got {len(rewards)} values for "
                                 f"{len(samples)} samples{'' if len(rewards) != len(samples) else ', not all finite'}")
        except Exception as e:  # noqa: BLE001 - a broken hook fails the step's samples, not the run
            message = f"reward post-process {path} raised {type(e).__name__}: {e}"
            logger.warning("%s; the %d samples of this batch are marked failed", message, len(samples))
            for s in samples:
                s.status, s.error = Status.FAILED, message
            return None
        for s, r in zip(samples, rewards):
            s.metadata["raw_reward"], s.reward = s.reward, r
        return sum(rewards) / len(rewards)

    def _keep(self, group: _Group, failed: list[Sample], counts: dict[str, int]) -> bool:
        """The dynamic sampling filter's verdict; a filter that raises drops the group as failed."""
        try:
            return bool(self.filter_fn(self.args, group.samples))
        except Exception as e:  # noqa: BLE001 - a broken filter fails the group, not the run
            message = f"filter {self.config.dynamic_sampling_filter_path} raised {type(e).__name__}: {e}"
            logger.warning("group %d: %s", group.prompt.group_index, message)
            for s in group.samples:
                s.status, s.error = Status.FAILED, message
            failed.extend(group.samples)
            counts["dropped_failed"] += 1
            counts["dropped_filter"] -= 1
            return False

    def _take_groups(self, n: int) -> list[_Group]:
        """Up to n groups: leftovers of the last step first, then new prompts."""
        groups, self._buffer = self._buffer[:n], self._buffer[n:]
        if len(groups) < n and self.data is not None:
            for prompt in self.data.next_prompts(n - len(groups)):
                prompt.group_index = self._next_group
                prompt.policy = self.default_policy
                self._next_group += 1
                groups.append(_Group(prompt, [_fresh(prompt, self._new_index())
                                              for _ in range(self.config.n_samples_per_prompt)]))
        return groups

    def _new_index(self) -> int:
        self._next_index += 1
        return self._next_index - 1

    def _return_to_buffer(self, group: _Group) -> None:
        if not self.config.partial_rollout:
            group.samples = [_fresh(group.prompt, s.index) for s in group.samples[:self.config.n_samples_per_prompt]]
        self._buffer.append(group)

    async def _stop(self, pending: set[asyncio.Future]) -> list[_Group]:
        """Abort the engines' requests, give them --abort-grace to come back, cancel the rest; the groups."""
        self._stopping = True
        try:
            await asyncio.gather(*(router.abort_all() for router in self.routers.values()))
        except Exception as e:  # noqa: BLE001 - aborting is best effort; cancellation follows
            logger.warning("abort_all failed: %r", e)
        done, still = await asyncio.wait(pending, timeout=self.config.abort_grace)
        if still:
            for task in list(self._inflight):
                task.cancel()
            more, _ = await asyncio.wait(still)
            done |= more
        return [task.result() for task in done]

    async def _run_group(self, group: _Group, sem: asyncio.Semaphore, pbar: Any) -> _Group:
        results = await asyncio.gather(*(self._run_sample(s, sem, pbar) for s in group.samples))
        group.samples = [s for result in results for s in result]
        for s in group.samples:
            s.group_index = group.prompt.group_index
        await self.scorer.score(group.samples)
        return group

    async def _run_sample(self, sample: Sample, sem: asyncio.Semaphore, pbar: Any) -> list[Sample]:
        """Run the generate function on a copy of `sample`; on cancel or abort keep the pre-call state."""
        if sample.status not in (Status.PENDING, Status.ABORTED):
            return [sample]
        async with sem:
            if self._stopping:
                return [sample]
            task = asyncio.ensure_future(self._call_generate(copy.deepcopy(sample)))
            self._inflight.add(task)
            try:
                return await task
            except asyncio.CancelledError:
                if not self._stopping:
                    raise
                sample.status = Status.ABORTED
                return [sample]
            finally:
                self._inflight.discard(task)
                pbar.update(1)

    async def _call_generate(self, sample: Sample) -> list[Sample]:
        cfg = self.config
        params = cfg.sampling_params()
        if cfg.sampling_seed is not None:
            params["seed"] = cfg.sampling_seed + sample.index * 100_003 + sample.response_length
        original_index, group_index = sample.index, sample.group_index
        try:
            result = await asyncio.wait_for(self.generate_fn(self.args, sample, params), cfg.sample_timeout)
            results = result if isinstance(result, list) else [result]
            if not results or not all(isinstance(s, Sample) for s in results):
                raise TypeError(f"returned {type(result).__name__}; expected a Sample or a list of Samples")
            for i, s in enumerate(results):
                s.validate()
                if s.status == Status.PENDING:
                    raise ValueError(f"returned sample {s.index} with status pending; set its status")
                if self._check_policies and s.policy not in self.routers:
                    raise ValueError(f"returned sample {s.index} for policy {s.policy!r}; "
                                     f"the policies are {sorted(self.routers)}")
                s.group_index = group_index
                if i > 0 and s.index == original_index:
                    s.index = self._new_index()
            return results
        except asyncio.TimeoutError:
            return [self._failed(sample, f"generate timed out after {cfg.sample_timeout}s")]
        except Exception as e:  # noqa: BLE001 - a failing generate function fails its sample, not the run
            return [self._failed(sample, f"generate function {cfg.custom_generate_function_path} raised "
                                         f"{type(e).__name__}: {e}")]

    def _failed(self, sample: Sample, message: str) -> Sample:
        self._failures_logged += 1
        if self._failures_logged <= FAILURE_LOG_LIMIT:
            logger.warning("sample %d: %s", sample.index, message)
        elif self._failures_logged == FAILURE_LOG_LIMIT + 1:
            logger.warning("more samples failed; the rest of this step's failures are counted, not logged "
                           "(rollout/failed_samples and the driver's step log sum them up)")
        sample.status, sample.error, sample.reward = Status.FAILED, message, None
        return sample

    def _metrics(self, samples: list[Sample], failed: list[Sample], counts: dict[str, int],
                 elapsed: float) -> dict[str, float]:
        stats = [s for router in self.routers.values() for s in router.take_stats()]
        prompt_tokens = sum(s.prompt_tokens for s in stats)
        completion_tokens = sum(s.completion_tokens for s in stats)
        rewards = [scalar_reward(s, self.config.reward_key) for s in samples]
        lengths = [s.response_length for s in samples]
        n = max(len(samples), 1)
        mean = sum(rewards) / len(rewards) if rewards else 0.0
        metrics = {
            "rollout/num_groups": len({s.group_index for s in samples}),
            "rollout/num_samples": len(samples),
            "rollout/reward_mean": mean,
            "rollout/reward_std": math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)) if rewards else 0.0,
            "rollout/response_len_mean": sum(lengths) / n,
            "rollout/response_len_max": max(lengths, default=0),
            "rollout/truncated_rate": sum(s.status == Status.TRUNCATED for s in samples) / n,
            "rollout/failed_samples": len(failed),
            "rollout/dropped_groups_filter": counts["dropped_filter"],
            "rollout/dropped_groups_failed": counts["dropped_failed"],
            "rollout/returned_to_buffer": counts["returned_to_buffer"],
            "rollout/resumed_groups": counts["resumed"],
            "rollout/sampling_rounds": counts["rounds"],
            "rollout/cache_hit_rate": sum(s.cached_tokens for s in stats) / prompt_tokens if prompt_tokens else 0.0,
            "rollout/prompt_tokens": prompt_tokens,
            "rollout/completion_tokens": completion_tokens,
            "rollout/tokens_per_s": completion_tokens / elapsed if elapsed > 0 else 0.0,
            "rollout/time_s": elapsed,
            "rollout/engine_slow_probes": sum(s.slow_probes for s in stats),   # engines kept: slow, not dead
            "rollout/engine_request_timeouts": sum(s.timeouts for s in stats),   # requests retried after a timeout
        }
        if self.data is not None:
            metrics["rollout/data_epoch"] = self.data.epoch
            metrics["rollout/skipped_rows"] = len(self.data.skipped)
        return metrics

    # ---- evaluation -----------------------------------------------------------------------------------------

    def _eval_task(self, spec: EvalSet, data: PromptDataset) -> _EvalTask:
        config = spec.rollout_config(self.config)
        scorer = self.scorer if config is self.config else RewardScorer(config, self.args)
        return _EvalTask(spec, data, config, spec.sampling_params(config), scorer)

    async def evaluate(self, data: PromptDataset | None = None) -> dict[str, float]:
        """Reward and length metrics over every prompt of each eval set (the sets run concurrently, sharing
        --rollout-concurrency): eval/<metric> for the set 'default' (--eval-prompt-data), eval/<name>/<metric> for
        the others. `data`: evaluate only it, as the set 'default'."""
        if data is not None:
            tasks = [self._eval_task(EvalSet(DEFAULT_EVAL_SET, ""), data)]
        else:
            tasks = list(self.eval_tasks.values())
        if not tasks:
            raise ValueError("no evaluation data: pass eval_data / eval_sets or set --eval-prompt-data / --eval-config")
        sem = asyncio.Semaphore(self.max_in_flight)
        self._failures_logged = 0
        metrics: dict[str, float] = {}
        for result in await asyncio.gather(*(self._evaluate_set(task, sem) for task in tasks)):
            metrics.update(result)
        return metrics

    async def _evaluate_set(self, task: _EvalTask, sem: asyncio.Semaphore) -> dict[str, float]:
        cfg, data, params = task.config, task.data, task.params

        async def one(prompt: Sample, group: int, index: int) -> list[Sample]:
            sample = _fresh(prompt, index)
            sample.group_index = group
            async with sem:
                try:
                    result = await asyncio.wait_for(self.generate_fn(self.args, sample, dict(params)),
                                                    cfg.sample_timeout)
                except Exception as e:  # noqa: BLE001 - counted as failed
                    return [self._failed(sample, f"{type(e).__name__}: {e}")]
            return result if isinstance(result, list) else [result]

        prompts = []
        for i in range(len(data)):
            if i in data.skipped:
                continue
            try:
                prompts.append(data.make_prompt(i))
            except ValueError as e:
                logger.warning("skipping row %d of eval set %r: %s", i, task.spec.name, e)
        n = cfg.n_samples_per_eval_prompt
        jobs = [one(p, k, k * n + j) for k, p in enumerate(prompts) for j in range(n)]
        samples = [s for result in await asyncio.gather(*jobs) for s in result]
        await task.scorer.score(samples)
        scored = [s for s in samples if s.status in _DONE and s.reward is not None]
        rewards = [scalar_reward(s, cfg.reward_key) for s in scored]
        count = max(len(scored), 1)
        prefix = task.spec.metric_prefix()
        return {
            f"{prefix}/reward_mean": sum(rewards) / count,
            f"{prefix}/num_samples": len(samples),
            f"{prefix}/failed_samples": len(samples) - len(scored),
            f"{prefix}/response_len_mean": sum(s.response_length for s in scored) / count,
            f"{prefix}/truncated_rate": sum(s.status == Status.TRUNCATED for s in scored) / count,
        }

    # ---- state and debug data -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Data position, index counters and the leftover groups (for exact resumption); a running stream's groups
        (in flight or ready) are recorded as fresh groups of their prompts, generated again on resume."""
        buffer = list(self._buffer)
        if self._stream is not None:
            pending = [*self._stream.inflight.values(), *self._stream.ready]
            n = self.config.n_samples_per_prompt
            buffer += [_Group(g.prompt, [_fresh(g.prompt, s.index) for s in g.samples[:n]])
                       for g in sorted(pending, key=lambda g: g.prompt.group_index)]
        return {"data": self.data.state_dict() if self.data is not None else None,
                "next_index": self._next_index, "next_group": self._next_group,
                "buffer": [{"prompt": g.prompt.to_dict(), "samples": [s.to_dict() for s in g.samples]}
                           for g in buffer]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`."""
        if state["data"] is not None and self.data is not None:
            self.data.load_state_dict(state["data"])
        self._next_index = state["next_index"]
        self._next_group = state["next_group"]
        self._buffer = [_Group(Sample.from_dict(g["prompt"]), [Sample.from_dict(s) for s in g["samples"]])
                        for g in state["buffer"]]

    @staticmethod
    def save_debug(batch: RolloutBatch, path: str | Path) -> None:
        """torch.save a batch's samples (as dicts) and metrics, atomically (a crash leaves no partial file)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(path, batch.to_dict())

    @staticmethod
    def load_debug(path: str | Path) -> RolloutBatch:
        """A batch written by `save_debug`."""
        import torch
        if not Path(path).exists():
            raise FileNotFoundError(f"debug rollout data {str(path)!r} does not exist")
        return RolloutBatch.from_dict(torch.load(path, weights_only=False))

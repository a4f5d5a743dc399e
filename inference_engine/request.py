"""Req: one sequence inside the engine, from admission to finish (and across retractions)."""

from __future__ import annotations

import itertools
from typing import Any, Callable

from inference_engine.radix_cache import TreeNode
from inference_engine.sampling_params import SamplingParams

_arrival = itertools.count()


class Req:
    """Prompt, generated tokens, log-probs and the KV bookkeeping of one sequence."""

    def __init__(self, rid: str, input_ids: list[int], sampling: SamplingParams, *, return_logprob: bool = False,
                 max_new_tokens: int | None = None, stream: bool = False, group: str | None = None,
                 on_output: Callable[["Req", bool], None] | None = None, seed: int | None = None):
        self.rid = rid
        self.group = group or rid  # n > 1: the samples (and their prefill-only parent) share the caller's rid
        self.origin_input_ids = input_ids
        self.output_ids: list[int] = []
        self.sampling = sampling
        self.max_new_tokens = sampling.max_new_tokens if max_new_tokens is None else max_new_tokens
        self.return_logprob = return_logprob
        self.stream = stream
        self.on_output = on_output
        self.seed = seed  # None: fresh random draws; else the sampler replays this seed's stream
        self.children: list[Req] = []  # n > 1: samples released into the queue once this prefill finishes
        self.arrival = next(_arrival)
        # log-probs
        self.output_logprobs: list[float] = []
        self.output_top_logprobs: list[list[tuple[float, int]]] = []
        self.input_logprobs: list[float | None] = []  # one per prompt token; the first is None
        # KV bookkeeping: tokens [0, kv_len) have KV in slots req_to_token[row, :kv_len]; the first
        # prefix_len of them belong to the radix tree (matched at admission or inserted after a prefill chunk;
        # locked through last_node)
        self.row: int | None = None
        self.kv_len = 0
        self.prefix_len = 0
        self.last_node: TreeNode | None = None
        self.last_slot = -1
        self.slots: list[int] = []  # host copy of req_to_token[row]: the slot of every allocated position
        self.new_slots: list[int] = []  # slots allocated for this step's tokens
        # overlap scheduling: tokens sampled on the device whose values the host reads one step late
        self.pending = 0
        # this step's input is a pending token (its KV is dropped if that token ends the request)
        self.lookahead = False
        self.admitted = -1  # order of (latest) admission, for newest-first retraction
        self.cache_epoch = -1  # radix cache epoch at (latest) admission: KV from an older epoch is never cached
        self.deferrals = 0  # admissions skipped to wait for another request's prefill of a shared prefix
        self.cached_tokens: int | None = None  # prefix reused at first admission
        # outcome
        self.finish_reason: dict[str, Any] | None = None
        self.error: str | None = None
        self.weight_version: int | None = None
        self.routed_experts = None  # return_routed_experts: [tokens - 1, moe layers, top_k] on the host, at finish
        # [[version, count], ...]: the weight version each output token was sampled under, run-length encoded
        self.output_versions: list[list[int]] = []

    @property
    def prompt_len(self) -> int:
        return len(self.origin_input_ids)

    @property
    def fill_len(self) -> int:
        """Prompt plus generated tokens: what a (re-)prefill must cover."""
        return len(self.origin_input_ids) + len(self.output_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """fill_ids[start:end] without building the full list."""
        n = len(self.origin_input_ids)
        if start >= n:
            return self.output_ids[start - n:end - n]
        return (self.origin_input_ids + self.output_ids)[start:end] if end > n else self.origin_input_ids[start:end]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt log-probs still to compute (these requests skip the prefix cache)."""
        return self.sampling.return_prompt_logprobs and len(self.input_logprobs) < self.prompt_len

    def add_token_version(self, version: int) -> None:
        """Record that the newest output token was sampled under weight `version`."""
        if self.output_versions and self.output_versions[-1][0] == version:
            self.output_versions[-1][1] += 1
        else:
            self.output_versions.append([version, 1])

    def finish(self, kind: str, matched: int | str | None = None, message: str | None = None) -> None:
        """Record why the request ended (SGLang's finish_reason)."""
        reason: dict[str, Any] = {"type": kind, "matched": matched}
        if kind == "length":
            reason["length"] = len(self.output_ids)
        if message is not None:
            reason["message"] = message
            self.error = message
        self.finish_reason = reason

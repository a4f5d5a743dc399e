"""A fake engine client for tests of rollout code (generate functions, router, manager) without an engine.

`FakeEngineClient` answers in SGLang's response format. By default the response is
`response_len` tokens, each a fixed function of the sequence so far, then EOS; a
request whose input is an earlier prompt plus part of its response continues that
response, so an aborted generation resumed from prompt + partial output ends as an
uninterrupted one would. With `script`, the response is a given text (encoded with
`tokenizer`, EOS appended). It emits one token per `token_delay` seconds (a number or
a function of the input ids), honours `abort_all`, simulates a prefix cache
(`cached_tokens`) and records concurrency. Each token carries the `weight_version` the client has when it
is emitted (`meta_info.output_token_weight_versions`), so a test changes it mid-generation like a push.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence

from rollout.client import EngineError, EngineUnavailableError


def next_token(seq: Sequence[int], vocab_size: int) -> int:
    """The fake model's deterministic next token after `seq`."""
    return (sum(seq) * 31 + len(seq) * 7) % vocab_size


class FakeEngineClient:
    """An in-memory EngineClient: deterministic outputs, simulated prefix cache, abort and failures."""

    def __init__(self, name: str = "fake", *, vocab_size: int = 512, eos_id: int = 0, response_len: int = 6,
                 token_delay: float | Callable[[list[int]], float] = 0.0,
                 script: Callable[[list[int]], str] | None = None,
                 tokenizer: Any = None, weight_version: int = 0) -> None:
        self.name = name
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.response_len = response_len  # tokens before EOS when not scripted
        self.token_delay = token_delay
        self.script = script
        self.tokenizer = tokenizer
        self.weight_version = weight_version
        self.calls: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.healthy = True  # health() answer
        self.down = False  # generate raises EngineUnavailableError
        self.stalled = False  # generate and health never answer (a stopped or hung engine)
        self.slow_probes = False  # health never answers, generate still serves (a loaded machine)
        self.gate: asyncio.Event | None = None  # when set: generate waits for it before answering (a slow engine)
        self.aborts = 0
        self._abort = asyncio.Event()
        self._seen: list[tuple[int, ...]] = []
        self._plans: dict[tuple[int, ...], list[int]] = {}  # prompt -> full response it was given

    def _cached(self, input_ids: list[int]) -> int:
        best = 0
        for seen in self._seen:
            n = 0
            for a, b in zip(seen, input_ids):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return best

    def _plan(self, input_ids: list[int]) -> list[int]:
        """The rest of the response to `input_ids` (ending with EOS); continues a plan cut short by an abort."""
        for prompt, plan in self._plans.items():
            done = len(input_ids) - len(prompt)
            if 0 < done < len(plan) and tuple(input_ids[:len(prompt)]) == prompt \
                    and input_ids[len(prompt):] == plan[:done]:
                return plan[done:]
        if self.script is not None:
            text = self.script(input_ids)
            plan = list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if self.tokenizer else []
        else:
            seq, plan = list(input_ids), []
            for _ in range(self.response_len):
                tok = next_token(seq, self.vocab_size)
                tok = tok if tok != self.eos_id else (tok + 1) % self.vocab_size
                plan.append(tok)
                seq.append(tok)
        plan.append(self.eos_id)
        self._plans[tuple(input_ids)] = plan
        return plan

    async def generate(self, input_ids: Sequence[int], sampling_params: dict[str, Any],
                       return_logprob: bool = True, session_id: str | None = None) -> dict[str, Any]:
        """Emit the planned response token by token until EOS, max_new_tokens or abort."""
        input_ids = list(input_ids)
        self.calls.append({"input_ids": input_ids, "sampling_params": dict(sampling_params),
                           "session_id": session_id})
        if self.down:
            raise EngineUnavailableError(f"{self.name} is down")
        if self.stalled:
            await asyncio.Event().wait()
        if self.gate is not None:
            await self.gate.wait()
        if not input_ids:
            raise EngineError(f"{self.name}: empty input_ids")
        cached = self._cached(input_ids)
        self._seen.append(tuple(input_ids))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        delay = self.token_delay(input_ids) if callable(self.token_delay) else self.token_delay
        try:
            plan = self._plan(input_ids)
            budget = sampling_params.get("max_new_tokens", len(plan))
            out: list[int] = []
            versions: list[list[int]] = []  # the weight version at each token's emission, run-length
            finish = "stop"
            for tok in plan:
                if self._abort.is_set():
                    finish = "abort"
                    break
                if len(out) >= budget:
                    finish = "length"
                    break
                if delay:
                    await asyncio.sleep(delay)
                    if self._abort.is_set():
                        finish = "abort"
                        break
                out.append(tok)
                if versions and versions[-1][0] == self.weight_version:
                    versions[-1][1] += 1
                else:
                    versions.append([self.weight_version, 1])
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._abort.clear()
        if self.script is not None and self.tokenizer is not None:
            text = self.tokenizer.decode([t for t in out if t != self.eos_id])
        else:
            text = "".join(f"<{t}>" for t in out if t != self.eos_id)
        meta = {"prompt_tokens": len(input_ids), "completion_tokens": len(out), "cached_tokens": cached,
                "finish_reason": {"type": finish, "matched": self.eos_id if finish == "stop" else None},
                "weight_version": self.weight_version, "output_token_weight_versions": versions}
        if return_logprob:
            meta["output_token_logprobs"] = [(-0.01 * (k + 1), t, None) for k, t in enumerate(out)]
        return {"text": text, "output_ids": out, "meta_info": meta}

    async def health(self) -> bool:
        """The `healthy` attribute (never answers while `stalled` or `slow_probes`)."""
        if self.stalled or self.slow_probes:
            await asyncio.Event().wait()
        return self.healthy and not self.down

    async def abort_all(self) -> None:
        """Make every request in flight return now with finish_reason 'abort'."""
        self.aborts += 1
        if self.in_flight:
            self._abort.set()

    async def flush_cache(self) -> None:
        """Forget the simulated prefix cache."""
        self._seen.clear()

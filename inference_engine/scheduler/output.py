"""Output processing: a step's sampled tokens and log-probs on their way back to their requests.

`LaunchedStep` carries a launched step's sampled tokens, log-probs and top log-probs to pinned host
memory behind an event. `OutputProcessor.process` appends them to their requests, checks the finish
conditions (EOS unless ignored, stop token ids, stop strings, `max_new_tokens`) and streams the requests
that go on. `prompt_logprobs` computes the log-probs of prompt tokens from a prefill's hidden states.
Ending a request (its KV, its n > 1 children, the final report) is the scheduler's `finish`, passed in.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from inference_engine.forward_batch import ForwardBatch
from inference_engine.model_runner import ModelRunner
from inference_engine.request import Req
from inference_engine.sampler import SampleOutput

log = logging.getLogger(__name__)


@dataclass
class LaunchedStep:
    """Sampled tokens of a launched step on their way to the host (pinned copies, complete once `done` is)."""

    reqs: list[Req]  # the requests that sampled, one per row
    tokens: torch.Tensor  # [B] int64, host
    logprobs: torch.Tensor  # [B] float32, host
    top_logprobs: torch.Tensor | None  # [B, k] float32, host
    top_ids: torch.Tensor | None  # [B, k] int64, host
    done: torch.cuda.Event | None  # recorded after the copies (CUDA); None: the copies were synchronous
    weight_version: int = 0  # of the weights the step ran with (a weight update waits for launched steps)

    @classmethod
    def start(cls, reqs: list[Req], out: SampleOutput, weight_version: int = 0) -> "LaunchedStep":
        """Queue the device -> host copies of out without waiting for them."""
        def host(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to("cpu", non_blocking=True)  # pinned destination on CUDA

        done = None
        copies = host(out.tokens), host(out.logprobs), host(out.top_logprobs), host(out.top_ids)
        if out.tokens.is_cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(out.tokens.device))
        return cls(reqs, *copies, done, weight_version)

    def wait(self) -> None:
        """Block until the copies are complete (the one device -> host wait of a step)."""
        if self.done is not None:
            self.done.synchronize()


class OutputProcessor:
    """Appends sampled tokens to their requests, ends those that hit a finish condition, streams the others."""

    def __init__(self, tokenizer, eos_token_ids: set[int], finish: Callable[..., None]):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.finish = finish  # finish(req, kind, matched=None, message=None, cache=True)

    def process(self, launched: LaunchedStep) -> int:
        """Append a launched step's tokens (its copies complete), check stop conditions, stream; returns how many
        tokens were appended (those of requests that ended while theirs was on the way are dropped)."""
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
                req.add_token_version(launched.weight_version)
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
                self.finish(req, "abort", message=f"engine error: {type(exc).__name__}: {exc}", cache=False)
        return appended

    def _check_finished(self, req: Req, tok: int) -> None:
        sp = req.sampling
        if not sp.ignore_eos and tok in self.eos_token_ids:
            self.finish(req, "stop", matched=tok)
        elif tok in sp.stop_token_ids:
            self.finish(req, "stop", matched=tok)
        elif sp.stop and (matched := self._match_stop_string(req)) is not None:
            self.finish(req, "stop", matched=matched)
        elif len(req.output_ids) >= req.max_new_tokens:
            self.finish(req, "length")

    def _match_stop_string(self, req: Req) -> str | None:
        """The stop string that the newest token completed, if any."""
        window = max(len(s.encode()) for s in req.sampling.stop) + 1  # every token adds at least one byte
        tail = self.tokenizer.decode(req.output_ids[-window:], skip_special_tokens=req.sampling.skip_special_tokens)
        found = [(tail.rfind(s) + len(s), s) for s in req.sampling.stop if s in tail]
        return min(found)[1] if found else None


def prompt_logprobs(batch: list[tuple[Req, int]], fb: ForwardBatch, hidden: torch.Tensor, runner: ModelRunner) -> None:
    """Log-probs of prompt tokens (of the temperature-scaled distribution) for requests that asked.

    batch's kv_len already counts this step's tokens; hidden [T, hidden] holds the step's hidden states."""
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
        logits = runner.logits(hidden[start + lo - first:start + hi - first])
        temperature = req.sampling.temperature if not req.sampling.greedy else 1.0
        targets = torch.tensor(req.origin_input_ids[lo + 1:hi + 1], device=runner.device)
        lp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, targets[:, None])[:, 0]
        req.input_logprobs.extend(lp.tolist())

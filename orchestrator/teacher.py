"""On-policy distillation's served teacher (--use-opd, --opd-type engine): its log-probs of every rollout sample's
response tokens, written to `Sample.teacher_logprobs` before the trainer sees the samples.

The teacher is any engine behind `rollout.client.EngineClient`: one the driver starts from --opd-teacher-load
(an `EngineActor`, reached over Ray), or one already served at --opd-teacher-url (Kiln's
`python -m inference_engine.serve`). Each sample is one teacher-forced request: the prompt + response ids
with `max_new_tokens` 0 and `return_prompt_logprobs`, so the engine prefills the whole sequence and returns
log_softmax(logits / T) of every token after the first (`meta_info.input_token_logprobs`), T the rollout
temperature the trainer uses for the student's log-probs. A sample the teacher cannot score is marked
failed with the reason; the others train.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Sequence

from kiln_common.sample import Sample, Status
from rollout.client import EngineClient

logger = logging.getLogger("kiln.teacher")


def teacher_request(sample: Sample, temperature: float) -> dict[str, Any]:
    """The sampling params of one teacher-forced scoring request (no new token, prompt log-probs)."""
    return {"max_new_tokens": 0, "temperature": temperature, "return_prompt_logprobs": True}


def response_logprobs(sample: Sample, response: dict[str, Any]) -> list[float]:
    """The teacher's log-probs of the sample's response tokens from an engine answer; ValueError if unusable."""
    rows = response.get("meta_info", {}).get("input_token_logprobs")
    if not isinstance(rows, list) or len(rows) != len(sample.tokens):
        got = len(rows) if isinstance(rows, list) else rows
        raise ValueError(f"the teacher returned {got} prompt log-probs for {len(sample.tokens)} tokens")
    tail = rows[len(rows) - sample.response_length:]
    if [int(row[1]) for row in tail] != sample.response_tokens:
        raise ValueError("the teacher scored other token ids than the sample's (a tokenizer or vocabulary mismatch)")
    values = [row[0] for row in tail]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ValueError("the teacher's log-probs are not all finite numbers")
    return [float(v) for v in values]


async def score_samples(client: EngineClient, samples: Sequence[Sample], temperature: float, *,
                        concurrency: int = 64) -> int:
    """Fill `teacher_logprobs` of every usable sample through `client`; returns how many were marked failed."""
    limit = asyncio.Semaphore(concurrency)

    async def one(sample: Sample) -> bool:
        if sample.status in (Status.FAILED, Status.ABORTED) or sample.response_length < 1:
            return True
        try:
            async with limit:
                answer = await client.generate(sample.tokens, teacher_request(sample, temperature),
                                               return_logprob=True)
            sample.teacher_logprobs = response_logprobs(sample, answer)
            return True
        except Exception as e:  # noqa: BLE001 - bad data or a failing teacher marks the sample, the run goes on
            sample.status, sample.error = Status.FAILED, f"opd teacher: {type(e).__name__}: {e}"
            return False

    results = await asyncio.gather(*(one(s) for s in samples))
    failed = results.count(False)
    if failed:
        first = next(s for s, ok in zip(samples, results) if not ok)
        logger.warning("the OPD teacher could not score %d of %d samples (first: %s)", failed, len(samples),
                       first.error)
    return failed

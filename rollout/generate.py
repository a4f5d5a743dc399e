"""The default single-turn generate function, and what every generate function receives (`GenerateArgs`).

A generate function is `async def fn(args: GenerateArgs, sample: Sample, sampling_params: dict)
-> Sample | list[Sample]`. `sample.tokens` holds the prompt ids (plus, when an aborted sample
is resumed under --partial-rollout, the response so far); the function appends response
tokens, one loss-mask entry and one log-prob per response token, and sets the status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rollout.client import EngineClient, EngineError
from rollout.config import EnvConfig, RolloutConfig
from kiln_common.sample import DEFAULT_POLICY, Sample, Status


FINISH_STATUS = {"stop": Status.COMPLETED, "length": Status.TRUNCATED, "abort": Status.ABORTED}


@dataclass
class GenerateArgs:
    """What generate, reward and filter functions get as `args`: engine clients, tokenizer and configs.

    `clients` maps each policy to its engines' client (`{"default": client}` with one policy); a
    multi-agent generate function calls `args.clients[policy]` and tags each Sample with its policy.
    `env_config` holds the run's `--env*` flags (`rollout.config.EnvConfig`) for env generate functions.
    """

    client: EngineClient
    tokenizer: Any
    config: RolloutConfig
    clients: dict[str, EngineClient] = field(default_factory=dict)
    env_config: EnvConfig | None = None

    def __post_init__(self) -> None:
        if not self.clients:
            self.clients = {DEFAULT_POLICY: self.client}


def finish_status(meta_info: dict[str, Any]) -> Status:
    """Sample status from an engine response's finish_reason."""
    reason = meta_info.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind not in FINISH_STATUS:
        raise EngineError(f"unknown finish_reason {reason!r}; expected type one of {sorted(FINISH_STATUS)}")
    return FINISH_STATUS[kind]


def append_response(sample: Sample, response: dict[str, Any], *, loss_mask: int = 1) -> Sample:
    """Append an engine response's tokens, log-probs and text to `sample`; set status and weight version."""
    meta = response["meta_info"]
    new_ids = list(response["output_ids"])
    logprobs = [float(entry[0]) for entry in meta.get("output_token_logprobs", ())]
    if len(logprobs) != len(new_ids):
        raise EngineError(f"sample {sample.index}: {len(new_ids)} output ids but {len(logprobs)} log-probs")
    sample.tokens = sample.tokens + new_ids
    sample.response_length += len(new_ids)
    sample.loss_mask = sample.loss_mask + [loss_mask] * len(new_ids)
    sample.rollout_logprobs = sample.rollout_logprobs + (logprobs if loss_mask else [0.0] * len(new_ids))
    sample.response += response.get("text", "")
    sample.status = finish_status(meta)
    sample.weight_version = meta.get("weight_version", sample.weight_version)
    return sample


async def generate(args: GenerateArgs, sample: Sample, sampling_params: dict[str, Any]) -> Sample:
    """Single-turn generation: prompt tokens in, response tokens and log-probs out (resumes partial samples)."""
    params = dict(sampling_params)
    budget = params.get("max_new_tokens")
    if budget is not None:
        params["max_new_tokens"] = budget - sample.response_length
        if params["max_new_tokens"] <= 0:
            sample.status = Status.TRUNCATED
            return sample
    if not sample.tokens:
        raise ValueError(f"sample {sample.index} has no prompt tokens")
    response = await args.client.generate(sample.tokens, params, return_logprob=True,
                                          session_id=f"group-{sample.group_index}")
    return append_response(sample, response)

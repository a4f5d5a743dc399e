"""The default single-turn generate function, and what every generate function receives (`GenerateArgs`).

A generate function is `async def fn(args: GenerateArgs, sample: Sample, sampling_params: dict)
-> Sample | list[Sample]`. `sample.tokens` holds the prompt ids (plus, when an aborted sample
is resumed under --partial-rollout, the response so far); the function appends the response with
`append_response` (an engine's answer) or `Sample.append` (any other tokens) and sets the status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rollout.client import EngineClient, EngineError
from rollout.config import EnvConfig, RolloutConfig
from kiln_common import routed_experts
from kiln_common.sample import DEFAULT_POLICY, Sample, Status


FINISH_STATUS = {"stop": Status.COMPLETED, "length": Status.TRUNCATED, "abort": Status.ABORTED}


@dataclass
class GenerateArgs:
    """What generate, reward and filter functions get as `args`: engine clients, tokenizer and configs.

    `clients` maps each policy to its engines' client (`{"default": client}` with one policy); a
    multi-agent generate function calls `args.clients[policy]` and tags each Sample with its policy.
    `env_config` holds the run's `--env*` flags (`rollout.config.EnvConfig`; its defaults when None is given).
    """

    client: EngineClient
    tokenizer: Any
    config: RolloutConfig
    clients: dict[str, EngineClient] = field(default_factory=dict)
    env_config: EnvConfig = field(default_factory=EnvConfig)

    def __post_init__(self) -> None:
        if not self.clients:
            self.clients = {DEFAULT_POLICY: self.client}
        if self.env_config is None:  # the manager's when the run sets no --env flags
            self.env_config = EnvConfig()
        if not isinstance(self.env_config, EnvConfig):
            raise TypeError(f"GenerateArgs.env_config is a {type(self.env_config).__name__}, "
                            "expected rollout.config.EnvConfig or None")


def check_args(args: Any, where: str) -> GenerateArgs:
    """`args` if it is a GenerateArgs with an EnvConfig; TypeError naming `where` and the wrong type otherwise."""
    if not isinstance(args, GenerateArgs):
        raise TypeError(f"{where}: args is a {type(args).__name__}, expected rollout.generate.GenerateArgs")
    if not isinstance(args.env_config, EnvConfig):
        raise TypeError(f"{where}: args.env_config is a {type(args.env_config).__name__}, "
                        "expected rollout.config.EnvConfig")
    return args


def finish_status(meta_info: dict[str, Any]) -> Status:
    """Sample status from an engine response's finish_reason."""
    reason = meta_info.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind not in FINISH_STATUS:
        raise EngineError(f"unknown finish_reason {reason!r}; expected type one of {sorted(FINISH_STATUS)}")
    return FINISH_STATUS[kind]


def response_tokens(response: dict[str, Any], where: str = "engine response") -> tuple[list[int], list[float]]:
    """An engine response's output ids and their log-probs, checked against each other (EngineError naming `where`)."""
    ids = response.get("output_ids")
    if not isinstance(ids, list):
        raise EngineError(f"{where}: no 'output_ids' list (keys: {sorted(response)})")
    entries = (response.get("meta_info") or {}).get("output_token_logprobs")
    if entries is None:
        raise EngineError(f"{where}: no meta_info.output_token_logprobs; call generate with return_logprob")
    if len(entries) != len(ids):
        raise EngineError(f"{where}: engine returned {len(ids)} output ids but {len(entries)} log-probs")
    for i, (entry, token) in enumerate(zip(entries, ids)):
        if entry[1] != token:
            raise EngineError(f"{where}: log-prob entry {i} is for token {entry[1]}, but output id {i} is {token}")
    return list(ids), [float(entry[0]) for entry in entries]


def token_weight_versions(response: dict[str, Any], where: str = "engine response") -> list[list[int]] | int | None:
    """The weight versions of an engine response's output tokens: its runs [[version, count], ...], else (an
    engine that does not report them) its one `weight_version`, else None; EngineError naming `where` if the runs
    do not cover the output ids."""
    meta = response.get("meta_info") or {}
    runs = meta.get("output_token_weight_versions")
    if runs is None:
        version = meta.get("weight_version")
        return int(version) if version is not None else None
    if not all(isinstance(r, (list, tuple)) and len(r) == 2 for r in runs) or \
            sum(int(n) for _, n in runs) != len(response.get("output_ids") or []):
        raise EngineError(f"{where}: output_token_weight_versions {str(runs)[:80]} do not cover the "
                          f"{len(response.get('output_ids') or [])} output ids")
    return [[int(v), int(n)] for v, n in runs]


def append_response(sample: Sample, response: dict[str, Any], *, loss_mask: int = 1) -> Sample:
    """Append an engine response to `sample` (`Sample.append`): its tokens with their log-probs and per-token weight
    versions, its status from finish_reason; `sample.weight_version` becomes the newest version (earlier segments of
    a resumed sample keep theirs in `token_weight_versions`)."""
    where = f"sample {sample.index}"
    ids, logprobs = response_tokens(response, where)
    meta = response["meta_info"]
    status = finish_status(meta)
    versions = token_weight_versions(response, where)
    routed = meta.get("routed_experts")   # asked for with sampling param return_routed_experts (MoE policies)
    sample.append(ids, logprobs if loss_mask == 1 else None, loss_mask=loss_mask, text=response.get("text", ""),
                  weight_versions=versions if loss_mask == 1 else None,
                  routed_experts=routed_experts.decode(routed) if routed is not None and loss_mask == 1 else None)
    sample.status = status
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

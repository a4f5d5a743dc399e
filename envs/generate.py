"""Rollout-compatible generate functions that play environments: single-agent (`Env`) and multi-agent episodes.

Use them as `--custom-generate-function-path envs.generate:generate_with_env` (or `:generate_multiagent`).
They take `args: rollout.generate.GenerateArgs`. The environment is the sample's metadata "env" (with
optional "env_kwargs"), else `args.env_config.env` (`--env`); engines are reached through `args.clients`
(policy name -> client); the episode limits come from `args.env_config` (`--env-max-turns`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envs.multiagent import MultiAgentEnv, new_episode_id, role_metrics, run_dialogue
from envs.multiturn import run_episode
from envs.registry import build, make
from kiln_common.sample import DEFAULT_POLICY, Sample
from rollout.client import EngineClient
from rollout.config import EnvConfig
from rollout.generate import GenerateArgs, check_args


def resolve_policy(clients: dict[str, EngineClient], wanted: str) -> str:
    """`wanted` if it has a client, else the only policy there is; ValueError naming the policies otherwise."""
    if wanted in clients:
        return wanted
    if len(clients) == 1:
        return next(iter(clients))
    raise ValueError(f"policy {wanted!r} has no engine client; policies: {sorted(clients)}")


def _env_spec(config: EnvConfig, sample: Sample) -> tuple[str, dict[str, Any]]:
    name = sample.metadata.get("env") or config.env
    if not name:
        raise ValueError(f"sample {sample.index}: no environment; set --env or put 'env' in the sample's metadata")
    extra = sample.metadata.get("env_kwargs") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"sample {sample.index}: metadata 'env_kwargs' must be a mapping, got {extra!r}")
    return name, {**config.env_kwargs, **extra}


async def generate_with_env(args: GenerateArgs, sample: Sample, sampling_params: dict[str, Any]) -> Sample:
    """Play one episode of the sample's env (`run_episode`) under one session id; the sample of `sample.policy`."""
    config = check_args(args, "generate_with_env").env_config
    name, kwargs = _env_spec(config, sample)
    env = make(name, **kwargs)
    sample.policy = resolve_policy(args.clients, sample.policy)
    episode_id = new_episode_id(sample)
    sample.metadata["episode_id"] = episode_id
    return await run_episode(args.clients[sample.policy], args.tokenizer, env, sample, sampling_params,
                             max_turns=config.env_max_turns, max_total_tokens=config.env_max_total_tokens,
                             step_timeout=config.env_step_timeout, episode_timeout=config.env_episode_timeout,
                             session_id=episode_id)


def make_multiagent(name: str, **kwargs: Any) -> MultiAgentEnv:
    """Instantiate a multi-agent env by registered name, entry-point name or 'pkg.mod:Class' path."""
    return build(name, MultiAgentEnv, kwargs)


async def generate_multiagent(args: GenerateArgs, sample: Sample, sampling_params: dict[str, Any]) -> list[Sample]:
    """Play one episode of the sample's multi-agent env; one Sample per role, each tagged with its policy."""
    config = check_args(args, "generate_multiagent").env_config
    name, kwargs = _env_spec(config, sample)
    return await run_dialogue(make_multiagent(name, **kwargs), sample, tokenizer=args.tokenizer,
                              clients=args.clients, policies=None, sampling_params=sampling_params,
                              max_turns=config.env_max_turns, max_total_tokens=config.env_max_total_tokens,
                              step_timeout=config.env_step_timeout, episode_timeout=config.env_episode_timeout)


def env_metrics(samples: Sequence[Sample], prefix: str = "rollout") -> dict[str, float]:
    """Episode metrics of env samples: turns, cache hit rate (sum cached / sum prompt tokens), and per role."""
    played = [s for s in samples if "episode_id" in s.metadata]
    if not played:
        return {}
    prompt = sum(s.metadata.get("prompt_tokens", 0) for s in played)
    cached = sum(s.metadata.get("cached_tokens", 0) for s in played)
    metrics = {f"{prefix}/env_turns_mean": sum(s.metadata.get("turns", 0) for s in played) / len(played),
               f"{prefix}/env_cache_hit_rate": cached / prompt if prompt else 0.0,
               f"{prefix}/env_episodes": float(len({s.metadata["episode_id"] for s in played}))}
    metrics.update(role_metrics(played, prefix))
    return metrics


__all__ = ["DEFAULT_POLICY", "EnvConfig", "GenerateArgs", "env_metrics", "generate_multiagent", "generate_with_env",
           "make_multiagent", "resolve_policy"]

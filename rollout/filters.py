"""Group filters for dynamic sampling: `fn(args, samples) -> bool` keeps (True) or drops (False) a group."""

from __future__ import annotations

import math
from typing import Any

from kiln_common.sample import Sample


def scalar_reward(sample: Sample, key: str | None = None) -> float:
    """The sample's reward as one float (`reward[key]` when the reward is a dict)."""
    reward = sample.reward
    if isinstance(reward, dict):
        if key is None:
            raise KeyError(f"sample {sample.index}: the reward is a dict (keys: {sorted(reward)}); set --reward-key")
        if key not in reward:
            raise KeyError(f"sample {sample.index}: reward dict has no key {key!r} (keys: {sorted(reward)}); "
                           f"set --reward-key")
        return float(reward[key])
    if reward is None:
        raise ValueError(f"sample {sample.index} has no reward")
    return float(reward)


def nonzero_reward_std(args: Any, samples: list[Sample]) -> bool:
    """Keep a group only if its rewards differ (a group with one reward gives GRPO no signal)."""
    key = args.config.reward_key if args is not None else None
    rewards = [scalar_reward(s, key) for s in samples]
    mean = sum(rewards) / len(rewards)
    return math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)) > 1e-8

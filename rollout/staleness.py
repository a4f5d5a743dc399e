"""Weight-version bookkeeping of samples: staleness against the trainer, lag metrics, off-policy token masking.

A sample's `token_weight_versions` says which weights sampled each response token (docs/async.md). The trainer
holds weight version `current` when it trains on a batch; a token sampled under version v is `current - v`
versions stale. These helpers are what the rollout manager and the driver use to admit, mask and measure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kiln_common.sample import Sample


def staleness(sample: Sample, current_version: int) -> int:
    """How many versions the sample's oldest token is behind `current_version` (0: all sampled by it or later)."""
    return current_version - sample.oldest_weight_version()


def mask_offpolicy_tokens(sample: Sample) -> int:
    """Set loss_mask 0 on the policy tokens sampled under older weights than the sample's newest (earlier
    partial-rollout segments, tokens before an in-flight weight push); returns how many were masked."""
    versions = sample.token_versions()
    newest = max((v for v, m in zip(versions, sample.loss_mask) if m and v >= 0), default=None)
    if newest is None:
        return 0
    mask = [0 if m and 0 <= v < newest else m for v, m in zip(versions, sample.loss_mask)]
    masked = sum(sample.loss_mask) - sum(mask)
    sample.loss_mask = mask
    return masked


def version_lag_metrics(samples: Sequence[Sample], current_version: int | Mapping[str, int],
                        prefix: str = "rollout") -> dict[str, float]:
    """Lag of the policy tokens (loss_mask 1 or masked off-policy, version >= 0) behind the trainer's version:
    <prefix>/weight_version_lag (the largest, = _max), _min, _mean (over tokens), and mixed_version_samples (samples
    whose tokens come from more than one version). `current_version`: one int, or {policy: version}."""
    lags: list[int] = []
    mixed = 0
    for s in samples:
        current = current_version[s.policy] if isinstance(current_version, Mapping) else current_version
        runs = [(v, n) for v, n in s.version_runs() if v >= 0 and n]
        mixed += len({v for v, _ in runs}) > 1
        for v, n in runs:
            lags.extend([current - v] * n)
    if not lags:
        return {}
    return {f"{prefix}/weight_version_lag": float(max(lags)), f"{prefix}/weight_version_lag_max": float(max(lags)),
            f"{prefix}/weight_version_lag_min": float(min(lags)),
            f"{prefix}/weight_version_lag_mean": sum(lags) / len(lags),
            f"{prefix}/mixed_version_samples": float(mixed)}


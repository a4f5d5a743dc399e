"""Advantage estimators (GRPO, Dr. GRPO, GSPO, RLOO, REINFORCE++, -baseline), custom hooks, DAPO overlong shaping.

Input is one reward per sample and the sample's group (the samples of one prompt share a
group index); output is one advantage per response token. Positions whose loss_mask is 0
(environment / tool text) get advantage 0. Statistics are computed in float64 and the
result is returned in the rewards' floating dtype (float32 for integer rewards).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from trainer.hooks import load_hook

ESTIMATORS = ("grpo", "dr_grpo", "gspo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
# A custom estimator is called as fn(*CUSTOM_ADVANTAGE_ARGS, **{k: ... for k in CUSTOM_ADVANTAGE_KWARGS}).
CUSTOM_ADVANTAGE_ARGS = ("rewards", "group_index", "response_lengths")
CUSTOM_ADVANTAGE_KWARGS = ("loss_masks", "samples")
_KL_IN_REWARD_ESTIMATORS = ("reinforce_plus_plus", "reinforce_plus_plus_baseline")


def _unbiased_std(x: Tensor) -> Tensor:
    """Sample standard deviation (n - 1 in the denominator); 0 for fewer than two values."""
    return x.std() if x.numel() > 1 else x.new_zeros(())


def group_centered_rewards(rewards: Tensor, group_index: Tensor, *, normalize_std: bool = False,
                           leave_one_out: bool = False, eps: float = 1e-6) -> Tensor:
    """Each reward minus its group's mean (optionally / (std_g + eps), or minus the others' mean); [S] -> [S]."""
    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    n = counts.to(rewards.dtype)  # [G]
    sums = rewards.new_zeros(len(counts)).index_add(0, inverse, rewards)  # [G]
    mean = sums / n  # [G]
    centered = rewards - mean[inverse]  # [S]; exactly 0 for a group of one
    if leave_one_out:
        # r_i - mean of the other n-1 = n/(n-1) * (r_i - mean); a group of one has no others and gets 0.
        n_s = n[inverse]
        return torch.where(n_s > 1, centered * n_s / (n_s - 1).clamp(min=1), torch.zeros_like(centered))
    if normalize_std:
        sq = rewards.new_zeros(len(counts)).index_add(0, inverse, centered.square())  # [G]
        std = torch.where(n > 1, (sq / (n - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))  # [G], unbiased
        return centered / (std[inverse] + eps)
    return centered


def token_level_rewards(rewards: Tensor, response_lengths: list[int], *, kl: list[Tensor] | None = None,
                        kl_coef: float = 0.0, loss_masks: list[Tensor] | None = None) -> list[Tensor]:
    """KL in the reward: the sample's reward at its last policy token, minus kl_coef * kl at every policy token."""
    if kl_coef != 0.0 and kl is None:
        raise ValueError(f"kl_coef={kl_coef} but kl is None; pass one per-token KL tensor per sample")
    out = []
    for i, length in enumerate(response_lengths):
        keep = _keep_mask(loss_masks, i, length, rewards.device)  # [L_i]
        r = torch.zeros(length, dtype=rewards.dtype, device=rewards.device)  # [L_i]
        if kl_coef != 0.0:
            r = r - kl_coef * kl[i].to(r.dtype)
        r = torch.where(keep, r, torch.zeros_like(r))
        policy_positions = keep.nonzero().flatten()
        if len(policy_positions):
            r[policy_positions[-1]] += rewards[i]
        out.append(r)
    return out


def discounted_returns(token_rewards: list[Tensor], gamma: float,
                       loss_masks: list[Tensor] | None = None) -> list[Tensor]:
    """Per-token returns sum_k gamma^k r_{t+k}, stepping over policy tokens only (loss_mask 0 gets 0)."""
    if not token_rewards:
        return []
    device, dtype = token_rewards[0].device, token_rewards[0].dtype
    keeps = [_keep_mask(loss_masks, i, len(r), device) for i, r in enumerate(token_rewards)]
    packed = torch.nn.utils.rnn.pad_sequence(
        [r[k] for r, k in zip(token_rewards, keeps)], batch_first=True)  # [S, max policy tokens], left-aligned
    returns = torch.zeros_like(packed)
    running = torch.zeros(packed.shape[0], dtype=dtype, device=device)  # [S]
    for t in range(packed.shape[1] - 1, -1, -1):
        running = packed[:, t] + gamma * running
        returns[:, t] = running
    out = []
    for i, (r, k) in enumerate(zip(token_rewards, keeps)):
        full = torch.zeros_like(r)
        full[k] = returns[i, : int(k.sum())]
        out.append(full)
    return out


def _keep_mask(loss_masks: list[Tensor] | None, i: int, length: int, device: torch.device) -> Tensor:
    """Boolean loss mask of sample i, [L_i]; all True when no masks are given."""
    if loss_masks is None:
        return torch.ones(length, dtype=torch.bool, device=device)
    return torch.as_tensor(loss_masks[i], device=device).bool()


def _check_inputs(estimator: str, rewards: Tensor, group_index: Tensor, response_lengths: list[int], gamma: float,
                  kl: list[Tensor] | None, kl_coef: float, loss_masks: list[Tensor] | None, eps: float) -> None:
    """Raise ValueError naming the first bad argument."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage estimator={estimator!r}; valid: {', '.join(ESTIMATORS)}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}; expected [S], one reward per sample")
    num = rewards.shape[0]
    if group_index.shape != (num,) or group_index.dtype.is_floating_point:
        raise ValueError(f"group_index must be an integer tensor [{num}], "
                         f"got {group_index.dtype} {tuple(group_index.shape)}")
    if len(response_lengths) != num:
        raise ValueError(f"response_lengths has {len(response_lengths)} entries for {num} rewards")
    if any(n < 0 for n in response_lengths):
        raise ValueError(f"response_lengths must be >= 0, got {response_lengths}")
    bad = (~torch.isfinite(rewards.double())).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"rewards of samples {bad} are not finite: {rewards[bad].tolist()}; mark them failed upstream")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma={gamma}; must be in (0, 1]")
    if not eps > 0.0:
        raise ValueError(f"eps={eps}; must be > 0")
    if kl_coef < 0.0:
        raise ValueError(f"kl_coef={kl_coef}; must be >= 0")
    if kl_coef > 0.0:
        if estimator not in _KL_IN_REWARD_ESTIMATORS:
            raise ValueError(f"kl_coef={kl_coef} puts KL in the reward, which only "
                             f"{', '.join(_KL_IN_REWARD_ESTIMATORS)} use; for {estimator!r} pass kl_coef=0 "
                             "and use LossConfig.use_kl_loss instead")
        if kl is None:
            raise ValueError(f"kl_coef={kl_coef} but kl is None; pass one per-token KL tensor per sample")
    for name, per_sample in (("kl", kl), ("loss_masks", loss_masks)):
        if per_sample is None:
            continue
        if len(per_sample) != num:
            raise ValueError(f"{name} has {len(per_sample)} entries for {num} samples")
        for i, (t, n) in enumerate(zip(per_sample, response_lengths)):
            if len(t) != n:
                raise ValueError(f"{name}[{i}] has {len(t)} entries; sample {i} has response_length {n}")


def compute_advantages(estimator: str, rewards: Tensor, group_index: Tensor, response_lengths: list[int], *,
                       normalize_std: bool = True, gamma: float = 1.0, kl: list[Tensor] | None = None,
                       kl_coef: float = 0.0, loss_masks: list[Tensor] | None = None,
                       eps: float = 1e-6) -> list[Tensor]:
    """Per-token advantages of every sample: one [response_lengths[i]] tensor each, 0 where loss_mask is 0."""
    _check_inputs(estimator, rewards, group_index, response_lengths, gamma, kl, kl_coef, loss_masks, eps)
    out_dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.float32
    r = rewards.to(torch.float64)  # [S]
    group_index = group_index.to(r.device)

    if estimator in _KL_IN_REWARD_ESTIMATORS:
        if estimator == "reinforce_plus_plus_baseline":
            r = group_centered_rewards(r, group_index)
        kl64 = None if kl is None else [torch.as_tensor(k, device=r.device).to(torch.float64) for k in kl]
        returns = discounted_returns(token_level_rewards(r, response_lengths, kl=kl64, kl_coef=kl_coef,
                                                         loss_masks=loss_masks), gamma, loss_masks)
        keeps = [_keep_mask(loss_masks, i, n, r.device) for i, n in enumerate(response_lengths)]
        policy_returns = torch.cat([ret[k] for ret, k in zip(returns, keeps)])  # [policy tokens of the batch]
        mean = policy_returns.mean() if policy_returns.numel() else policy_returns.new_zeros(())
        std = _unbiased_std(policy_returns)
        return [torch.where(k, (ret - mean) / (std + eps), torch.zeros_like(ret)).to(out_dtype)
                for ret, k in zip(returns, keeps)]

    if estimator == "dr_grpo":
        per_sample = group_centered_rewards(r, group_index)
    elif estimator == "rloo":
        per_sample = group_centered_rewards(r, group_index, leave_one_out=True)
    else:  # grpo, gspo
        per_sample = group_centered_rewards(r, group_index, normalize_std=normalize_std, eps=eps)
    out = []
    for i, n in enumerate(response_lengths):
        keep = _keep_mask(loss_masks, i, n, r.device)
        out.append(torch.where(keep, per_sample[i], 0.0).to(out_dtype))
    return out


def overlong_penalty(response_lengths: list[int], max_response_len: int, buffer_len: int,
                     penalty_factor: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment, one float64 per sample [S], added to the reward before advantages.

    With L_max = max_response_len and L_cache = buffer_len: 0 for |y| <= L_max - L_cache, then
    ((L_max - L_cache) - |y|) / L_cache (linear from 0 to -1 at |y| = L_max), -1 beyond L_max; times
    penalty_factor. buffer_len 0 turns it off (all zeros).
    """
    if buffer_len < 0 or not 0 <= buffer_len <= max_response_len:
        raise ValueError(f"overlong buffer_len={buffer_len}; must be in [0, max_response_len={max_response_len}]")
    if not penalty_factor >= 0:
        raise ValueError(f"overlong penalty_factor={penalty_factor}; must be >= 0")
    lengths = torch.tensor(response_lengths, dtype=torch.float64)  # [S]
    if buffer_len == 0:
        return torch.zeros_like(lengths)
    expected = max_response_len - buffer_len
    penalty = ((expected - lengths) / buffer_len).clamp(min=-1.0, max=0.0)
    return penalty * penalty_factor


def load_custom_advantage_function(path: str) -> Callable:
    """The custom estimator at `path`, checked to accept (rewards, group_index, response_lengths, *, loss_masks,
    samples); see docs/losses.md."""
    return load_hook(path, "custom advantage function", CUSTOM_ADVANTAGE_ARGS, CUSTOM_ADVANTAGE_KWARGS)


def custom_advantages(fn: Callable, rewards: Tensor, group_index: Tensor, response_lengths: list[int], *,
                      loss_masks: list[Tensor] | None = None, samples: list[Any] | None = None,
                      name: str = "custom advantage function") -> list[Tensor]:
    """Per-token advantages from a user function, checked and shaped like compute_advantages' output.

    `fn` gets the rewards as float64 [S], group_index [S], response_lengths, and by keyword loss_masks
    (one [L_i] tensor per sample) and samples (the Sample objects, read-only by contract). It returns
    either one advantage per sample ([S], spread over the sample's tokens) or one [L_i] tensor per
    sample. Positions with loss_mask 0 are set to 0; a non-finite value is an error.
    """
    _check_inputs("grpo", rewards, group_index, response_lengths, 1.0, None, 0.0, loss_masks, 1e-6)
    out_dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.float32
    r = rewards.to(torch.float64)
    masks = [_keep_mask(loss_masks, i, n, r.device) for i, n in enumerate(response_lengths)]
    result = fn(r, group_index.to(r.device), list(response_lengths), loss_masks=loss_masks, samples=samples)
    if torch.is_tensor(result) and result.shape == (len(response_lengths),):
        per_token = [result[i].expand(n) for i, n in enumerate(response_lengths)]
    elif isinstance(result, (list, tuple)) and len(result) == len(response_lengths):
        per_token = [torch.as_tensor(a) for a in result]
        bad = [i for i, (a, n) in enumerate(zip(per_token, response_lengths)) if a.shape != (n,)]
        if bad:
            raise ValueError(f"{name}: advantages of samples {bad[:5]} have shapes "
                             f"{[tuple(per_token[i].shape) for i in bad[:5]]}; expected [response_length]")
    else:
        shape = tuple(result.shape) if torch.is_tensor(result) else type(result).__name__
        raise ValueError(f"{name} returned {shape}; expected a [{len(response_lengths)}] tensor (one per sample) "
                         "or a list of one [response_length] tensor per sample")
    out = []
    for i, (a, keep) in enumerate(zip(per_token, masks)):
        a = a.to(device=r.device, dtype=torch.float64)
        if not torch.isfinite(a[keep]).all():
            raise ValueError(f"{name}: advantages of sample {i} are not finite")
        out.append(torch.where(keep, a, torch.zeros_like(a)).to(out_dtype))
    return out

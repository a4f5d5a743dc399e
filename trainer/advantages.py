"""Advantage estimators: GRPO, Dr. GRPO, GSPO, RLOO, REINFORCE++ and REINFORCE++-baseline.

Input is one reward per sample and the sample's group (the samples of one prompt share a
group index); output is one advantage per response token. Positions whose loss_mask is 0
(environment / tool text) get advantage 0. Statistics are computed in float64 and the
result is returned in the rewards' floating dtype (float32 for integer rewards).
"""

from __future__ import annotations

import torch
from torch import Tensor

ESTIMATORS = ("grpo", "dr_grpo", "gspo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
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

"""Advantage estimators (GRPO, Dr. GRPO, GSPO, RLOO, REINFORCE++, -baseline, GAE), custom hooks, DAPO overlong
shaping, the on-policy distillation penalty.

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

ESTIMATORS = ("grpo", "dr_grpo", "gspo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "gae")
# A custom estimator is called as fn(*CUSTOM_ADVANTAGE_ARGS, **{k: ... for k in CUSTOM_ADVANTAGE_KWARGS}).
CUSTOM_ADVANTAGE_ARGS = ("rewards", "group_index", "response_lengths")
CUSTOM_ADVANTAGE_KWARGS = ("loss_masks", "samples")
_KL_IN_REWARD_ESTIMATORS = ("reinforce_plus_plus", "reinforce_plus_plus_baseline", "gae")


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
    if estimator == "gae":
        raise ValueError("estimator 'gae' needs the critic's values: call compute_gae(rewards, values, ...)")
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


def gae(token_rewards: list[Tensor], values: list[Tensor], gamma: float, lambd: float,
        loss_masks: list[Tensor] | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Generalised advantage estimation per sample, over its policy tokens only: (advantages, returns), [L_i] each.

    With the policy tokens t_1..t_n of a sample (loss_mask 1; observations in between neither earn nor
    discount), V_k their values and r_k their token rewards: delta_k = r_k + gamma V_{k+1} - V_k (V_{n+1} = 0,
    the episode ends), A_k = delta_k + gamma lambd A_{k+1}, returns R_k = A_k + V_k. loss_mask 0 gets 0 in both.
    """
    if not 0.0 < gamma <= 1.0 or not 0.0 <= lambd <= 1.0:
        raise ValueError(f"gamma={gamma}, lambd={lambd}; need 0 < gamma <= 1 and 0 <= lambd <= 1")
    if len(values) != len(token_rewards):
        raise ValueError(f"values has {len(values)} entries for {len(token_rewards)} samples")
    advantages, returns = [], []
    for i, (r, v) in enumerate(zip(token_rewards, values)):
        v = torch.as_tensor(v).to(device=r.device, dtype=r.dtype)
        if v.shape != r.shape:
            raise ValueError(f"values[{i}] has shape {tuple(v.shape)}; sample {i} has {tuple(r.shape)} token rewards")
        keep = _keep_mask(loss_masks, i, len(r), r.device)  # [L_i]
        rk, vk = r[keep], v[keep]  # [n]: the policy tokens, in order
        adv = torch.zeros_like(rk)
        running = rk.new_zeros(())
        next_value = rk.new_zeros(())
        for k in range(len(rk) - 1, -1, -1):
            running = rk[k] + gamma * next_value - vk[k] + gamma * lambd * running
            adv[k] = running
            next_value = vk[k]
        full_adv, full_ret = torch.zeros_like(r), torch.zeros_like(r)
        full_adv[keep] = adv
        full_ret[keep] = adv + vk
        advantages.append(full_adv)
        returns.append(full_ret)
    return advantages, returns


def compute_gae(rewards: Tensor, values: list[Tensor], response_lengths: list[int], *, gamma: float = 1.0,
                lambd: float = 1.0, kl: list[Tensor] | None = None, kl_coef: float = 0.0,
                loss_masks: list[Tensor] | None = None, whiten: bool = True,
                eps: float = 1e-6) -> tuple[list[Tensor], list[Tensor]]:
    """PPO-with-critic advantages: the reward on each sample's last policy token (minus kl_coef * kl on every
    policy token), GAE over the critic's token values; returns (advantages, returns), one [L_i] tensor each.

    Computed in float64. `returns` (A + V, before whitening) are the value targets; with `whiten` the
    advantages of all policy tokens of the call are whitened, (A - mean) / (std + eps). Call it on the
    whole step's batch. Both are 0 where loss_mask is 0.
    """
    group_index = torch.zeros(rewards.shape[:1], dtype=torch.long)
    _check_inputs("gae", rewards, group_index, response_lengths, gamma, kl, kl_coef, loss_masks, eps)
    for i, (v, n) in enumerate(zip(values, response_lengths)):
        if len(v) != n:
            raise ValueError(f"values[{i}] has {len(v)} entries; sample {i} has response_length {n}")
    out_dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.float32
    r = rewards.to(torch.float64)
    kl64 = None if kl is None else [torch.as_tensor(k, device=r.device).to(torch.float64) for k in kl]
    token_rewards = token_level_rewards(r, response_lengths, kl=kl64, kl_coef=kl_coef, loss_masks=loss_masks)
    advantages, returns = gae(token_rewards, [torch.as_tensor(v).to(torch.float64) for v in values], gamma, lambd,
                              loss_masks)
    if whiten:
        keeps = [_keep_mask(loss_masks, i, n, r.device) for i, n in enumerate(response_lengths)]
        policy_adv = torch.cat([a[k] for a, k in zip(advantages, keeps)])  # [policy tokens of the batch]
        mean = policy_adv.mean() if policy_adv.numel() else policy_adv.new_zeros(())
        std = _unbiased_std(policy_adv)
        advantages = [torch.where(k, (a - mean) / (std + eps), torch.zeros_like(a)) for a, k in zip(advantages, keeps)]
    return [a.to(out_dtype) for a in advantages], [ret.to(out_dtype) for ret in returns]


def opd_penalty(student_logprobs: list[Tensor], teacher_logprobs: list[Tensor], kl_coef: float,
                loss_masks: list[Tensor] | None = None) -> list[Tensor]:
    """On-policy distillation: kl_coef * (log p_student - log p_teacher) of each sampled token, [L_i] per sample.

    The per-token reverse-KL estimate KL(student || teacher) on the student's own samples; subtracted from
    the advantages (A_t - penalty_t), it pushes the student towards the teacher's likelihoods. 0 where
    loss_mask is 0; computed in float64, returned in the student log-probs' dtype.
    """
    if not kl_coef >= 0.0:
        raise ValueError(f"opd kl_coef={kl_coef}; must be >= 0")
    if len(student_logprobs) != len(teacher_logprobs):
        raise ValueError(f"{len(student_logprobs)} student and {len(teacher_logprobs)} teacher log-prob tensors")
    out = []
    for i, (s, t) in enumerate(zip(student_logprobs, teacher_logprobs)):
        t = torch.as_tensor(t, device=s.device)
        if t.shape != s.shape:
            raise ValueError(f"teacher log-probs of sample {i} have shape {tuple(t.shape)}; the student's "
                             f"{tuple(s.shape)}")
        keep = _keep_mask(loss_masks, i, len(s), s.device)
        diff = s.to(torch.float64) - t.to(torch.float64)
        out.append(torch.where(keep, kl_coef * diff, torch.zeros_like(diff)).to(s.dtype))
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

"""Advantage estimators against float64 references written with plain Python loops."""

import math
import statistics

import pytest
import torch

from trainer.advantages import compute_advantages, discounted_returns, token_level_rewards

# Groups: 0 -> three samples, 1 -> a single sample, 2 -> equal rewards, 3 -> two samples.
REWARDS = [1.0, 0.0, 0.5, 0.7, 0.3, 0.3, 2.0, -1.0]
GROUPS = [0, 0, 0, 1, 2, 2, 3, 3]
LENGTHS = [3, 2, 4, 1, 2, 3, 5, 2]
MASKS = [[1, 1, 1], [1, 0], [1, 0, 0, 1], [1], [1, 1], [0, 1, 1], [1, 1, 0, 1, 0], [0, 0]]
KL = [[0.1, -0.2, 0.3], [0.05, 9.0], [0.2, 9.0, 9.0, -0.1], [0.4], [0.0, 0.1], [9.0, 0.2, 0.3],
      [0.1, 0.1, 9.0, -0.3, 9.0], [9.0, 9.0]]  # 9.0 sits on loss_mask 0 tokens and must not matter


def _groups():
    out = {}
    for i, g in enumerate(GROUPS):
        out.setdefault(g, []).append(i)
    return out


def ref_per_sample(estimator, normalize_std=True, eps=1e-6):
    out = []
    groups = _groups()
    for i, g in enumerate(GROUPS):
        members = [REWARDS[j] for j in groups[g]]
        if len(members) == 1:
            out.append(0.0)
            continue
        mean = sum(members) / len(members)
        if estimator == "rloo":
            others = [REWARDS[j] for j in groups[g] if j != i]
            out.append(REWARDS[i] - sum(others) / len(others))
        elif estimator == "dr_grpo" or not normalize_std:
            out.append(REWARDS[i] - mean)
        else:
            out.append((REWARDS[i] - mean) / (statistics.stdev(members) + eps))
    return out


def ref_reinforce_pp(baseline, gamma, kl_coef, eps=1e-6, masks=MASKS):
    rewards = list(REWARDS)
    if baseline:
        groups = _groups()
        rewards = [r - sum(REWARDS[j] for j in groups[g]) / len(groups[g]) for r, g in zip(REWARDS, GROUPS)]
    returns = []
    for i, n in enumerate(LENGTHS):
        policy_positions = [t for t in range(n) if masks[i][t]]
        ret = [0.0] * n
        running = 0.0
        for t in reversed(policy_positions):
            r = -kl_coef * KL[i][t] + (rewards[i] if t == policy_positions[-1] else 0.0)
            running = r + gamma * running
            ret[t] = running
        returns.append(ret)
    flat = [returns[i][t] for i, n in enumerate(LENGTHS) for t in range(n) if masks[i][t]]
    mean, std = statistics.mean(flat), statistics.stdev(flat)
    return [[(returns[i][t] - mean) / (std + eps) if masks[i][t] else 0.0 for t in range(n)]
            for i, n in enumerate(LENGTHS)]


def run(estimator, dtype=torch.float64, **kwargs):
    return compute_advantages(estimator, torch.tensor(REWARDS, dtype=dtype), torch.tensor(GROUPS), LENGTHS, **kwargs)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "gspo", "rloo"])
@pytest.mark.parametrize("use_masks", [False, True])
def test_group_estimators_match_reference(estimator, use_masks):
    got = run(estimator, loss_masks=MASKS if use_masks else None)
    per_sample = ref_per_sample(estimator)
    assert [len(a) for a in got] == LENGTHS
    for i, adv in enumerate(got):
        expected = [per_sample[i] if (m or not use_masks) else 0.0 for m in MASKS[i]]
        assert adv.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_grpo_without_std_normalisation_is_dr_grpo():
    got = run("grpo", normalize_std=False)
    assert [a.tolist() for a in got] == [a.tolist() for a in run("dr_grpo")]
    assert [a[0].item() for a in got] == pytest.approx(ref_per_sample("grpo", normalize_std=False), rel=1e-12)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "gspo", "rloo", "reinforce_plus_plus_baseline"])
def test_single_sample_groups_and_equal_rewards_give_zero(estimator):
    rewards = torch.tensor([0.7, 0.3, 0.3, 1.0, 1.0, 1.0])
    got = compute_advantages(estimator, rewards, torch.tensor([5, 9, 9, 2, 2, 2]), [2, 3, 1, 2, 2, 2])
    assert all(torch.isfinite(a).all() for a in got)
    assert all((a == 0).all() for a in got)


@pytest.mark.parametrize("baseline", [False, True])
@pytest.mark.parametrize("gamma,kl_coef", [(1.0, 0.0), (0.9, 0.0), (1.0, 0.05), (0.8, 0.2)])
def test_reinforce_plus_plus_matches_reference(baseline, gamma, kl_coef):
    estimator = "reinforce_plus_plus_baseline" if baseline else "reinforce_plus_plus"
    got = run(estimator, gamma=gamma, kl=[torch.tensor(k, dtype=torch.float64) for k in KL], kl_coef=kl_coef,
              loss_masks=MASKS)
    for adv, expected in zip(got, ref_reinforce_pp(baseline, gamma, kl_coef)):
        assert adv.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    flat = torch.cat([a[torch.tensor(m, dtype=torch.bool)] for a, m in zip(got, MASKS)])
    assert flat.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert flat.std().item() == pytest.approx(1.0, rel=1e-5)


def test_reinforce_plus_plus_without_masks_uses_every_token():
    all_ones = [[1] * n for n in LENGTHS]
    got = run("reinforce_plus_plus", gamma=0.95)
    for adv, expected in zip(got, ref_reinforce_pp(False, 0.95, 0.0, masks=all_ones)):
        assert adv.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_kl_in_reward_helpers():
    rewards = torch.tensor([1.0, 2.0], dtype=torch.float64)
    kl = [torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 4.0], dtype=torch.float64)]
    masks = [torch.tensor([1, 1, 0]), torch.tensor([1, 1])]
    token_rewards = token_level_rewards(rewards, [3, 2], kl=kl, kl_coef=0.1, loss_masks=masks)
    assert token_rewards[0].tolist() == pytest.approx([-0.05, 1.0 - 0.1, 0.0])  # reward at the last policy token
    assert token_rewards[1].tolist() == pytest.approx([-0.3, 2.0 - 0.4])
    returns = discounted_returns(token_rewards, 0.5, masks)
    assert returns[0].tolist() == pytest.approx([-0.05 + 0.5 * 0.9, 0.9, 0.0])
    assert returns[1].tolist() == pytest.approx([-0.3 + 0.5 * 1.6, 1.6])


def test_output_dtype_and_empty_responses():
    got = compute_advantages("grpo", torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), [0, 2])
    assert got[0].shape == (0,) and got[1].dtype == torch.float32
    ints = compute_advantages("rloo", torch.tensor([1, 0]), torch.tensor([0, 0]), [1, 1])
    assert ints[0].dtype == torch.float32 and ints[0].item() == pytest.approx(1.0)
    rpp = compute_advantages("reinforce_plus_plus", torch.tensor([1.0]), torch.tensor([0]), [2], loss_masks=[[0, 0]])
    assert rpp[0].tolist() == [0.0, 0.0]


def test_bad_inputs_are_clear_errors():
    r, g = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    with pytest.raises(ValueError, match="estimator='ppo'.*grpo, dr_grpo"):
        compute_advantages("ppo", r, g, [1, 1])
    with pytest.raises(ValueError, match=r"rewards of samples \[1\] are not finite"):
        compute_advantages("grpo", torch.tensor([1.0, math.nan]), g, [1, 1])
    with pytest.raises(ValueError, match="kl_coef=0.1 puts KL in the reward.*'grpo'"):
        compute_advantages("grpo", r, g, [1, 1], kl=[torch.zeros(1)] * 2, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef=0.1 but kl is None"):
        compute_advantages("reinforce_plus_plus", r, g, [1, 1], kl_coef=0.1)
    with pytest.raises(ValueError, match=r"loss_masks\[1\] has 1 entries; sample 1 has response_length 2"):
        compute_advantages("grpo", r, g, [1, 2], loss_masks=[[1], [1]])
    with pytest.raises(ValueError, match="response_lengths has 3 entries for 2 rewards"):
        compute_advantages("grpo", r, g, [1, 1, 1])
    with pytest.raises(ValueError, match="gamma=0"):
        compute_advantages("reinforce_plus_plus", r, g, [1, 1], gamma=0.0)

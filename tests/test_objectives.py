"""GSPO, CISPO, MIS, SFT, DAPO overlong shaping and the custom loss / advantage hooks, against float64
references written with plain Python loops (issue #19, algorithms)."""

import math
import random

import pytest
import torch

from trainer.advantages import (custom_advantages, load_custom_advantage_function, overlong_penalty)
from trainer.losses import LossConfig, compute_loss, compute_policy_loss, load_custom_loss_function, mis_accept_mask

TOL = dict(rtol=1e-12, atol=1e-14)


def _t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def _batch(seed=0, seq_lens=(5, 3, 6, 4), spread=0.3):
    """Fixed random flat inputs: logp, old, rollout, advantages (one per sequence), mask with some 0s."""
    rng = random.Random(seed)
    n = sum(seq_lens)
    logp = [-rng.uniform(0.1, 3.0) for _ in range(n)]
    old = [lp + rng.uniform(-spread, spread) for lp in logp]
    rollout = [o + rng.uniform(-1.2, 1.2) for o in old]
    seq_adv = [rng.uniform(-2, 2) for _ in seq_lens]
    adv = [a for a, k in zip(seq_adv, seq_lens) for _ in range(k)]
    mask = [0 if rng.random() < 0.2 else 1 for _ in range(n)]
    start = 0
    for k in seq_lens:  # at least one policy token per sequence
        mask[start] = 1
        start += k
    return dict(logp=logp, old=old, rollout=rollout, adv=adv, mask=mask, seq_lens=list(seq_lens))


def _seq_slices(seq_lens):
    start = 0
    for k in seq_lens:
        yield range(start, start + k)
        start += k


def _run(cfg, b, *, n_tok=None, n_seq=None, rollout=True):
    logp = _t(b["logp"]).requires_grad_(True)
    n_tok = n_tok or sum(b["mask"])
    n_seq = n_seq or len(b["seq_lens"])
    loss, metrics = compute_loss(logp, _t(b["old"]), _t(b["adv"]), torch.tensor(b["mask"]),
                                 torch.tensor(b["seq_lens"]), cfg, rollout_logp=_t(b["rollout"]) if rollout else None,
                                 global_num_tokens=n_tok, global_num_seqs=n_seq)
    loss.backward()
    return loss, metrics, logp.grad


# ------------------------------------------------------------------------------------------ GSPO

def test_gspo_defaults_are_the_papers_clip_ranges():
    cfg = LossConfig(policy_loss="gspo")
    assert (cfg.clip_low, cfg.clip_high) == (3e-4, 4e-4)
    assert (LossConfig().clip_low, LossConfig().clip_high) == (0.2, 0.2)
    assert LossConfig(policy_loss="gspo", eps_clip=0.1).clip_high == 0.1  # explicit flags win


@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.05, 0.08)])
def test_gspo_matches_sequence_level_reference(eps):
    b = _batch(seed=1, spread=0.02)
    cfg = LossConfig(policy_loss="gspo", loss_agg_mode="seq_mean_token_mean", eps_clip=eps[0], eps_clip_high=eps[1])
    loss, metrics, grad = _run(cfg, b)
    # GSPO (Zheng et al. 2025): J = 1/G sum_i min(s_i A_i, clip(s_i, 1-el, 1+eh) A_i), s_i = exp(mean_t(logp - old))
    n_seq = len(b["seq_lens"])
    ref_loss, ref_grad, clipped = 0.0, [0.0] * len(b["logp"]), 0
    for seq in _seq_slices(b["seq_lens"]):
        pol = [t for t in seq if b["mask"][t]]
        s = math.exp(sum(b["logp"][t] - b["old"][t] for t in pol) / len(pol))
        a = b["adv"][seq[0]]
        unclipped, clip = -a * s, -a * min(max(s, 1 - eps[0]), 1 + eps[1])
        ref_loss += max(unclipped, clip) / n_seq
        if clip > unclipped:
            clipped += 1
        else:
            for t in pol:  # d s / d logp_t = s / |y_i|
                ref_grad[t] = -a * s / len(pol) / n_seq
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    torch.testing.assert_close(grad, _t(ref_grad), **TOL)
    assert metrics["pg_clipfrac"].item() == pytest.approx(clipped / n_seq, rel=1e-12)
    if eps == (3e-4, 4e-4):
        assert 0 < clipped < n_seq  # the fixture exercises both branches


def test_gspo_ratio_is_sequence_level_where_token_clipping_disagrees():
    # one sequence, token ratios 1.5 and 0.7: PPO clips token 0 (1.5 > 1.2); GSPO's s = sqrt(1.05) = 1.025 is inside.
    old = _t([0.0, 0.0])
    adv, mask, lens = _t([1.0, 1.0]), torch.ones(2), torch.tensor([2])
    out = {}
    for kind in ("ppo", "gspo"):
        logp = _t([math.log(1.5), math.log(0.7)]).requires_grad_(True)
        loss, metrics = compute_policy_loss(logp, old, adv, mask, lens, LossConfig(policy_loss=kind, eps_clip=0.2),
                                            global_num_tokens=2, global_num_seqs=1)
        loss.backward()
        out[kind] = (loss.item(), metrics["pg_clipfrac"].item(), logp.grad.tolist())
    assert out["ppo"][1] == 0.5 and out["ppo"][2][0] == 0.0  # token 0 clipped: no gradient
    s = math.sqrt(1.5 * 0.7)
    assert out["gspo"][1] == 0.0
    assert out["gspo"][0] == pytest.approx(-s, rel=1e-12)
    assert out["gspo"][2] == pytest.approx([-s / 2, -s / 2], rel=1e-12)  # token_mean over 2 tokens of s * d logp_t


# ------------------------------------------------------------------------------------------ CISPO

@pytest.mark.parametrize("eps_clip,eps_high", [(None, None), (0.2, 0.3)])
def test_cispo_matches_reference(eps_clip, eps_high):
    b = _batch(seed=2, spread=0.6)
    cfg = LossConfig(policy_loss="cispo", eps_clip=eps_clip, eps_clip_high=eps_high)
    loss, metrics, grad = _run(cfg, b, rollout=False)
    low = 0.0 if eps_clip is None else 1 - eps_clip  # default: no lower bound
    high = 1 + (0.28 if eps_high is None else eps_high)
    n_tok = sum(b["mask"])
    # MiniMax-M1: J = 1/N sum_t sg(clip(r_t, 1-el, 1+eh)) A_t log pi(t); loss = -J
    ref_loss, ref_grad, clipped = 0.0, [], 0
    for lp, old, a, m in zip(b["logp"], b["old"], b["adv"], b["mask"]):
        r = math.exp(lp - old)
        w = min(max(r, low), high)
        clipped += m and w != r
        ref_loss += -w * a * lp * m / n_tok
        ref_grad.append(-w * a * m / n_tok)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    torch.testing.assert_close(grad, _t(ref_grad), **TOL)
    assert metrics["pg_clipfrac"].item() == pytest.approx(clipped / n_tok, rel=1e-12)
    assert clipped > 0
    # unlike PPO, a clipped token still has a gradient
    assert all(g != 0.0 for g, m in zip(grad.tolist(), b["mask"]) if m)


def test_cispo_rejects_dual_clip():
    with pytest.raises(ValueError, match="cispo"):
        LossConfig(policy_loss="cispo", dual_clip_c=3.0)


# ------------------------------------------------------------------------------------------ MIS

def _ref_mis_accept(b, level, lower, upper):
    accept = [True] * len(b["logp"])
    for seq in _seq_slices(b["seq_lens"]):
        pol = [t for t in seq if b["mask"][t]]
        logs = {t: b["old"][t] - b["rollout"][t] for t in pol}
        for t in pol:
            if level == "token":
                w = math.exp(logs[t])
            elif level == "sequence":
                w = math.prod(math.exp(v) for v in logs.values())
            else:
                w = math.prod(math.exp(v) for v in logs.values()) ** (1 / len(pol))
            accept[t] = lower <= w <= upper
    return accept


@pytest.mark.parametrize("level,lower,upper", [("token", 0.5, 2.0), ("token", 0.0, 1.5),
                                               ("sequence", 0.5, 2.0), ("geometric", 0.8, 1.25)])
def test_mis_masks_exactly_the_out_of_range_tokens(level, lower, upper):
    b = _batch(seed=3)
    cfg = LossConfig(use_mis=True, mis_level=level, mis_lower=lower, mis_upper=upper)
    ref = _ref_mis_accept(b, level, lower, upper)
    got = mis_accept_mask(_t(b["old"]), _t(b["rollout"]), torch.tensor(b["mask"]), torch.tensor(b["seq_lens"]), cfg)
    assert got.tolist() == ref
    rejected = [not a for a in ref]
    assert any(rejected) and not all(r for r, m in zip(rejected, b["mask"]) if m)

    # in the loss: rejected tokens contribute neither value nor gradient; the normaliser is unchanged
    loss, metrics, grad = _run(cfg, b)
    plain_cfg = LossConfig()
    kept = dict(b, mask=[m and a for m, a in zip(b["mask"], ref)])
    ref_loss, _, ref_grad = _run(plain_cfg, kept, n_tok=sum(b["mask"]))
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    n_rej = sum(1 for r, m in zip(rejected, b["mask"]) if r and m)
    assert metrics["mis_reject_frac"].item() == pytest.approx(n_rej / sum(b["mask"]), rel=1e-12)


def test_mis_works_with_tis_and_needs_rollout_logprobs():
    b = _batch(seed=4)
    loss, metrics, _ = _run(LossConfig(use_mis=True, use_tis=True, tis_cap=1.5), b)
    assert torch.isfinite(loss) and {"mis_reject_frac", "tis_clipfrac"} <= metrics.keys()
    with pytest.raises(ValueError, match="use_mis.*rollout_logp is None"):
        _run(LossConfig(use_mis=True), b, rollout=False)
    with pytest.raises(ValueError, match="mis_lower=1.5"):
        LossConfig(use_mis=True, mis_lower=1.5)
    with pytest.raises(ValueError, match="mis_level='seq'"):
        LossConfig(mis_level="seq")


# ------------------------------------------------------------------------------------------ SFT

def test_sft_loss_is_the_mean_nll_of_the_masked_tokens():
    b = _batch(seed=5)
    cfg = LossConfig(loss_type="sft")
    logp = _t(b["logp"]).requires_grad_(True)
    loss, metrics = compute_loss(logp, None, None, torch.tensor(b["mask"]), torch.tensor(b["seq_lens"]), cfg,
                                 global_num_tokens=sum(b["mask"]), global_num_seqs=len(b["seq_lens"]))
    loss.backward()
    kept = [lp for lp, m in zip(b["logp"], b["mask"]) if m]
    assert loss.item() == pytest.approx(-sum(kept) / len(kept), rel=1e-12)
    assert metrics["sft_loss"].item() == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(logp.grad, _t([-m / len(kept) for m in b["mask"]]), **TOL)


def test_sft_config_refuses_rl_terms_and_accepts_slime_spellings():
    assert LossConfig(loss_type="sft_loss").loss_type == "sft"
    assert LossConfig(loss_type="policy_loss").loss_type == "policy"
    with pytest.raises(ValueError, match="loss_type='sft'.*use_tis"):
        LossConfig(loss_type="sft", use_tis=True)
    with pytest.raises(ValueError, match="loss_type='dpo'"):
        LossConfig(loss_type="dpo")


# ------------------------------------------------------------------------------------------ custom hooks

CALLS: list = []


def recording_loss(logp, old_logp, advantages, loss_mask, seq_lens, cfg, *, ref_logp, rollout_logp, entropy,
                   global_num_tokens, global_num_seqs):
    CALLS.append(dict(logp=logp, old_logp=old_logp, advantages=advantages, loss_mask=loss_mask, seq_lens=seq_lens,
                      cfg=cfg, ref_logp=ref_logp, rollout_logp=rollout_logp, entropy=entropy,
                      global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs))
    loss = 3.0 * (logp * loss_mask).sum() / global_num_tokens
    return loss, {"my_metric": loss.detach() * 2}


def bad_signature_loss(logp, old_logp):
    return logp.sum(), {}


def wrong_return_loss(logp, old_logp, advantages, loss_mask, seq_lens, cfg, **kwargs):
    return logp.sum()


def per_sample_advantages(rewards, group_index, response_lengths, *, loss_masks, samples):
    CALLS.append(dict(rewards=rewards, group_index=group_index, response_lengths=response_lengths,
                      loss_masks=loss_masks, samples=samples))
    return rewards * 10.0


def per_token_advantages(rewards, group_index, response_lengths, *, loss_masks, samples):
    return [torch.arange(n, dtype=torch.float64) + r for n, r in zip(response_lengths, rewards.tolist())]


def wrong_shape_advantages(rewards, group_index, response_lengths, *, loss_masks, samples):
    return torch.zeros(len(response_lengths) + 1)


def test_custom_loss_is_called_with_the_documented_arguments_and_its_value_used():
    CALLS.clear()
    b = _batch(seed=6)
    cfg = LossConfig(loss_type="custom", custom_loss_function_path="test_objectives:recording_loss")
    fn = load_custom_loss_function(cfg.custom_loss_function_path)
    logp = _t(b["logp"]).requires_grad_(True)
    mask = torch.tensor(b["mask"])
    loss, metrics = compute_loss(logp, _t(b["old"]), _t(b["adv"]), mask, torch.tensor(b["seq_lens"]), cfg,
                                 rollout_logp=_t(b["rollout"]), global_num_tokens=11, global_num_seqs=4,
                                 custom_fn=fn)
    loss.backward()
    (call,) = CALLS
    assert call["logp"] is logp and call["cfg"] is cfg and call["ref_logp"] is None and call["entropy"] is None
    assert call["old_logp"].tolist() == b["old"] and call["advantages"].tolist() == b["adv"]
    assert call["rollout_logp"].tolist() == b["rollout"] and call["seq_lens"].tolist() == b["seq_lens"]
    assert (call["global_num_tokens"], call["global_num_seqs"]) == (11, 4)
    expected = 3.0 * sum(lp for lp, m in zip(b["logp"], b["mask"]) if m) / 11
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["my_metric"].item() == pytest.approx(2 * expected, rel=1e-12)
    torch.testing.assert_close(logp.grad, _t([3.0 * m / 11 for m in b["mask"]]), **TOL)


def test_custom_loss_errors_are_clear():
    with pytest.raises(TypeError, match=r"bad_signature_loss.*cannot be called as fn\(logp, old_logp, advantages"):
        LossConfig(loss_type="custom", custom_loss_function_path="test_objectives:bad_signature_loss")
    with pytest.raises(ImportError, match="no_such_module"):
        LossConfig(loss_type="custom", custom_loss_function_path="no_such_module:fn")
    with pytest.raises(ValueError, match="loss_type='custom' and the path go together"):
        LossConfig(loss_type="custom")
    with pytest.raises(ValueError, match="loss_type='policy' and the path go together|go together"):
        LossConfig(custom_loss_function_path="test_objectives:recording_loss")
    cfg = LossConfig(loss_type="custom", custom_loss_function_path="test_objectives:wrong_return_loss")
    b = _batch(seed=6)
    with pytest.raises(TypeError, match=r"must return \(0-d loss tensor, dict of metrics\), got Tensor"):
        compute_loss(_t(b["logp"]), _t(b["old"]), _t(b["adv"]), torch.tensor(b["mask"]), torch.tensor(b["seq_lens"]),
                     cfg, global_num_tokens=1, global_num_seqs=1,
                     custom_fn=load_custom_loss_function(cfg.custom_loss_function_path))


def test_custom_advantage_hook_gets_the_documented_arguments_and_is_masked():
    CALLS.clear()
    fn = load_custom_advantage_function("test_objectives:per_sample_advantages")
    rewards, groups, lengths = _t([1.0, 0.0, 0.5], torch.float32), torch.tensor([0, 0, 1]), [3, 2, 4]
    masks = [torch.tensor([1, 0, 1]), torch.tensor([1, 1]), torch.tensor([0, 1, 1, 1])]
    samples = ["s0", "s1", "s2"]
    out = custom_advantages(fn, rewards, groups, lengths, loss_masks=masks, samples=samples)
    (call,) = CALLS
    assert call["rewards"].dtype == torch.float64 and call["rewards"].tolist() == [1.0, 0.0, 0.5]
    assert call["group_index"].tolist() == [0, 0, 1] and call["response_lengths"] == lengths
    assert call["loss_masks"] is masks and call["samples"] is samples
    assert [a.tolist() for a in out] == [[10.0, 0.0, 10.0], [0.0, 0.0], [0.0, 5.0, 5.0, 5.0]]
    assert all(a.dtype == torch.float32 for a in out)

    per_token = custom_advantages(load_custom_advantage_function("test_objectives:per_token_advantages"),
                                  rewards, groups, lengths, loss_masks=masks)
    assert [a.tolist() for a in per_token] == [[1.0, 0.0, 3.0], [0.0, 1.0], [0.0, 1.5, 2.5, 3.5]]

    with pytest.raises(ValueError, match=r"returned \(4,\); expected a \[3\] tensor"):
        custom_advantages(load_custom_advantage_function("test_objectives:wrong_shape_advantages"),
                          rewards, groups, lengths, loss_masks=masks)
    with pytest.raises(TypeError, match="custom advantage function.*recording_loss.*cannot be called"):
        load_custom_advantage_function("test_objectives:recording_loss")


# ------------------------------------------------------------------------------------------ DAPO overlong

def test_dapo_overlong_penalty_on_hand_computed_lengths():
    # L_max = 20, L_cache = 5: 0 up to 15, then (15 - L) / 5, -1 from 20 on
    lengths = [1, 10, 15, 16, 18, 19, 20, 21, 30]
    expected = [0.0, 0.0, 0.0, -0.2, -0.6, -0.8, -1.0, -1.0, -1.0]
    got = overlong_penalty(lengths, 20, 5)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(expected, abs=1e-15)
    assert overlong_penalty(lengths, 20, 5, penalty_factor=0.5).tolist() == pytest.approx(
        [0.5 * e for e in expected], abs=1e-15)
    assert overlong_penalty(lengths, 20, 0).tolist() == [0.0] * len(lengths)  # off
    with pytest.raises(ValueError, match="buffer_len=25"):
        overlong_penalty(lengths, 20, 25)

"""RL losses against float64 references written with plain Python loops over a hand-built batch."""

import math

import pytest
import torch

from trainer.losses import LossConfig, aggregate, compute_policy_loss, kl_estimate

MODES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")

# A hand-built micro-batch: three sequences of 3, 4 and 2 response tokens; token 1 of
# sequence 0 and token 0 of sequence 1 are environment text (loss_mask 0) whose
# log-probs are garbage the loss must ignore.
SEQ_LENS = [3, 4, 2]
MASK = [1, 0, 1, 0, 1, 1, 1, 1, 1]
LOGP = [-1.2, 7.0, -0.4, 0.3, -2.0, -0.9, -1.5, -0.2, -3.1]
OLD = [-1.0, -1e4, -0.9, -5.0, -1.6, -1.0, -1.2, -0.25, -2.0]
ADV = [1.5, 9.0, -0.8, 9.0, 1.1, -1.3, -0.5, 0.7, -2.0]
REF = [-1.1, 50.0, -0.7, 0.0, -2.3, -0.6, -1.4, -0.9, -2.5]
ROLLOUT = [-0.5, 0.0, -1.0, 0.0, -1.7, -2.4, -1.25, -0.3, -1.0]
ENTROPY = [0.9, 3.0, 1.4, 3.0, 0.2, 0.7, 1.1, 0.05, 2.2]


def _t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def _seqs(values):
    """Split a flat per-token list into per-sequence lists."""
    out, start = [], 0
    for n in SEQ_LENS:
        out.append(values[start:start + n])
        start += n
    return out


def ref_token_weights(mode, n_tok, n_seq):
    """d(aggregate)/d(value_t) for every token, from the definition of each mode."""
    weights = []
    for mask in _seqs(MASK):
        kept = sum(mask)
        for m in mask:
            if not m:
                weights.append(0.0)
            elif mode == "token_mean":
                weights.append(1.0 / n_tok)
            elif mode == "seq_mean_token_sum":
                weights.append(1.0 / n_seq)
            else:
                weights.append(1.0 / (kept * n_seq))
    return weights


def ref_aggregate(values, mode, n_tok, n_seq):
    if mode == "token_mean":
        return sum(v for v, m in zip(values, MASK) if m) / n_tok
    if mode == "seq_mean_token_sum":
        return sum(sum(v for v, m in zip(vs, ms) if m) for vs, ms in zip(_seqs(values), _seqs(MASK))) / n_seq
    total = 0.0
    for vs, ms in zip(_seqs(values), _seqs(MASK)):
        kept = [v for v, m in zip(vs, ms) if m]
        total += sum(kept) / len(kept) if kept else 0.0
    return total / n_seq


def ref_pg_tokens(kind, eps_low=0.2, eps_high=0.2, dual_c=None, tis_cap=None):
    """Per-token policy-gradient loss and its derivative w.r.t. logp (before aggregation)."""
    values, grads = [], []
    seq_ratio = []
    for lp, old, mask in zip(_seqs(LOGP), _seqs(OLD), _seqs(MASK)):
        diffs = [a - b for a, b, m in zip(lp, old, mask) if m]
        seq_ratio.append(math.exp(sum(diffs) / len(diffs)))
    seq_of_token = [s for s, n in enumerate(SEQ_LENS) for _ in range(n)]
    for t in range(len(LOGP)):
        if not MASK[t]:
            values.append(0.0)
            grads.append(0.0)
            continue
        ratio = seq_ratio[seq_of_token[t]] if kind == "gspo" else math.exp(LOGP[t] - OLD[t])
        a = ADV[t]
        if kind == "reinforce":
            value, grad = -a * ratio, -a * ratio
        else:
            unclipped = -a * ratio
            clipped = -a * min(max(ratio, 1 - eps_low), 1 + eps_high)
            if clipped > unclipped:
                value, grad = clipped, 0.0
            else:
                value, grad = unclipped, -a * ratio
            if dual_c is not None and a < 0 and value > -a * dual_c:
                value, grad = -a * dual_c, 0.0
        if tis_cap is not None:
            w = min(math.exp(OLD[t] - ROLLOUT[t]), tis_cap)
            value, grad = value * w, grad * w
        values.append(value)
        grads.append(grad)
    return values, grads


def run_loss(cfg, mode_tokens=7, mode_seqs=3, with_ref=True, with_rollout=True, with_entropy=True,
             logp=None):
    logp = _t(LOGP).requires_grad_(True) if logp is None else logp
    entropy = _t(ENTROPY).requires_grad_(True) if with_entropy else None
    loss, metrics = compute_policy_loss(
        logp, _t(OLD), _t(ADV), torch.tensor(MASK), torch.tensor(SEQ_LENS), cfg,
        ref_logp=_t(REF) if with_ref else None, rollout_logp=_t(ROLLOUT) if with_rollout else None,
        entropy=entropy, global_num_tokens=mode_tokens, global_num_seqs=mode_seqs)
    loss.backward()
    return loss, metrics, logp.grad, None if entropy is None else entropy.grad


# ---------------------------------------------------------------- KL estimators

@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_estimators_match_formulas(kind):
    pairs = [(-1.0, -1.5), (-0.2, -0.1), (-3.0, -0.5), (-0.5, -0.5), (-20.0, -1.0), (-1.0, -15.0)]
    logp = _t([p for p, _ in pairs]).requires_grad_(True)
    out = kl_estimate(logp, _t([r for _, r in pairs]), kind)
    out.sum().backward()
    for i, (lp, ref) in enumerate(pairs):
        x = ref - lp
        if kind == "k1":
            value, grad = lp - ref, 1.0
        elif kind == "k2":
            value, grad = 0.5 * (lp - ref) ** 2, lp - ref
        else:
            value, grad = math.exp(x) - x - 1, 1.0 - math.exp(x)
            if kind == "low_var_kl" and not -10.0 <= value <= 10.0:
                value, grad = max(-10.0, min(10.0, value)), 0.0
        assert out[i].item() == pytest.approx(value, rel=1e-12, abs=1e-12)
        assert logp.grad[i].item() == pytest.approx(grad, rel=1e-12, abs=1e-12)


def test_k3_is_nonnegative_and_low_var_kl_stays_finite():
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(2000, generator=g, dtype=torch.float64) * 5).requires_grad_(True)
    ref = torch.randn(2000, generator=g, dtype=torch.float64) * 5
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    extreme = torch.tensor([-500.0, 0.0], dtype=torch.float32, requires_grad=True)
    out = kl_estimate(extreme, torch.tensor([0.0, -500.0]), "low_var_kl")
    out.sum().backward()
    assert out.tolist() == [10.0, 10.0] and torch.isfinite(extreme.grad).all()


def test_kl_estimate_rejects_unknown_kind():
    with pytest.raises(ValueError, match="k4.*k1, k2, k3, low_var_kl"):
        kl_estimate(_t([0.0]), _t([0.0]), "k4")


# ---------------------------------------------------------------- aggregation

@pytest.mark.parametrize("mode", MODES)
def test_aggregate_each_mode(mode):
    values = [0.5, float("nan"), -1.0, float("inf"), 2.0, 0.25, -0.75, 1.5, 3.0]  # garbage where mask is 0
    got = aggregate(_t(values), torch.tensor(MASK), torch.tensor(SEQ_LENS), mode,
                    global_num_tokens=11, global_num_seqs=5)
    clean = [v if m else 0.0 for v, m in zip(values, MASK)]
    assert got.item() == pytest.approx(ref_aggregate(clean, mode, 11, 5), rel=1e-12)


def test_aggregate_sequence_without_loss_tokens_contributes_zero():
    got = aggregate(_t([4.0, 4.0, 1.0]), torch.tensor([0, 0, 1]), torch.tensor([2, 1]), "seq_mean_token_mean",
                    global_num_tokens=1, global_num_seqs=2)
    assert got.item() == pytest.approx(0.5)


def test_aggregate_rejects_bad_shapes_and_normalisers():
    mask, lens = torch.tensor(MASK), torch.tensor(SEQ_LENS)
    with pytest.raises(ValueError, match=r"seq_lens \[3, 4, 1\].*sum to the 9 tokens"):
        aggregate(_t(LOGP), mask, torch.tensor([3, 4, 1]), "token_mean", global_num_tokens=7, global_num_seqs=3)
    with pytest.raises(ValueError, match=r"loss_mask has shape \(8,\); expected \[9\]"):
        aggregate(_t(LOGP), mask[:8], lens, "token_mean", global_num_tokens=7, global_num_seqs=3)
    with pytest.raises(ValueError, match="global_num_tokens=0"):
        aggregate(_t(LOGP), mask, lens, "token_mean", global_num_tokens=0, global_num_seqs=3)
    with pytest.raises(ValueError, match="loss_agg_mode='mean'"):
        aggregate(_t(LOGP), mask, lens, "mean", global_num_tokens=7, global_num_seqs=3)


# ---------------------------------------------------------------- policy losses

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["ppo", "gspo", "reinforce"])
def test_policy_loss_value_and_gradient_match_reference(kind, mode):
    cfg = LossConfig(policy_loss=kind, loss_agg_mode=mode, eps_clip=0.2 if kind != "gspo" else 0.1)
    loss, metrics, grad, _ = run_loss(cfg, with_ref=False, with_rollout=False, with_entropy=False)
    values, dvalues = ref_pg_tokens(kind, eps_low=cfg.eps_clip, eps_high=cfg.eps_clip)
    weights = ref_token_weights(mode, 7, 3)
    assert loss.item() == pytest.approx(ref_aggregate(values, mode, 7, 3), rel=1e-12)
    assert metrics["pg_loss"].item() == pytest.approx(loss.item(), rel=1e-12)
    expected_grad = [w * d for w, d in zip(weights, dvalues)]
    torch.testing.assert_close(grad, _t(expected_grad), rtol=1e-12, atol=1e-15)
    ppo_kl = [o - lp if m else 0.0 for lp, o, m in zip(LOGP, OLD, MASK)]
    assert metrics["ppo_kl"].item() == pytest.approx(ref_aggregate(ppo_kl, mode, 7, 3), rel=1e-12)


def test_ppo_clips_both_sides():
    # ratios e^0.5 > 1.2 and e^-0.5 < 0.8; the clip binds only where it lowers the objective.
    logp = _t([0.5, -0.5, 0.5, -0.5]).requires_grad_(True)
    adv = _t([1.0, -1.0, -1.0, 1.0])
    loss, metrics = compute_policy_loss(logp, torch.zeros(4, dtype=torch.float64), adv, torch.ones(4),
                                        torch.tensor([4]), LossConfig(), global_num_tokens=4, global_num_seqs=1)
    loss.backward()
    r_hi, r_lo = math.exp(0.5), math.exp(-0.5)
    assert loss.item() == pytest.approx((-1.2 + 0.8 + r_hi - r_lo) / 4, rel=1e-12)
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0, r_hi / 4, -r_lo / 4], rel=1e-12)
    assert metrics["pg_clipfrac"].item() == pytest.approx(0.5)


def test_clip_higher_widens_only_the_upper_bound():
    logp = _t([math.log(1.25), math.log(0.75)]).requires_grad_(True)
    adv, zeros, mask, lens = _t([1.0, -1.0]), torch.zeros(2, dtype=torch.float64), torch.ones(2), torch.tensor([2])
    sym, _ = compute_policy_loss(logp, zeros, adv, mask, lens, LossConfig(eps_clip=0.2),
                                 global_num_tokens=2, global_num_seqs=1)
    high, metrics = compute_policy_loss(logp, zeros, adv, mask, lens, LossConfig(eps_clip=0.2, eps_clip_high=0.28),
                                        global_num_tokens=2, global_num_seqs=1)
    assert sym.item() == pytest.approx((-1.2 + 0.8) / 2, rel=1e-12)
    assert high.item() == pytest.approx((-1.25 + 0.8) / 2, rel=1e-12)  # 1.25 < 1.28: no longer clipped
    high.backward()
    assert logp.grad.tolist() == pytest.approx([-1.25 / 2, 0.0], rel=1e-12)
    assert metrics["pg_clipfrac"].item() == pytest.approx(0.5)


def test_dual_clip_caps_negative_advantage_loss():
    logp = _t([math.log(5.0), math.log(2.0), math.log(5.0)]).requires_grad_(True)
    adv = _t([-2.0, -2.0, 1.0])
    loss, metrics = compute_policy_loss(logp, torch.zeros(3, dtype=torch.float64), adv, torch.ones(3),
                                        torch.tensor([3]), LossConfig(dual_clip_c=3.0),
                                        global_num_tokens=3, global_num_seqs=1)
    loss.backward()
    # token 0: -A*ratio = 10 > -A*c = 6 -> 6; token 1: 4 < 6 stays; token 2: A>0, clipped at 1.2.
    assert loss.item() == pytest.approx((6.0 + 4.0 - 1.2) / 3, rel=1e-12)
    assert logp.grad.tolist() == pytest.approx([0.0, 4.0 / 3, 0.0], rel=1e-12)
    assert metrics["pg_clipfrac_lower"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("clip", [0.05, 10.0])
def test_gspo_equals_sequence_level_objective(clip):
    # GSPO (paper form): J = mean_i clip-objective(s_i, A_i), s_i = exp(mean_t log(pi/pi_old)) over policy tokens.
    cfg = LossConfig(policy_loss="gspo", loss_agg_mode="seq_mean_token_mean", eps_clip=min(clip, 0.99),
                     eps_clip_high=clip)
    seq_adv = [1.5, -1.3, 0.7]
    adv = [seq_adv[s] for s, n in enumerate(SEQ_LENS) for _ in range(n)]
    logp = _t(LOGP).requires_grad_(True)
    loss, metrics = compute_policy_loss(logp, _t(OLD), _t(adv), torch.tensor(MASK), torch.tensor(SEQ_LENS), cfg,
                                        global_num_tokens=7, global_num_seqs=3)
    loss.backward()
    expected, expected_grad, n_clipped = 0.0, [], 0
    for s, (lp, old, mask) in enumerate(zip(_seqs(LOGP), _seqs(OLD), _seqs(MASK))):
        kept = sum(mask)
        ratio = math.exp(sum(a - b for a, b, m in zip(lp, old, mask) if m) / kept)
        a = seq_adv[s]
        unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - cfg.eps_clip), 1 + clip)
        expected += max(unclipped, clipped) / 3
        active = unclipped >= clipped
        n_clipped += not active
        expected_grad += [(-a * ratio / (kept * 3) if active and m else 0.0) for m in mask]
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(logp.grad, _t(expected_grad), rtol=1e-12, atol=1e-15)
    assert metrics["pg_clipfrac"].item() == pytest.approx(n_clipped / 3, rel=1e-12)
    assert (n_clipped > 0) == (clip < 1)


def test_reinforce_is_importance_weighted_policy_gradient():
    logp = _t([-1.0, -2.0]).requires_grad_(True)
    loss, metrics = compute_policy_loss(logp, logp.detach().clone(), _t([2.0, -3.0]), torch.ones(2),
                                        torch.tensor([1, 1]), LossConfig(policy_loss="reinforce"),
                                        global_num_tokens=2, global_num_seqs=2)
    loss.backward()
    assert loss.item() == pytest.approx(0.5, rel=1e-12)  # on-policy ratio 1: mean of -A
    assert logp.grad.tolist() == pytest.approx([-1.0, 1.5], rel=1e-12)
    assert metrics["pg_clipfrac"].item() == 0.0


def test_tis_weights_are_capped_and_detached():
    cfg = LossConfig(use_tis=True, tis_cap=1.5)
    loss, metrics, grad, _ = run_loss(cfg, with_ref=False, with_entropy=False)
    values, dvalues = ref_pg_tokens("ppo", tis_cap=1.5)
    assert loss.item() == pytest.approx(ref_aggregate(values, "token_mean", 7, 3), rel=1e-12)
    torch.testing.assert_close(grad, _t([d / 7 for d in dvalues]), rtol=1e-12, atol=1e-15)
    raw = [math.exp(o - r) if m else 0.0 for o, r, m in zip(OLD, ROLLOUT, MASK)]
    n_capped = sum(w > 1.5 for w in raw)
    assert 0 < n_capped < sum(MASK)
    assert metrics["tis_clipfrac"].item() == pytest.approx(n_capped / 7, rel=1e-12)
    absdiff = [abs(o - r) if m else 0.0 for o, r, m in zip(OLD, ROLLOUT, MASK)]
    assert metrics["train_rollout_logp_absdiff"].item() == pytest.approx(sum(absdiff) / 7, rel=1e-12)


def test_entropy_bonus_lowers_the_loss_and_pushes_entropy_up():
    base, _, _, _ = run_loss(LossConfig(), with_ref=False, with_rollout=False)
    loss, metrics, _, ent_grad = run_loss(LossConfig(entropy_coef=0.01), with_ref=False, with_rollout=False)
    mean_entropy = ref_aggregate(ENTROPY, "token_mean", 7, 3)
    assert metrics["entropy"].item() == pytest.approx(mean_entropy, rel=1e-12)
    assert loss.item() == pytest.approx(base.item() - 0.01 * mean_entropy, rel=1e-12)
    assert ent_grad.tolist() == pytest.approx([-0.01 / 7 if m else 0.0 for m in MASK], rel=1e-12)


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_loss_adds_coef_times_aggregated_kl(kl_type):
    cfg = LossConfig(use_kl_loss=True, kl_coef=0.1, kl_loss_type=kl_type, loss_agg_mode="seq_mean_token_mean")
    loss, metrics, grad, _ = run_loss(cfg, with_rollout=False, with_entropy=False)
    kl, dkl = [], []
    for lp, ref, m in zip(LOGP, REF, MASK):
        x = ref - lp
        pair = {"k1": (lp - ref, 1.0), "k2": (0.5 * (lp - ref) ** 2, lp - ref)}.get(
            kl_type, (math.exp(x) - x - 1, 1 - math.exp(x)))
        kl.append(pair[0] if m else 0.0)
        dkl.append(pair[1] if m else 0.0)
    values, dvalues = ref_pg_tokens("ppo")
    weights = ref_token_weights("seq_mean_token_mean", 7, 3)
    kl_mean = ref_aggregate(kl, "seq_mean_token_mean", 7, 3)
    assert metrics["kl_loss"].item() == pytest.approx(kl_mean, rel=1e-12)
    assert loss.item() == pytest.approx(ref_aggregate(values, "seq_mean_token_mean", 7, 3) + 0.1 * kl_mean, rel=1e-12)
    torch.testing.assert_close(grad, _t([w * (d + 0.1 * k) for w, d, k in zip(weights, dvalues, dkl)]),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", MODES)
def test_full_loss_gradient_matches_hand_derived(mode):
    cfg = LossConfig(loss_agg_mode=mode, eps_clip=0.2, eps_clip_high=0.28, dual_clip_c=1.5, use_kl_loss=True,
                     kl_coef=0.05, kl_loss_type="k3", entropy_coef=0.02, use_tis=True, tis_cap=2.0)
    loss, _, grad, ent_grad = run_loss(cfg)
    values, dvalues = ref_pg_tokens("ppo", eps_low=0.2, eps_high=0.28, dual_c=1.5, tis_cap=2.0)
    weights = ref_token_weights(mode, 7, 3)
    kl = [math.exp(r - lp) - (r - lp) - 1 if m else 0.0 for lp, r, m in zip(LOGP, REF, MASK)]
    dkl = [1 - math.exp(r - lp) if m else 0.0 for lp, r, m in zip(LOGP, REF, MASK)]
    expected = (ref_aggregate(values, mode, 7, 3) + 0.05 * ref_aggregate(kl, mode, 7, 3)
                - 0.02 * ref_aggregate(ENTROPY, mode, 7, 3))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(grad, _t([w * (d + 0.05 * k) for w, d, k in zip(weights, dvalues, dkl)]),
                               rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ent_grad, _t([-0.02 * w for w in weights]), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["ppo", "gspo", "reinforce"])
def test_micro_batches_add_up_to_the_whole_batch(kind, mode):
    cfg = LossConfig(policy_loss=kind, loss_agg_mode=mode, use_kl_loss=True, kl_coef=0.1, entropy_coef=0.01,
                     use_tis=True)
    whole, whole_metrics, whole_grad, _ = run_loss(cfg)
    total, grads, metric_sums = 0.0, [], {}
    for start, stop, seqs in ((0, 3, slice(0, 1)), (3, 9, slice(1, 3))):
        logp = _t(LOGP[start:stop]).requires_grad_(True)
        loss, metrics = compute_policy_loss(
            logp, _t(OLD[start:stop]), _t(ADV[start:stop]), torch.tensor(MASK[start:stop]),
            torch.tensor(SEQ_LENS[seqs]), cfg, ref_logp=_t(REF[start:stop]), rollout_logp=_t(ROLLOUT[start:stop]),
            entropy=_t(ENTROPY[start:stop]), global_num_tokens=7, global_num_seqs=3)
        loss.backward()
        total += loss.item()
        grads.append(logp.grad)
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + v.item()
    assert total == pytest.approx(whole.item(), rel=1e-12)
    torch.testing.assert_close(torch.cat(grads), whole_grad, rtol=1e-12, atol=1e-15)
    assert metric_sums.keys() == whole_metrics.keys()
    for k, v in whole_metrics.items():
        assert metric_sums[k] == pytest.approx(v.item(), rel=1e-12, abs=1e-15), k


def test_masked_tokens_are_ignored_even_when_extreme_in_float32():
    cfg = LossConfig(use_kl_loss=True, kl_coef=0.1, kl_loss_type="k3", use_tis=True)
    logp = _t(LOGP, torch.float32).requires_grad_(True)
    loss, metrics = compute_policy_loss(
        logp, _t(OLD, torch.float32), _t(ADV, torch.float32), torch.tensor(MASK), torch.tensor(SEQ_LENS), cfg,
        ref_logp=_t(REF, torch.float32), rollout_logp=_t(ROLLOUT, torch.float32),
        global_num_tokens=7, global_num_seqs=3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert logp.grad[1].item() == 0.0 and logp.grad[3].item() == 0.0
    assert all(torch.isfinite(v) for v in metrics.values())


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="policy_loss='grpo'.*ppo, gspo, reinforce"):
        LossConfig(policy_loss="grpo")
    with pytest.raises(ValueError, match="eps_clip=1.5"):
        LossConfig(eps_clip=1.5)
    with pytest.raises(ValueError, match="dual_clip_c=1.0; must be > 1"):
        LossConfig(dual_clip_c=1.0)
    with pytest.raises(ValueError, match="reinforce"):
        LossConfig(policy_loss="reinforce", dual_clip_c=3.0)
    with pytest.raises(ValueError, match="loss_agg_mode='sum'"):
        LossConfig(loss_agg_mode="sum")
    with pytest.raises(ValueError, match="kl_loss_type='k4'"):
        LossConfig(kl_loss_type="k4")
    with pytest.raises(ValueError, match="tis_cap=0"):
        LossConfig(tis_cap=0)


def test_missing_inputs_for_enabled_terms_are_clear_errors():
    with pytest.raises(ValueError, match="use_kl_loss.*ref_logp is None"):
        run_loss(LossConfig(use_kl_loss=True, kl_coef=0.1), with_ref=False)
    with pytest.raises(ValueError, match="use_tis.*rollout_logp is None"):
        run_loss(LossConfig(use_tis=True), with_rollout=False)
    with pytest.raises(ValueError, match="entropy_coef=0.01 but entropy is None"):
        run_loss(LossConfig(entropy_coef=0.01), with_entropy=False)
    with pytest.raises(ValueError, match=r"logp has shape \(3, 3\)"):
        run_loss(LossConfig(), logp=_t(LOGP).reshape(3, 3).requires_grad_(True))

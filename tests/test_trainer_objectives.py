"""One CPU TrainerActor step per new objective (GSPO, CISPO, SFT, custom loss, MIS, DAPO + custom advantages).

All runs share one spawn of two gloo ranks (TP=1, DP=2); each shows a finite loss and changed weights.
"""

import math

import pytest
import torch

from trainer.config import TrainerConfig
from trainer.losses import LossConfig
from trainer.testing import make_samples, run_distributed

HOOK_CALLS: list = []


def loss_hook(logp, old_logp, advantages, loss_mask, seq_lens, cfg, *, ref_logp, rollout_logp, entropy,
              global_num_tokens, global_num_seqs):
    """A custom loss: REINFORCE over the loss-mask tokens, plus a metric naming its normaliser."""
    HOOK_CALLS.append(("loss", global_num_tokens, global_num_seqs, old_logp is not None, advantages is not None))
    keep = loss_mask.bool()
    value = torch.where(keep, -advantages * logp, torch.zeros_like(logp)).sum() / global_num_tokens
    return value, {"hook_loss": value.detach(), "hook_tokens": torch.tensor(float(keep.sum())) / global_num_tokens}


def advantage_hook(rewards, group_index, response_lengths, *, loss_masks, samples):
    """A custom estimator: reward minus 0.5, one per sample."""
    HOOK_CALLS.append(("adv", len(samples), [s.index for s in samples]))
    return rewards - 0.5


def _config(path, **overrides) -> TrainerConfig:
    base = dict(hf_checkpoint=str(path), lr=1e-2, temperature=0.8, global_batch_size=8, max_tokens_per_gpu=256,
                vocab_pad_multiple=96, clip_grad=10.0, seed=3)
    return TrainerConfig(**{**base, **overrides})


def _weights(actor) -> dict:
    return {n: p.detach().clone() for n, p in actor.model.named_parameters()}


def _worker(rank, world, model):
    from trainer.actor import TrainerActor

    cases = {
        "gspo": dict(advantage_estimator="gspo", loss=LossConfig(policy_loss="gspo",
                                                                 loss_agg_mode="seq_mean_token_mean")),
        "cispo": dict(loss=LossConfig(policy_loss="cispo")),
        "sft": dict(loss=LossConfig(loss_type="sft")),
        "custom_loss": dict(loss=LossConfig(loss_type="custom",
                                            custom_loss_function_path="test_trainer_objectives:loss_hook")),
        "mis": dict(loss=LossConfig(use_mis=True, use_tis=True)),
        "dapo_custom_adv": dict(advantage_estimator="custom", overlong_buffer_len=3, rollout_max_response_len=6,
                                custom_advantage_function_path="test_trainer_objectives:advantage_hook",
                                loss=LossConfig(use_mis=True, mis_level="geometric")),
    }
    res = {}
    for name, overrides in cases.items():
        samples = make_samples(8, vocab_size=500, seed=7)
        actor = TrainerActor(_config(model, **overrides), rank, world, "127.0.0.1", 0)
        actor.init()
        old = actor.compute_log_probs(samples)
        for i, (s, lp) in enumerate(zip(samples, old)):
            # the engine's log-probs: equal to the trainer's, but one token in three off by e (ratio outside [0.5, 2])
            s.rollout_logprobs = [v + (1.0 if (i + t) % 3 == 0 else 0.0) for t, v in enumerate(lp.tolist())]
            if name == "sft":
                s.reward = None  # SFT needs no reward
        before = _weights(actor)
        HOOK_CALLS.clear()
        metrics = actor.train_step(samples)
        after = _weights(actor)
        res[name] = dict(metrics=metrics, moved=max((after[k] - before[k]).abs().max().item() for k in before),
                         calls=list(HOOK_CALLS),
                         lengths=[s.response_length for s in samples],
                         expected_reject=sum(m for i, s in enumerate(samples) for t, m in enumerate(s.loss_mask)
                                             if (i + t) % 3 == 0) / sum(sum(s.loss_mask) for s in samples),
                         status=[s.status for s in samples])
        actor.shutdown()
    res["old_logprobs"] = _old_logprobs_runs(model, rank, world)
    return res


def _old_logprobs_runs(model, rank, world) -> dict:
    """Two train steps with the old log-probs from the update's forward, and with the separate recompute pass (TIS
    and MIS on, so they use them too); then two optimizer steps per train step, where the recompute is needed."""
    from trainer.actor import TrainerActor

    out = {}
    for name, overrides in {"from_update": {}, "recompute": dict(old_logprobs_from_update=False),
                            "two_updates": dict(global_batch_size=4)}.items():
        actor = TrainerActor(_config(model, loss=LossConfig(use_tis=True, use_mis=True), **overrides), rank, world,
                             "127.0.0.1", 0)
        actor.init()
        passes = []
        separate = actor._log_probs_all
        actor._log_probs_all = lambda m, b: passes.append(len(b)) or separate(m, b)
        metrics = []
        for step in range(2):
            samples = make_samples(8, vocab_size=500, seed=11 + step)
            lp = separate(actor.model, samples)
            for s, v in zip(samples, lp):  # the engine's log-probs: the trainer's, one token in three off by 1
                s.rollout_logprobs = [x + (1.0 if t % 3 == 0 else -0.1) for t, x in enumerate(v.tolist())]
            metrics.append(actor.train_step(samples))
        out[name] = dict(metrics=metrics, weights=_weights(actor), passes=passes)
        actor.shutdown()
    return out


@pytest.fixture(scope="module")
def results(tiny_models):
    return run_distributed(_worker, 2, tiny_models["qwen3"])


@pytest.mark.parametrize("name", ["gspo", "cispo", "sft", "custom_loss", "mis", "dapo_custom_adv"])
def test_one_step_has_a_finite_loss_and_moves_the_weights(results, name):
    for rank in results:
        r = rank[name]
        assert r["metrics"]["num_failed"] == 0 and r["metrics"]["num_samples"] == 8
        assert math.isfinite(r["metrics"]["loss"])
        assert r["moved"] > 1e-4, r["moved"]
    assert results[0][name]["metrics"] == results[1][name]["metrics"]  # reduced over the DP ranks


def test_sft_reports_the_nll(results):
    m = results[0]["sft"]["metrics"]
    assert m["sft_loss"] == pytest.approx(m["loss"]) and m["sft_loss"] > 0
    assert "pg_loss" not in m


def test_custom_loss_value_and_metrics_reach_the_step(results):
    r = results[0]["custom_loss"]
    assert r["metrics"]["hook_loss"] == pytest.approx(r["metrics"]["loss"])
    assert r["metrics"]["hook_tokens"] == pytest.approx(1.0)  # the micro-batch shares add up over the DP ranks
    assert r["calls"] and all(c[0] == "loss" and c[3] and c[4] and c[2] == 8 for c in r["calls"])


def test_mis_rejects_the_off_policy_tokens(results):
    r = results[0]["mis"]
    assert r["metrics"]["mis_reject_frac"] == pytest.approx(r["expected_reject"], rel=1e-5)
    assert 0 < r["metrics"]["mis_reject_frac"] < 1


def test_dapo_shaping_and_custom_advantages(results):
    r = results[0]["dapo_custom_adv"]
    lengths = r["lengths"]
    penalties = [min(0.0, max(-1.0, (3 - n) / 3)) for n in lengths]
    assert r["metrics"]["overlong_penalty_mean"] == pytest.approx(sum(penalties) / len(penalties), rel=1e-6)
    assert r["metrics"]["overlong_frac"] == pytest.approx(sum(p < 0 for p in penalties) / len(penalties))
    assert any(p < 0 for p in penalties) and any(p == 0 for p in penalties)
    assert r["calls"] == [("adv", 8, list(range(8)))]
    assert "mis_reject_frac" in r["metrics"]


def test_old_logprobs_from_the_update_equal_the_recompute_pass(results):
    """One optimizer step per train step: the old log-probs come from the update's own forward (no separate pass over
    the rollout), and the step is the one the separate recompute gives: the same weights after two steps, the same
    loss, TIS / MIS and train-vs-rollout metrics; ppo_kl is exactly 0 (the ratio is exactly 1)."""
    runs = results[0]["old_logprobs"]
    fast, slow = runs["from_update"], runs["recompute"]
    assert fast["passes"] == [] and slow["passes"] == [8, 8]  # one pass over the rollout per step
    for a, b in zip(fast["metrics"], slow["metrics"]):
        for key in ("loss", "pg_loss", "train_rollout_logp_absdiff", "train_rollout_kl", "tis_clipfrac",
                    "mis_reject_frac", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        assert a["ppo_kl"] == 0.0 and abs(b["ppo_kl"]) < 1e-6
        assert 0 < a["mis_reject_frac"] < 1 and a["train_rollout_logp_absdiff"] > 0.1
    for name, w in fast["weights"].items():
        torch.testing.assert_close(w, slow["weights"][name], rtol=1e-4, atol=1e-6)
    for m in fast["metrics"] + slow["metrics"]:  # the train phase's split (the slowest rank's, equal on every rank)
        assert 0 <= m["time_optimizer_s"] < m["time_update_s"] and m["time_passes_s"] >= 0
    # two optimizer steps per train step: the second update's old policy is the weights before the first, so the
    # separate pass is still taken
    assert runs["two_updates"]["passes"] == [8, 8]
    assert runs["two_updates"]["metrics"][0]["optimizer_steps"] == 2


def test_trainer_config_makes_gspo_and_hooks_explicit(tiny_models):
    path = tiny_models["qwen3"]
    with pytest.raises(ValueError, match="advantage_estimator='gspo' gives GRPO's group advantages.*--policy-loss"):
        _config(path, advantage_estimator="gspo")
    assert _config(path, advantage_estimator="gspo", loss=LossConfig(policy_loss="gspo")).loss.clip_high == 4e-4
    with pytest.raises(ValueError, match="advantage_estimator='custom' and the path go together"):
        _config(path, advantage_estimator="custom")
    with pytest.raises(ValueError, match="go together"):
        _config(path, custom_advantage_function_path="test_trainer_objectives:advantage_hook")
    with pytest.raises(TypeError, match="custom advantage function.*cannot be called"):
        _config(path, advantage_estimator="custom", custom_advantage_function_path="test_trainer_objectives:_config")
    with pytest.raises(ValueError, match="use_mis needs recompute_old_logprobs"):
        _config(path, recompute_old_logprobs=False, loss=LossConfig(use_mis=True))
    with pytest.raises(ValueError, match="overlong_buffer_len=600"):
        _config(path, overlong_buffer_len=600)

"""PPO with a critic (GAE, value clipping) and on-policy distillation, against float64 references and hand-computed
cases, then one CPU TrainerActor run of each (issue #19, algorithms)."""

import math
import random

import pytest
import torch

from trainer.advantages import compute_advantages, compute_gae, gae, opd_penalty
from trainer.config import TrainerConfig
from trainer.critic import CriticConfig
from trainer.losses import LossConfig, compute_value_loss
from trainer.testing import make_samples, run_distributed

TOL = dict(rtol=1e-12, atol=1e-14)


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ GAE

def test_gae_hand_computed_case():
    # policy tokens 0, 1, 3 (token 2 is tool text); reward 1 on the last policy token; gamma 0.9, lambda 0.8
    # k=2: delta = 1 - (-0.1) = 1.1;               A = 1.1
    # k=1: delta = 0.9 * (-0.1) - 0.2 = -0.29;     A = -0.29 + 0.72 * 1.1 = 0.502
    # k=0: delta = 0.9 * 0.2 - 0.5 = -0.32;        A = -0.32 + 0.72 * 0.502 = 0.04144
    adv, ret = compute_gae(_t([1.0]), [_t([0.5, 0.2, 9.9, -0.1])], [4], gamma=0.9, lambd=0.8,
                           loss_masks=[torch.tensor([1, 1, 0, 1])], whiten=False)
    torch.testing.assert_close(adv[0], _t([0.04144, 0.502, 0.0, 1.1]), **TOL)
    torch.testing.assert_close(ret[0], _t([0.54144, 0.702, 0.0, 1.0]), **TOL)


def _gae_reference(rewards, values, masks, kl, kl_coef, gamma, lambd):
    """Plain-Python GAE over each sample's policy tokens, reward on the last one, KL in the reward."""
    advs, rets = [], []
    for r, v, m, k in zip(rewards, values, masks, kl):
        idx = [t for t, keep in enumerate(m) if keep]
        tok_r = [-kl_coef * k[t] for t in idx]
        tok_r[-1] += r
        a = [0.0] * len(idx)
        running = 0.0
        for j in reversed(range(len(idx))):
            next_v = values_at(v, idx, j + 1)
            running = tok_r[j] + gamma * next_v - v[idx[j]] + gamma * lambd * running
            a[j] = running
        full_a, full_r = [0.0] * len(m), [0.0] * len(m)
        for j, t in enumerate(idx):
            full_a[t], full_r[t] = a[j], a[j] + v[t]
        advs.append(full_a)
        rets.append(full_r)
    return advs, rets


def values_at(v, idx, j):
    return v[idx[j]] if j < len(idx) else 0.0


@pytest.mark.parametrize("gamma,lambd,kl_coef", [(1.0, 1.0, 0.0), (0.95, 0.9, 0.1), (0.7, 0.0, 0.05)])
def test_gae_matches_reference_with_kl_and_whitening(gamma, lambd, kl_coef):
    rng = random.Random(3)
    lengths = [5, 2, 7, 4]
    rewards = [rng.uniform(-1, 2) for _ in lengths]
    values = [[rng.uniform(-1, 1) for _ in range(n)] for n in lengths]
    kl = [[rng.uniform(-0.5, 0.5) for _ in range(n)] for n in lengths]
    masks = [[1] + [int(rng.random() > 0.3) for _ in range(n - 1)] for n in lengths]
    ref_a, ref_r = _gae_reference(rewards, values, masks, kl, kl_coef, gamma, lambd)
    adv, ret = compute_gae(_t(rewards), [_t(v) for v in values], lengths, gamma=gamma, lambd=lambd,
                           kl=[_t(k) for k in kl], kl_coef=kl_coef, loss_masks=[torch.tensor(m) for m in masks],
                           whiten=False)
    for a, r, ea, er in zip(adv, ret, ref_a, ref_r):
        torch.testing.assert_close(a, _t(ea), **TOL)
        torch.testing.assert_close(r, _t(er), **TOL)
    # whitened over the batch's policy tokens: (A - mean) / (std + eps), std with n - 1
    flat = [a for ea, m in zip(ref_a, masks) for a, keep in zip(ea, m) if keep]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((a - mean) ** 2 for a in flat) / (len(flat) - 1))
    white, ret2 = compute_gae(_t(rewards), [_t(v) for v in values], lengths, gamma=gamma, lambd=lambd,
                              kl=[_t(k) for k in kl], kl_coef=kl_coef, loss_masks=[torch.tensor(m) for m in masks])
    for w, ea, m in zip(white, ref_a, masks):
        torch.testing.assert_close(w, _t([(a - mean) / (std + 1e-6) if keep else 0.0 for a, keep in zip(ea, m)]),
                                   **TOL)
    for r, r2 in zip(ret, ret2):  # the value targets are never whitened
        torch.testing.assert_close(r, r2, **TOL)


def test_gae_limits_monte_carlo_and_td0():
    values = _t([0.3, -0.2, 0.7])
    adv, ret = gae([_t([0.0, 0.0, 1.0])], [values], gamma=1.0, lambd=1.0)
    torch.testing.assert_close(ret[0], _t([1.0, 1.0, 1.0]), **TOL)  # lambda 1, gamma 1: the return itself
    torch.testing.assert_close(adv[0], 1.0 - values, **TOL)
    adv, _ = gae([_t([0.0, 0.0, 1.0])], [values], gamma=0.5, lambd=0.0)  # TD(0): r + gamma V' - V
    torch.testing.assert_close(adv[0], _t([0.5 * -0.2 - 0.3, 0.5 * 0.7 + 0.2, 1.0 - 0.7]), **TOL)


def test_gae_input_errors():
    with pytest.raises(ValueError, match="needs the critic's values"):
        compute_advantages("gae", _t([1.0]), torch.tensor([0]), [2])
    with pytest.raises(ValueError, match=r"values\[0\] has 3 entries"):
        compute_gae(_t([1.0]), [_t([0.0, 0.0, 0.0])], [2])
    with pytest.raises(ValueError, match="lambd"):
        gae([_t([1.0])], [_t([0.0])], gamma=1.0, lambd=1.5)


# ------------------------------------------------------------------------------------------ value loss

@pytest.mark.parametrize("clip", [None, 0.2, 0.05])
def test_value_loss_matches_reference_values_and_gradients(clip):
    rng = random.Random(5)
    seq_lens = [4, 3, 5]
    n = sum(seq_lens)
    old = [rng.uniform(-1, 1) for _ in range(n)]
    new = [o + rng.uniform(-0.4, 0.4) for o in old]
    returns = [rng.uniform(-1.5, 1.5) for _ in range(n)]
    mask = [0 if i % 4 == 2 else 1 for i in range(n)]
    norm = 11  # a global token count larger than this micro-batch's
    values = _t(new).requires_grad_(True)
    loss, metrics = compute_value_loss(values, _t(old), _t(returns), torch.tensor(mask), torch.tensor(seq_lens),
                                       value_clip=clip, global_num_tokens=norm, global_num_seqs=3)
    loss.backward()
    ref, grads, clipped = 0.0, [], 0
    for v, o, r, m in zip(new, old, returns, mask):
        if not m:
            grads.append(0.0)
            continue
        un = (v - r) ** 2
        if clip is None:
            ref += 0.5 * un
            grads.append((v - r) / norm)
            continue
        vc = o + min(max(v - o, -clip), clip)
        cl = (vc - r) ** 2
        ref += 0.5 * max(un, cl)
        clipped += cl > un
        inside = -clip < v - o < clip
        grads.append((v - r) / norm if un >= cl or inside else 0.0)
    assert loss.item() == pytest.approx(ref / norm, rel=1e-12)
    torch.testing.assert_close(values.grad, _t(grads), **TOL)
    assert metrics["value_loss"].item() == pytest.approx(ref / norm, rel=1e-12)
    if clip is not None:
        assert metrics["value_clipfrac"].item() == pytest.approx(clipped / norm, rel=1e-12)
    if clip == 0.05:
        assert clipped > 0  # the case exercises the clipped branch
    with pytest.raises(ValueError, match="value_clip"):
        compute_value_loss(values, _t(old), _t(returns), torch.tensor(mask), torch.tensor(seq_lens), value_clip=0.0,
                           global_num_tokens=norm, global_num_seqs=3)


# ------------------------------------------------------------------------------------------ OPD

def test_opd_penalty_is_the_sampled_token_reverse_kl():
    student = [_t([-1.0, -0.5, -2.0]), _t([-0.1])]
    teacher = [_t([-1.5, -0.5, -0.2]), _t([-3.0])]
    masks = [torch.tensor([1, 0, 1]), torch.tensor([1])]
    out = opd_penalty(student, teacher, 0.7, masks)
    torch.testing.assert_close(out[0], _t([0.7 * 0.5, 0.0, 0.7 * -1.8]), **TOL)
    torch.testing.assert_close(out[1], _t([0.7 * 2.9]), **TOL)
    with pytest.raises(ValueError, match="teacher log-probs of sample 1"):
        opd_penalty(student, [teacher[0], _t([1.0, 2.0])], 1.0)


# ------------------------------------------------------------------------------------------ config

def _config(path, **overrides) -> TrainerConfig:
    base = dict(hf_checkpoint=str(path), lr=1e-2, temperature=0.8, global_batch_size=8, max_tokens_per_gpu=256,
                vocab_pad_multiple=96, clip_grad=10.0, seed=3)
    return TrainerConfig(**{**base, **overrides})


def test_config_errors(tiny_models):
    path = tiny_models["qwen3"]
    assert _config(path, advantage_estimator="gae").use_critic
    assert not _config(path).use_critic
    with pytest.raises(ValueError, match="critic_load"):
        _config(path, critic=CriticConfig(critic_load=str(path)))
    with pytest.raises(ValueError, match="not an HF model folder"):
        CriticConfig(critic_load="/nonexistent")
    with pytest.raises(ValueError, match="pipeline_parallel_size=1 only"):
        _config(path, advantage_estimator="gae", pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="lambd"):
        _config(path, lambd=1.2)
    with pytest.raises(ValueError, match="opd_teacher_load"):
        _config(path, use_opd=True, opd_type="megatron")
    with pytest.raises(ValueError, match="opd_type"):
        _config(path, use_opd=True, opd_type="sglang")
    # KL in the reward is supported by GAE
    assert _config(path, advantage_estimator="gae", loss=LossConfig(kl_coef=0.1)).kl_in_reward


# ------------------------------------------------------------------------------------------ CPU trainer

def _worker(rank, world, model, teacher, ckpt_dir):
    from trainer.actor import TrainerActor

    res = {}
    # PPO with a critic: two steps (the zero value head moves in step 1, the trunk from step 2)
    actor = TrainerActor(_config(model, advantage_estimator="gae", lambd=0.95, gamma=0.99,
                                 critic=CriticConfig(critic_lr=5e-3, value_clip=0.2)), rank, world, "127.0.0.1", 0)
    actor.init()
    samples = make_samples(8, vocab_size=500, seed=7)
    critic0 = {n: p.detach().clone() for n, p in actor.critic.named_parameters()}
    policy0 = {n: p.detach().clone() for n, p in actor.model.named_parameters()}
    m1 = actor.train_step(samples)
    critic1 = {n: p.detach().clone() for n, p in actor.critic.named_parameters()}
    m2 = actor.train_step(samples)
    critic2 = {n: p.detach().clone() for n, p in actor.critic.named_parameters()}

    def moved(a, b, part=""):
        return max((a[k] - b[k]).abs().max().item() for k in a if part in k and a[k].numel())

    res["gae"] = dict(m1=m1, m2=m2, head1=moved(critic0, critic1, "value_head"),
                      trunk1=moved(critic0, critic1, "gpt."), trunk2=moved(critic1, critic2, "gpt."),
                      policy=moved(policy0, {n: p.detach() for n, p in actor.model.named_parameters()}),
                      rewards=[s.reward for s in samples], masks=[s.loss_mask for s in samples],
                      values=[v.tolist() for v in actor._values_all(samples)])
    actor.save_checkpoint(ckpt_dir)
    saved = {n: p.detach().clone() for n, p in actor.critic.named_parameters()}
    actor.shutdown()
    again = TrainerActor(_config(model, advantage_estimator="gae", critic=CriticConfig(critic_lr=5e-3)),
                         rank, world, "127.0.0.1", 0)
    again.init()
    again.load_checkpoint(ckpt_dir)
    res["gae"]["restored"] = moved(saved, {n: p.detach() for n, p in again.critic.named_parameters()})
    again.shutdown()

    # critic-only first step: the policy waits
    actor = TrainerActor(_config(model, advantage_estimator="gae", critic=CriticConfig(num_critic_only_steps=1)),
                         rank, world, "127.0.0.1", 0)
    actor.init()
    before = {n: p.detach().clone() for n, p in actor.model.named_parameters()}
    m = actor.train_step(make_samples(8, vocab_size=500, seed=7))
    res["critic_only"] = dict(m=m, policy=moved(before, {n: p.detach() for n, p in actor.model.named_parameters()}))
    actor.shutdown()

    # OPD, teacher in the trainer (megatron): a teacher equal to the student gives exactly no penalty
    for name, teacher_dir in (("opd_self", model), ("opd_other", teacher)):
        actor = TrainerActor(_config(model, use_opd=True, opd_type="megatron", opd_teacher_load=str(teacher_dir),
                                     opd_kl_coef=0.5), rank, world, "127.0.0.1", 0)
        actor.init()
        samples = make_samples(8, vocab_size=500, seed=7)
        old = actor.compute_log_probs(samples)
        teacher_lp = actor.compute_log_probs(samples, model="teacher")
        m = actor.train_step(samples)
        res[name] = dict(m=m, old=[t.tolist() for t in old], teacher=[t.tolist() for t in teacher_lp],
                         masks=[s.loss_mask for s in samples])
        actor.shutdown()

    # OPD from a served engine: the teacher's log-probs arrive on the samples
    actor = TrainerActor(_config(model, use_opd=True, opd_kl_coef=2.0), rank, world, "127.0.0.1", 0)
    actor.init()
    samples = make_samples(8, vocab_size=500, seed=7)
    old = actor.compute_log_probs(samples)
    for i, (s, lp) in enumerate(zip(samples, old)):
        s.teacher_logprobs = [v - 0.1 * ((i + t) % 3) for t, v in enumerate(lp.tolist())]
    samples[3].teacher_logprobs = []  # a sample without its teacher's log-probs fails, the others train
    before = {n: p.detach().clone() for n, p in actor.model.named_parameters()}
    m = actor.train_step(samples)
    res["opd_engine"] = dict(m=m, status=[s.status.value for s in samples], error=samples[3].error,
                             moved=moved(before, {n: p.detach() for n, p in actor.model.named_parameters()}),
                             expected=[(0.1 * ((i + t) % 3), k) for i, s in enumerate(samples) if i != 3
                                       for t, k in enumerate(s.loss_mask)])
    actor.shutdown()
    return res


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    return run_distributed(_worker, 2, tiny_models["qwen3"], tiny_models["llama"],
                           str(tmp_path_factory.mktemp("critic_ckpt")))


def test_gae_step_trains_the_critic(results):
    r = results[0]["gae"]
    m1 = r["m1"]
    # step 1: every value is 0 (zero head), so delta is the reward on the last policy token and 0 elsewhere,
    # returns = A = (gamma lambda)^(tokens after) * reward, and the value loss is 0.5 * the token mean of R^2;
    # the trainer's metrics must equal this float64 reference
    decay = 0.99 * 0.95
    rets = []
    for reward, mask in zip(r["rewards"], r["masks"]):
        idx = [t for t, k in enumerate(mask) if k]
        rets += [reward * decay ** (len(idx) - 1 - j) for j in range(len(idx))]
    assert m1["returns_mean"] == pytest.approx(sum(rets) / len(rets), rel=1e-5)
    assert m1["value_loss"] == pytest.approx(0.5 * sum(x * x for x in rets) / len(rets), rel=1e-5)
    assert m1["values_mean"] == 0.0 and m1["value_clipfrac"] == 0.0
    assert m1["value_loss"] > 0 and math.isfinite(m1["loss"])
    assert r["head1"] > 1e-4 and r["trunk2"] > 1e-6  # the head moves at once, the trunk once the head is non-zero
    assert r["trunk1"] == 0.0
    assert r["m2"]["value_loss"] < m1["value_loss"]  # the critic fits the returns
    assert r["m2"]["values_mean"] != 0.0
    assert r["policy"] > 1e-4
    assert results[0]["gae"]["m2"] == results[1]["gae"]["m2"]  # reduced over the DP ranks
    assert r["restored"] == 0.0  # the checkpoint holds the critic


def test_critic_only_steps_leave_the_policy(results):
    r = results[0]["critic_only"]
    assert r["policy"] == 0.0 and r["m"]["value_loss"] > 0 and "pg_loss" not in r["m"]


def test_opd_in_the_trainer(results):
    same = results[0]["opd_self"]["m"]
    assert same["opd_reverse_kl"] == 0.0  # bit-equal log-probs: no penalty
    r = results[0]["opd_other"]
    gaps = [o - t for old, teach, mask in zip(r["old"], r["teacher"], r["masks"])
            for o, t, k in zip(old, teach, mask) if k]
    assert r["m"]["opd_reverse_kl"] == pytest.approx(sum(gaps) / len(gaps), rel=1e-5)
    assert math.isfinite(r["m"]["loss"])


def test_opd_from_engine_logprobs(results):
    r = results[0]["opd_engine"]
    assert r["status"][3] == "failed" and "teacher" in r["error"]
    assert r["m"]["num_failed"] == 1
    gaps = [g for g, k in r["expected"] if k]
    assert r["m"]["opd_reverse_kl"] == pytest.approx(sum(gaps) / len(gaps), rel=1e-5)
    assert r["moved"] > 1e-4


# ------------------------------------------------------------------------------------------ served teacher

def test_served_teacher_scores_the_response_tokens_like_hf(tiny_models):
    """orchestrator.teacher over an in-process engine: teacher-forced log-probs equal HF's log_softmax(logits / T)."""
    import asyncio

    from transformers import AutoModelForCausalLM

    from inference_engine import Engine
    from kiln_common.sample import Status
    from orchestrator.teacher import score_samples
    from rollout.client import LocalEngineClient
    from trainer.testing import hf_response_logprobs

    teacher_dir = tiny_models["llama"]
    samples = make_samples(5, vocab_size=500, seed=11)
    samples[2].tokens = samples[2].tokens[:-1] + [10 ** 6]  # an id outside the teacher's vocabulary
    hf = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with Engine(model_path=str(teacher_dir), max_total_tokens=2048) as engine:
        failed = asyncio.run(score_samples(LocalEngineClient(engine), samples, 0.8))
    assert failed == 1 and samples[2].status == Status.FAILED and samples[2].error.startswith("opd teacher:")
    for i, s in enumerate(samples):
        if i == 2:
            continue
        expected, _ = hf_response_logprobs(hf, s, 0.8)
        assert len(s.teacher_logprobs) == s.response_length
        torch.testing.assert_close(torch.tensor(s.teacher_logprobs, dtype=torch.float64), expected,
                                   rtol=0, atol=2e-4)

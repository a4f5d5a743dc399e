"""TrainerActor on CPU: TP=2 vs TP=1 updates, packing invariance, learning, bit-exact resume, export, bad input.

Everything distributed runs in ONE spawn of two gloo ranks (module fixture): TP=2 (DP=1) and
TP=1 (DP=2) runs of the same steps; the tests then compare what the ranks reported.
"""

import pytest
import torch

from kiln_common.sample import Sample, Status
from trainer.batching import data_parallel_shares, pack_micro_batches, split_global_batches
from trainer.config import TrainerConfig
from trainer.logprobs import vocab_parallel_logprobs
from trainer.losses import LossConfig
from trainer.optimizer import lr_at
from trainer.testing import hf_response_logprobs, hf_weights, make_samples, run_distributed, without_timings

TEMPERATURE = 0.8


def _config(path, **overrides) -> TrainerConfig:
    base = dict(hf_checkpoint=str(path), lr=1e-2, temperature=TEMPERATURE, global_batch_size=8,
                max_tokens_per_gpu=256, vocab_pad_multiple=96, clip_grad=10.0, seed=3)
    return TrainerConfig(**{**base, **overrides})


def _run(actor_cls, cfg, rank, world, steps, samples):
    actor = actor_cls(cfg, rank, world, "127.0.0.1", 0)
    actor.init()
    metrics = [actor.train_step(samples) for _ in range(steps)]
    return actor, metrics


def _trainer_worker(rank, world, models, out_dir):
    from trainer.actor import TrainerActor

    res = {}
    samples = make_samples(8, vocab_size=500, seed=11)
    # TP=2 (DP=1) vs TP=1 (DP=2): same update; qwen2 has the untied head and qkv bias.
    for tp in (2, 1):
        cfg = _config(models["qwen2"], tensor_parallel_size=tp, adam_eps=1e-3)  # eps: Adam's g/|g| would amplify noise
        actor, m = _run(TrainerActor, cfg, rank, world, 1, samples)
        res[f"tp{tp}_weights"], res[f"tp{tp}_metrics"] = hf_weights(actor), m[0]
        actor.shutdown()

    # Packing invariance at TP=2: one micro-batch vs three.
    lengths = [len(s.tokens) for s in samples]
    max_len = max(lengths)
    for name, budget in (("one", max_len * len(samples)), ("three", None)):
        if budget is None:  # the smallest budget that still yields exactly three micro-batches
            budget = next(b for b in range(max_len, 10_000)
                          if len(pack_micro_batches(list(range(8)), [s.tokens for s in samples],
                                                    [s.response_length for s in samples], b)) == 3)
        cfg = _config(models["qwen3"], tensor_parallel_size=2, max_tokens_per_gpu=budget, adam_eps=1e-3)
        actor, _ = _run(TrainerActor, cfg, rank, world, 1, samples)
        res[f"pack_{name}"] = hf_weights(actor)
        actor.shutdown()

    # Learning, bit-exact resume, export (TP=2): rewards 1/0 inside each group of two.
    learn = make_samples(4, vocab_size=500, seed=5)
    for i, s in enumerate(learn):
        s.reward = float(i % 2 == 0)
    cfg = _config(models["qwen3"], tensor_parallel_size=2, lr=3e-3, lr_warmup_steps=2, lr_decay_steps=10,
                  lr_decay_style="cosine")
    actor = TrainerActor(cfg, rank, world, "127.0.0.1", 0)
    actor.init()
    res["logp_before"] = actor.compute_log_probs(learn)
    for _ in range(3):
        actor.train_step(learn)
    res["logp_after"] = actor.compute_log_probs(learn)
    actor.save_checkpoint(out_dir / "ckpt")
    res["next_metrics"] = actor.train_step(learn)
    res["next_weights"] = hf_weights(actor)
    res["offload_bytes"], res["onload_bytes"] = actor.offload(), actor.onload()
    res["grads_after_offload"] = sum(t.grad is not None for t in [*actor.model.parameters(),
                                                                  *getattr(actor.optimizer, "params", [])])
    actor.export_hf(out_dir / "export")
    res["trainer_logp_export"] = actor.compute_log_probs(learn)
    actor.shutdown()
    actor = TrainerActor(cfg, rank, world, "127.0.0.1", 0)
    actor.init()
    actor.load_checkpoint(out_dir / "ckpt")
    res["resumed_metrics"] = actor.train_step(learn)
    res["resumed_weights"] = hf_weights(actor)

    # Bad input: out-of-vocab token, missing reward, wrong loss_mask length; the rest still trains.
    bad = [Sample(index=100, tokens=[1, 2, 10_000, 3], response_length=2, loss_mask=[1, 1], reward=1.0),
           Sample(index=101, tokens=[1, 2, 3, 4], response_length=2, loss_mask=[1, 1], reward=None),
           Sample(index=102, tokens=[1, 2, 3, 4], response_length=2, loss_mask=[1], reward=1.0)]
    res["bad_metrics"] = actor.train_step(learn + bad)
    res["bad_status"] = [(s.status, s.error) for s in bad]
    actor.shutdown()

    # KL in the loss: the reference equals the initial policy, so KL starts at 0.
    cfg = _config(models["llama"], tensor_parallel_size=2,
                  loss=LossConfig(kl_coef=0.1, use_kl_loss=True, entropy_coef=0.01))
    actor = TrainerActor(cfg, rank, world, "127.0.0.1", 0)
    actor.init()
    res["ref_equals_actor"] = all(torch.equal(a, b) for a, b in
                                  zip(actor.compute_log_probs(samples), actor.compute_log_probs(samples, "ref")))
    res["kl_metrics"] = [actor.train_step(samples) for _ in range(2)]
    actor.shutdown()
    return res


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("trainer")
    ranks = run_distributed(_trainer_worker, 2, dict(tiny_models), out_dir)
    return ranks[0], out_dir


def _assert_weights_close(a: dict, b: dict, atol: float):
    assert sorted(a) == sorted(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, worst


def test_tp2_step_equals_tp1_step(results, tiny_models):
    res, _ = results
    from safetensors.torch import load_file

    initial = load_file(tiny_models["qwen2"] / "model.safetensors")
    moved = max((res["tp2_weights"][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3  # the step changed the weights
    _assert_weights_close(res["tp2_weights"], res["tp1_weights"], atol=1e-5)
    for key in ("loss", "grad_norm", "entropy", "pg_clipfrac"):
        assert res["tp2_metrics"][key] == pytest.approx(res["tp1_metrics"][key], rel=1e-4, abs=1e-6), key


def test_packing_invariance(results):
    res, _ = results
    _assert_weights_close(res["pack_one"], res["pack_three"], atol=1e-6)


def test_repeated_steps_raise_log_prob_of_positive_advantage_samples(results):
    res, _ = results
    for i, (before, after) in enumerate(zip(res["logp_before"], res["logp_after"])):
        delta = (after - before).sum().item()
        assert (delta > 0) if i % 2 == 0 else (delta < 0), (i, delta)


def test_resume_is_bit_identical(results):
    res, _ = results
    assert without_timings(res["resumed_metrics"]) == without_timings(res["next_metrics"])
    assert all(torch.equal(res["resumed_weights"][k], v) for k, v in res["next_weights"].items())


def test_export_hf_loads_in_transformers_with_trainer_log_probs(results):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res, out_dir = results
    hf = AutoModelForCausalLM.from_pretrained(out_dir / "export", dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(out_dir / "export").eos_token == "<|im_end|>"
    learn = make_samples(4, vocab_size=500, seed=5)
    for sample, trainer_logp in zip(learn, res["trainer_logp_export"]):
        ref, _ = hf_response_logprobs(hf, sample, TEMPERATURE)
        assert (trainer_logp.double() - ref).abs().max().item() < 1e-4


def test_offload_on_cpu_moves_nothing_and_drops_the_gradients(results):
    res, _ = results
    assert res["offload_bytes"] == 0 and res["onload_bytes"] == 0
    assert res["grads_after_offload"] == 0   # dropped, not moved: the next step starts from zero anyway


def test_bad_samples_are_marked_failed_and_the_step_goes_on(results):
    res, _ = results
    assert res["bad_metrics"]["num_failed"] == 3 and res["bad_metrics"]["num_samples"] == 4
    assert res["bad_metrics"]["optimizer_steps"] == 1
    errors = [e for _, e in res["bad_status"]]
    assert all(status == Status.FAILED for status, _ in res["bad_status"])
    assert "outside [0, 512)" in errors[0] and "reward None" in errors[1] and "loss_mask" in errors[2]


def test_kl_loss_uses_a_frozen_reference(results):
    res, _ = results
    assert res["ref_equals_actor"]
    first, second = res["kl_metrics"]
    assert first["kl_loss"] == pytest.approx(0.0, abs=1e-7)
    assert second["kl_loss"] > 1e-6  # the policy moved away from the frozen reference


# ---------------------------------------------------------------------------------------------
# single-process pieces
# ---------------------------------------------------------------------------------------------

def test_vocab_parallel_log_probs_entropy_and_grads_match_float64_reference():
    torch.manual_seed(0)
    vocab, padded = 10, 12  # the last two columns are vocabulary padding (TP=2 runs in the spawned tests)
    logits = torch.randn(5, padded, dtype=torch.float64)
    targets = torch.tensor([0, 3, 9, 4, 7])
    ref_logp_all = torch.log_softmax(logits[:, :vocab] / 0.7, dim=-1)
    ref_logp = ref_logp_all.gather(-1, targets[:, None]).squeeze(-1)
    ref_entropy = -(ref_logp_all.exp() * ref_logp_all).sum(-1)
    full = logits.clone().requires_grad_(True)
    logp, entropy = vocab_parallel_logprobs(full.float(), targets, vocab_start=0, vocab_size=vocab,
                                            temperature=0.7, with_entropy=True)
    assert (logp.double() - ref_logp).abs().max() < 1e-5
    assert (entropy.double() - ref_entropy).abs().max() < 1e-5
    (logp.sum() + entropy.sum()).backward()
    ref = logits.clone().requires_grad_(True)
    ref_all = torch.log_softmax(ref[:, :vocab] / 0.7, dim=-1)
    (ref_all.gather(-1, targets[:, None]).sum() - (ref_all.exp() * ref_all).sum()).backward()
    assert (full.grad - ref.grad).abs().max() < 1e-5
    assert torch.all(full.grad[:, vocab:] == 0)


def test_micro_batches_respect_the_budget_and_cover_each_sample_once():
    tokens = [[1] * n for n in (5, 9, 3, 9, 7, 2)]
    batches = pack_micro_batches(list(range(6)), tokens, [1] * 6, max_tokens=18)
    assert sorted(i for b in batches for i in b.indices) == list(range(6))
    assert all(b.padded_tokens <= 18 for b in batches)
    assert [b.indices for b in batches] == [[1, 3], [4, 0], [2, 5]]
    with pytest.raises(ValueError, match="max_tokens_per_gpu"):
        pack_micro_batches([0], [[1] * 20], [1], max_tokens=18)


def test_response_positions_select_the_logits_that_predict_the_response():
    tokens = [[5, 6, 7, 8], [1, 2, 3]]
    mb = pack_micro_batches([0, 1], tokens, [2, 1], max_tokens=100)[0]
    assert mb.response_positions().tolist() == [1, 2, 4 + 1]  # row 0 predicts 7, 8; row 1 predicts 3
    assert mb.response_targets().tolist() == [7, 8, 3]


def test_data_parallel_shares_are_disjoint_and_balanced():
    shares = data_parallel_shares([10, 1, 9, 2, 8, 3], 2)
    assert sorted(shares[0] + shares[1]) == list(range(6))
    assert shares == [[0, 1, 3, 5], [2, 4]]  # loads 16 and 17
    assert split_global_batches(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]


def test_lr_schedule_warmup_then_cosine(tiny_models):
    cfg = _config(tiny_models["qwen3"], lr=1.0, min_lr=0.1, lr_warmup_steps=2, lr_decay_steps=4,
                  lr_decay_style="cosine")
    assert [round(lr_at(s, cfg), 6) for s in range(7)] == [0.5, 1.0, 1.0, 0.868198, 0.55, 0.231802, 0.1]


def test_config_errors_name_the_bad_value(tiny_models):
    with pytest.raises(ValueError, match="lr_decay_style='cosine' needs lr_decay_steps"):
        _config(tiny_models["qwen3"], lr_decay_style="cosine")
    with pytest.raises(ValueError, match="advantage_estimator='grpo' does not support"):
        _config(tiny_models["qwen3"], loss=LossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="not an HF model folder"):
        TrainerConfig(hf_checkpoint="/nonexistent")


def test_flatten_parameters_makes_one_buffer_per_dtype_with_the_same_values():
    from trainer.actor import flatten_parameters

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].to(torch.float64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objects = [id(p) for p in model.parameters()]
    assert flatten_parameters(model, torch.device("cpu")) == 0  # nothing changed device
    storages = {p.dtype: set() for p in model.parameters()}
    for p in model.parameters():
        storages[p.dtype].add(p.untyped_storage().data_ptr())
    assert {d: len(s) for d, s in storages.items()} == {torch.float32: 1, torch.float64: 1}
    assert [id(p) for p in model.parameters()] == objects  # the same Parameter objects (optimizer, hooks)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.is_contiguous()
    ptrs = [p.data_ptr() for p in model.parameters()]
    flatten_parameters(model, torch.device("cpu"))  # already flat on this device: left alone
    assert [p.data_ptr() for p in model.parameters()] == ptrs

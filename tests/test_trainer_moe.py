"""Qwen3-MoE in the trainer: log-probs against HF, the bridge round trip and HF export, routing replay, EP=2 == EP=1.

References: HF transformers' Qwen3MoeForCausalLM (fp32), and a float64 copy of it whose routers are
forced to given experts (`trainer.testing.hf_moe_response_logprobs`). Everything distributed runs in
ONE spawn of two gloo ranks (module fixture), so process start and the megatron import are paid once.
"""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from inference_engine.testing import make_tiny_model
from trainer import bridge, moe
from trainer.testing import hf_moe_response_logprobs, hf_response_logprobs, make_samples, run_distributed

TEMPERATURE = 0.7
PERTURB = 0.3  # fraction of (token, layer) rows whose first replayed expert is swapped for one not chosen


@pytest.fixture(scope="module")
def moe_models(qwen3_moe_model, tmp_path_factory, tokenizer_dir):
    """The conftest model (renormalised top-2, layer 1 dense) and one without renormalisation (all layers sparse)."""
    plain = make_tiny_model(tmp_path_factory.mktemp("qwen3_moe_plain"), "qwen3_moe", seed=3,
                            tokenizer_dir=tokenizer_dir, num_layers=2, norm_topk_prob=False, num_experts=6,
                            num_experts_per_tok=3)
    return {"renorm": qwen3_moe_model, "plain": plain}


def test_spec_reads_qwen3_moe(moe_models):
    spec = bridge.load_spec(moe_models["renorm"])
    assert (spec.family, spec.num_experts, spec.moe_top_k, spec.moe_ffn_hidden_size) == ("qwen3_moe", 8, 2, 32)
    assert spec.moe_layers == (0, 2) and spec.norm_topk_prob and spec.qk_norm and spec.is_moe
    plain = bridge.load_spec(moe_models["plain"])
    assert plain.moe_layers == (0, 1) and not plain.norm_topk_prob and plain.moe_top_k == 3
    names = {n for m in bridge.weight_mappings(spec) for n in m.hf}
    assert "model.layers.1.mlp.gate_proj.weight" in names and "model.layers.0.mlp.gate.weight" in names
    assert "model.layers.2.mlp.experts.7.up_proj.weight" in names and "model.layers.1.mlp.gate.weight" not in names
    local = {n for m in bridge.weight_mappings(spec, experts=range(4, 8)) for n in m.hf}  # EP rank 1 of 2
    assert {f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(8)} & local == \
        {f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(4, 8)}


def test_config_refuses_what_moe_cannot_do(moe_models, qwen3_model):
    from trainer.config import TrainerConfig

    with pytest.raises(ValueError, match="sequence parallelism"):
        TrainerConfig(hf_checkpoint=str(moe_models["renorm"]), tensor_parallel_size=2)
    with pytest.raises(ValueError, match="does not divide"):
        TrainerConfig(hf_checkpoint=str(moe_models["renorm"]), expert_model_parallel_size=3)
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        TrainerConfig(hf_checkpoint=str(qwen3_model), use_routing_replay=True)
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        TrainerConfig(hf_checkpoint=str(qwen3_model), moe_aux_loss_coeff=0.01)


def test_micro_batch_routing_follows_megatrons_token_order(moe_models):
    spec = bridge.load_spec(moe_models["renorm"])  # 2 MoE layers, top-2
    a = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2)  # a sequence of 4 tokens, fully recorded
    b = 100 + np.arange(1 * 2 * 2, dtype=np.uint8).reshape(1, 2, 2)  # 3 tokens, only its first recorded
    ids, valid = moe.micro_batch_routing([a, b], [4, 3], True, 7, spec)  # packed: [L, 7, k]
    assert valid.tolist() == [True, True, True, False, True, False, False]
    assert ids[1, 2].tolist() == a[2, 1].tolist() and ids[0, 4].tolist() == b[0, 0].tolist()
    ids, valid = moe.micro_batch_routing([a, b], [4, 3], False, 4, spec)  # padded [s=4, b=2] -> s * 2 + row
    assert valid.view(4, 2).tolist() == [[True, True], [True, False], [True, False], [False, False]]
    assert ids[1, 2 * 2 + 0].tolist() == a[2, 1].tolist() and ids[0, 0 * 2 + 1].tolist() == b[0, 0].tolist()
    with pytest.raises(ValueError, match="routed_experts"):
        moe.check_routed_experts(np.zeros((4, 2, 2), np.uint8), 4, spec)  # 4 rows for 4 tokens: one too many
    with pytest.raises(ValueError, match="outside"):
        moe.check_routed_experts(np.full((3, 2, 2), 8, np.uint8), 4, spec)


def _perturbed(samples, num_experts: int, seed: int):
    """Copies of `samples` whose routed experts have the first slot of ~PERTURB of their rows swapped."""
    rng = np.random.default_rng(seed)
    out = copy.deepcopy(samples)
    for s in out:
        r = s.routed_experts.copy()
        for t, layer in zip(*np.nonzero(rng.random(r.shape[:2]) < PERTURB)):
            r[t, layer, 0] = rng.choice([e for e in range(num_experts) if e not in r[t, layer]])
        s.routed_experts = r
    return out


def _moe_worker(rank, world_size, models, out_dir):
    """Per model: log-probs, export, replay (own / perturbed experts, packed and padded), a replayed train step;
    then EP=2 against EP=1 on the renormalised model. Rank 0 returns everything with its references."""
    from transformers import AutoModelForCausalLM

    from trainer.actor import TrainerActor
    from trainer.config import TrainerConfig

    def actor(path, **kw):
        a = TrainerActor(TrainerConfig(hf_checkpoint=str(path), temperature=TEMPERATURE, max_tokens_per_gpu=64,
                                       vocab_pad_multiple=96, lr=1e-3, **kw), rank, world_size, "127.0.0.1", 0)
        a.init()
        return a

    results = {}
    for name, path in models.items():
        hf32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        hf64 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
        out = results[name] = {}
        a = actor(path, use_routing_replay=True)
        spec = a.spec
        samples = make_samples(6, vocab_size=spec.vocab_size, seed=5)
        exported = {}
        for bucket in a.iter_hf_weight_buckets(bucket_bytes=40_000):
            exported.update({n: t.clone() for n, t in bucket})
        out["exported"] = exported
        a.export_hf(out_dir / name)
        base = a.compute_log_probs(samples)  # no routed_experts: the routers' own top-k
        own = [hf_moe_response_logprobs(hf64, s, TEMPERATURE)[1] for s in samples]
        for s, o in zip(samples, own):
            s.routed_experts = o[:-1].astype(np.uint8)
        a.replay.reset_counts()
        replayed_own = a.compute_log_probs(samples)
        out["own_disagreement"] = a._routing_disagreement()
        perturbed = _perturbed(samples, spec.num_experts, seed=1)
        a.replay.reset_counts()
        replayed = a.compute_log_probs(perturbed)
        out["disagreement"] = a._routing_disagreement()
        router = a.model.decoder.layers[0].mlp.router.weight.detach().clone()
        out["metrics"] = a.train_step(copy.deepcopy(perturbed))
        out["router_step"] = (a.model.decoder.layers[0].mlp.router.weight - router).abs().max().item()
        a.shutdown()
        if name == "renorm":  # padded micro-batches replay the same experts
            padded = actor(path, use_routing_replay=True, pack_sequences=False)
            out["padded_err"] = max((x - y).abs().max().item()
                                    for x, y in zip(padded.compute_log_probs(perturbed), replayed))
            padded.shutdown()
            grouped, moe.grouped_experts = moe.grouped_experts, lambda: False  # megatron's SequentialMLP experts
            try:
                sequential = actor(path, use_routing_replay=True)
                out["sequential_err"] = max((x - y).abs().max().item()
                                            for x, y in zip(sequential.compute_log_probs(perturbed), replayed))
                out["sequential_exported"] = {}
                for bucket in sequential.iter_hf_weight_buckets(bucket_bytes=40_000):
                    out["sequential_exported"].update({n: t.clone() for n, t in bucket})
                sequential.shutdown()
            finally:
                moe.grouped_experts = grouped
        if name == "plain":  # two pipeline stages of one MoE layer each: replay by global layer, metrics over PP
            pp = actor(path, use_routing_replay=True, pipeline_parallel_size=2)
            out["pp_err"] = max((x - y).abs().max().item() for x, y in zip(pp.compute_log_probs(perturbed), replayed))
            out["pp_exported"] = {}
            for bucket in pp.iter_hf_weight_buckets(bucket_bytes=40_000):
                out["pp_exported"].update({n: t.clone() for n, t in bucket})
            out["pp_metrics"] = pp.train_step(copy.deepcopy(perturbed))
            pp.shutdown()
        if rank == 0:
            out["hf_err"] = max((x.double() - hf_response_logprobs(hf32, s, TEMPERATURE)[0]).abs().max().item()
                                for x, s in zip(base, samples))
            out["own_err"] = max((x - y).abs().max().item() for x, y in zip(base, replayed_own))
            out["moved"] = max((x - y).abs().max().item() for x, y in zip(base, replayed))
            forced = [hf_moe_response_logprobs(hf64, s, TEMPERATURE, s.routed_experts) for s in perturbed]
            out["forced_err"] = max((x.double() - f[0]).abs().max().item() for x, f in zip(replayed, forced))
            # the reference's own top-k under the forced routing: which replayed slots it would not have chosen
            missed = [~(s.routed_experts[..., :, None] == f[1][:len(s.routed_experts), ..., None, :]).any(-1)
                      for s, f in zip(perturbed, forced)]
            out["expected_disagreement"] = sum(m.sum() for m in missed) / sum(m.size for m in missed)
            logits = AutoModelForCausalLM.from_pretrained(out_dir / name, dtype=torch.float32)(
                torch.tensor([samples[0].tokens])).logits
            out["export_logits_err"] = (logits - hf32(torch.tensor([samples[0].tokens])).logits).abs().max().item()

    path = models["renorm"]
    samples = make_samples(6, vocab_size=bridge.load_spec(path).vocab_size, seed=9)
    for ep in (1, 2):
        a = actor(path, expert_model_parallel_size=ep)
        before = a.compute_log_probs(samples)
        metrics = a.train_step(copy.deepcopy(samples))
        weights = {}
        for bucket in a.iter_hf_weight_buckets(bucket_bytes=40_000):
            weights.update({n: t.clone() for n, t in bucket})
        results[("ep", ep)] = {"before": before, "after": a.compute_log_probs(samples), "metrics": metrics,
                               "weights": weights}
        a.shutdown()
    return results


@pytest.fixture(scope="module")
def moe_results(moe_models, tmp_path_factory):
    return run_distributed(_moe_worker, 2, dict(moe_models), tmp_path_factory.mktemp("moe_export"))[0]


@pytest.mark.parametrize("name", ["renorm", "plain"])
def test_log_probs_match_hf(moe_results, name):
    assert moe_results[name]["hf_err"] < 1e-4


@pytest.mark.parametrize("name", ["renorm", "plain"])
def test_round_trip_is_exact_and_the_export_loads(moe_results, moe_models, name):
    original = load_file(moe_models[name] / "model.safetensors")
    exported = moe_results[name]["exported"]
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    assert moe_results[name]["export_logits_err"] < 1e-5


@pytest.mark.parametrize("name", ["renorm", "plain"])
def test_replaying_the_routers_own_experts_changes_nothing(moe_results, name):
    assert moe_results[name]["own_err"] < 1e-6
    disagreement, replayed = moe_results[name]["own_disagreement"]
    assert disagreement == 0.0 and replayed > 0


@pytest.mark.parametrize("name", ["renorm", "plain"])
def test_replayed_experts_give_the_forced_reference(moe_results, name):
    r = moe_results[name]
    assert r["moved"] > 1e-2  # other experts: other log-probs
    assert r["forced_err"] < 1e-4  # ... exactly those of the float64 model forced to the same experts
    disagreement, _ = r["disagreement"]
    assert 0.1 < disagreement == pytest.approx(r["expected_disagreement"], abs=1e-12)


def test_padded_micro_batches_replay_the_same_experts(moe_results):
    assert moe_results["renorm"]["padded_err"] < 1e-5


def test_pipeline_stages_replay_and_export_like_one_stage(moe_results, moe_models):
    r = moe_results["plain"]
    assert r["pp_err"] < 1e-5
    original = load_file(moe_models["plain"] / "model.safetensors")
    assert sorted(r["pp_exported"]) == sorted(original)
    assert all(torch.equal(r["pp_exported"][k], t) for k, t in original.items())
    for key in ("routing_disagreement", "routing_replayed_slots", "loss", "grad_norm"):
        assert r["pp_metrics"][key] == pytest.approx(r["metrics"][key], rel=1e-5), key


def test_sequential_experts_equal_the_grouped_ones(moe_results, moe_models):
    """Without torch's grouped matmul the experts are megatron's SequentialMLP: same weights, same log-probs."""
    r = moe_results["renorm"]
    assert r["sequential_err"] < 1e-5
    original = load_file(moe_models["renorm"] / "model.safetensors")
    assert sorted(r["sequential_exported"]) == sorted(original)
    assert all(torch.equal(r["sequential_exported"][k], t) for k, t in original.items())


@pytest.mark.parametrize("name", ["renorm", "plain"])
def test_a_replayed_train_step_reports_disagreement_and_trains_the_router(moe_results, name):
    r = moe_results[name]
    assert r["metrics"]["routing_disagreement"] == pytest.approx(r["disagreement"][0], abs=1e-12)
    # the training pass only: its forward gives the old log-probs too (one optimizer step, no separate pass)
    assert r["metrics"]["routing_replayed_slots"] == r["disagreement"][1]
    assert r["router_step"] > 0  # the replayed gather keeps gradients flowing into the router weights


def test_expert_parallel_equals_one_rank_holding_all_experts(moe_results):
    one, two = moe_results[("ep", 1)], moe_results[("ep", 2)]
    assert max((x - y).abs().max().item() for x, y in zip(one["before"], two["before"])) < 1e-5
    assert two["metrics"]["grad_norm"] == pytest.approx(one["metrics"]["grad_norm"], rel=1e-5)
    assert max((x - y).abs().max().item() for x, y in zip(one["after"], two["after"])) < 1e-4
    assert sorted(one["weights"]) == sorted(two["weights"])
    # Adam divides by sqrt(v): a gradient of float-noise size moves a weight by up to lr = 1e-3; a tenth of that
    assert max((one["weights"][n] - two["weights"][n]).abs().max().item() for n in one["weights"]) < 1e-4


def _gpu_worker(rank, world_size, path):
    """bf16 trainer on the GPU: log-probs, and replay of the routers' own experts (recorded in fp32 by HF)."""
    from transformers import AutoModelForCausalLM

    from trainer.actor import TrainerActor
    from trainer.config import TrainerConfig

    a = TrainerActor(TrainerConfig(hf_checkpoint=str(path), temperature=TEMPERATURE, max_tokens_per_gpu=64,
                                   use_routing_replay=True), rank, world_size, "127.0.0.1", 0)
    a.init()
    samples = make_samples(6, vocab_size=a.spec.vocab_size, seed=5)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    refs = [hf_response_logprobs(hf, s, TEMPERATURE)[0] for s in samples]
    base = a.compute_log_probs(samples)
    for s in samples:
        s.routed_experts = hf_moe_response_logprobs(hf, s, TEMPERATURE)[1][:-1].astype(np.uint8)
    a.replay.reset_counts()
    replayed = a.compute_log_probs(samples)
    disagreement, _ = a._routing_disagreement()
    a.shutdown()
    ref = torch.cat(refs)
    return {"base_err": (torch.cat(base).double() - ref).abs().mean().item(),
            "replay_err": (torch.cat(replayed).double() - ref).abs().mean().item(), "disagreement": disagreement}


@pytest.mark.gpu
def test_bf16_trainer_on_gpu_matches_hf_and_replays(moe_models):
    r = run_distributed(_gpu_worker, 1, moe_models["renorm"])[0]
    assert r["base_err"] < 0.05 and r["replay_err"] < 0.05  # mean |error|: bf16 model vs fp32 HF, as the dense ones
    assert r["disagreement"] < 0.05  # bf16 router logits flip only near-ties of fp32 HF's choice


def _recompute_worker(rank, world_size, path):
    """A replayed train step (several micro-batches) with and without full activation recomputation."""
    from trainer.actor import TrainerActor
    from trainer.config import TrainerConfig

    out = {}
    for recompute in ("none", "full"):
        a = TrainerActor(TrainerConfig(hf_checkpoint=str(path), temperature=TEMPERATURE, max_tokens_per_gpu=32,
                                       use_routing_replay=True, recompute=recompute, lr=1e-3),
                         rank, world_size, "127.0.0.1", 0)
        a.init()
        samples = make_samples(6, vocab_size=a.spec.vocab_size, seed=1)
        rng = np.random.default_rng(0)
        for s in samples:  # random recorded experts: most differ from the routers' own
            order = np.argsort(rng.random((len(s.tokens) - 1, a.spec.num_moe_layers, a.spec.num_experts)), -1)
            s.routed_experts = order[..., :a.spec.moe_top_k].astype(np.uint8)
        m = a.train_step(samples)
        out[recompute] = (m["loss"], m["grad_norm"], m["routing_disagreement"], m["routing_replayed_slots"])
        a.shutdown()
    return out


def test_recomputed_layers_replay_their_own_micro_batch(moe_models):
    """Full recomputation re-runs each router in backward: it must replay the same micro-batch, counted once."""
    r = run_distributed(_recompute_worker, 1, moe_models["renorm"])[0]
    assert r["full"] == r["none"] and r["none"][2] > 0.5

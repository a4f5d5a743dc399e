"""Pipeline parallelism in the trainer: PP=2 against PP=1 (log-probs, one update, export), resume, the 1F1B schedule.

The trainer runs happen in ONE spawn of two gloo ranks (module fixture) on a 4-layer tiny Qwen3
(tied embeddings, so the first stage's embedding and the last stage's output copy must stay one
weight): PP=1 (DP=2) and PP=2 (DP=1) on the same samples, with a token budget small enough for
several micro-batches (warm-up, steady 1F1B and drain all run). The tests compare what rank 0 saw.
"""

import pytest
import torch

from trainer.config import TrainerConfig
from trainer.pipeline import PipelineSchedule
from trainer.testing import hf_response_logprobs, make_samples, run_distributed, without_timings

TEMPERATURE = 0.8
BUDGET = 48  # tokens per micro-batch: 8 samples of 6..24 tokens -> 4..6 packed micro-batches


def _config(path, **overrides) -> TrainerConfig:
    base = dict(hf_checkpoint=str(path), lr=1e-2, temperature=TEMPERATURE, global_batch_size=8,
                max_tokens_per_gpu=BUDGET, vocab_pad_multiple=96, clip_grad=10.0, seed=3, adam_eps=1e-3)
    return TrainerConfig(**{**base, **overrides})


def _weights(actor) -> dict:
    out = {}
    for bucket in actor.iter_hf_weight_buckets(1 << 16):  # several buckets: stage 1's tensors arrive in pieces
        out.update({k: v.clone() for k, v in bucket})
    return out


def _pp_worker(rank, world, model, out_dir):
    from trainer.actor import TrainerActor

    res = {}
    samples = make_samples(8, vocab_size=500, seed=11)
    probe = make_samples(4, vocab_size=500, seed=5)
    for pp in (1, 2):
        cfg = _config(model, pipeline_parallel_size=pp)
        actor = TrainerActor(cfg, rank, world, "127.0.0.1", 0)
        actor.init()
        res[f"pp{pp}_logp"] = actor.compute_log_probs(samples)
        res[f"pp{pp}_metrics"] = actor.train_step(samples)
        res[f"pp{pp}_weights"] = _weights(actor)
        if pp == 2:
            res["engine_weights"], res["push_stats"] = _push_into_engine(actor, rank, model)
        actor.export_hf(out_dir / f"export_pp{pp}")
        res[f"pp{pp}_logp_after"] = actor.compute_log_probs(probe)
        if pp == 2:  # resume: save, step, reload, step again -> the same weights and metrics
            actor.save_checkpoint(out_dir / "ckpt")
            res["next_metrics"] = actor.train_step(samples)
            res["next_weights"] = _weights(actor)
            actor.shutdown()
            actor = TrainerActor(cfg, rank, world, "127.0.0.1", 0)
            actor.init()
            actor.load_checkpoint(out_dir / "ckpt")
            res["resumed_metrics"] = actor.train_step(samples)
            res["resumed_weights"] = _weights(actor)
        actor.shutdown()
    return res


def _push_into_engine(actor, rank, model):
    """Push the trainer's weights into one engine (rank 0 sends, every rank iterates); the engine's tensors."""
    from inference_engine import Engine
    from weight_sync import WeightSender, WeightSyncConfig, push_weights

    engine, endpoints, sender = None, [], None
    if rank == 0:
        engine = Engine(model_path=str(model), max_total_tokens=1024)
        endpoints = [engine]
        sender = WeightSender(WeightSyncConfig(transport="distributed", bucket_bytes=1 << 16, backend="gloo",
                                               timeout_s=60, check_weight_update=True))
        sender.connect(endpoints)
    stats = push_weights(actor.iter_hf_weight_buckets(1 << 16), endpoints, sender, 1)
    if rank != 0:
        return None, stats
    tensors = {k: v.clone() for k, v in engine.named_hf_tensors()}
    sender.close(endpoints)
    engine.shutdown()
    return tensors, stats


@pytest.fixture(scope="module")
def pp_model(tmp_path_factory, tokenizer_dir):
    from inference_engine.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("qwen3_4l"), "qwen3", seed=7, tokenizer_dir=tokenizer_dir,
                           num_layers=4)


@pytest.fixture(scope="module")
def results(pp_model, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("trainer_pp")
    return run_distributed(_pp_worker, 2, pp_model, out_dir, timeout=300)[0], out_dir


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_pp2_log_probs_equal_pp1(results):
    res, _ = results
    for a, b in zip(res["pp2_logp"], res["pp1_logp"]):
        assert a.shape == b.shape and a.numel() > 0
        assert (a - b).abs().max().item() < 1e-5


def test_pp2_step_equals_pp1_step(results, pp_model):
    res, _ = results
    from safetensors.torch import load_file

    initial = load_file(pp_model / "model.safetensors")
    assert _max_diff(res["pp2_weights"], initial) > 1e-3  # the step moved the weights, every stage's included
    assert all((res["pp2_weights"][k] - initial[k]).abs().max() > 0 for k in initial if "norm" not in k)
    assert _max_diff(res["pp2_weights"], res["pp1_weights"]) < 1e-5
    for key in ("loss", "pg_loss", "grad_norm", "entropy", "ppo_kl", "padding_fraction"):
        assert res["pp2_metrics"][key] == pytest.approx(res["pp1_metrics"][key], rel=1e-4, abs=1e-6), key


def test_pp2_trainer_pushes_the_full_model_into_one_engine(results):
    res, _ = results
    assert res["push_stats"].weight_version == 1 and res["push_stats"].buckets > 1  # checksums verified in the push
    assert sorted(res["engine_weights"]) == sorted(res["pp2_weights"])
    assert all(torch.equal(res["engine_weights"][k], v) for k, v in res["pp2_weights"].items())


def test_pp2_export_equals_pp1_export_and_loads_in_transformers(results):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    res, out_dir = results
    exports = {pp: load_file(out_dir / f"export_pp{pp}" / "model.safetensors") for pp in (1, 2)}
    assert "lm_head.weight" not in exports[2]  # tied: the last stage's copy is not exported
    assert _max_diff(exports[2], exports[1]) < 1e-5
    hf = AutoModelForCausalLM.from_pretrained(out_dir / "export_pp2", dtype=torch.float32)
    for sample, trainer_logp in zip(make_samples(4, vocab_size=500, seed=5), res["pp2_logp_after"]):
        ref, _ = hf_response_logprobs(hf, sample, TEMPERATURE)
        assert (trainer_logp.double() - ref).abs().max().item() < 1e-4


def test_pp2_resume_is_bit_identical(results):
    res, _ = results
    assert without_timings(res["resumed_metrics"]) == without_timings(res["next_metrics"])
    assert all(torch.equal(res["resumed_weights"][k], v) for k, v in res["next_weights"].items())


def test_pipeline_size_must_divide_the_layers(pp_model):
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 does not divide the model's 4 layers"):
        _config(pp_model, pipeline_parallel_size=3)
    assert _config(pp_model, pipeline_parallel_size=4).pipeline_parallel_size == 4


# ---------------------------------------------------------------------------------------------
# the schedule alone: a 3-stage toy pipeline against the same computation in one process
# ---------------------------------------------------------------------------------------------

HIDDEN = 5
WIDTHS = [3, 7, 2, 5, 4]  # micro-batches of different lengths: [width, 1, HIDDEN] activations


def _toy_stage_weights(stage: int) -> torch.Tensor:
    return torch.randn(HIDDEN, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(stage)) / 2


def _toy_inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return [torch.randn(w, 1, HIDDEN, dtype=torch.float64, generator=g) for w in WIDTHS]


def _toy_loss(out: torch.Tensor, k: int) -> torch.Tensor:
    return (out.sin() * (k + 1)).sum()


def _schedule_worker(rank, world):
    import torch.distributed as dist

    pipe = PipelineSchedule(dist.group.WORLD, dtype=torch.float64, device=torch.device("cpu"))
    weight = _toy_stage_weights(rank).requires_grad_()
    inputs = _toy_inputs()
    losses = []

    def forward(k, x):
        x = inputs[k] if pipe.is_first else x
        y = torch.tanh(x @ weight)
        if not pipe.is_last:
            return y
        losses.append(_toy_loss(y, k).detach())
        return _toy_loss(y, k)

    pipe.forward_backward(list(range(len(WIDTHS))), forward, lambda k: (WIDTHS[k], 1, HIDDEN))
    grad_after_training = weight.grad.clone()
    outputs = []

    def forward_only(k, x):
        y = torch.tanh((inputs[k] if pipe.is_first else x) @ weight)
        if pipe.is_last:
            outputs.append(y)
        return y

    pipe.forward_only(list(range(len(WIDTHS))), forward_only, lambda k: (WIDTHS[k], 1, HIDDEN))
    return grad_after_training, losses, outputs


def test_1f1b_schedule_over_three_stages_matches_one_process():
    stages = 3
    ranks = run_distributed(_schedule_worker, stages, timeout=120)
    weights = [_toy_stage_weights(s).requires_grad_() for s in range(stages)]
    outputs, losses = [], []
    for k, x in enumerate(_toy_inputs()):
        for w in weights:
            x = torch.tanh(x @ w)
        outputs.append(x.detach())
        losses.append(_toy_loss(x, k))
    torch.stack(losses).sum().backward()
    for stage, (grad, _, _) in enumerate(ranks):
        torch.testing.assert_close(grad, weights[stage].grad, rtol=1e-12, atol=1e-12)
    _, last_losses, last_outputs = ranks[-1]
    torch.testing.assert_close(torch.stack(last_losses), torch.stack(losses).detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(last_outputs, outputs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _tp_pp_worker(rank, world, model):
    from trainer.actor import TrainerActor

    cfg = _config(model, tensor_parallel_size=2, pipeline_parallel_size=2)
    actor = TrainerActor(cfg, rank, world, "127.0.0.1", 0)
    actor.init()
    samples = make_samples(8, vocab_size=500, seed=11)
    res = {"logp": actor.compute_log_probs(samples), "metrics": actor.train_step(samples), "weights": _weights(actor)}
    actor.shutdown()
    return res


def test_tp2_pp2_equals_pp1(results, pp_model):
    res, _ = results
    tp_pp = run_distributed(_tp_pp_worker, 4, pp_model, timeout=300)[0]
    for a, b in zip(tp_pp["logp"], res["pp1_logp"]):
        assert (a - b).abs().max().item() < 1e-5
    assert _max_diff(tp_pp["weights"], res["pp1_weights"]) < 1e-5
    assert tp_pp["metrics"]["grad_norm"] == pytest.approx(res["pp1_metrics"]["grad_norm"], rel=1e-4)

"""Trainer at scale on CPU (issue 20): the sharded (ZeRO-1) optimizer, its offloaded chunked path, resharding
checkpoints across DP sizes, and balanced micro-batches.

Two spawns: DP=2 (two gloo ranks: sharded optimizer for 3 steps with a checkpoint after 2, and TP=2 sharded vs
TP=2 replicated), then DP=1 (one rank: the replicated reference, the sharded + offloaded optimizer, and a resume
from the DP=2 checkpoint). Buckets are shrunk so every path runs over several of them.
"""

import pytest
import torch

from trainer.config import TrainerConfig
from trainer.optimizer import ShardLayout, copy_between_layouts
from trainer.testing import make_samples, run_distributed

BUCKET = 4099  # elements per rank per bucket: the tiny models span many buckets, and bucket edges cut parameters
STEPS = 3


def _config(path, **overrides) -> TrainerConfig:
    base = dict(hf_checkpoint=str(path), lr=1e-2, temperature=0.8, global_batch_size=8, max_tokens_per_gpu=256,
                vocab_pad_multiple=96, clip_grad=1.0, seed=3, adam_eps=1e-3, weight_decay=0.1)
    return TrainerConfig(**{**base, **overrides})


def _weights(actor) -> dict:
    out = {}
    for bucket in actor.iter_hf_weight_buckets(1 << 20):
        out.update({k: v.clone() for k, v in bucket})
    return out


def _train(cfg, rank, world, samples, steps, *, save=None, load=None):
    """Metrics of `steps` train steps and the final weights (optionally resuming / saving after step 2)."""
    from trainer import optimizer
    from trainer.actor import TrainerActor

    optimizer.DEFAULT_BUCKET_NUMEL = BUCKET
    actor = TrainerActor(cfg, rank, world, "127.0.0.1", 0)
    actor.init()
    if load is not None:
        actor.load_checkpoint(load)
    metrics = []
    for step in range(steps):
        metrics.append(actor.train_step(samples))
        if save is not None and step == 1:
            actor.save_checkpoint(save)
    out = {"metrics": metrics, "weights": _weights(actor), "kind": type(actor.optimizer).__name__,
           "params": torch.cat([p.detach().reshape(-1) for p in actor.model.parameters()])}
    if hasattr(actor.optimizer, "memory_bytes"):
        out["memory"] = actor.optimizer.memory_bytes()
    actor.shutdown()
    return out


def _dp2_worker(rank, world, models, out_dir):
    samples = make_samples(8, vocab_size=500, seed=11)
    res = {"dp2": _train(_config(models["qwen3"], use_distributed_optimizer=True), rank, world, samples, STEPS,
                         save=out_dir / "ckpt_dp2")}
    for sharded in (True, False):  # TP=2 (DP=1): q/k-norm partial grads and TP-sharded norms through the shards
        cfg = _config(models["qwen2"], tensor_parallel_size=2, use_distributed_optimizer=sharded)
        res[f"tp2_{sharded}"] = _train(cfg, rank, world, samples, 2)
    return res


def _dp1_worker(rank, world, models, out_dir):
    samples = make_samples(8, vocab_size=500, seed=11)
    cfg = _config(models["qwen3"])
    res = {"replicated": _train(cfg, rank, world, samples, STEPS),
           "sharded": _train(_config(models["qwen3"], use_distributed_optimizer=True), rank, world, samples, STEPS),
           "offloaded": _train(_config(models["qwen3"], use_distributed_optimizer=True, optimizer_cpu_offload=True),
                               rank, world, samples, STEPS),
           "resumed": _train(_config(models["qwen3"], use_distributed_optimizer=True), rank, world, samples, 1,
                             load=out_dir / "ckpt_dp2")}
    try:
        _train(cfg, rank, world, samples, 0, load=out_dir / "ckpt_dp2")
    except ValueError as e:
        res["replicated_load_error"] = str(e)
    return res


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("scale")
    dp2 = run_distributed(_dp2_worker, 2, dict(tiny_models), out_dir)
    dp1 = run_distributed(_dp1_worker, 1, dict(tiny_models), out_dir)[0]
    return dp2, dp1


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_dp2_sharded_equals_dp1_replicated_over_three_steps(results, tiny_models):
    from safetensors.torch import load_file

    dp2, dp1 = results
    sharded, reference = dp2[0]["dp2"], dp1["replicated"]
    assert (sharded["kind"], reference["kind"]) == ("ShardedOptimizer", "PolicyOptimizer")
    initial = load_file(tiny_models["qwen3"] / "model.safetensors")
    assert max((reference["weights"][k] - initial[k]).abs().max().item() for k in initial) > 1e-3  # it moved
    assert _max_diff(sharded["weights"], reference["weights"]) < 2e-5
    assert torch.equal(dp2[0]["dp2"]["params"], dp2[1]["dp2"]["params"])  # both ranks hold the same params
    for mine, ref in zip(sharded["metrics"], reference["metrics"]):
        for key in ("loss", "grad_norm", "lr", "entropy"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key


def test_sharded_state_is_one_dp_th_per_rank(results):
    dp2, dp1 = results
    full, half = dp1["sharded"]["memory"]["optimizer_states"], dp2[0]["dp2"]["memory"]["optimizer_states"]
    assert full % 12 == 0 and full > 0  # fp32 master + two moments per element
    assert 0 <= 2 * half - full < 12 * 2  # 1/DP of it, plus fewer than DP padding elements


def test_dp1_sharded_equals_replicated(results):
    _, dp1 = results
    assert _max_diff(dp1["sharded"]["weights"], dp1["replicated"]["weights"]) < 2e-5


def test_offloaded_chunked_step_equals_resident(results):
    _, dp1 = results
    assert _max_diff(dp1["offloaded"]["weights"], dp1["sharded"]["weights"]) == 0
    assert dp1["offloaded"]["metrics"] == dp1["sharded"]["metrics"]
    assert dp1["offloaded"]["memory"]["optimizer_states_on_host"] == dp1["offloaded"]["memory"]["optimizer_states"]


def test_save_at_dp2_load_at_dp1_continues_identically(results):
    dp2, dp1 = results
    assert dp1["resumed"]["metrics"][0]["loss"] == pytest.approx(dp2[0]["dp2"]["metrics"][2]["loss"], rel=1e-5)
    assert _max_diff(dp1["resumed"]["weights"], dp2[0]["dp2"]["weights"]) < 2e-5
    assert "sharded optimizer state" in dp1["replicated_load_error"]


def test_tp2_sharded_equals_tp2_replicated(results):
    dp2, _ = results
    assert _max_diff(dp2[0]["tp2_True"]["weights"], dp2[0]["tp2_False"]["weights"]) < 2e-5
    for mine, ref in zip(dp2[0]["tp2_True"]["metrics"], dp2[0]["tp2_False"]["metrics"]):
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# single-process pieces
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("numel,dp,bucket", [(10, 1, 4), (10, 3, 2), (1, 4, 8), (1000, 8, 7)])
def test_shard_layout_covers_every_element_once(numel, dp, bucket):
    layout = ShardLayout(numel, dp, bucket)
    owner = torch.full((sum(size * dp for _, size in layout.buckets),), -1)
    for rank in range(dp):
        shard = 0
        for g, s, n in layout.ranges(rank):
            assert s == shard and n <= bucket
            assert (owner[g:g + n] == -1).all()
            owner[g:g + n] = rank
            shard += n
        assert shard == layout.shard_numel
    assert (owner >= 0).all() and len(owner) - numel < dp


@pytest.mark.parametrize("src,dst", [((2, 5), (1, 5)), ((1, 5), (3, 5)), ((3, 4), (2, 7)), ((4, 3), (4, 9))])
def test_resharding_moves_every_element_to_its_new_owner(src, dst):
    numel = 101
    full = torch.arange(numel, dtype=torch.float32) + 1
    old = ShardLayout(numel, *src)

    def shard_of(layout, rank):
        out = torch.zeros(layout.shard_numel)
        for g, s, n in layout.ranges(rank):
            real = max(0, min(n, numel - g))
            out[s:s + real] = full[g:g + real]
        return out

    new = ShardLayout(numel, *dst)
    for rank in range(new.dp_size):
        target = torch.zeros(new.shard_numel)
        copied = sum(copy_between_layouts(shard_of(old, r), old, r, target, new, rank) for r in range(old.dp_size))
        assert torch.equal(target, shard_of(new, rank))
        assert copied == sum(max(0, min(n, numel - g)) for g, _, n in new.ranges(rank))
    with pytest.raises(ValueError, match="another model"):
        copy_between_layouts(torch.zeros(3), ShardLayout(5, 2, 3), 0, torch.zeros(3), ShardLayout(6, 2, 3), 0)


def test_offload_needs_the_distributed_optimizer(tiny_models):
    with pytest.raises(ValueError, match="--use-distributed-optimizer"):
        _config(tiny_models["qwen3"], optimizer_cpu_offload=True)

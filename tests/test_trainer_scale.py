"""Trainer at scale on CPU (issue 20): the sharded (ZeRO-1) optimizer, its offloaded chunked path, resharding
checkpoints across DP sizes, and balanced micro-batches.

Two spawns: DP=2 (two gloo ranks: sharded optimizer for 3 steps with a checkpoint after 2, the same with balanced
micro-batches, and TP=2 / PP=2 sharded vs replicated), then DP=1 (one rank: the replicated reference, the sharded
and the offloaded optimizer, and a resume from the DP=2 checkpoint). Buckets are shrunk so every path runs over
several of them.
"""

import copy
from types import SimpleNamespace

import pytest
import torch

from trainer.batching import (CostModel, balanced_micro_batches, balanced_partition, data_parallel_shares,
                              pack_micro_batches, plan_micro_batches)
from trainer.config import TrainerConfig
from trainer.optimizer import ShardLayout, copy_between_layouts
from trainer.testing import hf_weights, make_samples, run_distributed, without_timings

BUCKET = 4099  # elements per rank per bucket: the tiny models span many buckets, and bucket edges cut parameters
STEPS = 3


def _config(path, **overrides) -> TrainerConfig:
    base = dict(hf_checkpoint=str(path), lr=1e-2, temperature=0.8, global_batch_size=8, max_tokens_per_gpu=256,
                vocab_pad_multiple=96, clip_grad=1.0, seed=3, adam_eps=1e-3, weight_decay=0.1)
    return TrainerConfig(**{**base, **overrides})


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
    out = {"metrics": metrics, "weights": hf_weights(actor), "kind": type(actor.optimizer).__name__,
           "params": torch.cat([p.detach().reshape(-1) for p in actor.model.parameters()])}
    if hasattr(actor.optimizer, "memory_bytes"):
        out["memory"] = actor.optimizer.memory_bytes()
    actor.shutdown()
    return out


def _dp2_worker(rank, world, models, out_dir):
    samples = make_samples(8, vocab_size=500, seed=11)
    res = {"dp2": _train(_config(models["qwen3"], use_distributed_optimizer=True), rank, world, samples, STEPS,
                         save=out_dir / "ckpt_dp2")}
    cfg = _config(models["qwen3"], use_distributed_optimizer=True, balance_data=True, max_tokens_per_gpu=40)
    res["dp2_balanced"] = _train(cfg, rank, world, samples, STEPS)
    for sharded in (True, False):  # TP=2 (DP=1): q/k-norm partial grads and TP-sharded norms through the shards
        cfg = _config(models["qwen2"], tensor_parallel_size=2, use_distributed_optimizer=sharded)
        res[f"tp2_{sharded}"] = _train(cfg, rank, world, samples, 2)
    for sharded in (True, False):  # PP=2 (DP=1): the tied embedding's copies on the first and last stage
        cfg = _config(models["qwen3"], pipeline_parallel_size=2, use_distributed_optimizer=sharded)
        res[f"pp2_{sharded}"] = _train(cfg, rank, world, samples, 2)
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
    steps = {run: [without_timings(m) for m in dp1[run]["metrics"]] for run in ("offloaded", "sharded")}
    assert steps["offloaded"] == steps["sharded"]
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


def test_pp2_sharded_equals_pp2_replicated(results):
    dp2, _ = results
    assert _max_diff(dp2[0]["pp2_True"]["weights"], dp2[0]["pp2_False"]["weights"]) < 2e-5
    for mine, ref in zip(dp2[0]["pp2_True"]["metrics"], dp2[0]["pp2_False"]["metrics"]):
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_balanced_micro_batches_train_like_the_plain_plan(results):
    dp2, dp1 = results
    balanced = dp2[0]["dp2_balanced"]
    assert _max_diff(balanced["weights"], dp1["replicated"]["weights"]) < 2e-5
    for m in balanced["metrics"]:
        assert 1.0 <= m["dp_imbalance_after"] <= m["dp_imbalance_before"]
        assert 1.0 <= m["mb_imbalance_after"] <= m["mb_imbalance_before"]
    assert "dp_imbalance_after" not in dp2[0]["dp2"]["metrics"][0]  # reported with balance_data only


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


def _skewed(seed: int, num: int = 64) -> list[list[int]]:
    """Token lists of a long-tailed length distribution: mostly short, a few very long."""
    g = torch.Generator().manual_seed(seed)
    lengths = (torch.rand(num, generator=g) ** 4 * 900 + 20).long().tolist()
    return [[1] * n for n in lengths]


@pytest.mark.parametrize("dp_size,max_tokens,seed", [(1, 1024, 0), (2, 1024, 1), (4, 2048, 2), (8, 1000, 3)])
def test_balanced_plan_keeps_every_sample_once_within_the_budget(dp_size, max_tokens, seed):
    tokens = _skewed(seed)
    indices = list(range(5, len(tokens)))  # a global batch: a subset of the rollout
    responses = [max(1, len(t) // 3) for t in tokens]
    cost = CostModel(1e-3)
    seen = []
    for rank in range(dp_size):
        batches, metrics = plan_micro_batches(indices, tokens, responses, dp_size=dp_size, dp_rank=rank,
                                              max_tokens=max_tokens, packed=True, balance=True, cost=cost)
        for mb in batches:
            assert mb.packed and sum(mb.lengths) <= max_tokens
            assert mb.lengths == [len(tokens[i]) for i in mb.indices]
            assert mb.response_lengths == [responses[i] for i in mb.indices]
            assert mb.tokens.shape == (1, sum(mb.lengths))
        seen += [i for mb in batches for i in mb.indices]
        assert metrics["dp_imbalance_after"] <= metrics["dp_imbalance_before"] + 1e-12
    assert sorted(seen) == indices


def test_balancing_reduces_the_imbalance_of_a_skewed_batch():
    tokens = _skewed(7)
    indices = list(range(len(tokens)))
    cost = CostModel(1e-3)
    _, metrics = plan_micro_batches(indices, tokens, [1] * len(tokens), dp_size=4, dp_rank=0, max_tokens=2048,
                                    packed=True, balance=True, cost=cost)
    assert metrics["dp_imbalance_after"] < metrics["dp_imbalance_before"]
    assert metrics["mb_imbalance_after"] < metrics["mb_imbalance_before"]
    assert metrics["dp_imbalance_after"] < 1.05
    # the token-balanced plain split leaves the attention-heavy long sequences uneven; by cost it is better
    costs = [cost(len(t)) for t in tokens]
    plain = data_parallel_shares([len(t) for t in tokens], 4)
    kk = balanced_partition(costs, 4)
    spread = [max(sum(costs[i] for i in s) for s in p) - min(sum(costs[i] for i in s) for s in p) for p in (plain, kk)]
    assert spread[1] < spread[0]


def test_balanced_partition_on_known_answers():
    assert balanced_partition([8, 7, 6, 5, 4], 2) in ([[0, 2], [1, 3, 4]], [[1, 3, 4], [0, 2]])  # 14 / 16 ... KK
    assert sorted(map(sorted, balanced_partition([5, 5, 5, 5], 4))) == [[0], [1], [2], [3]]
    assert balanced_partition([3.0], 3) in ([[0], [], []], [[], [0], []], [[], [], [0]])
    assert balanced_partition([], 2) == [[], []]


def test_balanced_micro_batches_use_the_fewest_the_budget_allows():
    tokens = [[1] * n for n in (60, 50, 40, 30, 20, 10)]  # 210 tokens, budget 70: 3 micro-batches of 70
    batches = balanced_micro_batches(list(range(6)), tokens, [1] * 6, 70, CostModel(0.0))
    assert sorted(sum(mb.lengths) for mb in batches) == [70, 70, 70]
    tokens = [[1] * n for n in (50, 10, 10, 10)]  # first fit fills the first micro-batch: 60 + 20
    plain = pack_micro_batches(list(range(4)), tokens, [1] * 4, 60, packed=True)
    balanced = balanced_micro_batches(list(range(4)), tokens, [1] * 4, 60, CostModel(0.0))
    assert sorted(sum(mb.lengths) for mb in plain) == [20, 60]
    assert sorted(sum(mb.lengths) for mb in balanced) == [30, 50]
    with pytest.raises(ValueError, match="max_tokens_per_gpu"):
        balanced_micro_batches([0], [[1] * 80], [1], 70, CostModel())


def test_cost_model_weighs_attention_from_the_shape():
    from types import SimpleNamespace

    spec = SimpleNamespace(num_heads=32, head_dim=128, num_kv_heads=8, hidden_size=4096, ffn_hidden_size=12288,
                           num_experts=0)  # the Qwen3-8B shape
    weight = CostModel.for_model(spec).attention_weight
    per_token = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 12288
    assert weight == pytest.approx(4096 / per_token)
    assert 30_000 < 1 / weight < 60_000  # attention equals the matmuls near 45k tokens


def _offload_pair(device: str, steps: int = 3) -> tuple[list, list, list]:
    """Two identical bf16 (GPU) / fp32 (CPU) models, ShardedOptimizer resident vs offloaded, `steps` equal steps.

    Returns the parameters after each step of both, and the losses.
    """
    from trainer.optimizer import ShardedOptimizer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.LayerNorm(96), torch.nn.Linear(96, 8))
    models = [copy.deepcopy(base).to(device=device, dtype=dtype) for _ in range(2)]
    cfg = SimpleNamespace(clip_grad=1.0, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.98, adam_eps=1e-8, lr=1e-2,
                          min_lr=0.0, lr_warmup_steps=1, lr_decay_style="constant", lr_decay_steps=None)
    optims = [ShardedOptimizer(m, cfg, dp_group=None, tp_group=None, tp_rank=0, cpu_offload=off, bucket_numel=1000)
              for m, off in zip(models, (False, True))]
    assert len(optims[0].layout.buckets) > 3  # the chunked path runs over several buckets
    params: tuple[list, list] = ([], [])
    x = torch.randn(16, 48, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    for _ in range(steps):
        for k, (model, opt) in enumerate(zip(models, optims)):
            model(x).square().mean().backward()
            opt.step()
            params[k].append(torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()]))
    if device == "cuda":
        assert optims[1].master.device.type == "cpu" and optims[1].master.is_pinned()
    return params[0], params[1], [o.exp_avg_sq.cpu() for o in optims]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_offloaded_optimizer_step_equals_the_resident_one(device):
    resident, offloaded, moments = _offload_pair(device)
    assert (resident[-1] - resident[0]).abs().max() > 1e-3  # the steps moved the weights
    for a, b in zip(resident, offloaded):
        assert torch.equal(a, b)
    assert torch.equal(moments[0], moments[1])

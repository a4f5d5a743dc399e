"""Context parallelism: CP=2 equals CP=1 on packed sequences of uneven lengths (log-probs, loss, grads, one step).

The layout and the chunked attention are checked in one process against full causal attention; the
trainer runs happen in ONE spawn of two gloo ranks: CP=1 (DP=2) and CP=2 (DP=1) on the same samples,
with a token budget that makes several micro-batches of several sequences each.
"""

import math

import pytest
import torch

from trainer.attention import cu_seqlens_from_lengths, varlen_attention_reference
from trainer.config import TrainerConfig
from trainer.context_parallel import ContextParallel, chunk_attention_reference
from trainer.testing import make_samples, run_distributed

LENGTHS = [7, 1, 12, 4, 9]
TEMPERATURE = 0.8


@pytest.mark.parametrize("size", [2, 3])
def test_layout_covers_every_token_once_and_chunk_attention_equals_full_attention(size):
    g = torch.Generator().manual_seed(0)
    views = [ContextParallel.build(LENGTHS, None, size, r) for r in range(size)]
    padded = views[0].padded
    assert all(p % (2 * size) == 0 and 0 <= p - n < 2 * size for p, n in zip(padded, LENGTHS))
    held = torch.cat([v.local_index for v in views])
    assert torch.equal(held.sort().values, torch.arange(sum(padded)))  # each padded position on exactly one rank
    assert len({v.local_index.numel() for v in views}) == 1  # equal shares
    q = torch.randn(sum(padded), 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(sum(padded), 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    scale = 1 / math.sqrt(8)
    full = varlen_attention_reference(q, k, v, cu_seqlens_from_lengths(padded), scale)  # causal per padded sequence
    flat = torch.arange(sum(LENGTHS))
    tokens = torch.arange(sum(LENGTHS)).unsqueeze(0) + 1
    for view in views:
        out = chunk_attention_reference(q[view.local_index], k[view.k_index], v[view.k_index], view, scale)
        assert (out - full[view.local_index]).abs().max() < 1e-12
        starts = [sum(padded[:i]) for i in range(len(padded))]
        expected = torch.cat([torch.arange(n) for n in padded])[view.local_index]
        assert torch.equal(view.positions, expected)
        # local tokens are the packed row's tokens at their padded places, 0 on the padding
        row = torch.cat([torch.cat([tokens[0, sum(LENGTHS[:i]):sum(LENGTHS[:i + 1])], torch.zeros(p - n).long()])
                         for i, (n, p) in enumerate(zip(LENGTHS, padded))])
        assert torch.equal(view.local_tokens(tokens)[0], row[view.local_index])
        # split_positions: unpadded indices held here -> their local rows
        local, places = view.split_positions(flat)
        seq = torch.bucketize(flat, torch.tensor(LENGTHS).cumsum(0), right=True)
        in_padded = flat - torch.tensor([sum(LENGTHS[:i]) for i in range(len(LENGTHS))])[seq] + \
            torch.tensor(starts)[seq]
        assert torch.equal(view.local_index[local], in_padded[places])
    assert sorted(torch.cat([v.split_positions(flat)[1] for v in views]).tolist()) == flat.tolist()


def _config(path, **overrides) -> TrainerConfig:
    base = dict(hf_checkpoint=str(path), lr=1e-2, temperature=TEMPERATURE, global_batch_size=8,
                max_tokens_per_gpu=40, vocab_pad_multiple=96, clip_grad=100.0, seed=3, adam_eps=1e-3)
    base["loss"] = {"entropy_coef": 0.01}
    return TrainerConfig(**{**base, **overrides})


def _cp_worker(rank, world, model):
    from trainer.actor import TrainerActor

    res = {}
    samples = make_samples(8, vocab_size=500, seed=11, min_len=5, max_len=30)
    for cp in (1, 2):
        cfg = _config(model, context_parallel_size=cp, max_tokens_per_gpu=80 // cp)  # the same micro-batches
        actor = TrainerActor(cfg, rank, world, "127.0.0.1", 0)
        actor.init()
        res[f"cp{cp}_logp"] = actor.compute_log_probs(samples)
        res[f"cp{cp}_metrics"] = actor.train_step(samples)
        res[f"cp{cp}_grads"] = {n: p.grad.detach().clone() for n, p in actor.model.named_parameters()}
        res[f"cp{cp}_weights"] = {n: p.detach().clone() for n, p in actor.model.named_parameters()}
        res[f"cp{cp}_logp_after"] = actor.compute_log_probs(samples)
        actor.shutdown()
    # the sharded optimizer shards over DP x CP: here the two CP ranks
    actor = TrainerActor(_config(model, context_parallel_size=2, max_tokens_per_gpu=40, use_distributed_optimizer=True),
                         rank, world, "127.0.0.1", 0)
    actor.init()
    res["sharded_metrics"] = actor.train_step(samples)
    res["sharded_weights"] = {n: p.detach().clone() for n, p in actor.model.named_parameters()}
    actor.shutdown()
    return res


@pytest.fixture(scope="module")
def results(qwen3_model):
    return run_distributed(_cp_worker, 2, qwen3_model, timeout=300)


def test_cp2_log_probs_equal_cp1(results):
    for res in results:
        for a, b in zip(res["cp2_logp"], res["cp1_logp"]):
            assert a.shape == b.shape and a.numel() > 0
            assert (a - b).abs().max().item() < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(results[0]["cp2_logp"], results[1]["cp2_logp"]))


def test_cp2_loss_grads_and_step_equal_cp1(results):
    res = results[0]
    for key in ("loss", "pg_loss", "entropy", "ppo_kl", "grad_norm"):
        assert res["cp2_metrics"][key] == pytest.approx(res["cp1_metrics"][key], rel=1e-4, abs=1e-6), key
    grads1, grads2 = res["cp1_grads"], res["cp2_grads"]
    assert sorted(grads1) == sorted(grads2)
    scale = max(g.abs().max().item() for g in grads1.values())
    assert scale > 0
    for name in grads1:
        assert (grads2[name] - grads1[name]).abs().max().item() < 1e-5 * max(1.0, scale), name
    for name, w in res["cp2_weights"].items():
        assert (w - res["cp1_weights"][name]).abs().max().item() < 1e-5, name
        assert torch.equal(w, results[1]["cp2_weights"][name])  # both CP ranks hold the same model
    for a, b in zip(res["cp2_logp_after"], res["cp1_logp_after"]):
        assert (a - b).abs().max().item() < 1e-5


def test_cp2_with_the_sharded_optimizer_equals_cp1(results):
    res = results[0]
    for key in ("loss", "grad_norm"):
        assert res["sharded_metrics"][key] == pytest.approx(res["cp1_metrics"][key], rel=1e-4, abs=1e-6), key
    for name, w in res["sharded_weights"].items():
        assert (w - res["cp1_weights"][name]).abs().max().item() < 1e-5, name
        assert torch.equal(w, results[1]["sharded_weights"][name])


@pytest.mark.parametrize("overrides, words", [
    ({"pipeline_parallel_size": 2}, "pipeline_parallel_size"),
    ({"pack_sequences": False}, "pack_sequences=False"),
    ({"advantage_estimator": "gae"}, "critic"),
])
def test_unsupported_combinations_are_refused(qwen3_model, overrides, words):
    with pytest.raises(ValueError, match=words):
        _config(qwen3_model, context_parallel_size=2, **overrides)


def test_cp_with_moe_is_refused(qwen3_moe_model):
    with pytest.raises(ValueError, match="mixture-of-experts"):
        _config(qwen3_moe_model, context_parallel_size=2)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 64), (16, 8, 128)])
def test_flash_chunk_attention_matches_reference_on_gpu(heads, kv_heads, dim):
    """The flash varlen kernel with separate query / key ranges (causal aligned at the end) against float64."""
    from trainer.attention import flash_varlen

    g = torch.Generator().manual_seed(heads)
    lengths = [300, 17, 1024, 5]
    for rank in range(2):
        view = ContextParallel.build(lengths, None, 2, rank)
        total = sum(view.padded)
        q, k, v = (torch.randn(total, h, dim, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
        q_loc, k_pre, v_pre = q[view.local_index], k[view.k_index], v[view.k_index]
        ref_inputs = [t.clone().requires_grad_(True) for t in (q_loc, k_pre, v_pre)]
        ref = chunk_attention_reference(*ref_inputs, view, 1 / math.sqrt(dim))
        gpu = view.to("cuda")
        inputs = [t.to("cuda", torch.bfloat16).requires_grad_(True) for t in (q_loc, k_pre, v_pre)]
        out = flash_varlen(*inputs, gpu.cu_q, gpu.cu_k, gpu.max_q, gpu.max_k, 1 / math.sqrt(dim))
        assert (out.double().cpu() - ref).abs().max() < 2e-2
        grad = torch.randn_like(ref)
        out.backward(grad.to("cuda", torch.bfloat16))
        ref.backward(grad)
        for a, b in zip(inputs, ref_inputs):
            assert (a.grad.double().cpu() - b.grad).abs().max() < 5e-2 * max(1.0, b.grad.abs().max().item())


def _gpu_cp_worker(rank, world, port, model):
    from trainer.actor import TrainerActor

    res = {}
    samples = make_samples(8, vocab_size=500, seed=11, min_len=64, max_len=600)
    for cp in (1, 2):
        cfg = _config(model, context_parallel_size=cp, max_tokens_per_gpu=2048 // cp)
        actor = TrainerActor(cfg, rank, world, "127.0.0.1", port + cp)
        actor.init()
        res[f"cp{cp}_logp"] = actor.compute_log_probs(samples)
        res[f"cp{cp}_metrics"] = actor.train_step(samples)
        res[f"cp{cp}_logp_after"] = actor.compute_log_probs(samples)
        actor.shutdown()
    return res


@pytest.mark.gpu
def test_cp2_equals_cp1_on_two_gpus(qwen3_model):
    """NCCL, bf16, the flash path: CP=2 log-probs, loss and the step's effect equal CP=1 within bf16 tolerance."""
    from trainer.testing import run_ranks

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    res = run_ranks(_gpu_cp_worker, 2, qwen3_model, timeout_s=300)[0]
    for key in ("cp1_logp", "cp1_logp_after"):
        for a, b in zip(res[key.replace("cp1", "cp2")], res[key]):
            assert a.shape == b.shape and a.numel() > 0
            assert (a - b).abs().max().item() < 5e-2
    for key in ("loss", "pg_loss", "entropy", "grad_norm"):
        assert res["cp2_metrics"][key] == pytest.approx(res["cp1_metrics"][key], rel=2e-2, abs=1e-3), key


@pytest.mark.parametrize("extra, message", [
    ({"context-parallel-size": 2}, "not a multiple of TP x PP x CP = 2"),
    ({"context-parallel-size": 2, "actor-num-gpus-per-node": 2, "pack-sequences": False}, "pack_sequences=False"),
])
def test_driver_refuses_before_ray(qwen3_model, extra, message):
    from orchestrator.cli import ConfigError
    from orchestrator.driver import resolve

    with pytest.raises(ConfigError, match=message):
        resolve({"hf-checkpoint": str(qwen3_model), "prompt-data": "x.jsonl", **extra})
    cfg = resolve({"hf-checkpoint": str(qwen3_model), "prompt-data": "x.jsonl", "context-parallel-size": 2,
                   "actor-num-gpus-per-node": 2})
    assert cfg.trainer.context_parallel_size == 2

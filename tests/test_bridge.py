"""HF <-> megatron bridge: layouts, exact round trips at TP=1 and TP=2, and log-probs against HF transformers.

All distributed checks run in ONE spawn of two gloo ranks (module fixture): TP=1 (DP=2) and TP=2
for every family, so process start and the megatron import are paid once.
"""

import pytest
import torch
from safetensors.torch import load_file

from inference_engine.testing import FAMILIES
from trainer import bridge
from trainer.testing import hf_response_logprobs, make_samples, run_distributed

TEMPERATURE = 0.7
VOCAB_PAD = 96  # 512 rows padded to 576 at TP=1 and TP=2: the padding path is exercised


def _spec(**overrides) -> bridge.MegatronSpec:
    base = dict(family="qwen2", vocab_size=10, hidden_size=8, ffn_hidden_size=12, num_layers=1, num_heads=4,
                num_kv_heads=2, head_dim=2, rope_theta=1e4, rms_eps=1e-6, tie_embeddings=False, qkv_bias=True,
                qk_norm=False, max_position_embeddings=64)
    return bridge.MegatronSpec(**{**base, **overrides})


def test_qkv_layout_is_interleaved_per_query_group():
    spec = _spec()
    m = bridge.WeightMapping("w", ("q", "k", "v"), "qkv")
    q = torch.arange(8.0).repeat_interleave(8).view(8, 8)  # row r of q is all r: heads 0..3, head_dim 2
    k = 100 + torch.arange(4.0).repeat_interleave(8).view(4, 8)
    v = 200 + torch.arange(4.0).repeat_interleave(8).view(4, 8)
    fused = bridge.to_shard(m, [q, k, v], spec, tp_rank=0, tp_size=1, padded_vocab=0)[:, 0]
    # group 0: q heads 0,1 (rows 0-3), k head 0, v head 0; then group 1
    assert fused.tolist() == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    rank1 = bridge.to_shard(m, [q, k, v], spec, tp_rank=1, tp_size=2, padded_vocab=0)[:, 0]
    assert rank1.tolist() == [4, 5, 6, 7, 102, 103, 202, 203]


def test_gate_up_layout_holds_each_ranks_slice_of_both():
    spec = _spec()
    m = bridge.WeightMapping("w", ("gate", "up"), "gate_up")
    gate, up = torch.arange(12.0).view(12, 1), 100 + torch.arange(12.0).view(12, 1)
    shard = bridge.to_shard(m, [gate, up], spec, tp_rank=1, tp_size=2, padded_vocab=0)[:, 0]
    assert shard.tolist() == [6, 7, 8, 9, 10, 11, 106, 107, 108, 109, 110, 111]


@pytest.mark.parametrize("layout,names", [("qkv", ("q", "k", "v")), ("gate_up", ("g", "u")), ("vocab", ("e",)),
                                          ("row", ("o",)), ("column", ("c",)), ("replicated", ("n",))])
@pytest.mark.parametrize("tp", [1, 2])
def test_shards_round_trip(layout, names, tp):
    spec = _spec()
    shapes = {"qkv": [(8, 8), (4, 8), (4, 8)], "gate_up": [(12, 8), (12, 8)], "vocab": [(10, 8)],
              "row": [(8, 12)], "column": [(12, 8)], "replicated": [(8,)]}[layout]
    hf = [torch.randn(s, dtype=torch.float64) for s in shapes]
    m = bridge.WeightMapping("w", names, layout)
    padded = spec.padded_vocab_size(4, tp)
    shards = [bridge.to_shard(m, hf, spec, tp_rank=r, tp_size=tp, padded_vocab=padded) for r in range(tp)]
    back = bridge.from_shards(m, shards, spec)
    assert len(back) == len(hf) and all(torch.equal(a, b) for a, b in zip(back, hf))
    if layout == "vocab":
        assert sum(s.shape[0] for s in shards) == padded == {1: 12, 2: 16}[tp]  # multiple of 4 * tp


def test_spec_rejects_unsupported_configs(tiny_models):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_models["llama"])
    cfg.rope_scaling = {"rope_type": "llama3", "factor": 8.0}
    with pytest.raises(ValueError, match="rope_scaling"):
        bridge.spec_from_hf_config(cfg)
    with pytest.raises(ValueError, match="family"):
        _spec(family="gpt2")


def test_spec_reads_families(tiny_models):
    specs = {f: bridge.load_spec(p) for f, p in tiny_models.items()}
    assert specs["qwen2"].qkv_bias and not specs["qwen2"].qk_norm
    assert specs["qwen3"].qk_norm and specs["qwen3"].tie_embeddings and not specs["qwen3"].qkv_bias
    assert not specs["llama"].qkv_bias and not specs["llama"].tie_embeddings
    assert specs["llama"].num_kv_heads == 2 and specs["llama"].head_dim == 16


def _bridge_worker(rank, world_size, models, out_dir):
    """Every family at TP=1 (DP=2) and TP=2: exported HF tensors and log-probs, gathered on rank 0."""
    from transformers import AutoModelForCausalLM

    from trainer.actor import TrainerActor
    from trainer.config import TrainerConfig

    results = {}
    for tp in (1, 2):
        for family, path in models.items():
            cfg = TrainerConfig(hf_checkpoint=str(path), tensor_parallel_size=tp, temperature=TEMPERATURE,
                                vocab_pad_multiple=VOCAB_PAD, max_tokens_per_gpu=64)
            actor = TrainerActor(cfg, rank, world_size, "127.0.0.1", 0)
            actor.init()
            exported = {}
            for bucket in actor.iter_hf_weight_buckets(bucket_bytes=40_000):
                exported.update(bucket)
            samples = make_samples(6, vocab_size=actor.spec.vocab_size, seed=tp)
            logps = actor.compute_log_probs(samples)
            if rank == 0:
                hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
                refs = [hf_response_logprobs(hf, s, TEMPERATURE)[0] for s in samples]
                results[(tp, family)] = {
                    "exported": exported,
                    "logp_err": max((a.double() - b).abs().max().item() for a, b in zip(logps, refs)),
                }
            actor.shutdown()
    return results


@pytest.fixture(scope="module")
def bridge_results(tiny_models, tmp_path_factory):
    return run_distributed(_bridge_worker, 2, dict(tiny_models), tmp_path_factory.mktemp("bridge"))[0]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_exact(bridge_results, tiny_models, family, tp):
    original = load_file(tiny_models[family] / "model.safetensors")
    if bridge.load_spec(tiny_models[family]).tie_embeddings:
        original.pop("lm_head.weight", None)
    exported = bridge_results[(tp, family)]["exported"]
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_log_probs_match_hf(bridge_results, family, tp):
    assert bridge_results[(tp, family)]["logp_err"] < 1e-4

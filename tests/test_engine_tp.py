"""Tensor parallelism: shard math per layer (any tp, no processes) and TP=2 engines on CPU (two gloo processes)
against TP=1."""

import multiprocessing
import os
import signal
import threading

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from inference_engine import Engine
from inference_engine.models.layers import (MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                            VocabParallelEmbedding)
from inference_engine.parallel import TPGroup, rank_device
from inference_engine.testing import greedy_and_prompt_logprobs, make_tiny_model

PROMPTS = [[5, 17, 99, 230, 41, 7, 8, 9, 10, 11], [300, 2, 2, 64], [77, 401, 12, 9, 150, 151, 152, 153, 154]]
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
ENGINE_ARGS = {"max_total_tokens": 1024, "page_size": 4, "chunked_prefill_size": 8}  # prompts prefill in chunks


class _RankStub:
    """A TPGroup's rank and size; its all-reduce returns this rank's partial result, which the tests sum over ranks."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _ranks(make, tp):
    return [make(_RankStub(r, tp)) for r in range(tp)]


@pytest.mark.parametrize("tp,kv_heads", [(2, 2), (4, 2), (4, 1), (2, 4)])
def test_qkv_shards_hold_each_ranks_heads_and_unshard_back(tp, kv_heads):
    heads, d, hidden = 4, 3, 5
    q, k, v = (torch.randn(n * d, hidden, dtype=torch.float64) for n in (heads, kv_heads, kv_heads))
    layers = _ranks(lambda g: QKVParallelLinear(hidden, d, heads, kv_heads, False, g), tp)
    pieces = {"q": [], "k": [], "v": []}
    for r, layer in enumerate(layers):
        layer.weight.data = layer.weight.data.double()
        for shard_id, full in zip("qkv", (q, k, v)):
            layer.weight_loader(layer.weight, full, shard_id)
        (q_off, q_n), (k_off, k_n), (v_off, v_n) = layer.part_slices()
        w = layer.weight.data
        kv_head = r * kv_heads // tp if tp > kv_heads else r * (kv_heads // tp)  # first kv head of rank r
        assert torch.equal(w[q_off:q_off + q_n], q[r * q_n:(r + 1) * q_n])  # heads r*H/tp ...
        assert torch.equal(w[k_off:k_off + k_n], k[kv_head * d:kv_head * d + k_n])
        assert torch.equal(w[v_off:v_off + v_n], v[kv_head * d:kv_head * d + v_n])
        for shard_id, (off, n) in zip("qkv", layer.part_slices()):
            pieces[shard_id].append(w[off:off + n])
    for shard_id, full in zip("qkv", (q, k, v)):
        assert torch.equal(layers[0].unshard(pieces[shard_id], shard_id), full)


def test_column_and_row_parallel_products_sum_to_the_full_product():
    tp, x = 4, torch.randn(3, 8, dtype=torch.float64)
    gate, up, down = (torch.randn(12, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64),
                      torch.randn(8, 12, dtype=torch.float64))
    gate_up = _ranks(lambda g: MergedColumnParallelLinear(8, [12, 12], False, g), tp)
    rows = _ranks(lambda g: RowParallelLinear(12, 8, False, g), tp)
    total = torch.zeros(3, 8, dtype=torch.float64)
    for col, row in zip(gate_up, rows):
        col.weight.data, row.weight.data = col.weight.data.double(), row.weight.data.double()
        col.weight_loader(col.weight, gate, 0)
        col.weight_loader(col.weight, up, 1)
        row.weight_loader(row.weight, down)
        g, u = col(x).chunk(2, dim=-1)  # this rank's share of the intermediate size
        total += row(F.silu(g) * u)  # the all-reduce, simulated
    assert torch.allclose(total, F.linear(F.silu(x @ gate.T) * (x @ up.T), down), atol=1e-12)
    assert torch.equal(rows[0].unshard([r.weight.data for r in rows]), down)


@pytest.mark.parametrize("vocab,tp", [(12, 4), (10, 4), (7, 2)])
def test_vocab_parallel_lookup_and_logits_equal_the_full_table(vocab, tp):
    table, hidden = torch.randn(vocab, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    ids = torch.arange(vocab).flip(0)
    shards = []
    for g in (_RankStub(r, tp) for r in range(tp)):
        emb = VocabParallelEmbedding(vocab, 6, g)
        emb.weight.data = emb.weight.data.double()
        emb.weight_loader(emb.weight, table)
        shards.append(emb)
    assert torch.equal(sum(e(ids) for e in shards), table[ids])
    local_logits = [F.linear(hidden, e.weight) for e in shards]  # what each rank contributes to the all-gather
    assert torch.allclose(torch.cat(local_logits, dim=-1)[:, :vocab], hidden @ table.T, atol=1e-12)
    assert torch.equal(shards[0].unshard([e.weight.data for e in shards]), table)


def test_rank_devices_and_bad_tp_sizes(qwen3_model):
    assert rank_device("cpu", 0, 1) == torch.device("cpu")
    assert rank_device("cuda", 2, 1) == torch.device("cuda", 3)
    assert rank_device("cuda:4", 0, 1) == torch.device("cuda", 5)
    with pytest.raises(ValueError, match="tp_size must be >= 1"):
        Engine(model_path=str(qwen3_model), tp_size=0)
    with pytest.raises(ValueError, match="tp_size 3 does not divide num_attention_heads 4"):
        Engine(model_path=str(qwen3_model), tp_size=3)
    assert multiprocessing.active_children() == []  # refused before any worker started


def _run(engine):
    return greedy_and_prompt_logprobs(engine, PROMPTS, GREEDY)


def _assert_same(a, b):
    (outs_a, plp_a), (outs_b, plp_b) = a, b
    for x, y in zip(outs_a, outs_b):
        assert x["output_ids"] == y["output_ids"]
        lp_x = [lp for lp, _, _ in x["meta_info"]["output_token_logprobs"]]
        lp_y = [lp for lp, _, _ in y["meta_info"]["output_token_logprobs"]]
        assert max(abs(p - q) for p, q in zip(lp_x, lp_y)) < 1e-5
    px = [lp for lp, _, _ in plp_a["meta_info"]["input_token_logprobs"][1:]]
    py = [lp for lp, _, _ in plp_b["meta_info"]["input_token_logprobs"][1:]]
    assert len(px) == len(PROMPTS[0]) - 1 and max(abs(p - q) for p, q in zip(px, py)) < 1e-5


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_tp2_generates_what_tp1_generates_and_exits_cleanly(tiny_models, family):
    path = tiny_models[family]
    with Engine(model_path=str(path), **ENGINE_ARGS) as tp1:
        expected = _run(tp1)
    with Engine(model_path=str(path), tp_size=2, **ENGINE_ARGS) as tp2:
        workers = tp2.runner.workers.processes
        assert [p.is_alive() for p in workers] == [True]
        assert tp2.runner.kv_pool.shape[1] == 1  # 2 kv heads, one per rank
        _assert_same(_run(tp2), expected)
        again = tp2.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)  # prefix from the radix cache
        assert again["meta_info"]["cached_tokens"] > 0 and again["output_ids"] == expected[0][0]["output_ids"]
        reference = load_file(path / "model.safetensors")
        exported = dict(tp2.named_hf_tensors())  # gathered from both ranks
        assert sorted(exported) == sorted(n for n in reference if n != "lm_head.weight" or family != "qwen3")
        for name, tensor in exported.items():
            assert torch.equal(tensor, reference[name]), name
    assert not any(p.is_alive() for p in workers) and multiprocessing.active_children() == []


def _group_ranks(fn, size: int = 2) -> list:
    """fn(group) on every rank of a gloo TPGroup, one thread per rank; each rank's return value or exception."""
    from kiln_common.net import free_port

    port, results = free_port(), [None] * size

    def rank_main(rank: int) -> None:
        group = TPGroup("127.0.0.1", port, rank, size, torch.device("cpu"), timeout_s=30)
        try:
            results[rank] = fn(group)
        except Exception as exc:  # noqa: BLE001 - returned for the test to inspect
            results[rank] = exc
        finally:
            group.close()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return results


def test_ranks_that_plan_differently_all_raise_instead_of_hanging():
    # a rank sizing its KV pool from its own free memory would hand out different batches and hang in a collective
    pools = _group_ranks(lambda g: g.check_same("KV pool tokens", 4096 if g.rank == 0 else 3072))
    for err in pools:
        assert isinstance(err, ValueError)
        assert str(err) == "tp ranks disagree on KV pool tokens: rank 0 has 4096, rank 1 has 3072"
    assert _group_ranks(lambda g: g.check_same("graph batch sizes", [1, 2, 4])) == [None, None]
    assert _group_ranks(lambda g: g.min_int(100 + g.rank)) == [100, 100]


def test_a_dead_tp_worker_is_reported_and_shutdown_returns(qwen3_model):
    engine = Engine(model_path=str(qwen3_model), tp_size=2, **ENGINE_ARGS)
    worker = engine.runner.workers.processes[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(30)
    with pytest.raises(RuntimeError, match=r"tensor-parallel worker\(s\) exited: rank 1 \(exit code -9\)"):
        engine.runner.check_alive()
    try:  # the next step fails on the lost peer, or generate reports the dead worker: either way it returns
        out = engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
        assert out["meta_info"]["finish_reason"]["type"] == "abort" and "engine error" in out["meta_info"]["error"]
    except RuntimeError as exc:
        assert "rank 1 (exit code -9)" in str(exc)
    engine.shutdown()
    assert multiprocessing.active_children() == []


@pytest.fixture(scope="module")
def other_qwen3(tmp_path_factory, tokenizer_dir):
    return make_tiny_model(tmp_path_factory.mktemp("tp_other_qwen3"), "qwen3", seed=42, tokenizer_dir=tokenizer_dir)


def test_tp2_weight_updates_equal_a_fresh_tp2_engine(qwen3_model, other_qwen3):
    with Engine(model_path=str(other_qwen3), tp_size=2, **ENGINE_ARGS) as fresh:
        expected_other = _run(fresh)
    with Engine(model_path=str(qwen3_model), tp_size=2, **ENGINE_ARGS) as engine:
        original = _run(engine)
        assert engine.update_weights_from_tensor(load_file(other_qwen3 / "model.safetensors").items(), 1) == 1
        _assert_same(_run(engine), expected_other)
        engine.release_memory(weights=True)
        engine.resume_memory()
        _assert_same(_run(engine), expected_other)
        # the RL loop's hand-over: every rank discards its shard, takes the memory back empty, the push refills it
        engine.release_memory(weights=True, keep_weights=False)
        engine.resume_memory(kv_cache=False)
        assert engine.update_weights_from_tensor(load_file(other_qwen3 / "model.safetensors").items(), 2) == 2
        engine.resume_memory()
        _assert_same(_run(engine), expected_other)
        assert engine.update_weights_from_disk(str(qwen3_model), weight_version=7) == 7
        _assert_same(_run(engine), original)
        out = engine.generate(input_ids=PROMPTS[1], sampling_params=GREEDY)
        assert out["meta_info"]["weight_version"] == 7


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_on_two_gpus_with_nccl_and_cuda_graphs_matches_tp1(qwen3_model, other_qwen3):
    import torch.distributed as dist

    args = {**ENGINE_ARGS, "device": "cuda"}  # fp32; decode steps replay CUDA graphs with the NCCL all-reduces inside
    with Engine(model_path=str(qwen3_model), **args) as tp1:
        expected = _run(tp1)
    with Engine(model_path=str(other_qwen3), tp_size=2, **args) as tp2:
        assert isinstance(tp2.runner.tp.device_group, dist.ProcessGroupNCCL)
        assert tp2.runner.device == torch.device("cuda", 0) and tp2.runner.graph_runner is not None
        tp2.update_weights_from_tensor(load_file(qwen3_model / "model.safetensors").items(), 1)  # NCCL to rank 1
        _assert_same(_run(tp2), expected)
        workers = tp2.runner.workers.processes
    assert not any(p.is_alive() for p in workers)

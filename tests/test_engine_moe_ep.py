"""Expert parallelism in the engine (`ep_size`): the shard math of every (tp, ep) on stand-in ranks, EP=2 engines on
CPU (two gloo processes, as TP=2 is tested) against TP=1 and TP=2, weight loading and pushes that place each
expert on its owning rank only, the fused kernel's expert-parallel path under the triton interpreter, the config
errors, the train.py flag and its slime alias, and EP=2 on two GPUs."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from inference_engine import Engine
from inference_engine.config import EngineConfig
from inference_engine.models.moe import Experts, moe_reference
from inference_engine.testing import greedy_and_prompt_logprobs, make_tiny_model, run_under_triton_interpreter
from weight_sync import FlatLayout, WeightUpdateGroup, bucket_named_tensors, compare_checksums
from weight_sync.checksum import checksums
from kiln_common.net import free_port

PROMPTS = [[5, 17, 99, 230, 41, 7, 8, 9, 10, 11, 300, 301, 12], [300, 2, 2, 64], list(range(40, 75))]
GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True, "return_routed_experts": True}
ARGS = {"max_total_tokens": 1024, "page_size": 4, "chunked_prefill_size": 8}  # prompts prefill in chunks
TOL = 1e-5  # test_engine_tp's TP=2 vs TP=1 log-prob tolerance: only the order of the all-reduced sums differs


class _RankStub:
    """A TPGroup's rank and size (no processes): each rank's partial output is summed by the test."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


def _full_experts(e: int, inter: int, hidden: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(e, 2 * inter, hidden, generator=g, dtype=torch.float64),
            torch.randn(e, hidden, inter, generator=g, dtype=torch.float64))


def _per_expert(w13: torch.Tensor, w2: torch.Tensor, prefix: str = "model.layers.0.mlp.experts"):
    inter = w2.shape[2]
    for e in range(w13.shape[0]):
        yield f"{prefix}.{e}.gate_proj.weight", w13[e, :inter]
        yield f"{prefix}.{e}.up_proj.weight", w13[e, inter:]
        yield f"{prefix}.{e}.down_proj.weight", w2[e]


@pytest.mark.parametrize("tp,ep", [(2, 2), (4, 2), (4, 4), (2, 1)])
@pytest.mark.parametrize("layout", ["stacked", "per_expert"])
def test_each_rank_holds_its_experts_and_the_partial_outputs_sum_to_the_full_layer(tp, ep, layout):
    e, inter, hidden, k = 8, 12, 10, 3
    w13, w2 = _full_experts(e, inter, hidden)
    ranks = [Experts(e, hidden, inter, _RankStub(r, tp), ep) for r in range(tp)]
    for experts in ranks:
        experts.double()
        experts.gate_up_proj.data.fill_(float("nan"))  # anything left unloaded shows up below
        experts.down_proj.data.fill_(float("nan"))
        if layout == "stacked":
            experts.weight_loader(experts.gate_up_proj, w13)
            experts.weight_loader(experts.down_proj, w2)
        else:  # every rank is offered every expert and keeps its own
            for name, tensor in _per_expert(w13, w2):
                _, _, _, _, _, idx, proj, _ = name.split(".")
                part = {"gate_proj": 0, "up_proj": 1, "down_proj": "down"}[proj]
                experts.weight_loader(experts.down_proj if part == "down" else experts.gate_up_proj, tensor,
                                      (int(idx), part))
    n, cols = e // ep, inter // (tp // ep)
    for r, experts in enumerate(ranks):
        assert experts.gate_up_proj.shape == (n, 2 * cols, hidden) and experts.down_proj.shape == (n, hidden, cols)
        group, within = divmod(r, tp // ep)
        assert experts.first == group * n and [experts.owns(x) for x in range(e)] == [
            group * n <= x < (group + 1) * n for x in range(e)]
        own = slice(group * n, (group + 1) * n)
        cut = slice(within * cols, (within + 1) * cols)
        gate_up = torch.cat([w13[own, :inter][:, cut], w13[own, inter:][:, cut]], 1)
        assert torch.equal(experts.gate_up_proj.data, gate_up)
        assert torch.equal(experts.down_proj.data, w2[own][:, :, cut])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, hidden, generator=g, dtype=torch.float64)
    weights, ids = torch.softmax(torch.randn(7, e, generator=g, dtype=torch.float64), -1).topk(k)
    total = sum(moe_reference(x, m.gate_up_proj, m.down_proj, weights, ids, m.first) for m in ranks)
    assert torch.allclose(total, moe_reference(x, w13, w2, weights, ids), atol=1e-10)
    # the export: one all-gather per local expert projection rebuilds every ep rank's expert of that index
    pieces = [list(m.hf_pieces("model.layers.0.mlp.experts")) for m in ranks]
    rebuilt = {}
    for j in range(len(pieces[0])):
        name, param, shard_id, _ = pieces[0][j]
        rebuilt.update(param.gather_hf(name, shard_id, [p[j][3] for p in pieces]))
    expected = dict(_per_expert(w13, w2))
    assert sorted(rebuilt) == sorted(expected) and all(torch.equal(rebuilt[n], expected[n]) for n in expected)


def test_a_wrong_expert_or_shape_is_refused_on_every_rank_even_when_not_its_own():
    experts = Experts(8, 10, 12, _RankStub(0, 2), 2)  # rank 0 holds experts 0..3
    with pytest.raises(ValueError, match="does not match the engine's"):
        experts.weight_target(experts.down_proj, torch.Size((10, 13)), (6, "down"))
    with pytest.raises(ValueError, match="expert 8 does not exist"):
        experts.weight_target(experts.gate_up_proj, torch.Size((12, 10)), (8, 0))
    assert experts.weight_target(experts.gate_up_proj, torch.Size((12, 10)), (5, 1)) is None  # rank 1's: skipped


def _run(engine):
    return greedy_and_prompt_logprobs(engine, PROMPTS, GREEDY)


def _lps(out, key="output_token_logprobs"):
    return [lp for lp, _, _ in out["meta_info"][key] if lp is not None]


def _assert_same(a, b):
    (outs_a, plp_a), (outs_b, plp_b) = a, b
    for x, y in zip(outs_a, outs_b, strict=True):
        assert x["output_ids"] == y["output_ids"]
        assert max(abs(p - q) for p, q in zip(_lps(x), _lps(y), strict=True)) < TOL
        assert x["meta_info"]["routed_experts"] == y["meta_info"]["routed_experts"]  # the router is not split
    px, py = _lps(plp_a, "input_token_logprobs"), _lps(plp_b, "input_token_logprobs")
    assert len(px) == len(PROMPTS[0]) - 1 and max(abs(p - q) for p, q in zip(px, py, strict=True)) < TOL
    assert plp_a["meta_info"]["routed_experts"] == plp_b["meta_info"]["routed_experts"]


def _assert_holds(engine: Engine, model_path) -> None:
    """The engine's weights, gathered from both ranks (each expert from its owner alone), are the folder's."""
    sent = load_file(Path(model_path) / "model.safetensors")
    held = dict(engine.named_hf_tensors())
    assert sorted(held) == sorted(sent)
    for name, tensor in held.items():
        assert torch.equal(tensor, sent[name]), name


def test_ep2_generates_what_tp1_and_tp2_generate(qwen3_moe_model):
    with Engine(model_path=str(qwen3_moe_model), **ARGS) as tp1:
        expected = _run(tp1)
    with Engine(model_path=str(qwen3_moe_model), tp_size=2, **ARGS) as tp2:
        _assert_same(_run(tp2), expected)
    with Engine(model_path=str(qwen3_moe_model), tp_size=2, ep_size=2, **ARGS) as ep2:
        workers = ep2.runner.workers.processes
        experts = ep2.runner.model.model.layers[0].mlp.experts
        assert (experts.first, experts.gate_up_proj.shape, experts.down_proj.shape) == (0, (4, 64, 64), (4, 64, 32))
        own = load_file(qwen3_moe_model / "model.safetensors")
        assert torch.equal(experts.down_proj.data[3], own["model.layers.0.mlp.experts.3.down_proj.weight"])
        _assert_same(_run(ep2), expected)
        again = ep2.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)  # prefix from the radix cache
        assert again["meta_info"]["cached_tokens"] > 0 and again["output_ids"] == expected[0][0]["output_ids"]
        _assert_holds(ep2, qwen3_moe_model)
    assert not any(p.is_alive() for p in workers) and multiprocessing.active_children() == []


def test_ep2_inside_tp4_generates_what_tp1_generates(qwen3_moe_model):
    """ep < tp: two ep groups of two ranks, each group holding 4 experts with half of their width per rank."""
    with Engine(model_path=str(qwen3_moe_model), **ARGS) as tp1:
        expected = _run(tp1)
    with Engine(model_path=str(qwen3_moe_model), tp_size=4, ep_size=2, **ARGS) as engine:
        experts = engine.runner.model.model.layers[2].mlp.experts
        assert (experts.first, experts.gate_up_proj.shape, experts.down_proj.shape) == (0, (4, 32, 64), (4, 64, 16))
        _assert_same(_run(engine), expected)
        _assert_holds(engine, qwen3_moe_model)


@pytest.fixture(scope="module")
def other_moe(tmp_path_factory, tokenizer_dir):
    return make_tiny_model(tmp_path_factory.mktemp("ep_other_moe"), "qwen3_moe", seed=11, tokenizer_dir=tokenizer_dir,
                           num_layers=3, mlp_only_layers=(1,))


def _stacked(tensors: dict[str, torch.Tensor], num_experts: int) -> list[tuple[str, torch.Tensor]]:
    """The same weights with every layer's experts stacked as transformers 5 stores them."""
    out = {n: t for n, t in tensors.items() if ".mlp.experts." not in n}
    for layer in sorted({n.split(".mlp.experts.")[0] for n in tensors if ".mlp.experts." in n}):
        def proj(e, p):
            return tensors[f"{layer}.mlp.experts.{e}.{p}_proj.weight"]
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([proj(e, "gate"), proj(e, "up")]) for e in range(num_experts)])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([proj(e, "down") for e in range(num_experts)])
    return list(out.items())


def _send(port: int, model_path, done) -> None:
    """A stand-in trainer: rank 0 of a gloo weight-update group, broadcasting the checkpoint in small buckets."""
    group = WeightUpdateGroup("127.0.0.1", port, 0, 3, "ep_push", backend="gloo", timeout_s=60)
    for bucket in bucket_named_tensors(sorted(load_file(Path(model_path) / "model.safetensors").items()), 40_000):
        for buf in FlatLayout.of(bucket).flatten(bucket):
            group.broadcast(buf, src=0)
    done.wait(60)
    group.close()


def test_weight_pushes_into_ep2_equal_a_fresh_ep2_engine(qwen3_moe_model, other_moe):
    """update_weights_from_tensor (per-expert and stacked names), update_weights_from_distributed and
    update_weights_from_disk: each rank keeps only its experts, and the engine then equals a fresh EP=2 engine of
    the pushed weights (outputs, routing and checksums of every tensor)."""
    ep = {"tp_size": 2, "ep_size": 2, **ARGS}
    with Engine(model_path=str(other_moe), **ep) as fresh:
        expected_other, sums_other = _run(fresh), checksums(fresh.named_hf_tensors())
    with Engine(model_path=str(qwen3_moe_model), **ep) as fresh:
        expected, sums = _run(fresh), checksums(fresh.named_hf_tensors())
    with Engine(model_path=str(qwen3_moe_model), **ep) as engine:
        assert engine.update_weights_from_tensor(list(load_file(other_moe / "model.safetensors").items()), 1) == 1
        _assert_same(_run(engine), expected_other)
        compare_checksums(sums_other, checksums(engine.named_hf_tensors()))  # raises on any difference
        engine.update_weights_from_tensor(_stacked(load_file(qwen3_moe_model / "model.safetensors"), 8), 2)
        _assert_same(_run(engine), expected)
        compare_checksums(sums, checksums(engine.named_hf_tensors()))  # raises on any difference

        ctx = multiprocessing.get_context("spawn")
        port, done = free_port(), ctx.Event()
        sender = ctx.Process(target=_send, args=(port, other_moe, done), daemon=True)
        sender.start()
        engine.init_weights_update_group("127.0.0.1", port, 1, 3, "ep_push", "gloo", 60)  # tp rank r: 1 + r
        for bucket in bucket_named_tensors(sorted(load_file(other_moe / "model.safetensors").items()), 40_000):
            meta = FlatLayout.of(bucket).metadata()
            engine.update_weights_from_distributed(meta["names"], meta["dtypes"], meta["shapes"], "ep_push", 3)
        engine.destroy_weights_update_group("ep_push")
        done.set()
        sender.join(60)
        assert sender.exitcode == 0
        _assert_same(_run(engine), expected_other)
        _assert_holds(engine, other_moe)

        assert engine.update_weights_from_disk(str(qwen3_moe_model), weight_version=4) == 4
        _assert_same(_run(engine), expected)
        with pytest.raises(ValueError, match="does not match the engine's"):  # rank 1's expert, checked on rank 0
            engine.update_weights_from_tensor([("model.layers.0.mlp.experts.6.down_proj.weight",
                                                torch.zeros(64, 31))], 5)
        _assert_same(_run(engine), expected)  # nothing was loaded


def test_config_errors(qwen3_moe_model, qwen3_model):
    with pytest.raises(ValueError, match="ep_size 2 must divide tp_size 1"):
        EngineConfig(model_path=str(qwen3_moe_model), ep_size=2)
    with pytest.raises(ValueError, match="ep_size 2 needs a mixture-of-experts model; .* dense qwen3 model"):
        EngineConfig(model_path=str(qwen3_model), tp_size=2, ep_size=2)
    with pytest.raises(ValueError, match="ep_size 3 does not divide num_experts 8"):
        EngineConfig(model_path=str(qwen3_moe_model), tp_size=3, ep_size=3)
    with pytest.raises(ValueError, match="ep_size must be an integer >= 1"):
        EngineConfig(model_path=str(qwen3_moe_model), tp_size=2, ep_size=0)
    assert EngineConfig(model_path=str(qwen3_moe_model), tp_size=2, ep_size=2).ep_size == 2
    assert multiprocessing.active_children() == []  # refused before any worker started


def test_train_flag_and_slime_alias_reach_the_engine_config(qwen3_moe_model, qwen3_model, tmp_path):
    from orchestrator.cli import ConfigError
    from orchestrator.driver import parse_args

    base = ["--prompt-data", str(tmp_path / "p.jsonl"), "--no-colocate", "--tp-size", "2"]
    cfg = parse_args(["--hf-checkpoint", str(qwen3_moe_model), *base, "--ep-size", "2"])
    assert (cfg.engine.tp_size, cfg.engine.ep_size) == (2, 2)
    cfg = parse_args(["--hf-checkpoint", str(qwen3_moe_model), *base, "--sglang-ep-size", "2"])
    assert cfg.engine.ep_size == 2
    with pytest.raises(ConfigError, match="dense qwen3 model"):
        parse_args(["--hf-checkpoint", str(qwen3_model), *base, "--ep-size", "2"])
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, str(repo / "train.py"), "--hf-checkpoint", str(qwen3_moe_model),
                           "--prompt-data", "p.jsonl", "--sglang-ep-size", "3", "--tp-size", "3", "--no-colocate"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if line.startswith("train.py: error: ")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert "ep_size 3 does not divide num_experts 8" in errors[0] and "Traceback" not in done.stderr


def test_fused_moe_expert_parallel_path_under_the_triton_interpreter():
    pytest.importorskip("triton")
    proc = run_under_triton_interpreter([__file__])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fused moe expert-parallel checks passed" in proc.stdout


def _check_fused_ep(device: str, dtype: torch.dtype, atol: float) -> None:
    """fused_moe over each ep rank's experts (expert_offset) sums to the full layer's reference, and each part
    equals the reference restricted to those experts."""
    from inference_engine.kernels import fused_moe as kernels

    for tokens, experts, top_k, hidden, inter, ep, config in [(1, 8, 2, 64, 32, 2, "SMALL"),
                                                              (37, 16, 4, 64, 48, 4, "LARGE"),
                                                              (37, 16, 4, 64, 48, 2, "SMALL")]:
        g = torch.Generator().manual_seed(tokens + ep)
        x = torch.randn(tokens, hidden, generator=g)
        w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden ** -0.5
        w2 = torch.randn(experts, hidden, inter, generator=g) * inter ** -0.5
        weights, ids = torch.softmax(torch.randn(tokens, experts, generator=g), -1).topk(top_k)
        n = experts // ep
        total = torch.zeros(tokens, hidden)
        for rank in range(ep):
            part = slice(rank * n, (rank + 1) * n)
            args = [t.to(device=device, dtype=dtype) for t in (x, w13[part], w2[part], weights)]
            got = kernels.fused_moe(*args, ids.to(device=device, dtype=torch.int32), config=getattr(kernels, config),
                                    expert_offset=rank * n).float().cpu()
            want = moe_reference(x, w13[part], w2[part], weights, ids, rank * n)
            torch.testing.assert_close(got, want, atol=atol, rtol=0.02 if dtype != torch.float32 else 0)
            total += got
        torch.testing.assert_close(total, moe_reference(x, w13, w2, weights, ids), atol=2 * atol,
                                   rtol=0.02 if dtype != torch.float32 else 0)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ep2_on_two_gpus_with_nccl_and_cuda_graphs_matches_tp1(qwen3_moe_model, other_moe):
    import torch.distributed as dist

    _check_fused_ep("cuda", torch.float32, atol=1e-5)
    _check_fused_ep("cuda", torch.bfloat16, atol=2e-2)
    args = {**ARGS, "device": "cuda"}  # fp32; decode steps replay CUDA graphs with the NCCL all-reduces inside
    with Engine(model_path=str(qwen3_moe_model), **args) as tp1:
        expected = _run(tp1)
    with Engine(model_path=str(other_moe), tp_size=2, ep_size=2, **args) as ep2:
        assert isinstance(ep2.runner.tp.device_group, dist.ProcessGroupNCCL) and ep2.runner.graph_runner is not None
        ep2.update_weights_from_tensor(list(load_file(qwen3_moe_model / "model.safetensors").items()), 1)  # NCCL
        _assert_same(_run(ep2), expected)
        _assert_holds(ep2, qwen3_moe_model)
        workers = ep2.runner.workers.processes
    assert not any(p.is_alive() for p in workers)


if __name__ == "__main__":  # the interpreter subprocess of test_fused_moe_expert_parallel_path_under_the_triton_...
    from inference_engine import ops

    assert ops.runs_triton("cpu"), "TRITON_INTERPRET=1 was not in effect"
    _check_fused_ep("cpu", torch.float32, atol=1e-5)
    print("fused moe expert-parallel checks passed")

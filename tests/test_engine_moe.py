"""Qwen3-MoE in the engine against HF transformers: greedy tokens, log-probs, the experts each token was routed to
(also from the prefix cache and across the turns of a Sample), weight loading in both expert layouts, TP=2, and the
fused triton MoE kernel (under the triton interpreter on CPU, compiled on a GPU)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from inference_engine import Engine
from inference_engine.models.moe import moe_reference, route_reference, stacked_expert_names
from inference_engine.testing import make_tiny_model, run_under_triton_interpreter
from kiln_common import routed_experts
from kiln_common.sample import Sample
from rollout.generate import append_response

PROMPTS = [[5, 17, 99, 230, 41, 7, 8, 9, 10, 11, 300, 301, 12], [300, 2, 2, 64], list(range(40, 75))]
GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
ARGS = {"max_total_tokens": 2048, "chunked_prefill_size": 16}
MARGIN = 1e-4  # router probabilities closer than this may order differently in two float32 computations


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_routing(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(HF's top-k expert ids [len(ids), moe layers, k], and whether each (token, layer) is decided by more than
    MARGIN: the gaps between the k + 1 largest router probabilities)."""
    out = model(torch.tensor([ids]), output_router_logits=True)
    k = model.config.num_experts_per_tok
    probs = torch.stack([torch.softmax(r.float(), -1) for r in out.router_logits], dim=1)  # [T, layers, E]
    top = probs.topk(k + 1, dim=-1)
    clear = (top.values[..., :-1] - top.values[..., 1:]).min(-1).values > MARGIN
    return top.indices[..., :k].numpy(), clear.numpy()


def assert_routing_matches(got: np.ndarray, model, ids: list[int]) -> None:
    """got [len(ids) - 1, layers, k] equals HF's routing of ids[:-1] wherever HF's choice is clear."""
    expected, clear = hf_routing(model, ids)
    assert got.shape == (len(ids) - 1, *expected.shape[1:]) and got.dtype == np.uint8
    expected, clear = expected[:-1], clear[:-1]
    assert clear.mean() > 0.9, "the random model's routing is too close to call"
    assert (got[clear] == expected[clear]).all()


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("page_size", [1, 4])
def test_greedy_logprobs_and_routing_match_hf(qwen3_moe_model, page_size):
    model = hf_model(qwen3_moe_model)
    refs = [model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    sp = {**GREEDY, "return_routed_experts": True}
    with Engine(model_path=str(qwen3_moe_model), page_size=page_size, **ARGS) as engine:
        assert engine.spec.moe_layers == (0, 2) and engine.runner.kv_pool.routed_experts.shape[1:] == (2, 2)
        outs = engine.generate(input_ids=PROMPTS, sampling_params=sp, return_logprob=True)
    assert [o["output_ids"] for o in outs] == refs
    for prompt, out in zip(PROMPTS, outs):
        full = prompt + out["output_ids"]
        got = torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])
        assert torch.allclose(got, hf_logprobs(model, full)[len(prompt) - 1:], atol=1e-4, rtol=0)
        assert_routing_matches(routed_experts.decode(out["meta_info"]["routed_experts"]), model, full)


def test_sampled_logprobs_match_hf(qwen3_moe_model):
    model = hf_model(qwen3_moe_model)
    sp = {"temperature": 1.0, "max_new_tokens": 12, "seed": 5, "ignore_eos": True, "return_prompt_logprobs": True}
    with Engine(model_path=str(qwen3_moe_model), **ARGS) as engine:
        out = engine.generate(input_ids=PROMPTS[2], sampling_params=sp, return_logprob=True)
    ref = hf_logprobs(model, PROMPTS[2] + out["output_ids"])
    got = torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])
    assert torch.allclose(got, ref[len(PROMPTS[2]) - 1:], atol=1e-4, rtol=0)
    prompt_lp = torch.tensor([lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]])
    assert torch.allclose(prompt_lp, ref[:len(PROMPTS[2]) - 1], atol=1e-4, rtol=0)
    assert "routed_experts" not in out["meta_info"]  # not asked for


def test_routing_of_a_prefix_cache_hit_is_the_recorded_one(qwen3_moe_model):
    model = hf_model(qwen3_moe_model)
    first = PROMPTS[2]
    second = first[:24] + [7, 8, 9, 300, 301]
    sp = {**GREEDY, "return_routed_experts": True}
    with Engine(model_path=str(qwen3_moe_model), page_size=4, **ARGS) as engine:
        a = engine.generate(input_ids=first, sampling_params=sp)
        b = engine.generate(input_ids=second, sampling_params=sp)
        slots = engine.runner.kv_pool.routed_experts
        slots.fill_(255)  # ids no router can choose: a later hit returns exactly what the buffer holds
        c = engine.generate(input_ids=second, sampling_params=sp)
    assert b["meta_info"]["cached_tokens"] == 24 and c["meta_info"]["cached_tokens"] == 28
    route_a, route_b, route_c = (routed_experts.decode(o["meta_info"]["routed_experts"]) for o in (a, b, c))
    assert np.array_equal(route_b[:24], route_a[:24])
    assert_routing_matches(route_b, model, second + b["output_ids"])
    assert (route_c[:28] == 255).all() and np.array_equal(route_c[28:], route_b[28:])  # cached rows from the slots


def test_routing_survives_retraction_and_n_samples(qwen3_moe_model):
    """A pool too small for the batch retracts requests (their KV to the radix cache, re-prefilled later); n > 1
    samples fork off their prompt's cached prefill: every request still returns the routing of all its tokens."""
    model = hf_model(qwen3_moe_model)
    sp = {**GREEDY, "max_new_tokens": 24, "return_routed_experts": True}
    with Engine(model_path=str(qwen3_moe_model), page_size=4, max_total_tokens=96, context_length=64,
                chunked_prefill_size=16) as engine:
        outs = engine.generate(input_ids=[p[:20] for p in PROMPTS[:1] + PROMPTS[2:]] + [PROMPTS[1]],
                               sampling_params=sp)
        assert engine.metrics()["retractions_total"] > 0
        forks = engine.generate(input_ids=PROMPTS[2][:30], sampling_params={
            "max_new_tokens": 5, "temperature": 1.0, "seed": 1, "n": 2, "return_routed_experts": True})
    for prompt, out in zip([p[:20] for p in PROMPTS[:1] + PROMPTS[2:]] + [PROMPTS[1]], outs):
        assert_routing_matches(routed_experts.decode(out["meta_info"]["routed_experts"]), model,
                               prompt + out["output_ids"])
    assert all(f["meta_info"]["cached_tokens"] > 0 for f in forks)
    for fork in forks:
        assert_routing_matches(routed_experts.decode(fork["meta_info"]["routed_experts"]), model,
                               PROMPTS[2][:30] + fork["output_ids"])


def test_routing_across_the_turns_of_a_sample(qwen3_moe_model):
    """Turn 1, environment tokens (loss_mask 0), turn 2 from the whole context: Sample.routed_experts covers every
    token but the last, equal to HF's routing of the final sequence."""
    model = hf_model(qwen3_moe_model)
    sp = {**GREEDY, "max_new_tokens": 6, "return_routed_experts": True}
    with Engine(model_path=str(qwen3_moe_model), page_size=4, **ARGS) as engine:
        sample = Sample(tokens=list(PROMPTS[0]))
        append_response(sample, engine.generate(input_ids=sample.tokens, sampling_params=sp, return_logprob=True))
        assert sample.routed_experts.shape[0] == len(sample.tokens) - 1
        turn1 = sample.routed_experts.copy()
        sample.append([20, 21, 22], loss_mask=0)
        response = engine.generate(input_ids=sample.tokens, sampling_params=sp, return_logprob=True)
        assert response["meta_info"]["cached_tokens"] > 0
        append_response(sample, response)
    assert sample.routed_experts.shape[0] == len(sample.tokens) - 1 and sample.response_length == 15
    assert np.array_equal(sample.routed_experts[:len(turn1)], turn1)
    assert_routing_matches(sample.routed_experts, model, sample.tokens)
    with pytest.raises(ValueError, match="loss_mask 0"):
        sample.append([1], loss_mask=0, routed_experts=sample.routed_experts)
    with pytest.raises(ValueError, match="at most"):
        sample.append([1], [0.0], loss_mask=1, routed_experts=np.zeros((40, 2, 2), np.uint8))


def test_routed_experts_wire_format_and_refusals(qwen3_moe_model, qwen3_model):
    a = np.random.default_rng(0).integers(0, 200, size=(5, 3, 2), dtype=np.uint8)
    assert np.array_equal(routed_experts.decode(routed_experts.encode(a)), a)
    b = torch.randint(-1, 300, (4, 2, 8), dtype=torch.int16)
    wire = routed_experts.encode(b)
    assert wire["dtype"] == "int16" and np.array_equal(routed_experts.decode(wire), b.numpy())
    with pytest.raises(ValueError, match="bytes for shape"):
        routed_experts.decode({**wire, "shape": [4, 2, 9]})
    with pytest.raises(ValueError, match="dtype"):
        routed_experts.decode({**wire, "dtype": "float64"})
    with Engine(model_path=str(qwen3_model), **ARGS) as dense:
        with pytest.raises(ValueError, match="dense qwen3 model"):
            dense.generate(input_ids=[1, 2], sampling_params={"return_routed_experts": True})


def test_moe_reference_equals_a_float64_loop():
    g = torch.Generator().manual_seed(3)
    x, w13 = torch.randn(9, 12, generator=g), torch.randn(5, 14, 12, generator=g)
    w2 = torch.randn(5, 12, 7, generator=g)
    weights, ids = torch.softmax(torch.randn(9, 5, generator=g), -1).topk(3)
    expected = torch.zeros(9, 12, dtype=torch.float64)
    for t in range(9):
        for j in range(3):
            gate, up = (w13[ids[t, j]].double() @ x[t].double()).chunk(2)
            expected[t] += weights[t, j].double() * (w2[ids[t, j]].double() @ (torch.nn.functional.silu(gate) * up))
    assert torch.allclose(moe_reference(x, w13, w2, weights, ids).double(), expected, atol=1e-5)


@pytest.fixture(scope="module")
def other_moe(tmp_path_factory, tokenizer_dir):
    return make_tiny_model(tmp_path_factory.mktemp("other_moe"), "qwen3_moe", seed=11, tokenizer_dir=tokenizer_dir,
                           num_layers=3, mlp_only_layers=(1,))


def _stacked(tensors: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """The same weights with every layer's experts stacked as transformers 5 stores them."""
    out = {n: t for n, t in tensors.items() if ".mlp.experts." not in n}
    layers = sorted({n.split(".mlp.experts.")[0] for n in tensors if ".mlp.experts." in n})
    for layer in layers:
        def proj(e, p):
            return tensors[f"{layer}.mlp.experts.{e}.{p}_proj.weight"]
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([proj(e, "gate"), proj(e, "up")]) for e in range(num_experts)])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([proj(e, "down") for e in range(num_experts)])
    return out


@pytest.mark.parametrize("tp_size", [1, 2])
def test_weight_updates_per_expert_and_stacked_and_tp2_equals_tp1(qwen3_moe_model, other_moe, tp_size):
    sp = {**GREEDY, "return_routed_experts": True}
    ref = load_file(qwen3_moe_model / "model.safetensors")
    other = load_file(other_moe / "model.safetensors")
    with Engine(model_path=str(other_moe), page_size=4, **ARGS) as fresh:
        expected_other = fresh.generate(input_ids=PROMPTS, sampling_params=sp)
    with Engine(model_path=str(qwen3_moe_model), page_size=4, **ARGS) as fresh:
        expected = fresh.generate(input_ids=PROMPTS, sampling_params=sp)
    with Engine(model_path=str(qwen3_moe_model), page_size=4, tp_size=tp_size, **ARGS) as engine:
        if tp_size == 2:
            assert engine.runner.model.model.layers[0].mlp.experts.down_proj.shape == (8, 64, 16)
        _assert_same(engine.generate(input_ids=PROMPTS, sampling_params=sp), expected)
        exported = dict(engine.named_hf_tensors())  # per-expert HF names, gathered from every rank
        assert sorted(exported) == sorted(ref)
        assert all(torch.equal(exported[n], ref[n]) for n in ref)
        assert engine.update_weights_from_tensor(list(other.items()), 1) == 1  # the per-expert names of a push
        _assert_same(engine.generate(input_ids=PROMPTS, sampling_params=sp), expected_other)
        engine.update_weights_from_tensor(list(_stacked(ref, 8).items()), 2)  # the stacked fast path
        _assert_same(engine.generate(input_ids=PROMPTS, sampling_params=sp), expected)
        engine.release_memory(weights=True)  # the routed-experts buffer goes and comes back with the KV pool
        assert engine.runner.kv_pool.routed_experts is None
        engine.resume_memory()
        _assert_same(engine.generate(input_ids=PROMPTS, sampling_params=sp), expected)
        with pytest.raises(ValueError, match="expert 8 does not exist"):
            engine.update_weights_from_tensor([("model.layers.0.mlp.experts.8.up_proj.weight", ref[
                "model.layers.0.mlp.experts.0.up_proj.weight"])], 3)
        with pytest.raises(ValueError, match="does not match the engine's"):
            engine.update_weights_from_tensor([("model.layers.0.mlp.experts.gate_up_proj", torch.zeros(8, 32, 64))],
                                              3)


def _assert_same(outs, expected):
    for got, want in zip(outs, expected):
        assert got["output_ids"] == want["output_ids"]
        assert got["meta_info"]["routed_experts"] == want["meta_info"]["routed_experts"]


def test_a_stacked_checkpoint_loads(tmp_path, qwen3_moe_model):
    from safetensors.torch import save_file

    for f in Path(qwen3_moe_model).iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file(_stacked(load_file(qwen3_moe_model / "model.safetensors"), 8), tmp_path / "model.safetensors")
    assert stacked_expert_names("model.layers.2.mlp.experts.down_proj", 2) == [
        "model.layers.2.mlp.experts.0.down_proj.weight", "model.layers.2.mlp.experts.1.down_proj.weight"]
    with Engine(model_path=str(tmp_path), **ARGS) as stacked, \
            Engine(model_path=str(qwen3_moe_model), **ARGS) as per_expert:
        assert stacked.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)["output_ids"] == \
            per_expert.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)["output_ids"]


def test_http_generate_returns_routed_experts_as_base64(qwen3_moe_model):
    import httpx

    from inference_engine.server import create_app

    async def post(engine):
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.post("/generate", json={"input_ids": PROMPTS[1], "return_logprob": True,
                                                     "sampling_params": {**GREEDY, "return_routed_experts": True}})
            return r.json()

    with Engine(model_path=str(qwen3_moe_model), **ARGS) as engine:
        direct = engine.generate(input_ids=PROMPTS[1], sampling_params={**GREEDY, "return_routed_experts": True})
        body = asyncio.run(post(engine))
    wire = body["meta_info"]["routed_experts"]
    assert wire == direct["meta_info"]["routed_experts"] and wire["shape"] == [len(PROMPTS[1]) + 9, 2, 2]
    sample = append_response(Sample(tokens=list(PROMPTS[1])), body)
    assert np.array_equal(sample.routed_experts, routed_experts.decode(wire))


# ---------------------------------------------------------------- the fused kernel
KERNEL_CASES = [  # (tokens, experts, top_k, hidden, intermediate, config name)
    (1, 8, 2, 64, 32, "SMALL"), (5, 8, 2, 64, 32, "SMALL"), (37, 16, 4, 64, 48, "LARGE"), (37, 16, 4, 64, 48, "SMALL"),
    (3, 4, 4, 40, 20, "SMALL"),
]


def _kernel_case(tokens, experts, top_k, hidden, inter, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden ** -0.5  # outputs of about unit size
    w2 = torch.randn(experts, hidden, inter, generator=g) * inter ** -0.5
    weights, ids = torch.softmax(torch.randn(tokens, experts, generator=g), -1).topk(top_k)
    return [t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in (x, w13, w2, weights, ids)]


def _check_kernels(device: str, dtype: torch.dtype, atol: float) -> None:
    """The triton route, align and grouped GEMMs against their torch references on device."""
    from inference_engine.kernels import fused_moe as kernels

    for case in KERNEL_CASES:
        args = _kernel_case(*case[:5], dtype, device)
        want = moe_reference(*[a.cpu().float() if a.is_floating_point() else a.cpu() for a in args])
        got = kernels.fused_moe(*args, config=getattr(kernels, case[5]))
        torch.testing.assert_close(got.float().cpu(), want, atol=atol, rtol=0.02 if dtype != torch.float32 else 0)
        if case[0] == 1:  # one token: its pair blocks (the default there) and the aligned path agree
            aligned = kernels.fused_moe(*args, config=getattr(kernels, case[5]), pair_blocks=False)
            torch.testing.assert_close(aligned.float().cpu(), want, atol=atol,
                                       rtol=0.02 if dtype != torch.float32 else 0)
    g = torch.Generator().manual_seed(1)
    for tokens, experts, top_k, renormalize in [(1, 8, 2, True), (37, 16, 4, False), (300, 128, 8, True),
                                                (5, 6, 6, True)]:
        # distinct logits, exact in bf16 too (k / 16): no ties for the two top-k to break differently
        logits = torch.stack([torch.randperm(experts, generator=g) for _ in range(tokens)]) / 16
        logits = logits.to(device=device, dtype=dtype)
        want_w, want_ids = route_reference(logits, top_k, renormalize, dtype)
        record = torch.zeros(tokens + 3, 2, top_k, dtype=torch.uint8, device=device)
        loc = torch.randperm(tokens + 3, generator=g)[:tokens].to(device)
        weights, ids = kernels.route(logits, top_k, renormalize, dtype, (record, loc, 1))
        assert torch.equal(ids.long(), want_ids), (tokens, experts)  # random logits: no ties
        torch.testing.assert_close(weights, want_w, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5)
        assert torch.equal(record[loc, 1].long(), want_ids) and not record[loc, 0].any()
        for block_m in (16, 64):
            kernel_align = kernels.align(ids, experts, block_m)
            assert all(torch.equal(a, b) for a, b in zip(kernel_align, kernels.align_reference(ids, experts, block_m)))
    saved = kernels.ONE_HOT_MAX_PAIRS
    kernels.ONE_HOT_MAX_PAIRS = 0  # the sorting branch of align_reference gives the same grouping
    try:
        ids = _kernel_case(*KERNEL_CASES[2][:5], dtype, device)[4]
        assert all(torch.equal(a, b) for a, b in zip(kernels.align_reference(ids, 16, 16), kernels.align(ids, 16, 16)))
    finally:
        kernels.ONE_HOT_MAX_PAIRS = saved


def _check_layer(device: str, dtype: torch.dtype, atol: float) -> None:
    """SparseMoE's triton path (router GEMV, route + record, align, GEMMs) against its torch path, as the engine calls
    it: with a batch whose KV pool has a routed-experts buffer."""
    from types import SimpleNamespace

    from inference_engine import ops
    from inference_engine.kernels import fused_moe as kernels
    from inference_engine.models.moe import SparseMoE
    from kiln_common.model_spec import ModelSpec
    from inference_engine.testing import tiny_config

    spec = ModelSpec.from_hf_config(tiny_config("qwen3_moe", 64, num_layers=2).to_dict())
    g = torch.Generator().manual_seed(2)
    with torch.device(device):
        layer = SparseMoE(spec, 1, None).to(dtype)
    for p in layer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)
    for tokens in (1, 7, 100):  # the last one in the LARGE tiles
        x = torch.randn(tokens, spec.hidden_size, generator=g).to(device=device, dtype=dtype)
        buffer = torch.zeros(128, 2, spec.num_experts_per_tok, dtype=torch.uint8, device=device)
        loc = torch.randperm(128, generator=g)[:tokens].to(device)
        fb = SimpleNamespace(kv_pool=SimpleNamespace(routed_experts=buffer), out_cache_loc=loc)
        got = layer(x, fb)
        logits = ops.linear(x, layer.gate.weight)  # the layer's own router product: the same logits
        weights, ids = route_reference(logits, spec.num_experts_per_tok, True, dtype)
        want = moe_reference(x, layer.experts.gate_up_proj, layer.experts.down_proj, weights, ids)
        torch.testing.assert_close(got, want, atol=atol, rtol=0.02 if dtype != torch.float32 else 0)
        assert torch.equal(buffer[loc, 1].long(), ids) and not buffer[loc, 0].any()
    assert kernels.default_config(100 * 2, 8) == kernels.LARGE and kernels.default_config(7 * 2, 8) == kernels.SMALL


def test_fused_moe_kernel_under_the_triton_interpreter():
    pytest.importorskip("triton")
    proc = run_under_triton_interpreter([__file__])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fused moe interpreter checks passed" in proc.stdout


@pytest.mark.gpu
def test_fused_moe_kernel_on_gpu_matches_reference():
    _check_kernels("cuda", torch.bfloat16, atol=2e-2)
    _check_kernels("cuda", torch.float32, atol=1e-5)
    _check_layer("cuda", torch.float32, atol=1e-5)  # float32: bf16 router logits could tie
    from inference_engine.kernels import fused_moe as kernels  # the Qwen3-30B-A3B layer shape, bf16

    for tokens in (1, 64, 300):
        args = _kernel_case(tokens, 128, 8, 2048, 768, torch.bfloat16, "cuda", seed=tokens)
        want = moe_reference(*[a.float() if a.is_floating_point() else a for a in args])
        torch.testing.assert_close(kernels.fused_moe(*args).float(), want, atol=3e-2, rtol=0.02)
    from inference_engine.ops import pdl  # programmatic dependent launch (sm90+) changes no bit

    logits = torch.randn(args[0].shape[0], 128, device="cuda", dtype=torch.bfloat16)
    saved, results = pdl.ENABLED, []
    try:
        for pdl.ENABLED in (False, True):
            weights, ids = kernels.route(logits, 8, True, torch.bfloat16)
            results.append((weights, ids, kernels.fused_moe(*args[:3], weights, ids)))
    finally:
        pdl.ENABLED = saved
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.fixture(scope="module")
def gpu_moe_model(tmp_path_factory, tokenizer_dir):
    """head_dim 128, as the GPU attention kernels are tested elsewhere."""
    return make_tiny_model(tmp_path_factory.mktemp("gpu_moe"), "qwen3_moe", seed=7, tokenizer_dir=tokenizer_dir,
                           hidden_size=512, num_heads=4, num_kv_heads=2, num_layers=3, mlp_only_layers=(1,),
                           moe_intermediate_size=128)


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_and_hf_routing(gpu_moe_model):
    model = hf_model(gpu_moe_model)
    sp = {**GREEDY, "return_routed_experts": True}
    common = dict(model_path=str(gpu_moe_model), device="cuda", attention_backend="triton", page_size=4, **ARGS)
    with Engine(disable_cuda_graph=True, **common) as eager:
        want = eager.generate(input_ids=PROMPTS, sampling_params=sp, return_logprob=True)
    with Engine(**common) as graphs:
        assert graphs.runner.graph_runner is not None
        got = graphs.generate(input_ids=PROMPTS, sampling_params=sp, return_logprob=True)
    for prompt, a, b in zip(PROMPTS, got, want):
        assert a["output_ids"] == b["output_ids"]
        lp_a = torch.tensor([lp for lp, _, _ in a["meta_info"]["output_token_logprobs"]])
        lp_b = torch.tensor([lp for lp, _, _ in b["meta_info"]["output_token_logprobs"]])
        assert torch.allclose(lp_a, lp_b, atol=1e-4)
        assert a["meta_info"]["routed_experts"] == b["meta_info"]["routed_experts"]
        assert_routing_matches(routed_experts.decode(a["meta_info"]["routed_experts"]), model,
                               prompt + a["output_ids"])


def test_benchmark_script_smoke_on_cpu(tmp_path):
    """benchmarks/moe_engine.py end to end on a tiny shape (what the GPU run does, minus the GPU-only rows)."""
    import json

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.moe_engine", "--smoke", "--out", str(tmp_path / "r.json")],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "r.json").read_text())
    assert {"decode batch 1 (16 in)", "decode batch 4 (16 in)", "offline 8 x (16 in, 8 out)"} <= set(rows)
    assert "experts/layer" in rows["decode batch 4 (16 in)"]


if __name__ == "__main__":  # the interpreter subprocess of test_fused_moe_kernel_under_the_triton_interpreter
    from inference_engine import ops

    assert ops.runs_triton("cpu"), "TRITON_INTERPRET=1 was not in effect"
    _check_kernels("cpu", torch.float32, atol=1e-5)
    _check_layer("cpu", torch.float32, atol=1e-5)
    print("fused moe interpreter checks passed")

"""FP8 KV cache (issue #22 item 3): e4m3 K/V with a float32 scale per (layer, kv head) derived from the weights.

References: float64 for the quantiser and the scale bounds; HF transformers with its keys and values fake-quantised
by the same scales (a custom attention function) for the engine's tokens and log-probs; the float32-KV engine for
the size of the drift; an engine without the radix cache for prefix-cache hits. The triton kernels (store, decode,
extend with an e4m3 cache) run under the triton interpreter in one subprocess.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from inference_engine import Engine
from inference_engine.config import EngineConfig
from inference_engine.kv_cache import (FP8_MAX, KVPool, dequantize_kv, kv_bytes_per_token, kv_slots_for_memory,
                                       quantize_kv)
from inference_engine.model_runner import ModelRunner
from weight_sync.fp8 import dequantize_weight, quantize_weight

PROMPTS = [[5, 17, 42, 99, 3, 7, 250, 11, 64], [8, 8, 300], list(range(1, 40))]
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
E4M3_SMALLEST_NORMAL = 2.0 ** -6


def _e4m3_error_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Half an e4m3 step at x: 2^-4 of |x| for normals (3 mantissa bits), 2^-10 * scale below 2^-6 * scale."""
    return torch.maximum(x.abs() * 2.0 ** -4, scale * 2.0 ** -10)


def test_kv_quantisation_round_trip_within_e4m3_bound():
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.01, 1.0, 37.5], dtype=torch.float32)  # [KVH]
    # values over 20 binades below each head's bound (448 * scale), both signs, and exact zeros
    mag = torch.exp2(torch.empty(500, 3, 64).uniform_(-20, 0, generator=gen)) * FP8_MAX * scale[:, None]
    x = (mag * torch.randn(500, 3, 64, generator=gen).sign()).float()
    x[0] = 0.0
    q = quantize_kv(x, 1.0 / scale)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    back = dequantize_kv(q, scale, torch.float64)
    x64, s64 = x.double(), scale.double()[:, None]
    err = (back - x64).abs()
    assert (err <= _e4m3_error_bound(x64, s64) * (1 + 1e-6)).all()
    assert err.max() > 0 and (back[0] == 0).all()
    normal = x64.abs() >= E4M3_SMALLEST_NORMAL * s64
    assert (err[normal] / x64.abs()[normal]).max() > 2.0 ** -5  # the bound is reached, not loose
    # beyond the bound: saturated at +-448 * scale, never inf / NaN
    big = torch.full((1, 3, 4), 1e6) * torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert torch.equal(dequantize_kv(quantize_kv(big, 1.0 / scale), scale),
                       (FP8_MAX * scale[:, None] * torch.tensor([1.0, -1.0, 1.0, -1.0]))[None])


def _hf_kv_bounds64(path: Path, fp8_block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale derivation of models/kv_scales.py redone in float64 from the HF checkpoint: (K, V) bounds [L, KVH]
    (of the projections' dequant(quant(w)) with fp8_block)."""
    cfg = json.loads((path / "config.json").read_text())
    sd = load_file(path / "model.safetensors")
    if fp8_block:
        sd = {k: dequantize_weight(*quantize_weight(v, fp8_block), fp8_block) if k.endswith("proj.weight") else v
              for k, v in sd.items()}
    sd = {k: v.double() for k, v in sd.items()}
    kvh, hidden = cfg["num_key_value_heads"], cfg["hidden_size"]
    d = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    k_bounds, v_bounds = [], []
    for layer in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        a = sd[pre + "input_layernorm.weight"]

        def proj(name: str) -> torch.Tensor:  # [KVH, D] element bounds
            c = (sd[pre + f"self_attn.{name}.weight"] * a).norm(dim=1) * math.sqrt(hidden)
            bias = sd.get(pre + f"self_attn.{name}.bias")
            return (c if bias is None else c + bias.abs()).view(kvh, d)

        if pre + "self_attn.k_norm.weight" in sd:
            k = sd[pre + "self_attn.k_norm.weight"].abs().max() * math.sqrt(d) * torch.ones(kvh, dtype=torch.float64)
        else:
            c = proj("k_proj")
            k = (c[:, :d // 2] ** 2 + c[:, d // 2:] ** 2).sqrt().amax(dim=1)
        k_bounds.append(k)
        v_bounds.append(proj("v_proj").amax(dim=1))
    return torch.stack(k_bounds), torch.stack(v_bounds)


def test_fp8_weights_and_fp8_kv_together(tiny_models):
    """With FP8 weights the scales come from the dequantised projections, and generation runs."""
    path = tiny_models["llama"]
    with Engine(model_path=str(path), max_total_tokens=512, context_length=128, weight_dtype="fp8",
                fp8_block_size=32, kv_cache_dtype="fp8_e4m3") as engine:
        pool = engine.runner.kv_pool
        out = engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
    k_bound, v_bound = _hf_kv_bounds64(path, fp8_block=32)
    assert torch.allclose(pool.k_scale.double(), k_bound / FP8_MAX, rtol=1e-5)
    assert torch.allclose(pool.v_scale.double(), v_bound / FP8_MAX, rtol=1e-5)
    assert len(out["output_ids"]) == GREEDY["max_new_tokens"]


def _capture_kv(model) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Hooks that record every layer's keys (after norm and RoPE) and values, {layer: [(k, v) [B, KVH, T, D]]}."""
    seen: dict[int, list] = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        seen.setdefault(module.layer_idx, []).append((key.detach().clone(), value.detach().clone()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("kiln_capture_kv", attention)
    model.config._attn_implementation = "kiln_capture_kv"
    return seen


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2"])
def test_kv_scales_bound_every_key_and_value(tiny_models, family):
    path = tiny_models[family]
    with Engine(model_path=str(path), max_total_tokens=256, context_length=128, kv_cache_dtype="fp8_e4m3") as engine:
        pool = engine.runner.kv_pool
        k_scale, v_scale = pool.k_scale.clone(), pool.v_scale.clone()
        assert torch.equal(pool.k_inv_scale, 1.0 / k_scale) and torch.equal(pool.v_inv_scale, 1.0 / v_scale)
    k_bound, v_bound = _hf_kv_bounds64(path)
    assert torch.allclose(k_scale.double(), k_bound / FP8_MAX, rtol=1e-5)
    assert torch.allclose(v_scale.double(), v_bound / FP8_MAX, rtol=1e-5)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    seen = _capture_kv(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (8, 64), generator=gen))
    for layer, [(k, v)] in seen.items():
        k_amax = k.abs().amax(dim=(0, 2, 3))  # [KVH]
        v_amax = v.abs().amax(dim=(0, 2, 3))
        assert (k_amax <= k_bound[layer]).all() and (v_amax <= v_bound[layer]).all()  # nothing saturates
        # and the bound is not so loose that the largest values leave e4m3's normal range (>= 2^-6 * scale)
        assert (k_amax / k_scale[layer].double() > 16).all() and (v_amax / v_scale[layer].double() > 16).all()


def _fake_quant_kv_hf(path: Path, pool: KVPool):
    """The HF model whose attention reads dequant(quant(k)) and dequant(quant(v)) with the engine's scales."""
    def attention(module, query, key, value, attention_mask, **kwargs):
        layer = module.layer_idx
        key = dequantize_kv(quantize_kv(key.transpose(1, 2), pool.k_inv_scale[layer]), pool.k_scale[layer])
        value = dequantize_kv(quantize_kv(value.transpose(1, 2), pool.v_inv_scale[layer]), pool.v_scale[layer])
        return sdpa_attention_forward(module, query, key.transpose(1, 2), value.transpose(1, 2), attention_mask,
                                      **kwargs)

    AttentionInterface.register("kiln_fp8_kv", attention)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="kiln_fp8_kv").eval()


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _teacher_forced(model, ids: list[int], targets: list[int]) -> torch.Tensor:
    """log p(targets) [n] of the model after ids (the targets appended)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + targets])).logits[0].float()
    return torch.log_softmax(logits, -1)[len(ids) - 1:-1].gather(-1, torch.tensor(targets)[:, None])[:, 0]


def _logprobs(out: dict) -> torch.Tensor:
    return torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])


@pytest.mark.parametrize("family,backend", [("qwen3", "torch"), ("llama", "triton"), ("qwen2", "torch"),
                                            ("qwen3_moe", "torch")])
def test_fp8_kv_engine_matches_hf_with_fake_quantised_kv(tiny_models, request, family, backend):
    """Greedy tokens equal HF's with its K/V fake-quantised by the same scales; log-probs within float32 noise; and
    the drift from the float32-KV engine is stated (mean |d log p| < 0.1 per token on these random models)."""
    path = tiny_models[family] if family in tiny_models else request.getfixturevalue("qwen3_moe_model")
    with Engine(model_path=str(path), max_total_tokens=2048, page_size=4, chunked_prefill_size=5,
                attention_backend=backend, kv_cache_dtype="fp8_e4m3") as engine:
        outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
        ref = _fake_quant_kv_hf(path, engine.runner.kv_pool)
    assert [o["output_ids"] for o in outs] == [_hf_greedy(ref, ids, GREEDY["max_new_tokens"]) for ids in PROMPTS]
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    drift = []
    for ids, out in zip(PROMPTS, outs):
        want = _teacher_forced(ref, ids, out["output_ids"])
        assert torch.allclose(_logprobs(out), want, atol=2e-3)
        drift.append((_teacher_forced(plain, ids, out["output_ids"]) - want).abs())
    drift = torch.cat(drift)
    assert 2e-3 < drift.max() and drift.mean() < 0.1  # e4m3 K/V move the log-probs more than float32 noise


def test_prefix_cache_hits_read_the_same_quantised_kv(qwen3_model):
    """A request whose prompt is found in the radix cache gets what it gets computed from scratch."""
    shared = list(range(3, 40))
    prompts = [shared + [7, 9], shared + [11], shared + [7, 9, 13, 2]]
    results = {}
    for radix in (True, False):
        with Engine(model_path=str(qwen3_model), max_total_tokens=2048, page_size=4,
                    disable_radix_cache=not radix, kv_cache_dtype="fp8_e4m3") as engine:
            first = engine.generate(input_ids=prompts[0], sampling_params=GREEDY, return_logprob=True)
            rest = engine.generate(input_ids=prompts[1:], sampling_params=GREEDY, return_logprob=True)
            results[radix] = [first] + rest
    assert all(o["meta_info"]["cached_tokens"] >= 36 for o in results[True][1:])  # the shared pages were hits
    assert all(o["meta_info"]["cached_tokens"] == 0 for o in results[False])
    for hit, fresh in zip(results[True], results[False]):
        assert hit["output_ids"] == fresh["output_ids"]
        assert torch.allclose(_logprobs(hit), _logprobs(fresh), atol=1e-5)


def test_tensor_parallel_ranks_scale_their_own_heads(tiny_models):
    """tp 2 (one kv head a rank, each rank's scales from its own k/v rows) answers as tp 1 does."""
    path = tiny_models["llama"]
    args = dict(max_total_tokens=1024, page_size=4, chunked_prefill_size=8, kv_cache_dtype="fp8_e4m3")
    with Engine(model_path=str(path), **args) as tp1:
        want = tp1.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
        scales = tp1.runner.kv_pool.k_scale.clone()
    with Engine(model_path=str(path), tp_size=2, **args) as tp2:
        got = tp2.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
        assert torch.equal(tp2.runner.kv_pool.k_scale, scales[:, :1])  # rank 0 holds kv head 0
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert all(torch.allclose(_logprobs(g), _logprobs(w), atol=1e-4) for g, w in zip(got, want))


def test_fp8_pool_holds_twice_the_tokens(qwen3_model, monkeypatch):
    shape = dict(num_layers=36, num_kv_heads=8, head_dim=128)  # the Qwen3-8B shape
    assert kv_bytes_per_token(**shape, dtype=torch.float8_e4m3fn) * 2 == kv_bytes_per_token(**shape,
                                                                                           dtype=torch.bfloat16)
    free = 60 * 2**30
    bf16 = kv_slots_for_memory(free, 0.85, **shape, dtype=torch.bfloat16)
    fp8 = kv_slots_for_memory(free, 0.85, **shape, dtype=torch.float8_e4m3fn)
    assert bf16 == int(free * 0.85) // (2 * 36 * 8 * 128 * 2) == 371_370 and fp8 in (2 * bf16, 2 * bf16 + 1)
    # the runner sizes a GPU pool from free memory with the cache's element size (no GPU needed to check)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 * 2**30))
    spec = SimpleNamespace(num_layers=36, head_dim=128)
    for dtype, want in ((torch.bfloat16, bf16), (torch.float8_e4m3fn, fp8)):
        runner = SimpleNamespace(config=SimpleNamespace(max_total_tokens=None, mem_fraction_static=0.85),
                                 device=torch.device("cuda"), spec=spec, kv_dtype=dtype)
        assert ModelRunner._kv_slots(runner, 8) == want
    pools = {}
    for kv in ("auto", "fp8_e4m3"):
        with Engine(model_path=str(qwen3_model), dtype="bfloat16", max_total_tokens=512, context_length=256,
                    kv_cache_dtype=kv) as e:
            pool = e.runner.kv_pool
            pools[kv] = (pool.capacity, pool.bytes, pool.k_buffer[0].dtype)
    assert pools["auto"][0] == pools["fp8_e4m3"][0] and pools["auto"][1] == 2 * pools["fp8_e4m3"][1]
    assert pools["auto"][2] == torch.bfloat16 and pools["fp8_e4m3"][2] == torch.float8_e4m3fn


def test_weight_update_recomputes_the_scales(qwen3_model, tmp_path):
    """After an update that triples layer 0's v_proj, the engine answers as one started on those weights."""
    folder = tmp_path / "updated"
    shutil.copytree(qwen3_model, folder)
    weights = load_file(folder / "model.safetensors")
    name = "model.layers.0.self_attn.v_proj.weight"
    weights[name] = weights[name] * 3
    save_file(weights, folder / "model.safetensors")
    with Engine(model_path=str(qwen3_model), max_total_tokens=1024, kv_cache_dtype="fp8_e4m3") as engine:
        before = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
        v_before, k_before = engine.runner.kv_pool.v_scale.clone(), engine.runner.kv_pool.k_scale.clone()
        engine.update_weights_from_tensor([(name, weights[name])], weight_version=1)
        pool = engine.runner.kv_pool
        assert torch.allclose(pool.v_scale[0], 3 * v_before[0], rtol=1e-6)
        assert torch.equal(pool.v_scale[1:], v_before[1:]) and torch.equal(pool.k_scale, k_before)
        after = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
    with Engine(model_path=str(folder), max_total_tokens=1024, kv_cache_dtype="fp8_e4m3") as fresh:
        want = fresh.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
        assert torch.equal(fresh.runner.kv_pool.v_scale, pool.v_scale)
    assert [o["output_ids"] for o in after] == [o["output_ids"] for o in want]
    assert all(torch.equal(_logprobs(a), _logprobs(w)) for a, w in zip(after, want))
    assert [o["output_ids"] for o in after] != [o["output_ids"] for o in before]


def test_fp8_kv_config_errors(qwen3_model, monkeypatch):
    from inference_engine.attention import register_backend
    from inference_engine.attention import _BACKENDS

    with pytest.raises(ValueError, match=r"kv_cache_dtype 'fp8_e5m2' is not supported; expected one of "
                                         r"\('auto', 'fp8_e4m3'\)"):
        EngineConfig(model_path=str(qwen3_model), kv_cache_dtype="fp8_e5m2")
    register_backend("no_fp8", "inference_engine.attention.base:AttentionBackend")
    try:
        with pytest.raises(ValueError, match="attention_backend 'no_fp8' cannot read an fp8 KV cache"):
            EngineConfig(model_path=str(qwen3_model), attention_backend="no_fp8", kv_cache_dtype="fp8_e4m3")
    finally:
        del _BACKENDS["no_fp8"]
    # a GPU without e4m3 conversion (sm_80) is refused when the engine starts (no GPU needed to check the rule)
    from inference_engine import model_runner

    monkeypatch.setattr(model_runner.ops, "runs_triton", lambda device: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8_e4m3' needs a CUDA GPU of compute capability 8.9"):
        model_runner.check_fp8_kv_device(torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    model_runner.check_fp8_kv_device(torch.device("cuda:0"))
    model_runner.check_fp8_kv_device(torch.device("cpu"))
    assert EngineConfig(model_path=str(qwen3_model), kv_cache_dtype="fp8_e4m3").kv_torch_dtype == torch.float8_e4m3fn
    assert EngineConfig(model_path=str(qwen3_model), dtype="bfloat16").kv_torch_dtype == torch.bfloat16


def test_kv_cache_dtype_flag_reaches_the_engine_and_a_bad_value_is_one_line(qwen3_model, capsys):
    from orchestrator.driver import main, parse_args
    from inference_engine.serve import _configs_or_exit

    base = ["--hf-checkpoint", str(qwen3_model), "--prompt-data", "x.jsonl"]
    assert parse_args(base + ["--kv-cache-dtype", "fp8_e4m3"]).engine.kv_cache_dtype == "fp8_e4m3"
    assert parse_args(base).engine.kv_cache_dtype == "auto"
    assert parse_args(base + ["--sglang-kv-cache-dtype", "fp8_e4m3"]).engine.kv_cache_dtype == "fp8_e4m3"  # slime's
    with pytest.raises(SystemExit) as exit_:
        main(base + ["--kv-cache-dtype", "fp8"])
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and err == [
        "train.py: error: kv_cache_dtype 'fp8' is not supported; expected one of ('auto', 'fp8_e4m3')"]
    engine_config, _, _ = _configs_or_exit(["--model-path", str(qwen3_model), "--kv-cache-dtype", "fp8_e4m3"])
    assert engine_config.kv_cache_dtype == "fp8_e4m3"


def test_flashinfer_fold_of_per_head_scales_into_q_and_output():
    """flashinfer takes one k / v scale per call: the backend multiplies each query head by its kv head's K scale and
    each output head by its V scale around a kernel that reads the raw e4m3 values. Checked with a stand-in kernel
    (the torch reference over the undequantised cache) against attention over the dequantised cache."""
    from inference_engine.attention.flashinfer_backend import FlashInferAttentionBackend, FlashInferMetadata
    from inference_engine.kernels import attention_reference

    case = _kernel_cases()
    heads, kvh, d, page = 4, 2, 16, 1
    qo, kv_indptr, kv_indices = case["extend_qo"], case["extend_indptr"], case["kv_indices"]

    class RawKernel:  # flashinfer with k_scale = v_scale = None: attention over the e4m3 values as they are
        def run(self, q, paged):
            k, v = (t.view(-1, kvh, d).float() for t in paged)
            return attention_reference(q.float(), k, v, qo, kv_indptr, kv_indices, 0.3).to(q.dtype)

    backend = object.__new__(FlashInferAttentionBackend)
    backend.num_heads, backend.num_kv_heads, backend.head_dim, backend.page_size = heads, kvh, d, page
    pool = SimpleNamespace(k_buffer=[case["k"]], v_buffer=[case["v"]],
                           layer_scales=lambda layer: (case["k_scale"], case["v_scale"]))
    fb = SimpleNamespace(kv_pool=pool, attn_metadata=FlashInferMetadata("paged", RawKernel()))
    q = case["q_extend"]
    got = backend.forward(q, None, None, SimpleNamespace(layer_id=0), fb)
    want = attention_reference(q, dequantize_kv(case["k"], case["k_scale"]), dequantize_kv(case["v"], case["v_scale"]),
                               qo, kv_indptr, kv_indices, 0.3)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_decode_tensor_cores_follow_the_kv_cache_unless_set(qwen3_model):
    """flashinfer's decode on tensor cores: on by default with an e4m3 cache only; on / off override; the choice
    reaches the attention backend the engine builds."""
    def use(**kwargs) -> bool:
        return EngineConfig(model_path=str(qwen3_model), **kwargs).use_decode_tensor_cores

    assert not use() and use(kv_cache_dtype="fp8_e4m3")
    assert use(decode_tensor_cores="on") and not use(kv_cache_dtype="fp8_e4m3", decode_tensor_cores="off")
    with pytest.raises(ValueError, match="decode_tensor_cores 'yes' is unknown; expected auto, on or off"):
        EngineConfig(model_path=str(qwen3_model), decode_tensor_cores="yes")
    with Engine(model_path=str(qwen3_model), max_total_tokens=256, context_length=64,
                kv_cache_dtype="fp8_e4m3") as engine:
        assert engine.runner.attn_backend.decode_tensor_cores is True


def test_per_kv_head_scaling_is_the_float32_product_rounded_once():
    """The one-kernel scaling of q and of the output equals multiplying in float32 by each query head's kv-head scale
    (query head h belongs to kv head h // group) and rounding to bf16 once, bit for bit, also on a strided q."""
    from inference_engine.attention.flashinfer_backend import scale_by_kv_head

    gen = torch.Generator().manual_seed(3)
    qkv = (torch.randn(7, 8 + 2 + 2, 32, generator=gen) * 4).to(torch.bfloat16)   # [T, H + 2 KVH, D]
    q = qkv[:, :8]   # a strided view, as the fused qkv output gives
    kv_scale = torch.rand(2, generator=gen) * 0.05 + 1e-3
    want = (q.float() * kv_scale.repeat_interleave(4)[None, :, None]).to(torch.bfloat16)
    got = scale_by_kv_head(q, kv_scale)
    assert got.shape == q.shape and torch.equal(got, want)


# ---------------------------------------------------------------- triton kernels under the interpreter

def _kernel_cases() -> dict:
    """A paged e4m3 cache with per-head scales, q for a decode and an extend batch, and a store."""
    gen = torch.Generator().manual_seed(3)
    heads, kvh, d, slots = 4, 2, 16, 64
    scale = torch.tensor([0.02, 0.5])
    k = quantize_kv(torch.randn(slots, kvh, d, generator=gen) * 448 * scale[:, None] / 4, 1.0 / scale)
    v = quantize_kv(torch.randn(slots, kvh, d, generator=gen) * 448 * scale[:, None] / 4, 1.0 / scale.flip(0))
    kv_indices = torch.randperm(slots - 1, generator=gen)[:40] + 1
    return dict(
        q_decode=torch.randn(3, heads, d, generator=gen), q_extend=torch.randn(9, heads, d, generator=gen),
        k=k, v=v, k_scale=scale, v_scale=scale.flip(0).contiguous(), kv_indices=kv_indices,
        decode_indptr=torch.tensor([0, 5, 22, 40]), extend_indptr=torch.tensor([0, 7, 30, 40]),
        extend_qo=torch.tensor([0, 3, 4, 9]),
        qkv=torch.randn(6, (heads + 2 * kvh) * d, generator=gen), positions=torch.arange(6) * 3,
        loc=torch.tensor([9, 2, 33, 4, 17, 60]), norm_q=1 + 0.1 * torch.randn(d, generator=gen),
        norm_k=1 + 0.1 * torch.randn(d, generator=gen))


def _run_kernels(c: dict) -> dict:
    """Decode, extend and the fused store on case c (triton under the interpreter, or the torch references)."""
    from inference_engine import ops
    from inference_engine.kernels import decode_attention, extend_attention
    from inference_engine.models.layers import RotaryEmbedding

    scales = (c["k_scale"], c["v_scale"])
    out = {"decode": decode_attention(c["q_decode"], c["k"], c["v"], c["decode_indptr"], c["kv_indices"], 0.3,
                                      num_kv_splits=3, kv_scale=scales),
           "extend": extend_attention(c["q_extend"], c["k"], c["v"], c["extend_qo"], c["extend_indptr"],
                                      c["kv_indices"], 0.3, kv_scale=scales)}
    rotary = RotaryEmbedding(16, 256, 10000.0)
    k_buf, v_buf = torch.zeros_like(c["k"]), torch.zeros_like(c["v"])
    ops.qk_norm_rope(c["qkv"], c["positions"], rotary.cos, rotary.sin, 4, 2, 16, c["norm_q"], c["norm_k"],
                     kv_cache=(k_buf, v_buf, c["loc"]), kv_inv_scale=(1.0 / c["k_scale"], 1.0 / c["v_scale"]))
    out["k_store"], out["v_store"] = k_buf[c["loc"]].float(), v_buf[c["loc"]].float()
    return out


def _interpreter_worker(inputs: str, outputs: str) -> None:
    from inference_engine import ops

    assert ops.runs_triton("cpu"), "TRITON_INTERPRET=1 was not in effect"
    torch.save(_run_kernels(torch.load(inputs)), outputs)


def test_triton_kernels_read_and_write_the_fp8_cache_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    case = _kernel_cases()
    torch.save(case, tmp_path / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], env=env,
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = torch.load(tmp_path / "out.pt"), _run_kernels(case)  # want: the torch references
    assert torch.allclose(got["decode"], want["decode"], atol=1e-4, rtol=1e-4)
    assert torch.allclose(got["extend"], want["extend"], atol=1e-4, rtol=1e-4)
    for name in ("k_store", "v_store"):
        # the interpreter's own float32 -> e4m3 conversion (numpy) is not the GPU's: it may land one step off, and
        # where rounding up carries into the exponent it drops the carry (2.0 -> 1.0); both allowed, nothing else
        g, w = got[name], want[name]
        step = torch.maximum(w.abs() * 2.0 ** -3, torch.tensor(2.0 ** -9))
        carry_dropped = (torch.frexp(w.abs())[0] == 0.5) & (g == w / 2)
        assert (((g - w).abs() <= step) | carry_dropped).all() and (g == w).float().mean() > 0.9


if __name__ == "__main__":
    _interpreter_worker(sys.argv[1], sys.argv[2])

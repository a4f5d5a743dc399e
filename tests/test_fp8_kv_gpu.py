"""FP8 KV cache on the GPU (issue #22 item 3): the store kernel, the triton kernels and flashinfer with an e4m3 cache,
fp8-KV decode against bf16-KV, CUDA-graph decode against eager, prefix-cache hits, and the pool's capacity.

Tolerances: the store is bit-identical to the torch definition (kv_cache.quantize_kv). The kernels read e4m3
exactly and sum in float32 like the dequantised float32 reference, then round to bf16: one bf16 rounding
(2^-8 relative) plus float32 noise. Engine log-probs: e4m3 K/V move this model's log-probs by about 0.03 a token
on average, 0.12 at most (the float32 CPU engine, fp8 vs float32 KV, on the same model); bf16 activations add
their own rounding, so fp8 vs bf16 KV must stay within mean 0.08 and max 0.5.
"""

import gc

import pytest
import torch

from inference_engine import Engine, ops
from inference_engine.kernels import attention_reference, decode_attention, extend_attention
from inference_engine.kv_cache import dequantize_kv, quantize_kv
from inference_engine.models.layers import RotaryEmbedding
from inference_engine.ops import reference
from inference_engine.testing import make_tiny_model

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 17, 42, 99, 3, 7, 250, 11, 64], [8, 8, 300], list(range(1, 40))]
GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
# (attention_backend, decode_attention): triton; flashinfer with its own decode; flashinfer with the triton decode
BACKENDS = [("triton", "auto"), ("flashinfer", "flashinfer"), ("flashinfer", "triton")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A Qwen3 (q/k norm, head_dim 128) and a Llama (no q/k norm, head_dim 64), small and random."""
    root = tmp_path_factory.mktemp("fp8_kv_gpu")
    return {"qwen3": make_tiny_model(root / "qwen3", "qwen3", hidden_size=256, num_heads=2, num_kv_heads=1,
                                     intermediate_size=512, tie_word_embeddings=False, init_std=0.05),
            "llama": make_tiny_model(root / "llama", "llama", hidden_size=256, num_heads=4, num_kv_heads=2,
                                     intermediate_size=512, init_std=0.05)}


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.float(), want.float()
    bound = 2.0 ** -7 * want.abs() + 2e-3 * want.abs().max()
    bad = (got - want).abs() > bound
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} outside; worst {((got - want).abs() - bound).max()}"


def test_store_kernel_quantises_exactly_as_the_torch_definition():
    """The fused q/k-norm + RoPE kernel stores e4m3(clamp(x * inv_scale)) of the k and v it returns, bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    heads, kvh, d, tokens = 8, 2, 128, 37
    qkv = (torch.randn(tokens, (heads + 2 * kvh) * d, device="cuda", generator=gen) * 3).bfloat16()
    qkv[0, -d:] = 1e4  # a value beyond 448 * scale: saturates
    positions = torch.randint(0, 4000, (tokens,), device="cuda", generator=gen)
    rotary = RotaryEmbedding(d, 4096, 1e6).to("cuda")
    norms = [1 + 0.1 * torch.randn(d, device="cuda", generator=gen).bfloat16() for _ in range(2)]
    inv = (1.0 / torch.tensor([0.01, 0.02], device="cuda"), 1.0 / torch.tensor([0.003, 0.05], device="cuda"))
    loc = torch.randperm(200, device="cuda", generator=gen)[:tokens]
    k_buf = torch.zeros(200, kvh, d, dtype=torch.float8_e4m3fn, device="cuda")
    v_buf = torch.zeros_like(k_buf)
    assert ops.runs_triton("cuda")
    _, k, v = ops.qk_norm_rope(qkv, positions, rotary.cos, rotary.sin, heads, kvh, d, *norms, 1e-6,
                               kv_cache=(k_buf, v_buf, loc), kv_inv_scale=inv)
    assert torch.equal(k_buf[loc].view(torch.uint8), quantize_kv(k, inv[0]).view(torch.uint8))
    assert torch.equal(v_buf[loc].view(torch.uint8), quantize_kv(v, inv[1]).view(torch.uint8))
    assert v_buf[loc[0], 1].float().abs().max() == 448  # saturated, not inf / NaN
    _, k_ref, _ = reference.qk_norm_rope(qkv, positions, rotary.cos, rotary.sin, heads, kvh, d, *norms, 1e-6)
    assert (k - k_ref).abs().max() <= 2.0 ** -7 * k_ref.abs().max()  # the k it stores is the torch op's k


@pytest.mark.parametrize("kind", ["decode", "extend"])
def test_triton_kernels_read_the_fp8_cache(kind):
    gen = torch.Generator(device="cuda").manual_seed(1)
    heads, kvh, d, slots = 32, 8, 128, 4096
    k_scale = torch.rand(kvh, device="cuda", generator=gen) * 0.05 + 0.005
    v_scale = torch.rand(kvh, device="cuda", generator=gen) * 0.05 + 0.005
    k = quantize_kv(torch.randn(slots, kvh, d, device="cuda", generator=gen) * 40 * k_scale[:, None], 1 / k_scale)
    v = quantize_kv(torch.randn(slots, kvh, d, device="cuda", generator=gen) * 40 * v_scale[:, None], 1 / v_scale)
    lens = [1, 77, 600, 1500]
    kv_indptr = torch.tensor([0] + lens, device="cuda").cumsum(0)
    kv_indices = torch.randperm(slots - 1, device="cuda", generator=gen)[:sum(lens)] + 1
    q_lens = [1] * 4 if kind == "decode" else [1, 20, 200, 33]
    qo_indptr = torch.tensor([0] + q_lens, device="cuda").cumsum(0)
    q = torch.randn(sum(q_lens), heads, d, device="cuda", generator=gen).bfloat16()
    scales = (k_scale, v_scale)
    if kind == "decode":
        got = decode_attention(q, k, v, kv_indptr, kv_indices, 0.088, kv_scale=scales)
    else:
        got = extend_attention(q, k, v, qo_indptr, kv_indptr, kv_indices, 0.088, kv_scale=scales)
    want = attention_reference(q.float(), dequantize_kv(k, k_scale), dequantize_kv(v, v_scale), qo_indptr, kv_indptr,
                               kv_indices, 0.088)
    _close(got, want)


def _engine(path, backend: str, decode: str, kv: str, graphs: bool = True, **kw) -> Engine:
    return Engine(model_path=str(path), device="cuda", dtype="bfloat16", attention_backend=backend,
                  decode_attention=decode, page_size=16, max_total_tokens=kw.pop("max_total_tokens", 4096),
                  context_length=256, cuda_graph_max_bs=8, disable_cuda_graph=not graphs, kv_cache_dtype=kv, **kw)


def _logprobs(out: dict, key: str = "output_token_logprobs", start: int = 0) -> torch.Tensor:
    return torch.tensor([lp for lp, _, _ in out["meta_info"][key][start:]])


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("backend,decode", BACKENDS)
def test_fp8_kv_decode_within_tolerance_of_bf16_kv(models, family, backend, decode):
    """Tokens decoded with an fp8 cache, scored teacher-forced by the same engine build with a bf16 cache."""
    with _engine(models[family], backend, decode, "fp8_e4m3") as engine:
        outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
    seqs = [p + o["output_ids"] for p, o in zip(PROMPTS, outs)]
    with _engine(models[family], backend, decode, "auto") as engine:
        refs = engine.generate(input_ids=seqs, sampling_params={"max_new_tokens": 1, "return_prompt_logprobs": True},
                               return_logprob=True)
    diff = torch.cat([_logprobs(o) - _logprobs(r, "input_token_logprobs", len(p))
                      for p, o, r in zip(PROMPTS, outs, refs)]).abs()
    assert diff.mean() < 0.08 and diff.max() < 0.5, (diff.mean(), diff.max())


@pytest.mark.parametrize("backend,decode", BACKENDS)
def test_fp8_kv_graph_decode_equals_eager(models, backend, decode):
    outs = {}
    for graphs in (False, True):
        with _engine(models["qwen3"], backend, decode, "fp8_e4m3", graphs=graphs) as engine:
            assert (engine.runner.graph_runner is not None) == graphs
            single = engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY, return_logprob=True)
            batch = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
            outs[graphs] = [single] + batch
    for eager, graph in zip(outs[False], outs[True]):
        assert graph["output_ids"] == eager["output_ids"]
        assert torch.allclose(_logprobs(graph), _logprobs(eager), atol=2e-3)


@pytest.mark.parametrize("backend,decode", BACKENDS[:2])
def test_fp8_kv_prefix_cache_hits_on_gpu(models, backend, decode):
    """Requests whose prompt pages come from the radix cache answer as when computed from scratch."""
    shared = list(range(3, 60))
    prompts = [shared + [7, 9], shared + [11], shared + [7, 9, 13, 2]]
    results = {}
    for radix in (True, False):
        with _engine(models["llama"], backend, decode, "fp8_e4m3", disable_radix_cache=not radix) as engine:
            first = engine.generate(input_ids=prompts[0], sampling_params=GREEDY, return_logprob=True)
            results[radix] = [first] + engine.generate(input_ids=prompts[1:], sampling_params=GREEDY,
                                                       return_logprob=True)
    assert all(o["meta_info"]["cached_tokens"] >= 48 for o in results[True][1:])
    for hit, fresh in zip(results[True], results[False]):
        assert hit["output_ids"] == fresh["output_ids"]
        assert torch.allclose(_logprobs(hit), _logprobs(fresh), atol=2e-2)  # other bf16 tilings of the same values


def test_fp8_kv_engine_agrees_with_the_cpu_reference_engine(models):
    """Teacher-forced: the GPU fp8-KV engine (bf16 activations) vs the CPU fp8-KV reference (float32), same scales."""
    prompt = PROMPTS[0]
    with _engine(models["qwen3"], "flashinfer", "auto", "fp8_e4m3") as gpu:
        out = gpu.generate(input_ids=prompt, sampling_params=GREEDY, return_logprob=True)
        gpu_scales = gpu.runner.kv_pool.k_scale.cpu(), gpu.runner.kv_pool.v_scale.cpu()
    with Engine(model_path=str(models["qwen3"]), max_total_tokens=2048, context_length=256,
                kv_cache_dtype="fp8_e4m3") as cpu:
        ref = cpu.generate(input_ids=prompt + out["output_ids"],
                           sampling_params={"max_new_tokens": 1, "return_prompt_logprobs": True}, return_logprob=True)
        cpu_scales = cpu.runner.kv_pool.k_scale, cpu.runner.kv_pool.v_scale
    for g, c in zip(gpu_scales, cpu_scales):  # bf16 weights on the GPU, float32 on the CPU: scales within bf16
        assert torch.allclose(g, c, rtol=2.0 ** -7)
    diff = (_logprobs(out) - _logprobs(ref, "input_token_logprobs", len(prompt))).abs()
    assert diff.mean() < 0.05


def _pool_capacity(path, kv: str) -> int:
    """Tokens of the KV pool an engine sizes from free memory (mem_fraction_static), not from max_total_tokens."""
    with Engine(model_path=str(path), device="cuda", dtype="bfloat16", context_length=256, mem_fraction_static=0.2,
                disable_cuda_graph=True, kv_cache_dtype=kv) as engine:
        return engine.runner.kv_pool.capacity


def test_fp8_pool_holds_about_twice_the_tokens(models):
    capacity = {}
    for kv in ("auto", "fp8_e4m3"):
        capacity[kv] = _pool_capacity(models["llama"], kv)
        gc.collect()  # the engine and its pool gone before the next one measures free memory
        torch.cuda.empty_cache()
    assert 1.9 < capacity["fp8_e4m3"] / capacity["auto"] < 2.1, capacity

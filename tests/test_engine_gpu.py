"""Attention backends and GPU engine paths against the torch backend.

CPU: the triton backend (kernels' torch reference), flashinfer's page-table construction, and the flashinfer
backend's triton decode path (its flashinfer parts stood in for).
GPU (`pytest -m gpu`): triton, flashinfer and flashinfer with triton decode ("hybrid") vs torch in
bfloat16 (greedy tokens equal on a short horizon, log-probs within 2e-2), CUDA-graph decode vs eager,
release -> resume memory.
"""

import weakref

import pytest
import torch

from inference_engine import Engine
from inference_engine.attention.base import AttentionBackend
from inference_engine.attention.flashinfer_backend import FlashInferAttentionBackend, page_table
from inference_engine.attention.triton_backend import triton_metadata
from inference_engine.cuda_graph import CudaGraphRunner
from inference_engine.forward_batch import ForwardBatch
from inference_engine.ops import pdl
from inference_engine.testing import make_tiny_model

PROMPTS = [[5, 17, 42, 99, 3, 7, 250, 11, 64, 9, 12], [8, 8, 300], list(range(1, 40)), [77] * 20]
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
RUN_PROMPTS = PROMPTS + [p + [1, 2, 3] for p in PROMPTS]  # what `_run` generates from, in its order


def _run(model_path, prompts=PROMPTS, sampling_params=GREEDY, **options):
    with Engine(model_path=str(model_path), max_total_tokens=4096, context_length=512, **options) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=sampling_params, return_logprob=True)
        shared = engine.generate(input_ids=[p + [1, 2, 3] for p in prompts], sampling_params=sampling_params,
                                 return_logprob=True)  # prefix-cached extends
    return outs + shared


def _assert_close(outs, ref, atol):
    for o, r in zip(outs, ref):
        assert o["output_ids"] == r["output_ids"]
        lp_o = [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]
        lp_r = [lp for lp, _, _ in r["meta_info"]["output_token_logprobs"]]
        assert lp_o == pytest.approx(lp_r, abs=atol)


@pytest.mark.parametrize("page_size", [1, 4])
def test_triton_backend_matches_torch_on_cpu(tiny_model, page_size):
    ref = _run(tiny_model, attention_backend="torch", page_size=page_size)
    outs = _run(tiny_model, attention_backend="triton", page_size=page_size)
    assert any(o["meta_info"]["cached_tokens"] > 0 for o in outs)
    _assert_close(outs, ref, 1e-4)


class _TritonOnlyFlashInfer(FlashInferAttentionBackend):
    """The flashinfer backend without flashinfer (CPU): every batch must take the triton path, prefill included."""

    def __init__(self, *args, **kwargs):
        AttentionBackend.__init__(self, *args, **kwargs)  # skips the CUDA / flashinfer checks and wrappers

    def init_forward_metadata(self, fb):
        if fb.is_decode:
            assert self.decodes_with_triton(fb.batch_size)
            return super().init_forward_metadata(fb)
        fb.attn_metadata = triton_metadata(fb, self.num_kv_heads, self.device)  # flashinfer's prefill, stood in for

    def init_cuda_graph_state(self, max_bs, max_context):
        pass


@pytest.mark.parametrize("graphs", [False, True])
def test_flashinfer_backend_triton_decode_on_cpu(qwen3_model, graphs):
    """The flashinfer backend's triton decode path (eager, and in a graph runner replayed on CPU) equals torch's."""
    def run(hybrid: bool):
        with Engine(model_path=str(qwen3_model), page_size=4, max_total_tokens=1024, context_length=128) as engine:
            runner = engine.runner
            if hybrid:
                torch_backend = runner.attn_backend
                runner.attn_backend = _TritonOnlyFlashInfer(
                    torch_backend.num_heads, torch_backend.num_kv_heads, torch_backend.head_dim, runner.device,
                    page_size=4, dtype=runner.dtype, triton_decode_max_bs=4)
                if graphs:
                    runner.graph_runner = CudaGraphRunner(runner.model, runner.attn_backend, runner.kv_pool, 4,
                                                          runner.context_length, runner.device)
            return engine.generate(input_ids=PROMPTS[:3], sampling_params=GREEDY, return_logprob=True)

    _assert_close(run(hybrid=True), run(hybrid=False), 1e-4)


def test_page_table_matches_python_reference():
    page = 4
    seq_lens = [1, 4, 5, 11]
    slot_lists = [[8], [12, 13, 14, 15], [20, 21, 22, 23, 4], [40, 41, 42, 43, 28, 29, 30, 31, 16, 17, 18]]
    kv_indices = torch.tensor([s for slots in slot_lists for s in slots])
    kv_indptr = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()])
    fb = ForwardBatch(input_ids=torch.zeros(4, dtype=torch.int64), positions=torch.zeros(4, dtype=torch.int64),
                      out_cache_loc=torch.zeros(4, dtype=torch.int64), qo_indptr=torch.arange(5),
                      kv_indptr=kv_indptr, kv_indices=kv_indices, seq_lens=torch.tensor(seq_lens),
                      seq_lens_cpu=torch.tensor(seq_lens), extend_lens=[1] * 4, kv_pool=None, attn_backend=None)
    pages = page_table(fb, page)
    assert pages.indptr.tolist() == [0, 1, 2, 4, 7]
    assert pages.indices.tolist() == [2, 3, 5, 1, 10, 7, 4]
    assert pages.last_page_len.tolist() == [1, 4, 1, 3]
    assert pages.indices.dtype == pages.indptr.dtype == torch.int32


@pytest.fixture(scope="module")
def gpu_models(tmp_path_factory, tokenizer_dir):
    """Head dim 128 (what flashinfer's kernels are built for): Qwen3 (q/k norm, tied) and Llama.

    init_std 0.02 (HF's default, not testing's 0.1) keeps attention and logits soft, so the kernels'
    bf16 rounding of attention probabilities moves log-probs by less than the 2e-2 tolerance."""
    shape = dict(hidden_size=512, num_heads=4, num_kv_heads=2, intermediate_size=1024, num_layers=2)
    return {family: make_tiny_model(tmp_path_factory.mktemp(f"gpu_{family}"), family, seed=7, init_std=0.02,
                                    tokenizer_dir=tokenizer_dir, **shape) for family in ("qwen3", "llama")}


GPU = dict(device="cuda", dtype="bfloat16")


def _teacher_forced(model_path, outs, prompts=RUN_PROMPTS, **options):
    """Log-probs the engine gives each of outs when fed prompt + output as a prompt (no divergence after a near-tie)."""
    seqs = [p + o["output_ids"] for p, o in zip(prompts, outs)]
    sp = {"temperature": 0, "max_new_tokens": 1, "return_prompt_logprobs": True}
    with Engine(model_path=str(model_path), max_total_tokens=4096, context_length=512, **options) as engine:
        scored = engine.generate(input_ids=seqs, sampling_params=sp, return_logprob=True)
    return [[lp for lp, _, _ in s["meta_info"]["input_token_logprobs"][len(p):]] for s, p in zip(scored, prompts)]


# attention paths by name: the flashinfer backend with its decode batches in Kiln's triton split-KV kernel is "hybrid"
BACKENDS = {"triton": dict(attention_backend="triton"),
            "flashinfer": dict(attention_backend="flashinfer", decode_attention="flashinfer"),
            "hybrid": dict(attention_backend="flashinfer", decode_attention="triton")}


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("backend, graphs", [("triton", False), ("flashinfer", False), ("hybrid", False),
                                             ("hybrid", True)])
@pytest.mark.parametrize("page_size", [1, 16])
def test_backend_matches_torch_on_gpu(gpu_models, family, backend, graphs, page_size):
    """First greedy token equal; each generated token's log-prob within 2e-2 of the torch backend's on the same context.

    The fused kernels round attention probabilities to bf16 before P @ V, the torch backend does not:
    on these random models that moves log-probs by up to ~0.03 over 8 free-running tokens and can flip
    a near-tied greedy choice, so later tokens are compared teacher-forced. graphs: the backend's decode
    steps replay CUDA graphs (the torch reference runs eagerly).
    """
    options = dict(page_size=page_size, **GPU)
    ref = _run(gpu_models[family], attention_backend="torch", disable_cuda_graph=True, **options)
    outs = _run(gpu_models[family], disable_cuda_graph=not graphs, cuda_graph_max_bs=8, **BACKENDS[backend],
                **options)
    assert [o["output_ids"][0] for o in outs] == [r["output_ids"][0] for r in ref]
    forced = _teacher_forced(gpu_models[family], outs, attention_backend="torch", disable_cuda_graph=True, **options)
    for o, f in zip(outs, forced):
        assert [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] == pytest.approx(f, abs=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_float32_triton_backend_matches_torch_on_gpu(gpu_models, graphs):
    """A float32 engine (small models, e.g. the medical example's) on the triton backend: its kernels take tl.dot's
    ieee precision, so greedy tokens equal the torch backend's and log-probs agree to 1e-3 (float32 order only)."""
    options = dict(device="cuda", dtype="float32", page_size=16)
    ref = _run(gpu_models["qwen3"], attention_backend="torch", disable_cuda_graph=True, **options)
    outs = _run(gpu_models["qwen3"], attention_backend="triton", disable_cuda_graph=not graphs, cuda_graph_max_bs=8,
                **options)
    _assert_close(outs, ref, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "flashinfer", "hybrid"])
def test_cuda_graph_decode_matches_eager(gpu_models, backend):
    options = dict(BACKENDS.get(backend, dict(attention_backend=backend)), page_size=16, cuda_graph_max_bs=8, **GPU)
    eager = _run(gpu_models["qwen3"], disable_cuda_graph=True, **options)
    graphed = _run(gpu_models["qwen3"], **options)
    _assert_close(graphed, eager, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_pdl_launches_give_identical_outputs(gpu_models, monkeypatch, graphs):
    """Programmatic dependent launch (ops/pdl.py) changes when kernels start, not what they compute.

    Batch 4 (rms norm, q/k norm + RoPE + KV write, triton split-KV decode and merge between cuBLAS GEMMs) and
    batch 1 (every linear in the GEMV, the fused greedy LM head) give the same tokens and bit-equal log-probs
    with and without PDL; a kernel that read its input before `gdc_wait` would race and differ."""
    if not pdl.enabled(torch.device("cuda")):
        pytest.skip("PDL needs an sm90+ GPU and triton >= 3.4 (and KILN_PDL not 0)")
    options = dict(BACKENDS["hybrid"], page_size=16, cuda_graph_max_bs=8, disable_cuda_graph=not graphs, **GPU)

    def outputs():
        return _run(gpu_models["qwen3"], **options) + _run(gpu_models["qwen3"], prompts=PROMPTS[:1], **options)

    with_pdl = outputs()
    monkeypatch.setattr(pdl, "ENABLED", False)
    _assert_close(with_pdl, outputs(), 0)


@pytest.mark.gpu
def test_auto_decode_attention_splits_graphs_by_size(gpu_models):
    """decode_attention 'auto': graphs up to the threshold run triton, larger ones flashinfer; both match torch."""
    options = dict(page_size=16, **GPU)
    prompts = PROMPTS + [[3, 1, 4, 1, 5, 9, 2, 6]]  # 5 requests decode in the size-8 graph (flashinfer) ...
    with Engine(model_path=str(gpu_models["qwen3"]), max_total_tokens=4096, context_length=512, cuda_graph_max_bs=8,
                attention_backend="flashinfer", decode_attention="auto", decode_attention_auto_max_bs=4,
                **options) as engine:
        kinds = {bs: type(fb.attn_metadata).__name__ for bs, fb in engine.runner.graph_runner.batches.items()}
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
        outs += engine.generate(input_ids=prompts[:1], sampling_params=GREEDY, return_logprob=True)  # ... 1 (triton)
    assert kinds == {1: "TritonMetadata", 2: "TritonMetadata", 4: "TritonMetadata", 8: "FlashInferMetadata"}
    forced = _teacher_forced(gpu_models["qwen3"], outs, prompts + prompts[:1], attention_backend="torch",
                             disable_cuda_graph=True, **options)
    for o, f in zip(outs, forced):
        assert [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] == pytest.approx(f, abs=2e-2)


def _free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_release_resume_frees_memory_and_keeps_outputs(gpu_models, backend):
    with Engine(model_path=str(gpu_models["llama"]), max_total_tokens=65536, context_length=512, page_size=16,
                cuda_graph_max_bs=8, **BACKENDS[backend], **GPU) as engine:
        assert engine.runner.graph_runner is not None
        before = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
        kv_bytes = engine.runner.kv_pool.bytes
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
        free = _free_bytes()
        engine.release_memory(weights=True)
        released = _free_bytes()
        # device-wide (the KV pool is not torch's memory); torch's allocator may keep a few weights' segments shared
        assert released - free >= kv_bytes + weight_bytes // 2
        engine.resume_memory()
        assert _free_bytes() <= released - kv_bytes - weight_bytes // 2
        after = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
    _assert_close(after, before, 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("memory_saver", [True, False])
def test_discarded_weights_come_back_at_the_same_addresses_and_a_push_refills_them(gpu_models, memory_saver):
    """The colocated RL hand-over with the weights (`--release-engine-weights`): KV pool and weights released, the
    weights discarded, taken back and refilled by a push (here: the checkpoint's tensors), then the KV pool. With the
    memory saver the weights come back at the same addresses and the graphs captured after the first release are
    kept; device memory is freed by at least the KV pool and the weights each time, with no growth."""
    from safetensors.torch import load_file

    weights = load_file(gpu_models["qwen3"] / "model.safetensors")
    with Engine(model_path=str(gpu_models["qwen3"]), max_total_tokens=65536, context_length=512, page_size=16,
                cuda_graph_max_bs=8, disable_memory_saver=not memory_saver, **BACKENDS["flashinfer"], **GPU) as engine:
        runner = engine.runner
        before = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
        weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        resumed, graphs, addresses = [], None, None
        for step in range(3):
            free = _free_bytes()
            engine.release_memory(weights=True, keep_weights=False)
            assert _free_bytes() - free >= runner.kv_pool.bytes + weight_bytes * (step > 0)   # first: the move
            engine.resume_memory(kv_cache=False)
            engine.update_weights_from_tensor(list(weights.items()), weight_version=step + 1)
            engine.resume_memory()
            resumed.append(_free_bytes())
            if step == 0:
                graphs = weakref.ref(runner.graph_runner)
                addresses = [p.data_ptr() for p in runner.model.parameters()]
            elif memory_saver:
                assert runner.graph_runner is graphs()
                assert [p.data_ptr() for p in runner.model.parameters()] == addresses
            after = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
            _assert_close(after, before, 1e-3)
        assert runner.param_store.stable == memory_saver
        assert max(resumed[1:]) - min(resumed[1:]) <= 2**22, resumed   # no growth from one hand-over to the next


@pytest.mark.gpu
@pytest.mark.parametrize("memory_saver", [True, False])
def test_kv_release_keeps_graphs_only_with_stable_addresses(gpu_models, memory_saver):
    """The colocated hand-over (KV pool only): with the memory saver (default) the pool's physical memory goes back
    to the device and returns at the same addresses, so the captured graphs are kept and replay correctly; without
    it the graphs are freed and captured again. Outputs equal before and after either way."""
    with Engine(model_path=str(gpu_models["qwen3"]), max_total_tokens=65536, context_length=512, page_size=16,
                cuda_graph_max_bs=8, disable_memory_saver=not memory_saver, **BACKENDS["flashinfer"], **GPU) as engine:
        runner = engine.runner
        assert runner.kv_pool.stable_addresses == memory_saver
        graphs = weakref.ref(runner.graph_runner)  # a strong reference would keep freed graphs' memory alive
        addresses = [t.data_ptr() for t in runner.kv_pool.k_buffer + runner.kv_pool.v_buffer]
        before = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
        resumed = []
        for _ in range(3):  # repeated hand-overs: no growth, same addresses each time
            free = _free_bytes()
            engine.release_memory()
            assert _free_bytes() - free >= runner.kv_pool.bytes
            engine.resume_memory()
            resumed.append(_free_bytes())
            assert runner.kv_pool.k_buffer[0].abs().sum() == 0  # fresh pages are zeroed like a new pool
        assert (runner.graph_runner is graphs()) == memory_saver
        if memory_saver:
            assert [t.data_ptr() for t in runner.kv_pool.k_buffer + runner.kv_pool.v_buffer] == addresses
        assert max(resumed) - min(resumed) <= 2**22, resumed  # no growth from one hand-over to the next
        after = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
    _assert_close(after, before, 1e-3)

"""GPU diagnosis of the failures of the first `pytest -m gpu` run of 2026-12-06 (H100): prints facts, asserts nothing.

    python3 scripts/gpu_diag.py

1. FP8 activation quantisation: the triton kernel vs weight_sync.fp8 on CUDA, and whether torch's `amax / 448`
   (a tensor divided by a Python scalar) equals IEEE division on CUDA.
2. FP8 linear: the kernel vs the reference with the kernel's own quantised activations (isolates the GEMM).
3. The config.json keys transformers writes for a tiny Qwen3-MoE.
4. With ordinary allocations (memory saver off): what still holds the KV pool after release_memory.
"""

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference_engine.kernels import fp8_gemm  # noqa: E402
from inference_engine.testing import make_tiny_model  # noqa: E402
from weight_sync.fp8 import dequantize_weight, quantize_activation, quantize_weight  # noqa: E402

argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
print("torch", torch.__version__, "tf32 matmul", torch.backends.cuda.matmul.allow_tf32,
      "precision", torch.get_float32_matmul_precision())

# 1
x = torch.randn(300, 4096 + 64, device="cuda").bfloat16() * torch.logspace(-3, 3, 300, device="cuda")[:, None]
q, s = fp8_gemm.quantize_activation(x, 128)
rq, rs = quantize_activation(x, 128)
print("x dtype", x.dtype, "| scales differ:", int((s != rs).sum()), "of", s.numel(),
      "max rel", float(((s - rs).abs() / rs).max()),
      "| q differ:", int((q.view(torch.uint8) != rq.view(torch.uint8)).sum()))
amax = x[:, :4096].reshape(300, 32, 128).abs().amax(-1).float()
print("amax / 448 vs amax / full_like(448): differ", int((amax / 448.0 != amax / torch.full_like(amax, 448.0)).sum()),
      "| kernel scale == IEEE:", bool(torch.equal(s[:, :32], amax / torch.full_like(amax, 448.0))))
cpu = amax.cpu()
print("CPU amax / 448 == CPU IEEE:", bool(torch.equal(cpu / 448.0, cpu / torch.full_like(cpu, 448.0))))

# 2
gen = torch.Generator(device="cuda").manual_seed(0)
for m, n, k in ((1, 6144, 4096), (64, 4096, 4096), (256, 4096, 12288)):
    xb = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).bfloat16()
    wq, ws = quantize_weight(w, 128)
    xq, xs = fp8_gemm.quantize_activation(xb, 128)
    xd = xq.float() * xs.repeat_interleave(128, 1)[:, :k]
    rq2, rs2 = quantize_activation(xb, 128)
    xr = rq2.float() * rs2.repeat_interleave(128, 1)[:, :k]
    wd = dequantize_weight(wq, ws, 128)
    ref64 = (xd.double() @ wd.double().T)
    got = fp8_gemm.gemm(xq, xs, wq, ws, 128, None, torch.bfloat16, torch.bfloat16).double()
    want32 = (xd @ wd.T).double()
    print(f"m={m} n={n} k={k}: act q differ {int((xq.view(torch.uint8) != rq2.view(torch.uint8)).sum())}, "
          f"|gemm - ref64| max {float((got - ref64).abs().max()):.4g}, "
          f"|fp32 matmul - ref64| max {float((want32 - ref64).abs().max()):.4g}, |torch-quant ref - ref64| max "
          f"{float(((xr.double() @ wd.double().T) - ref64).abs().max()):.4g}, "
          f"|ref64| max {float(ref64.abs().max()):.3g}")

# 3
with tempfile.TemporaryDirectory() as d:
    path = make_tiny_model(Path(d) / "moe", "qwen3_moe")
    cfg = json.loads((path / "config.json").read_text())
    print("qwen3_moe config keys:", {k: v for k, v in cfg.items() if "expert" in k or "moe" in k or "sparse" in k})

# 4
with tempfile.TemporaryDirectory() as d:
    from inference_engine import Engine

    path = make_tiny_model(Path(d) / "q", "qwen3", hidden_size=512, num_heads=4, num_kv_heads=2,
                           intermediate_size=1024, num_layers=2)
    with Engine(model_path=str(path), device="cuda", dtype="bfloat16", max_total_tokens=65536, context_length=512,
                page_size=16, cuda_graph_max_bs=8, attention_backend="flashinfer", decode_attention="flashinfer",
                disable_memory_saver=True) as engine:
        engine.generate(input_ids=[[1, 2, 3, 4]], sampling_params={"max_new_tokens": 4, "temperature": 0})
        flat = engine.runner.kv_pool._memory.tensor
        ptr = flat.untyped_storage().data_ptr()
        del flat
        engine.release_memory()
        gc.collect()
        holders = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.is_cuda
                   and o.untyped_storage().data_ptr() == ptr]
        print("tensors still on the released KV storage:", len(holders))
        for t in holders[:3]:
            for r in gc.get_referrers(t)[:4]:
                print("   held by", type(r).__name__, str(r)[:160].replace("\n", " "))
        free0 = torch.cuda.mem_get_info()[0]
        torch.cuda.empty_cache()
        print("free after release", free0 / 2**20, "MiB; pool", engine.runner.kv_pool.bytes / 2**20, "MiB")

# 5: the FP8 engine on the GPU vs its CPU reference, next to what FP8 and bf16 each move the log-probs by
with tempfile.TemporaryDirectory() as d:
    from inference_engine import Engine

    path = make_tiny_model(Path(d) / "f", "qwen3", hidden_size=256, num_heads=2, num_kv_heads=1,
                           intermediate_size=512, tie_word_embeddings=False, init_std=0.05)
    prompt = [5, 17, 42, 99, 3, 7, 250, 11, 64]
    with Engine(model_path=str(path), device="cuda", dtype="bfloat16", max_total_tokens=2048, context_length=256,
                weight_dtype="fp8") as gpu:
        out = gpu.generate(input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 16,
                                                              "ignore_eos": True}, return_logprob=True)
    ids = prompt + out["output_ids"]

    def scored(**options):
        with Engine(model_path=str(path), max_total_tokens=2048, context_length=256, **options) as e:
            r = e.generate(input_ids=ids, sampling_params={"max_new_tokens": 1, "return_prompt_logprobs": True},
                           return_logprob=True)
        return torch.tensor([lp for lp, _, _ in r["meta_info"]["input_token_logprobs"][len(prompt):]])

    gpu_lp = torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])
    runs = {"cpu fp8 fp32": scored(weight_dtype="fp8"), "cpu fp32": scored(),
            "gpu bf16": scored(device="cuda", dtype="bfloat16"), "cpu fp8 bf16": scored(weight_dtype="fp8",
                                                                                       dtype="bfloat16")}
    for name, lp in runs.items():
        print(f"mean |gpu fp8 - {name}| = {float((gpu_lp - lp).abs().mean()):.4f}")
    print(f"mean |cpu fp8 - cpu fp32| = {float((runs['cpu fp8 fp32'] - runs['cpu fp32']).abs().mean()):.4f}; "
          f"mean |gpu bf16 - cpu fp32| = {float((runs['gpu bf16'] - runs['cpu fp32']).abs().mean()):.4f}")

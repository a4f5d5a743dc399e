"""The pre-quantised FP8 GEMV (`kernels.fp8_gemm.gemv_prequant`) on the CPU under the triton interpreter, and
benchmarks/fp8_linear.py's smoke run.

gemv_prequant of `quantize_activation(x)` is bit for bit `gemv(x)` under the same config: both quantise x with
`_quant_group`, fold the same two scales into x and sum the same float32 products in the same order. Against the
dequantised float32 product (models.fp8.reference_linear) both may differ by one rounding to the activation dtype
(2^-8 relative for bf16) plus float32 summation noise: |got - want| <= 2^-7 |want| + 1e-3 max|want|.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# (rows, n, k, block, silu_mul, bias, x dtype, out dtype, config or None for gemv_config): a ragged K group,
# a partial N block, several rows, SiLU-and-mul, a bias, float32 output of a bf16 product, float32 x
CASES = [(1, 200, 136, 32, False, False, torch.bfloat16, torch.bfloat16, None),
         (1, 256, 256, 128, False, True, torch.bfloat16, torch.float32, (1, 8, 2, 4)),
         (3, 130, 384, 64, True, False, torch.bfloat16, torch.bfloat16, (4, 4, 4, 2)),
         (2, 64, 96, 32, False, True, torch.float32, torch.float32, None)]


def _check_prequant(device: str) -> None:
    from inference_engine.kernels import fp8_gemm
    from inference_engine.models.fp8 import reference_linear
    from weight_sync.fp8 import quantize_weight

    for i, (rows, n, k, block, silu, has_bias, dtype, out_dtype, cfg) in enumerate(CASES):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(rows, 2 * k if silu else k, generator=g).to(dtype).to(device)
        wq, ws = quantize_weight((torch.randn(n, k, generator=g) * 0.05).to(device), block)  # [n, k], [n/B, k/B]
        bias = torch.randn(n, generator=g).to(dtype).to(device) if has_bias else None
        xq, xs = fp8_gemm.quantize_activation(x, block, silu_mul=silu)
        got = fp8_gemm.gemv_prequant(xq, xs, wq, ws, block, bias, out_dtype, dtype, config=cfg)
        fused = fp8_gemm.gemv(x, wq, ws, block, bias, out_dtype, silu_mul=silu, config=cfg)
        assert got.dtype == out_dtype and got.shape == (rows, n)
        assert torch.equal(got, fused), f"case {i}: max |diff| {(got.float() - fused.float()).abs().max()}"
        want = reference_linear(x, wq, ws, block, bias, silu, out_dtype).float()
        bound = 2.0 ** -7 * want.abs() + 1e-3 * want.abs().max()
        assert ((got.float() - want).abs() <= bound).all(), f"case {i}"
    with pytest.raises(ValueError, match="BLOCK_N 3 must divide"):
        fp8_gemm.gemv_prequant(xq, xs, wq, ws, 32, None, torch.float32, torch.float32, config=(2, 3, 1, 4))


def test_prequant_gemv_under_the_triton_interpreter():
    pytest.importorskip("triton")
    from inference_engine.testing import run_under_triton_interpreter

    proc = run_under_triton_interpreter([__file__])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fp8 prequant gemv interpreter checks passed" in proc.stdout


def test_fp8_linear_benchmark_smoke(tmp_path):
    """benchmarks/fp8_linear.py --smoke: tiny shapes under the interpreter, every path of the GPU run but the graphs,
    each variant checked (none wrong), the tables printed and the JSON written."""
    pytest.importorskip("triton")
    env = dict(os.environ, OMP_NUM_THREADS="1", OUT=str(tmp_path))
    configs = tmp_path / "fp8_kernel_configs.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fp8_linear", "--smoke", "--write-configs", str(configs)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "fp8_linear.json").read_text())
    results = report["results"]
    assert not [r for r in results if r["status"] in ("wrong", "failed")], results
    variants = {(r["shape"], r["rows"], r["variant"]) for r in results if r["status"] == "ok"}
    for shape in ("qkv", "o", "gate_up", "down"):
        assert {(shape, 1, "bf16 (engine)"), (shape, 1, "fp8 gemv default"),
                (shape, 1, "fp8 quant + gemv_prequant default"), (shape, 1, "fp8 quant + gemv_prequant 1x4x2x4"),
                (shape, 1, "fp8 quant + gemm 16x32x4x2"), (shape, 16, "fp8 quant + gemm default"),
                (shape, 16, "fp8 quant + gemm 32x64x4x2")} <= variants
    assert report["summary"]["layers"]["1"]["fp8 quant + gemv_prequant default"] > 0
    assert "| fp8 quant + gemv_prequant, best config per shape |" in proc.stdout
    # the tuned-kernels table: per shape the fastest timed FP8 kernel at each row count, as the engine reads it
    from inference_engine.models.fp8 import KernelTable

    table = KernelTable.load(configs)
    assert table.device == "cpu (smoke)" and table.block == 128 and len(table.choices) == 4
    for entry in json.loads(configs.read_text())["linears"]:
        choice = table.choices[(entry["n"], entry["k"])]
        timed = [r for r in results if r["shape"] == entry["name"] and r["status"] == "ok" and r["kernel"]]
        best1 = min((r for r in timed if r["rows"] == 1), key=lambda r: r["us"])
        if best1["kernel"] in ("gemv", "prequant"):
            assert (choice.gemv, choice.prequant) == (tuple(best1["config"]), best1["kernel"] == "prequant")
        else:  # a tensor-core kernel won at 1 row: no GEMV, a 1-row GEMM entry
            assert choice.gemv is None and choice.for_rows(1) == (best1["kernel"], tuple(best1["config"]))
        best16 = min((r for r in timed if r["rows"] == 16), key=lambda r: r["us"])
        assert choice.for_rows(16) == (best16["kernel"], best16["config"] and tuple(best16["config"]))


if __name__ == "__main__":  # the interpreter subprocess of test_prequant_gemv_under_the_triton_interpreter
    from inference_engine import ops
    from inference_engine.testing import exact_e4m3_under_interpreter

    assert ops.runs_triton("cpu"), "TRITON_INTERPRET=1 was not in effect"
    exact_e4m3_under_interpreter()
    _check_prequant("cpu")
    print("fp8 prequant gemv interpreter checks passed")

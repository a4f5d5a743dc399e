"""The triton blockwise weight quantisation (`weight_sync.fp8_kernels`) against the torch specification
(`weight_sync.fp8.quantize_weight_torch`), bit for bit: e4m3 bytes and float32 scales. On CPU under the triton
interpreter (with torch's e4m3 conversion, as a GPU rounds); on a GPU (`-m gpu`) through `quantize_weight` and the
engine's in-place `quantize_weight_into`, on the Qwen3-8B shapes too."""

from __future__ import annotations

import pytest
import torch

from weight_sync.fp8 import FP8_MAX, TINY, quantize_weight, quantize_weight_into, quantize_weight_torch

# (shape, block, dtype): whole and partial blocks in both dimensions, an expert stack, every block size
CASES = [((64, 96), 32, torch.float32), ((70, 50), 16, torch.bfloat16), ((3, 40, 72), 32, torch.bfloat16),
         ((130, 260), 128, torch.bfloat16), ((64, 64), 64, torch.float16)]


def _weight(shape, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 3
    w.view(-1, shape[-1])[:16, :16] = 0  # an all-zero block: scale 1, not amax / 448 = 0
    return w.to(dtype)


def _same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    (gq, gs), (wq, ws) = got, want
    assert gq.dtype == torch.float8_e4m3fn and gq.shape == wq.shape and gs.shape == ws.shape
    assert torch.equal(gq.cpu().view(torch.uint8), wq.cpu().view(torch.uint8))
    assert torch.equal(gs.cpu(), ws.cpu())


def _check_kernel(device: str) -> None:
    """The kernel into fresh tensors, and into views of larger ones (an engine parameter's row range, one expert
    of a stack, a scale slice): each bit for bit the specification, nothing outside the views written."""
    from weight_sync.fp8_kernels import quantize_weight_into

    for i, (shape, block, dtype) in enumerate(CASES):
        w = _weight(shape, dtype, seed=i)
        want = quantize_weight_torch(w, block)
        n, k = shape[-2:]
        sb = (*shape[:-2], -(-n // block), -(-k // block))
        q = torch.empty(shape, dtype=torch.float8_e4m3fn, device=device)
        s = torch.empty(sb, dtype=torch.float32, device=device)
        quantize_weight_into(w.to(device), q, s, block, FP8_MAX, TINY)
        _same((q, s), want)
        # into rows [block, block + n) of a parameter with a block of rows before and after
        big_q = torch.zeros((*shape[:-2], n + 2 * block, k), dtype=torch.float8_e4m3fn, device=device)
        big_s = torch.full((*shape[:-2], sb[-2] + 2, sb[-1]), -1.0, device=device)
        quantize_weight_into(w.to(device), big_q[..., block:block + n, :], big_s[..., 1:1 + sb[-2], :], block,
                             FP8_MAX, TINY)
        _same((big_q[..., block:block + n, :], big_s[..., 1:1 + sb[-2], :]), want)
        outside = torch.cat([big_q[..., :block, :], big_q[..., block + n:, :]], dim=-2)
        assert not outside.view(torch.uint8).any()
        assert (big_s[..., 0, :] == -1).all() and (big_s[..., -1, :] == -1).all()


def test_weight_quantisation_kernel_under_the_triton_interpreter():
    pytest.importorskip("triton")
    from inference_engine.testing import run_under_triton_interpreter

    proc = run_under_triton_interpreter([__file__])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fp8 weight quantisation interpreter checks passed" in proc.stdout


def test_cpu_quantise_weight_is_the_specification():
    """Off CUDA `quantize_weight` is the torch form itself (the reference engine and the sender on gloo)."""
    w = _weight((70, 50), torch.bfloat16, seed=9)
    _same(quantize_weight(w, 16), quantize_weight_torch(w, 16))


@pytest.mark.gpu
def test_weight_quantisation_kernel_on_gpu_is_bit_identical_to_torch():
    _check_kernel("cuda")
    for i, (shape, block, dtype) in enumerate(CASES):  # quantize_weight's CUDA dispatch
        w = _weight(shape, dtype, seed=i).cuda()
        _same(quantize_weight(w, block), quantize_weight_torch(w, block))
    for n, k in ((6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)):  # the 8B shape's qkv, o, gate_up, down
        w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
        _same(quantize_weight(w, 128), quantize_weight_torch(w, 128))
        # the engine's in-place path: a row range of an FP8 parameter and its scale rows
        q = torch.empty(n + 256, k, dtype=torch.float8_e4m3fn, device="cuda")
        s = torch.empty(n // 128 + 2, k // 128, device="cuda")
        quantize_weight_into(w, q[128:128 + n], s[1:1 + n // 128], 128)
        _same((q[128:128 + n], s[1:1 + n // 128]), quantize_weight_torch(w, 128))


if __name__ == "__main__":  # the interpreter subprocess of test_weight_quantisation_kernel_under_the_triton_interpreter
    from inference_engine import ops
    from inference_engine.testing import exact_e4m3_under_interpreter

    assert ops.runs_triton("cpu"), "TRITON_INTERPRET=1 was not in effect"
    exact_e4m3_under_interpreter()
    _check_kernel("cpu")
    print("fp8 weight quantisation interpreter checks passed")

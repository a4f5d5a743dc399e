"""Triton kernels of the FP8 linears (CUDA, sm_89+): per-token activation quantisation, a blockwise-scaled FP8 GEMM
(prefill and batched decode), an FP8 GEMV with the activation quantisation fused in (batch-1 decode), and the same
GEMV of activations quantised beforehand (`gemv_prequant`: the engine runs it where a tuned-kernels table says so,
models/fp8.py).

All compute what `weight_sync.fp8` specifies: activations quantised per row and group of `block` columns
(scale = amax / 448 and its reciprocal by IEEE division once per group, x times the reciprocal, e4m3 by
round-to-nearest-even after clamping), weights e4m3 with one
float32 scale per `block x block` block, products of e4m3 values summed in float32 per k-block and scaled by
both scales, the result rounded to the activation dtype. None reads tensor values on the host: all are safe
inside CUDA graphs. The GEMV and the activation quantisation launch with programmatic dependent launch where
`ops.pdl` allows (the contract in ops/pdl.py), as the bf16 GEMV does. `torch._scaled_mm` with blockwise scales
(1x128 activations, 128x128 weights) is an alternative GEMM where this torch build and GPU take it
(`scaled_mm_works` probes it once).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from inference_engine.ops import pdl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # triton < 3.4: pdl.enabled() is False, so no kernel traces the calls
    gdc_launch_dependents = gdc_wait = None

FP8_MAX = 448.0
TINY = 1e-30  # weight_sync.fp8.TINY


@triton.jit
def _quant_group(x, FP8_MAX_C: tl.constexpr, TINY_C: tl.constexpr):
    """(e4m3 [..., G, B], scales [..., G]) of float32 x [..., G, B], one scale per last-dim group: weight_sync.fp8."""
    amax = tl.max(tl.abs(x), axis=-1)
    scale = tl.where(amax > TINY_C, tl.math.div_rn(amax, FP8_MAX_C), 1.0)
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)  # IEEE-rounded, once per group
    q = x * tl.expand_dims(inv, -1)
    q = tl.minimum(tl.maximum(q, -FP8_MAX_C), FP8_MAX_C).to(tl.float8e4nv)
    return q, scale


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, stride_s, SILU_MUL: tl.constexpr,
                      BLOCK: tl.constexpr, GROUPS: tl.constexpr, FP8_MAX_C: tl.constexpr, TINY_C: tl.constexpr,
                      USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g0 = tl.program_id(1) * GROUPS
    offs = g0 * BLOCK + tl.arange(0, GROUPS * BLOCK)
    mask = offs < K
    dt: tl.constexpr = x_ptr.dtype.element_ty
    if USE_PDL:  # ops/pdl.py: x belongs to the previous kernel until it has completed
        gdc_launch_dependents()
        gdc_wait()
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if SILU_MUL:  # x is [gate | up] of width 2K; the input is silu(gate) * up rounded as ops.silu_and_mul rounds
        up = tl.load(x_ptr + row * stride_x + K + offs, mask=mask, other=0.0).to(tl.float32)
        act = (x / (1.0 + tl.exp(-x))).to(dt).to(tl.float32)
        x = (act * up).to(dt).to(tl.float32)
    q, scale = _quant_group(tl.reshape(x, (GROUPS, BLOCK)), FP8_MAX_C, TINY_C)
    tl.store(q_ptr + row * stride_q + offs, tl.reshape(q, (GROUPS * BLOCK,)), mask=mask)
    groups = g0 + tl.arange(0, GROUPS)
    tl.store(s_ptr + row * stride_s + groups, scale, mask=groups * BLOCK < K)


def quantize_activation(x: torch.Tensor, block: int, silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [M, K], float32 scales [M, ceil(K/block)]) of x [M, K] (silu_mul: of silu_and_mul(x [M, 2K]))."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows = x.shape[0]
    k = x.shape[1] // 2 if silu_mul else x.shape[1]
    kb = triton.cdiv(k, block)
    q = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(rows, kb, dtype=torch.float32, device=x.device)
    groups = max(1, min(triton.next_power_of_2(kb), 2048 // block))
    if rows:
        _act_quant_kernel[(rows, triton.cdiv(kb, groups))](x, q, s, k, x.stride(0), q.stride(0), s.stride(0),
                                                           SILU_MUL=silu_mul, BLOCK=block, GROUPS=groups,
                                                           FP8_MAX_C=FP8_MAX, TINY_C=TINY, num_warps=4,
                                                           **pdl.launch(x.device))
    return q, s


@triton.jit
def _gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_asm, stride_bn,
                 stride_bsn, stride_cm, HAS_BIAS: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, ROUND_DT: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n  # grouped order: neighbouring programs share B tiles in L2
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, QBLOCK)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]  # [BM, BK]
    b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]  # [BK, BN]
    as_ptrs = as_ptr + offs_m.to(tl.int64) * stride_asm  # [BM]
    bs_ptrs = bs_ptr + (offs_n // QBLOCK).to(tl.int64) * stride_bsn  # [BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, QBLOCK)):
        k_mask = offs_k < K - kb * QBLOCK
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        a_s = tl.load(as_ptrs + kb, mask=m_mask, other=0.0)
        b_s = tl.load(bs_ptrs + kb, mask=n_mask, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += QBLOCK
        b_ptrs += QBLOCK
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c = acc.to(ROUND_DT).to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :], c,
             mask=m_mask[:, None] & n_mask[None, :])


def gemm_config(rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the FP8 GEMM for `rows` rows (K tiles are one scale block).

    Decode batches are bound by the weight bytes: few rows get narrow N tiles, so that even the 4096-row
    projections of the 8B shape spread over about one program per SM (not tuned on a GPU yet)."""
    if rows <= 16:
        return 16, 32, 4, 4
    if rows <= 64:
        return 64, 32, 4, 4
    if rows <= 256:
        return 64, 128, 4, 3
    return 128, 128, 8, 3


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def gemm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, block: int,
         bias: torch.Tensor | None, out_dtype: torch.dtype, round_dtype: torch.dtype,
         config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """xq [M, K] e4m3 (scales xs [M, K/B]) @ wq [N, K]^T e4m3 (scales ws [N/B, K/B]) (+ bias), rounded to
    round_dtype, in out_dtype: [M, N]."""
    (rows, k), n = xq.shape, wq.shape[0]
    out = torch.empty(rows, n, dtype=out_dtype, device=xq.device)
    bm, bn, warps, stages = config or gemm_config(rows)
    if rows:
        grid = (triton.cdiv(rows, bm) * triton.cdiv(n, bn),)
        _gemm_kernel[grid](xq, xs, wq, ws, bias if bias is not None else ws, out, rows, n, k, xq.stride(0),
                           xs.stride(0), wq.stride(0), ws.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                           QBLOCK=block, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, ROUND_DT=_TL_DTYPES[round_dtype],
                           num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _gemv_step(acc, w, k0, x_ptrs, xs_ptr, stride_xsm, ws_ptrs, offs_m, offs_k, offs_g, m_mask, K,
               dt: tl.constexpr, SILU_MUL: tl.constexpr, PREQUANT: tl.constexpr, QBLOCK: tl.constexpr,
               GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, FP8_MAX_C: tl.constexpr,
               TINY_C: tl.constexpr):
    """acc [BM, BN, BK] + x's tile at column k0 (quantised here, or read quantised: PREQUANT) times the e4m3 weight
    tile w [BN, BK], both scales folded into x."""
    k_mask = (k0 + offs_k) < K
    g_mask = (k0 // QBLOCK + offs_g) * QBLOCK < K  # [G]
    if PREQUANT:
        xq = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_last")
        xq = tl.reshape(xq, (BLOCK_M, GROUPS, QBLOCK))
        xs = tl.load(xs_ptr + offs_m[:, None] * stride_xsm + (k0 // QBLOCK + offs_g)[None, :],
                     mask=m_mask[:, None] & g_mask[None, :], other=0.0, eviction_policy="evict_last")  # [BM, G]
    else:
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0,
                    eviction_policy="evict_last").to(tl.float32)
        if SILU_MUL:  # x is [gate | up] of width 2K: the input is silu(gate) * up, rounded as silu_and_mul rounds
            up = tl.load(x_ptrs + K + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0,
                         eviction_policy="evict_last").to(tl.float32)
            act = (x / (1.0 + tl.exp(-x))).to(dt).to(tl.float32)
            x = (act * up).to(dt).to(tl.float32)
        xq, xs = _quant_group(tl.reshape(x, (BLOCK_M, GROUPS, QBLOCK)), FP8_MAX_C, TINY_C)  # [BM, G, B], [BM, G]
    w_s = tl.load(ws_ptrs + k0 // QBLOCK, mask=g_mask, other=0.0)  # [G]
    xe = xq.to(tl.float32) * (xs * w_s[None, :])[:, :, None]  # both scales on x: [BM, G, B]
    return acc + tl.reshape(xe, (BLOCK_M, BLOCK_K))[:, None, :] * w.to(tl.float32)[None, :, :]  # [BM, BN, BK]


@triton.jit
def _gemv_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_xsm, stride_wn, stride_wsn,
                 stride_ym, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, PREQUANT: tl.constexpr,
                 QBLOCK: tl.constexpr, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 ROUND_DT: tl.constexpr, FP8_MAX_C: tl.constexpr, TINY_C: tl.constexpr, USE_PDL: tl.constexpr):
    # BLOCK_N divides QBLOCK: a program's output rows share one row of weight scales, so both scales fold into x.
    # PREQUANT: x is already e4m3 with scales xs [M, K/QBLOCK] (quantize_activation), read instead of quantised here
    pid = tl.program_id(0)
    BLOCK_K: tl.constexpr = GROUPS * QBLOCK
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, GROUPS)
    n_mask = offs_n < N
    m_mask = offs_m < M
    dt: tl.constexpr = x_ptr.dtype.element_ty
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]  # [BN, BK]
    ws_ptrs = ws_ptr + ((pid * BLOCK_N) // QBLOCK).to(tl.int64) * stride_wsn + offs_g  # [G]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_start = 0
    if USE_PDL:  # no earlier kernel writes the weights: stream the first tile in while the previous kernel ends
        gdc_launch_dependents()
        w = tl.load(w_ptrs, mask=n_mask[:, None] & (offs_k < K)[None, :], other=0.0, eviction_policy="evict_first")
        gdc_wait()  # x (and the output) belong to the previous kernel until it has completed
        acc = _gemv_step(acc, w, 0, x_ptrs, xs_ptr, stride_xsm, ws_ptrs, offs_m, offs_k, offs_g, m_mask, K, dt,
                         SILU_MUL, PREQUANT, QBLOCK, GROUPS, BLOCK_M, BLOCK_K, FP8_MAX_C, TINY_C)
        k_start = BLOCK_K
    for k0 in range(k_start, K, BLOCK_K):  # each weight byte is read once; x stays cached
        w = tl.load(w_ptrs + k0, mask=n_mask[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0,
                    eviction_policy="evict_first")
        acc = _gemv_step(acc, w, k0, x_ptrs, xs_ptr, stride_xsm, ws_ptrs, offs_m, offs_k, offs_g, m_mask, K, dt,
                         SILU_MUL, PREQUANT, QBLOCK, GROUPS, BLOCK_M, BLOCK_K, FP8_MAX_C, TINY_C)
    y = tl.sum(acc, axis=2)  # [BM, BN]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = y.to(ROUND_DT).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y, mask=m_mask[:, None] & n_mask[None, :])


def gemv_config(rows: int, n: int, k: int, block: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, groups of `block` columns per K tile, num_warps) of the FP8 GEMV (x [rows, k] @ W[n, k]^T).

    Mirrors the bf16 GEMV (ops.triton_ops.gemv_config): 1024-wide K tiles, 4 output rows a program (2 for
    N < 6144), so that about 1500 programs keep every SM busy to the last wave."""
    block_m = triton.next_power_of_2(rows)
    width = min(1024 // block_m, triton.next_power_of_2(k))
    groups = max(1, width // block)
    return block_m, 4 if n >= 6144 else 2, groups, 4


def _gemv(x: torch.Tensor, xs: torch.Tensor | None, wq: torch.Tensor, ws: torch.Tensor, block: int,
          bias: torch.Tensor | None, out_dtype: torch.dtype, round_dtype: torch.dtype, silu_mul: bool,
          config: tuple[int, int, int, int] | None) -> torch.Tensor:
    """The launch of `gemv` (xs None) and `gemv_prequant` (x e4m3 with its scales xs)."""
    rows, (n, k) = x.shape[0], wq.shape
    out = torch.empty(rows, n, dtype=out_dtype, device=x.device)
    block_m, block_n, groups, warps = config or gemv_config(rows, n, k, block)
    if block % block_n:
        raise ValueError(f"fp8 GEMV: BLOCK_N {block_n} must divide the scale block {block}")
    if rows:
        _gemv_kernel[(triton.cdiv(n, block_n),)](
            x, ws if xs is None else xs, wq, ws, bias if bias is not None else ws, out, rows, n, k, x.stride(0),
            0 if xs is None else xs.stride(0), wq.stride(0), ws.stride(0), out.stride(0), HAS_BIAS=bias is not None,
            SILU_MUL=silu_mul, PREQUANT=xs is not None, QBLOCK=block, GROUPS=groups, BLOCK_M=block_m,
            BLOCK_N=block_n, ROUND_DT=_TL_DTYPES[round_dtype], FP8_MAX_C=FP8_MAX, TINY_C=TINY, num_warps=warps,
            **pdl.launch(x.device))
    return out


def gemv(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, block: int, bias: torch.Tensor | None,
         out_dtype: torch.dtype, silu_mul: bool = False,
         config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (activation dtype; silu_mul: [M, 2K]) @ wq [N, K]^T e4m3 with x quantised per row and `block` group
    inside the kernel: [M, N] in out_dtype, rounded to x's dtype first. For few rows M (decode)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return _gemv(x, None, wq, ws, block, bias, out_dtype, x.dtype, silu_mul, config)


def gemv_prequant(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, block: int,
                  bias: torch.Tensor | None, out_dtype: torch.dtype, round_dtype: torch.dtype,
                  config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """`gemv` of x already quantised by `quantize_activation`: xq [M, K] e4m3 (scales xs [M, K/B]) @ wq [N, K]^T e4m3
    (scales ws [N/B, K/B]) (+ bias), rounded to round_dtype, in out_dtype: [M, N]. The same numbers as `gemv` of that
    x under the same config; every program reads the quantised x instead of quantising its own copy."""
    return _gemv(xq, xs, wq, ws, block, bias, out_dtype, round_dtype, False, config)


def scaled_mm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype, round_dtype: torch.dtype) -> torch.Tensor:
    """`gemm` through torch._scaled_mm's blockwise scaling (1x128 activations, 128x128 weights; block 128 only)."""
    out = torch._scaled_mm(xq, wq.t(), scale_a=xs.t().contiguous().t(), scale_b=ws.t(),
                           out_dtype=torch.float32 if bias is not None else round_dtype)
    if bias is not None:
        out = (out + bias.float()).to(round_dtype)
    return out if out.dtype == out_dtype else out.to(out_dtype)


@functools.cache
def scaled_mm_works(device: torch.device) -> bool:
    """Whether torch._scaled_mm takes blockwise (1x128, 128x128) FP8 scales on this device and agrees with `gemm`,
    at row counts of decode graphs and prefill chunks (1, 3, 64, 137)."""
    from weight_sync.fp8 import quantize_weight

    try:
        gen = torch.Generator(device=device).manual_seed(0)
        n, k = 384, 640
        wq, ws = quantize_weight(torch.randn(n, k, device=device, generator=gen), 128)
        for m in (1, 3, 64, 137):
            xq, xs = quantize_activation(torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16), 128)
            want = gemm(xq, xs, wq, ws, 128, None, torch.float32, torch.bfloat16)
            got = scaled_mm(xq, xs, wq, ws, None, torch.float32, torch.bfloat16)
            if not torch.allclose(got, want, rtol=2e-2, atol=1e-2 * want.abs().max().item()):
                return False
        return True
    except (RuntimeError, TypeError, ValueError):
        return False

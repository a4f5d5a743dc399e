"""The FP8 linears of the Qwen3-8B shape against the engine's bf16 linears, kernel by kernel (issue #22).

    python -m benchmarks.fp8_linear                           # CUDA: rows 1, 64, 256 (a few minutes; not yet run)
    python -m benchmarks.fp8_linear --shapes o,down --rows 1 --block-n 4,8 --groups 8 --warps 4
    python -m benchmarks.fp8_linear --smoke                   # tiny shapes on the CPU (triton interpreter): checks the
                                                              # script, measures nothing

Weights: random bf16, quantised by weight_sync.fp8.quantize_weight (e4m3, 128 x 128 block scales).
Rows 1 (batch-1 decode): the engine's bf16 GEMV (ops.linear; ops.silu_and_mul_linear for down); the FP8 `gemv`
(activation quantised inside every program) with its default config and a sweep of (BLOCK_N, K tile in 128-wide
groups, warps); `quantize_activation` once + `gemv_prequant` (a GEMV that reads the quantised x) over the same sweep;
and the tensor-core kernels with the row padded to a 16-row tile (`quantize_activation` + torch._scaled_mm, + the
triton GEMM over --one-row-gemm-configs): e4m3 straight into the MMA, no per-element conversion on CUDA cores.
Rows 64 / 256: the engine's bf16 path (cuBLAS; SiLU-and-mul its own kernel for down) vs `quantize_activation` +
torch._scaled_mm (blockwise) vs `quantize_activation` + the triton `gemm`, its default config and a sweep.

Every variant is first checked against the default FP8 kernel's output (gemv at 1 row, gemm above), within one bf16
rounding; one that is off is reported as wrong and not timed. The swept kernels are built first in --compile-workers
processes (triton's cache then serves the timed runs). Timing: a CUDA graph of one call per copy of the weight (copies
together over 4x the L2 cache, so each call reads its weight from HBM as in a decode step), replayed back to back
(`engine_throughput.event_ms`); us per call, GB/s of the weight bytes read (e4m3 + float32 scales, or bf16) and their
fraction of the copy bandwidth measured in the same run. The summary sums one layer (qkv + o + gate_up + down) x 36
layers and predicts the decode step as the measured bf16 step (--bf16-step-ms) with the bf16 linears' time swapped
for the FP8 linears'. JSON of every measurement to $OUT/fp8_linear.json when OUT is set (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

BLOCK = 128  # the FP8 weights' scale block (the engine's default fp8_block_size)
LAYERS = 36  # Qwen3-8B decoder layers
BF16_STEP_MS = 5.58  # Qwen3-8B bf16 batch-1 decode graph replay, H100 80GB (2026-12-06, docs/benchmarks.md)
L2_MULTIPLE = 4  # the weight copies of one timed graph hold at least this many L2 caches' bytes
MAX_ACC_PER_THREAD = 128  # GEMV configs whose [BM, BN, BK] float32 accumulator needs more registers are skipped


@dataclass(frozen=True)
class Shape:
    """One linear: x [rows, k] @ W [n, k]^T; silu_mul: the input is [rows, 2k] = [gate | up] (the down projection)."""
    name: str
    n: int
    k: int
    silu_mul: bool = False


QWEN3_8B = {s.name: s for s in (Shape("qkv", 6144, 4096), Shape("o", 4096, 4096), Shape("gate_up", 24576, 4096),
                                Shape("down", 4096, 12288, silu_mul=True))}
SMOKE = {s.name: s for s in (Shape("qkv", 256, 128), Shape("o", 128, 128), Shape("gate_up", 384, 128),
                             Shape("down", 128, 256, silu_mul=True))}
ONE_ROW_GEMM_SWEEP = [(16, 32, 4, 4), (16, 64, 4, 4), (16, 32, 2, 4), (16, 64, 4, 3), (16, 128, 4, 3),
                      (16, 128, 8, 3)]  # 1 row on tensor cores: the row padded to a 16-row tile
GEMM_SWEEP = [(16, 64, 4, 4), (32, 64, 4, 4), (64, 32, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 8, 3),
              (128, 64, 4, 4), (128, 128, 8, 3), (64, 256, 8, 3)]  # (BLOCK_M, BLOCK_N, warps, stages)


@dataclass
class Result:
    """One variant of one shape at one row count: status 'ok' (timed), 'wrong', 'failed' or 'skipped'."""
    shape: str
    rows: int
    variant: str
    status: str
    us: float | None = None
    weight_bytes: int = 0
    note: str = ""
    kernel: str = ""  # an FP8 linear's kernel ("gemv", "prequant", "scaled_mm", "gemm"; "" for the others)
    config: tuple[int, ...] | None = None  # its config (None: scaled_mm)

    def gbps(self) -> float | None:
        return self.weight_bytes / self.us / 1e3 if self.us and self.weight_bytes else None


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _shape_names(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    if unknown := [n for n in names if n not in QWEN3_8B]:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(QWEN3_8B)}")
    return names


def _gemm_configs(text: str) -> list[tuple[int, ...]]:
    configs = [tuple(int(v) for v in c.split("x")) for c in text.split(";") if c]
    if bad := [c for c in configs if len(c) != 4]:
        raise argparse.ArgumentTypeError(f"{bad} are not BLOCK_MxBLOCK_NxWARPSxSTAGES")
    return configs


def close(got: torch.Tensor, want: torch.Tensor) -> tuple[bool, float]:
    """Whether got is want up to one bf16 rounding (2^-7 |want| + 1e-3 max|want|, as tests/test_fp8_gpu.py), and the
    largest |got - want|."""
    got, want = got.float(), want.float()
    err = (got - want).abs()
    bound = 2.0 ** -7 * want.abs() + 1e-3 * want.abs().max()
    return bool((err <= bound).all()), float(err.max()) if err.numel() else 0.0


class Timer:
    """Per-call device time of a list of calls: a CUDA graph of all, replayed back to back; on the CPU, wall time."""

    def __init__(self, cuda: bool, replays: int):
        self.cuda, self.replays = cuda, replays

    def us_per_call(self, calls: list[Callable[[], object]]) -> float:
        def run_all() -> None:
            for call in calls:
                call()

        if not self.cuda:  # one run (the check ran the first call): the interpreter is slow
            start = time.perf_counter()
            run_all()
            return (time.perf_counter() - start) * 1e6 / len(calls)
        from benchmarks.engine_throughput import event_ms, graphed

        graph = graphed(run_all)
        ms = min(event_ms(graph.replay, self.replays) for _ in range(2))
        del graph
        return ms * 1e3 / len(calls)


class Case:
    """One shape's operands: x, the bf16 weight and its FP8 form, each weight in `copies` copies (distinct memory)."""

    def __init__(self, shape: Shape, device: torch.device, copies: int, seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)
        from weight_sync.fp8 import quantize_weight

        w = (torch.randn(shape.n, shape.k, device=device, generator=gen) * 0.02).bfloat16()  # [N, K]
        wq, ws = quantize_weight(w, BLOCK)  # [N, K] e4m3, [N/B, K/B] float32
        self.shape, self.gen = shape, gen
        self.w = [w] + [w.clone() for _ in range(copies - 1)]
        self.wq = [wq] + [wq.clone() for _ in range(copies - 1)]
        self.ws = [ws] + [ws.clone() for _ in range(copies - 1)]
        self.bf16_bytes = w.numel() * w.element_size()
        self.fp8_bytes = wq.numel() * wq.element_size() + ws.numel() * ws.element_size()

    def x(self, rows: int) -> torch.Tensor:
        """The input [rows, k] bf16 ([rows, 2k] = [gate | up] for a silu_mul shape)."""
        width = self.shape.k * (2 if self.shape.silu_mul else 1)
        return torch.randn(rows, width, device=self.wq[0].device, generator=self.gen).bfloat16()


def copies_for(fp8_bytes: int, cuda: bool) -> int:
    """Copies of a weight so that one timed graph reads L2_MULTIPLE L2 caches' worth of FP8 weights (1 on the CPU)."""
    if not cuda:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(2, math.ceil(L2_MULTIPLE * l2 / fp8_bytes))


def _quant_then(case: Case, x: torch.Tensor, mm: Callable) -> Callable[[int], Callable[[], torch.Tensor]]:
    """make(i): quantize_activation(x) (SiLU-and-mul first for the down shape), then mm(xq, xs, i) on weight copy i."""
    from inference_engine.kernels import fp8_gemm

    def call(i):
        def run():
            xq, xs = fp8_gemm.quantize_activation(x, BLOCK, silu_mul=case.shape.silu_mul)
            return mm(xq, xs, i)
        return run
    return call


def _gemm(case: Case, x: torch.Tensor, cfg: tuple[int, ...] | None) -> Callable[[int], Callable[[], torch.Tensor]]:
    """quantize_activation + the triton blockwise GEMM with config cfg (None: gemm_config's)."""
    from inference_engine.kernels import fp8_gemm

    return _quant_then(case, x, lambda xq, xs, i: fp8_gemm.gemm(xq, xs, case.wq[i], case.ws[i], BLOCK, None,
                                                               torch.bfloat16, torch.bfloat16, config=cfg))


class Bench:
    """Checks and times the variants of each shape; keeps every Result."""

    def __init__(self, timer: Timer, bandwidth: float):
        self.timer, self.bandwidth = timer, bandwidth
        self.results: list[Result] = []

    def measure(self, case: Case, rows: int, variant: str, make: Callable[[int], Callable[[], torch.Tensor]],
                weight_bytes: int, want: torch.Tensor | None, skip: str = "", note: str = "", kernel: str = "",
                config: tuple[int, ...] | None = None) -> Result:
        """Check make(0)() against want (None: not checked), then time make(i) for every weight copy i."""
        res = Result(case.shape.name, rows, variant, "skipped", weight_bytes=weight_bytes, note=skip or note,
                     kernel=kernel, config=config)
        if not skip:
            try:
                if want is not None:
                    ok, err = close(make(0)(), want)
                    if not ok:
                        res.status = "wrong"
                        res.note = f"max |diff| {err:.3g} vs the default FP8 kernel" + (f"; {note}" if note else "")
                        self.results.append(res)
                        return res
                res.us = self.timer.us_per_call([make(i) for i in range(len(case.wq))])
                res.status = "ok"
            except Exception as exc:  # a config triton cannot build or cuBLAS refuses is reported, not fatal
                res.status, res.note = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        self.results.append(res)
        return res

    def rows_1(self, case: Case, sweep: list[tuple[int, int, int, int]], gemm_sweep: list[tuple[int, ...]]) -> None:
        """bf16 GEMV, FP8 gemv (default + sweep), quantize_activation + gemv_prequant (default + sweep), and the
        tensor-core kernels with the one row padded to a 16-row tile (scaled_mm, the triton GEMM over gemm_sweep) at
        1 row."""
        from inference_engine import ops as engine_ops
        from inference_engine.kernels import fp8_gemm

        s, x = case.shape, case.x(1)
        bf16 = engine_ops.silu_and_mul_linear if s.silu_mul else engine_ops.linear
        self.measure(case, 1, "bf16 (engine)", lambda i: lambda: bf16(x, case.w[i]), case.bf16_bytes, None)

        def fused(cfg):
            return lambda i: lambda: fp8_gemm.gemv(x, case.wq[i], case.ws[i], BLOCK, None, torch.bfloat16,
                                                   silu_mul=s.silu_mul, config=cfg)

        def prequant(cfg):
            return _quant_then(case, x, lambda xq, xs, i: fp8_gemm.gemv_prequant(
                xq, xs, case.wq[i], case.ws[i], BLOCK, None, torch.bfloat16, torch.bfloat16, config=cfg))

        want = fused(None)(0)()
        self.check_reference(case, x, want)
        default = fp8_gemm.gemv_config(1, s.n, s.k, BLOCK)
        note = f"config {_cfg(default)}"
        self.measure(case, 1, "fp8 gemv default", fused(None), case.fp8_bytes, want, note=note, kernel="gemv",
                     config=default)
        self.measure(case, 1, "fp8 quant + gemv_prequant default", prequant(None), case.fp8_bytes, want, note=note,
                     kernel="prequant", config=default)
        self.measure(case, 1, "fp8 quantize_activation alone",
                     lambda i: lambda: fp8_gemm.quantize_activation(x, BLOCK, silu_mul=s.silu_mul), 0, None)
        for cfg in sweep:
            skip = _gemv_skip(cfg)
            self.measure(case, 1, f"fp8 gemv {_cfg(cfg)}", fused(cfg), case.fp8_bytes, want, skip, kernel="gemv",
                         config=cfg)
            self.measure(case, 1, f"fp8 quant + gemv_prequant {_cfg(cfg)}", prequant(cfg), case.fp8_bytes, want, skip,
                         kernel="prequant", config=cfg)
        self.tensor_core_variants(case, 1, x, want, gemm_sweep, default=None)

    def rows_many(self, case: Case, rows: int, sweep: list[tuple[int, int, int, int]]) -> None:
        """bf16 (cuBLAS) vs quantize_activation + scaled_mm / + triton gemm (default + sweep) at `rows` rows."""
        from inference_engine import ops as engine_ops
        from inference_engine.kernels import fp8_gemm

        s, x = case.shape, case.x(rows)
        bf16 = engine_ops.silu_and_mul_linear if s.silu_mul else engine_ops.linear
        self.measure(case, rows, "bf16 (engine)", lambda i: lambda: bf16(x, case.w[i]), case.bf16_bytes, None)
        want = _gemm(case, x, None)(0)()
        self.check_reference(case, x, want)
        self.measure(case, rows, "fp8 quantize_activation alone",
                     lambda i: lambda: fp8_gemm.quantize_activation(x, BLOCK, silu_mul=s.silu_mul), 0, None)
        self.tensor_core_variants(case, rows, x, want, sweep, default=fp8_gemm.gemm_config(rows))

    def tensor_core_variants(self, case: Case, rows: int, x: torch.Tensor, want: torch.Tensor,
                             sweep: list[tuple[int, ...]], default: tuple[int, ...] | None) -> None:
        """quantize_activation + torch._scaled_mm, + the triton GEMM with its default config (unless None) and each
        config of the sweep, checked against want."""
        from inference_engine.kernels import fp8_gemm

        cuda = x.device.type == "cuda"
        skip = "" if cuda and fp8_gemm.scaled_mm_works(x.device) else "torch._scaled_mm blockwise unavailable here"
        scaled = _quant_then(case, x, lambda xq, xs, i: fp8_gemm.scaled_mm(xq, xs, case.wq[i], case.ws[i], None,
                                                                           torch.bfloat16, torch.bfloat16))
        self.measure(case, rows, "fp8 quant + scaled_mm", scaled, case.fp8_bytes, want, skip, kernel="scaled_mm")
        if default is not None:
            self.measure(case, rows, "fp8 quant + gemm default", _gemm(case, x, None), case.fp8_bytes, want,
                         note=f"config {_cfg(default)}", kernel="gemm", config=default)
        for cfg in sweep:
            if cfg != default:
                self.measure(case, rows, f"fp8 quant + gemm {_cfg(cfg)}", _gemm(case, x, cfg), case.fp8_bytes, want,
                             kernel="gemm", config=cfg)

    def check_reference(self, case: Case, x: torch.Tensor, got: torch.Tensor) -> None:
        """The default FP8 kernel against the dequantised float32 product (models.fp8.reference_linear): a result."""
        from inference_engine.models.fp8 import reference_linear

        ok, err = close(got, reference_linear(x, case.wq[0], case.ws[0], BLOCK, silu_mul=case.shape.silu_mul))
        self.results.append(Result(case.shape.name, x.shape[0], "default fp8 vs dequantised reference",
                                   "ok" if ok else "wrong", note=f"max |diff| {err:.3g}"))


def compile_jobs(shapes: list[Shape], rows_list: list[int], gemv_sweep: list, gemm_sweep: list) -> list[tuple]:
    """(kernel, config, silu_mul) of every swept kernel the run will build (gemm_sweep: every GEMM config it times)."""
    jobs: list[tuple] = []
    if 1 in rows_list:
        for cfg in (c for c in gemv_sweep if not _gemv_skip(c)):
            jobs += [("gemv", cfg, silu) for silu in sorted({s.silu_mul for s in shapes})] + [("prequant", cfg, False)]
    return jobs + [("gemm", cfg, False) for cfg in gemm_sweep]


def build_kernels(jobs: list[tuple], device: str, n: int, k: int) -> tuple[int, int]:
    """Run each job's kernel once on small operands with the real shapes' specialisation (n, k multiples of 16 and of
    every K tile), so that triton's on-disk cache holds it: (built, failed). In a worker process of `precompile`."""
    from inference_engine.kernels import fp8_gemm
    from weight_sync.fp8 import quantize_weight

    wq, ws = quantize_weight(torch.randn(n, k, device=device) * 0.02, BLOCK)  # [n, k] e4m3, [n/B, k/B]
    built = failed = 0
    for kernel, cfg, silu in jobs:
        x = torch.randn(16 if kernel == "gemm" else 1, 2 * k if silu else k, device=device).bfloat16()
        try:
            if kernel == "gemv":
                fp8_gemm.gemv(x, wq, ws, BLOCK, None, torch.bfloat16, silu_mul=silu, config=cfg)
            else:
                xq, xs = fp8_gemm.quantize_activation(x, BLOCK)
                mm = fp8_gemm.gemv_prequant if kernel == "prequant" else fp8_gemm.gemm
                mm(xq, xs, wq, ws, BLOCK, None, torch.bfloat16, torch.bfloat16, config=cfg)
            built += 1
        except Exception:  # measured (and reported) again by the main process
            failed += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return built, failed


def precompile(jobs: list[tuple], workers: int, device: str, n: int, k: int) -> None:
    """Build the sweep's kernels in `workers` processes at once (triton compiles one kernel at a time per process);
    the timed runs then load them from the cache. Any failure here only means the main process compiles them."""
    import concurrent.futures
    import multiprocessing

    from benchmarks import fp8_linear  # the worker function by its importable name (this file may run as __main__)

    start = time.perf_counter()
    chunks = [jobs[i::workers] for i in range(workers) if jobs[i::workers]]
    if not chunks:
        return
    try:
        with concurrent.futures.ProcessPoolExecutor(len(chunks), mp_context=multiprocessing.get_context("spawn")) as ex:
            counts = list(ex.map(fp8_linear.build_kernels, chunks, [device] * len(chunks), [n] * len(chunks),
                                 [k] * len(chunks)))
        print(f"built {sum(b for b, _ in counts)} kernels ({sum(f for _, f in counts)} failed) in {len(chunks)} "
              f"processes in {time.perf_counter() - start:.0f} s", flush=True)
    except Exception as exc:  # the main process compiles as it goes
        print(f"!! precompiling in processes failed ({type(exc).__name__}: {exc}); compiling in turn", flush=True)


def _cfg(cfg: tuple[int, ...]) -> str:
    return "x".join(map(str, cfg))


def _gemv_skip(cfg: tuple[int, int, int, int]) -> str:
    """Why a GEMV config is not tried ('' if it is): an accumulator of more float32 per thread than registers hold."""
    block_m, block_n, groups, warps = cfg
    per_thread = block_m * block_n * groups * BLOCK // (32 * warps)
    return f"accumulator {per_thread} float32/thread > {MAX_ACC_PER_THREAD}" if per_thread > MAX_ACC_PER_THREAD else ""


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _sweep(variant: str) -> bool:
    """Whether a variant is one config of a sweep (its name ends in the config, e.g. 'fp8 gemv 1x4x8x4')."""
    return re.search(r" \d+x\d+x\d+x\d+$", variant) is not None


# the per-layer sums: (label, rows 1 or more, which variants of a shape it picks the fastest of)
FAMILIES = [
    ("bf16 (engine)", False, lambda v: v == "bf16 (engine)"),
    ("fp8 gemv default", False, lambda v: v.startswith("fp8 gemv default")),
    ("fp8 gemv, best config per shape", False, lambda v: v.startswith("fp8 gemv ")),
    ("fp8 quant + gemv_prequant default", False, lambda v: v.startswith("fp8 quant + gemv_prequant default")),
    ("fp8 quant + gemv_prequant, best config per shape", False, lambda v: v.startswith("fp8 quant + gemv_prequant ")),
    ("fp8 quant + scaled_mm (1 row padded)", False, lambda v: v == "fp8 quant + scaled_mm"),
    ("fp8 quant + gemm (1 row padded), best config per shape", False, lambda v: v.startswith("fp8 quant + gemm ")),
    ("bf16 (engine)", True, lambda v: v == "bf16 (engine)"),
    ("fp8 quant + scaled_mm", True, lambda v: v == "fp8 quant + scaled_mm"),
    ("fp8 quant + gemm default", True, lambda v: v.startswith("fp8 quant + gemm default")),
    ("fp8 quant + gemm, best config per shape", True, lambda v: v.startswith("fp8 quant + gemm ")),
    ("fp8, best of all per shape", None, lambda v: v.startswith("fp8 ") and "alone" not in v),
]


def report(results: list[Result], bandwidth: float, bf16_step_ms: float, layers: int, cuda: bool) -> dict:
    """Print the markdown tables; return the summary (the fastest variant per shape and family, per-layer sums)."""
    by_key = {(r.shape, r.rows, r.variant): r for r in results}
    shapes = list(dict.fromkeys(r.shape for r in results))

    def frac(r: Result) -> float | None:
        return r.gbps() * 1e9 / bandwidth if r.gbps() else None

    print(f"\n### FP8 linears vs bf16, per call (CUDA graphs, one call per weight copy; copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s){'' if cuda else ' -- CPU smoke run: the times mean nothing'}\n")
    print("| shape | rows | variant | us | weight GB/s | % copy bw | x bf16 | status |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if _sweep(r.variant) and r.status in ("ok", "skipped"):
            continue  # in the sweep table
        bf16 = by_key.get((r.shape, r.rows, "bf16 (engine)"))
        speedup = bf16.us / r.us if r.us and r.weight_bytes and bf16 and bf16.us else None
        status = r.status + (f" ({r.note})" if r.note else "")
        print(f"| {r.shape} | {r.rows} | {r.variant} | {_fmt(r.us, '.1f')} | {_fmt(r.gbps(), '.0f')} | "
              f"{_fmt(frac(r) and frac(r) * 100, '.0f')} | {_fmt(speedup, '.2f')} | {status} |")

    summary: dict = {"best": {}, "layers": {}}
    for rows in sorted({r.rows for r in results}):
        variants = [v for v in dict.fromkeys(r.variant for r in results if r.rows == rows) if v.startswith("fp8 ")
                    and "alone" not in v]
        print(f"\n### rows {rows}: us per call (% of copy bandwidth) by variant and shape\n")
        print("| variant | " + " | ".join(shapes) + " |")
        print("| --- | " + " | ".join("---" for _ in shapes) + " |")
        for v in variants:
            cells = [by_key.get((s, rows, v)) for s in shapes]
            print(f"| {v} | " + " | ".join("" if r is None else f"{r.us:.1f} ({frac(r):.0%})" if r.us else r.status
                                           for r in cells) + " |")
        sums: dict[str, float | None] = {}
        for label, many, picks in FAMILIES:
            if many is not None and many != (rows > 1):
                continue
            fastest = {s: min((r for r in results if r.shape == s and r.rows == rows and r.us and picks(r.variant)),
                              key=lambda r: r.us, default=None) for s in shapes}
            summary["best"][f"rows {rows}: {label}"] = {s: r and r.variant for s, r in fastest.items()}
            timed = all(r is not None for r in fastest.values())
            sums[label] = sum(r.us for r in fastest.values()) / 1e3 if timed and fastest else None
        summary["layers"][rows] = sums
        bf16_ms = sums.get("bf16 (engine)")
        whole_layer = rows == 1 and len(shapes) == 4  # the prediction needs all four linears
        step = " predicted decode step ms |" if whole_layer else ""
        print(f"\n### rows {rows}: one layer's linears ({' + '.join(shapes)}) x {layers} layers\n")
        print(f"| linears | ms | x bf16 |{step}\n| --- | --- | --- |{' --- |' if step else ''}")
        for label, ms in sums.items():
            line = f"| {label} | {_fmt(ms and ms * layers, '.3f')} | {_fmt(ms and bf16_ms and bf16_ms / ms, '.2f')} |"
            if step:
                line += f" {_fmt(ms and bf16_ms and bf16_step_ms + (ms - bf16_ms) * layers, '.2f')} |"
            print(line)
        best = summary["best"][f"rows {rows}: fp8, best of all per shape"]
        print("\nfastest FP8 variant per shape: " + "; ".join(f"{s}: {v}" for s, v in best.items()))
    if 1 in summary["layers"] and len(shapes) == 4:  # the prediction's footnote
        print(f"\n(predicted step: the bf16 batch-1 graph replay of {bf16_step_ms} ms with its {layers} layers' bf16 "
              f"linears swapped for these)")
    return summary


def kernel_configs(results: list[Result], shapes: dict[str, Shape], device: str) -> dict:
    """The tuned-kernels table (EngineConfig.fp8_kernel_configs, models.fp8.KernelTable) of these results: per
    shape and row count the fastest checked-and-timed kernel: at 1 row a GEMV (its config, x quantised in it or
    before it) or, when a tensor-core kernel was faster, that GEMM as the 1-row entry of the GEMM list (the engine
    then skips the GEMV); at more rows scaled_mm or the triton GEMM with its config."""
    linears = []
    for name, shape in shapes.items():
        def fastest(rows: int, kernels: tuple[str, ...]) -> Result | None:
            return min((r for r in results if r.shape == name and r.rows == rows and r.status == "ok"
                        and r.kernel in kernels), key=lambda r: r.us, default=None)

        entry: dict = {"n": shape.n, "k": shape.k, "name": name}
        gemm = []
        if (best := fastest(1, ("gemv", "prequant", "scaled_mm", "gemm"))) is not None:
            if best.kernel in ("gemv", "prequant"):
                entry["gemv"] = {"kernel": best.kernel, "config": list(best.config), "us": round(best.us, 2)}
            else:
                gemm.append({"rows": 1, "kernel": best.kernel, "config": best.config and list(best.config),
                             "us": round(best.us, 2)})
        for rows in sorted({r.rows for r in results if r.shape == name and r.rows > 1}):
            if (best := fastest(rows, ("scaled_mm", "gemm"))) is not None:
                gemm.append({"rows": rows, "kernel": best.kernel, "config": best.config and list(best.config),
                             "us": round(best.us, 2)})
        if gemm:
            entry["gemm"] = gemm
        if len(entry) > 3:
            linears.append(entry)
    return {"device": device, "block": BLOCK, "written_by": "benchmarks.fp8_linear",
            "written": time.strftime("%Y-%m-%d %H:%M:%S"), "linears": linears}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", type=_shape_names, default="qkv,o,gate_up,down", help="linears of the 8B layer")
    ap.add_argument("--rows", type=_ints, default="1,64,256", help="decode batch sizes (rows of x)")
    ap.add_argument("--block-n", type=_ints, default="2,4,8,16,32",
                    help="GEMV sweep: output rows per program (divisors of 128)")
    ap.add_argument("--groups", type=_ints, default="4,8,16", help="GEMV sweep: K tile in 128-wide groups")
    ap.add_argument("--warps", type=_ints, default="2,4,8", help="GEMV sweep: warps per program")
    ap.add_argument("--gemm-configs", type=_gemm_configs, default=";".join(_cfg(c) for c in GEMM_SWEEP),
                    help="GEMM sweep at rows > 1: BLOCK_MxBLOCK_NxWARPSxSTAGES;... (empty: default config only)")
    ap.add_argument("--one-row-gemm-configs", type=_gemm_configs, default=";".join(_cfg(c) for c in ONE_ROW_GEMM_SWEEP),
                    help="the triton GEMM's configs tried at 1 row (the row padded to BLOCK_M; empty: none)")
    ap.add_argument("--compile-workers", type=int, default=8,
                    help="processes that build the swept kernels first (0: each is built when first timed)")
    ap.add_argument("--replays", type=int, default=10, help="graph replays per timing (the best of two timings)")
    ap.add_argument("--bf16-step-ms", type=float, default=BF16_STEP_MS,
                    help="measured bf16 batch-1 decode step the prediction starts from")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/fp8_linear.json when OUT is set)")
    ap.add_argument("--write-configs", default=None,
                    help="write the fastest correct kernel per shape and row count as a tuned-kernels JSON "
                         "(EngineConfig.fp8_kernel_configs / --fp8-kernel-configs)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, rows 1 and 16, two configs each, on the CPU under the triton interpreter")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke and not cuda:
        from inference_engine import ops as engine_ops

        if not engine_ops.runs_triton("cpu"):  # rerun under TRITON_INTERPRET=1, where the kernels run on the CPU
            from inference_engine.testing import run_under_triton_interpreter

            proc = run_under_triton_interpreter(["-m", "benchmarks.fp8_linear", *argv])
            sys.stdout.write(proc.stdout)
            sys.stderr.write(proc.stderr)
            return proc.returncode
        from inference_engine.testing import exact_e4m3_under_interpreter

        exact_e4m3_under_interpreter()
    elif not cuda:
        ap.error("needs a CUDA GPU (or --smoke)")

    table_shapes, names = (SMOKE if args.smoke else QWEN3_8B), args.shapes
    rows_list = [1, 16] if args.smoke else args.rows
    if args.smoke:
        gemv_sweep = [(1, 4, 2, 4), (1, 32, 4, 2)]
        gemm_sweep = [(16, 32, 4, 2), (32, 64, 4, 2)]
        one_row_gemm_sweep = [(16, 32, 4, 2)]
    else:
        gemv_sweep = [(1, bn, g, w) for bn in args.block_n for g in args.groups for w in args.warps]
        gemm_sweep = args.gemm_configs
        one_row_gemm_sweep = args.one_row_gemm_configs

    out_path = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "fp8_linear.json"
                                                if os.environ.get("OUT") else None)
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        from benchmarks.engine_throughput import copy_bandwidth

        bandwidth = copy_bandwidth()
        print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s; torch "
              f"{torch.__version__}", flush=True)
    else:
        bandwidth = 1e12  # a placeholder: CPU times are not measurements
    bench = Bench(Timer(cuda, args.replays), bandwidth)
    start = time.perf_counter()
    if args.compile_workers > 0:
        gemms = (one_row_gemm_sweep if 1 in rows_list else []) + (gemm_sweep if max(rows_list) > 1 else [])
        jobs = compile_jobs([table_shapes[n] for n in names], rows_list, gemv_sweep, list(dict.fromkeys(gemms)))
        precompile(jobs, min(args.compile_workers, 2) if args.smoke else args.compile_workers, device.type,
                   *((128, 256) if args.smoke else (256, 2048)))

    def save() -> dict:
        summary = report(bench.results, bandwidth, args.bf16_step_ms, LAYERS, cuda)
        if out_path:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps({
                "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "copy_bandwidth": bandwidth,
                "smoke": args.smoke, "results": [vars(r) | {"gbps": r.gbps()} for r in bench.results],
                "summary": summary}, indent=1))
        if args.write_configs:
            device_name = torch.cuda.get_device_name() if cuda else "cpu (smoke)"
            table = kernel_configs(bench.results, {n: table_shapes[n] for n in names}, device_name)
            Path(args.write_configs).parent.mkdir(parents=True, exist_ok=True)
            Path(args.write_configs).write_text(json.dumps(table, indent=1))
            print(f"tuned kernels of {len(table['linears'])} linears: {args.write_configs}", flush=True)
        return summary

    cases = {}
    for i, name in enumerate(names):
        shape = table_shapes[name]
        fp8_bytes = shape.n * shape.k + math.ceil(shape.n / BLOCK) * math.ceil(shape.k / BLOCK) * 4
        cases[name] = Case(shape, device, copies_for(fp8_bytes, cuda), seed=i)
    failed = False
    try:
        for rows in rows_list:  # batch 1 first: the issue's first target, kept if the call runs out of time
            for name, case in cases.items():
                try:
                    if rows == 1:
                        bench.rows_1(case, gemv_sweep, one_row_gemm_sweep)
                    else:
                        bench.rows_many(case, rows, gemm_sweep)
                except Exception:  # one shape's failure must not lose the rest of the device call
                    failed = True
                    print(f"!! {name} rows {rows} failed:\n{traceback.format_exc()}", flush=True)
                done = [r for r in bench.results if r.shape == name and r.rows == rows]
                shape = case.shape
                print(f"{name} (N={shape.n}, K={shape.k}{', silu_mul' if shape.silu_mul else ''}) rows {rows}: "
                      f"{sum(r.status == 'ok' for r in done)} timed, {sum(r.status == 'wrong' for r in done)} wrong, "
                      f"{sum(r.status == 'failed' for r in done)} failed; {len(case.wq)} weight copies; "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
                if out_path:  # partial JSON as it goes, in case the device call runs out of time
                    out_path.parent.mkdir(parents=True, exist_ok=True)
                    out_path.write_text(json.dumps({"partial": True, "results": [vars(r) for r in bench.results]}))
    except KeyboardInterrupt:  # `timeout -s INT`: report what was measured
        failed = True
        print(f"!! interrupted after {time.perf_counter() - start:.0f} s: the tables hold what was measured",
              flush=True)
    save()
    wrong = [r for r in bench.results if r.status == "wrong" and not _sweep(r.variant)]  # a default path is off
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())

"""Programmatic dependent launch (PDL) for the decode step's triton kernels (Hopper and newer GPUs).

A batch-1 decode step of an 8B model is ~330 short kernels (2-70 µs each) back to back. Normally a
kernel starts only after the previous one has completed, so every boundary costs the launch, the ramp-up
of the new grid and the drain of the old one. Launched with PDL (`launch_pdl=True`), a kernel's programs
are scheduled as soon as every program of the previous grid has called `gdc_launch_dependents` (our
kernels do so first thing): they run their independent prologue (the GEMV loads its first weight tile)
and then block in `gdc_wait` until the previous grid has completed and its writes are visible. The chain
stays ordered: each kernel waits for the one before it, which waited for the one before that.

The contract for a kernel that takes `USE_PDL: tl.constexpr`: when USE_PDL, call `gdc_launch_dependents()`
and call `gdc_wait()` before it loads anything an earlier kernel may have written and before any store.
Kernels without that contract must never be launched with `launch_pdl`. Torch, cuBLAS or NCCL kernels in
between are harmless: they neither trigger early nor get launched early.

`ENABLED` turns it off for the whole process (also `KILN_PDL=0`); captured CUDA graphs keep the mode they
were captured with, so switch it before `ModelRunner.capture_cuda_graphs()`.
"""

from __future__ import annotations

import functools
import os

import torch

ENABLED = os.environ.get("KILN_PDL", "1").lower() not in ("0", "false", "off", "no")


@functools.cache
def _supported(device_index: int) -> bool:
    """sm90+ and a triton that can launch with PDL (3.4+: `gdc_wait` and the `launch_pdl` option)."""
    if torch.cuda.get_device_capability(device_index) < (9, 0):
        return False
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return True


def enabled(device: torch.device) -> bool:
    """Whether kernels on device launch with PDL (CUDA sm90+, triton with PDL, not turned off)."""
    if not ENABLED or device.type != "cuda":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def launch(device: torch.device) -> dict:
    """Keyword arguments for a PDL-aware kernel's launch on device: its USE_PDL constexpr and the launch option."""
    return {"USE_PDL": True, "launch_pdl": True} if enabled(device) else {"USE_PDL": False}

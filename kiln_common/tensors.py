"""Tensor helpers shared by the engine and the trainer."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """t on device; a CPU tensor goes to a GPU through pinned memory without blocking the host (stream-ordered).

    The engine's scheduler and the trainer's micro-batch set-up both send their host-built tensors this way."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.contiguous().pin_memory().to(device, non_blocking=True)

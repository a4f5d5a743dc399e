"""Test and benchmark helpers: a minimal engine holding named tensors (the `WeightTarget` surface), a flat trainer buffer, a small Engine."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


class TensorDictEngine:
    """Named tensors (e.g. an HF model's state_dict) updated in place; stands in for an Engine where only weights matter.

    `load_weights` copies each (hf_name, tensor) into the held tensor of that name (casting dtype and
    device), counts a cache flush and sets the weight version, as the engine does between steps.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = dict(tensors)
        self.weight_version = 0
        self.cache_flushes = 0
        self.paused = False

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: int | None = None) -> int:
        """Copy each tensor into the held tensor of the same name; unknown names and shape mismatches raise."""
        for name, tensor in named_tensors:
            if name not in self.tensors:
                raise KeyError(f"load_weights: unknown tensor {name!r}; this model has {len(self.tensors)} tensors")
            dst = self.tensors[name]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"load_weights: {name!r} has shape {list(tensor.shape)}, expected {list(dst.shape)}")
            with torch.no_grad():
                dst.copy_(tensor)
        self.cache_flushes += 1
        self.weight_version = self.weight_version + 1 if weight_version is None else weight_version
        return self.weight_version

    def named_hf_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.tensors.items())

    def pause_generation(self) -> None:
        self.paused = True

    def continue_generation(self) -> None:
        self.paused = False

    def metrics(self) -> dict:
        return {"num_running_requests": 0, "num_queued_requests": 0, "weight_version": self.weight_version}

"""Test and benchmark helper: an engine that is nothing but named tensors, with the engine's weight-update members."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from weight_sync.buckets import NamedTensors, bucket_named_tensors
from weight_sync.checksum import checksum_report
from weight_sync.errors import WeightSyncError
from weight_sync.ipc import ColocatedBucket, SharedBucket, open_bucket
from weight_sync.receiver import WeightReceiver


class TensorDictEngine:
    """Named tensors (e.g. an HF model's state_dict) updated in place: a stand-in for an Engine where only weights
    matter, with the weight members of `inference_engine.control.EngineControl` (same names, same arguments) on
    top of a `WeightReceiver`, as the Engine has them.

    `load_weights` copies each (hf_name, tensor) into the held tensor of that name (casting dtype and device),
    counts a cache flush and sets the weight version, as the engine does between steps.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, disk_bucket_bytes: int = 512 << 20):
        self.tensors = dict(tensors)
        self.weight_version = 0
        self.cache_flushes = 0
        self.paused = False
        self.disk_bucket_bytes = disk_bucket_bytes
        self.receiver = WeightReceiver()

    # ---- what the Engine does inside: load, export, pause flag, load numbers
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: int) -> int:
        """Copy each tensor into the held tensor of the same name; unknown names and shape mismatches raise."""
        named = list(named_tensors)
        for name, tensor in named:
            if name not in self.tensors:
                raise KeyError(f"load_weights: unknown tensor {name!r}; this model has {len(self.tensors)} tensors")
            dst = self.tensors[name]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"load_weights: {name!r} has shape {list(tensor.shape)}, expected {list(dst.shape)}")
            with torch.no_grad():
                dst.copy_(tensor)
        if named and named[0][1].is_cuda:   # done reading a colocated sender's memory before returning
            torch.cuda.current_stream(named[0][1].device).synchronize()
        self.cache_flushes += 1
        self.weight_version = _version(weight_version)
        return self.weight_version

    def named_hf_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.tensors.items())

    def metrics(self) -> dict:
        return {"num_running_requests": 0, "num_queued_requests": 0, "weight_version": self.weight_version}

    # ---- the weight members of the engine's control surface
    def pause_generation(self, mode: str = "pause") -> None:
        self.receiver.drain(mode, lambda: 0)
        self.paused = True

    def continue_generation(self) -> None:
        self.paused = False

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str = "auto", timeout_s: float = 300.0) -> None:
        self.receiver.join_group(master_address, master_port, rank_offset, world_size, group_name, backend, timeout_s)

    def destroy_weights_update_group(self, group_name: str) -> None:
        self.receiver.leave_group(group_name)

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]], group_name: str, weight_version: int) -> int:
        return self.load_weights(self.receiver.receive_distributed(group_name, names, dtypes, shapes), weight_version)

    def update_weights_from_tensor(self, named_tensors: ColocatedBucket | SharedBucket | NamedTensors,
                                   weight_version: int) -> int:
        """A colocated bucket brings its push's pause (done first) and continue (after the load, also a failed one)."""
        _version(weight_version)
        if isinstance(named_tensors, ColocatedBucket):
            if named_tensors.pause is not None:
                self.pause_generation(named_tensors.pause)
            try:
                self.receiver.receive_colocated(named_tensors, lambda named: self.load_weights(named, weight_version))
            finally:
                if named_tensors.resume:
                    self.continue_generation()
            return self.weight_version
        named = open_bucket(named_tensors) if isinstance(named_tensors, SharedBucket) else list(named_tensors)
        return self.load_weights(named, weight_version)

    def update_weights_from_disk(self, model_path: str, weight_version: int) -> int:
        _version(weight_version)
        for bucket in safetensors_buckets(model_path, self.disk_bucket_bytes):
            self.load_weights(bucket, weight_version)
        return self.weight_version

    def weight_checksums(self) -> dict[str, dict]:
        return checksum_report(self.named_hf_tensors())


def safetensors_buckets(model_path: str, bucket_bytes: int) -> Iterator[NamedTensors]:
    """Every tensor of an HF folder's safetensors files, in buckets of about `bucket_bytes`."""
    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise WeightSyncError(f"update_weights_from_disk: {model_path!r} holds no *.safetensors files; "
                              "expected an HF model folder")

    def stream():
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    return bucket_named_tensors(stream(), bucket_bytes)


def _version(weight_version: int) -> int:
    if not isinstance(weight_version, int) or isinstance(weight_version, bool):
        raise TypeError(f"weight_version must be an int, got {weight_version!r}")
    return weight_version

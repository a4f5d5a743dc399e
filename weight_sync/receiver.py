"""Engine side: receive trainer weights by any transport and load them into the engine's own parameters."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from weight_sync.buckets import FlatLayout, NamedTensors, bucket_named_tensors
from weight_sync.checksum import checksums
from weight_sync.config import PAUSE_MODES
from weight_sync.errors import WeightSyncError, WeightSyncTimeoutError
from weight_sync.group import WeightUpdateGroup
from weight_sync.ipc import ColocatedBucket, SharedBucket, SharedStorages, open_bucket

T = TypeVar("T")


class WeightTarget(Protocol):
    """What the receiver needs from an engine (`inference_engine.Engine` has all of it)."""

    @property
    def weight_version(self) -> int: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: int | None = None) -> int:
        """Load between scheduler steps into the fused / sharded parameters, flush the radix cache, set the version."""

    def named_hf_tensors(self) -> Iterable[tuple[str, torch.Tensor]]: ...

    def pause_generation(self) -> None: ...

    def continue_generation(self) -> None: ...

    def metrics(self) -> dict: ...


class WeightReceiver:
    """An engine's weight-update endpoint (SGLang's method names): what `push_weights` and `WeightSender` talk to.

    Wrap an engine (`WeightReceiver(engine)`) and pass the receiver as the engine to `push_weights`, or
    have the engine's own RL methods be thin wrappers over one. Every update goes through
    `engine.load_weights(named_tensors, weight_version)`, which applies it between scheduler steps,
    flushes the radix cache and sets the weight version.
    """

    def __init__(self, target: WeightTarget, *, tp_rank: int = 0, disk_bucket_bytes: int = 512 << 20,
                 drain_timeout_s: float = 600.0, drain_poll_s: float = 0.01):
        self.target = target
        self.tp_rank = tp_rank
        self._disk_bucket_bytes = disk_bucket_bytes
        self._drain_timeout_s = drain_timeout_s
        self._drain_poll_s = drain_poll_s
        self._groups: dict[str, WeightUpdateGroup] = {}
        self.shared = SharedStorages()   # colocated senders' storages, opened once

    @property
    def weight_version(self) -> int:
        return self.target.weight_version

    def pause_generation(self, mode: str = "pause") -> None:
        """Stop the engine stepping; mode "drain" first waits until no request is running or queued."""
        self.wait_before_pause(mode)
        self.target.pause_generation()   # a request that slipped in after the drain is paused in place

    def wait_before_pause(self, mode: str) -> None:
        """Check the pause mode; for "drain" wait until no request is running or queued (a timeout raises)."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r}; expected one of {PAUSE_MODES}")
        if mode == "drain":
            deadline = time.monotonic() + self._drain_timeout_s
            while self._busy_requests():
                if time.monotonic() > deadline:
                    raise WeightSyncTimeoutError(f"drain: {self._busy_requests()} requests still in flight after "
                                                 f"{self._drain_timeout_s:g}s; use pause_mode='pause' or abort them")
                time.sleep(self._drain_poll_s)

    def continue_generation(self) -> None:
        """Let the engine step again."""
        self.target.continue_generation()

    def _busy_requests(self) -> int:
        m = self.target.metrics()
        return int(m["num_running_requests"]) + int(m["num_queued_requests"])

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str = "auto", timeout_s: float = 300.0) -> None:
        """Join the trainer's weight-update group as rank `rank_offset + tp_rank`; blocks until every rank arrived."""
        if group_name in self._groups:
            raise WeightSyncError(f"weight-update group {group_name!r} already exists on this engine; "
                                  "destroy_weights_update_group it first")
        self._groups[group_name] = WeightUpdateGroup(master_address, master_port, rank_offset + self.tp_rank,
                                                     world_size, group_name, backend, timeout_s)

    def destroy_weights_update_group(self, group_name: str) -> None:
        """Leave and release the named weight-update group."""
        self._group(group_name).close()
        del self._groups[group_name]

    def close(self) -> None:
        """Leave every weight-update group this receiver joined and drop the colocated senders' storages."""
        for group_name in list(self._groups):
            self.destroy_weights_update_group(group_name)
        self.shared.close()

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]],
                                        group_name: str, weight_version: int | None = None) -> None:
        """Receive one bucket broadcast from group rank 0 (one flat buffer per dtype) and load it."""
        group = self._group(group_name)
        layout = FlatLayout.from_metadata(names, dtypes, shapes)
        buffers = layout.empty_buffers(group.device)
        for buf in buffers:
            group.broadcast(buf, src=0)
        self._apply(layout.unflatten(buffers), weight_version)

    def update_weights_from_tensor(self, named_tensors: ColocatedBucket | SharedBucket | NamedTensors,
                                   weight_version: int | None = None) -> None:
        """Load a colocated bucket (`ColocatedBucket` / `SharedBucket`, by handle) or plain (hf_name, tensor) pairs.

        A `ColocatedBucket` may bring the push's pause (done first) and continue (done after the load).
        """
        if isinstance(named_tensors, ColocatedBucket):
            if named_tensors.pause is not None:
                self.pause_generation(named_tensors.pause)
            try:
                self.receive_colocated(named_tensors, lambda named: self._apply_synced(named, weight_version))
            finally:
                if named_tensors.resume:   # also after a failed load, as push_weights would
                    self.continue_generation()
            return
        if isinstance(named_tensors, SharedBucket):
            named = open_bucket(named_tensors)
        else:
            named = list(named_tensors)
            bad = [n for n, t in named if not isinstance(n, str) or not isinstance(t, torch.Tensor)]
            if bad:
                raise TypeError(f"update_weights_from_tensor expects (hf_name, tensor) pairs; bad entries: {bad[:5]}")
        self._apply_synced(named, weight_version)

    def receive_colocated(self, bucket: ColocatedBucket, load: Callable[[NamedTensors], T],
                          phases: dict[str, float] | None = None) -> T | None:
        """Open the bucket's tensors in the shared storages, `load` them (done reading when it returns), close what the push is done with.

        A bucket without tensors only opens and closes storages: `load` is not called, None is returned.
        `phases` gets the seconds of "open" (handles opened, views made) and "close" (storages the push is done with).
        """
        phases = {} if phases is None else phases
        start = time.perf_counter()
        named = None
        try:
            named = self.shared.tensors(bucket)
            phases["open"] = time.perf_counter() - start
            return load(named) if bucket.names else None
        finally:
            start = time.perf_counter()
            named = None   # the views go first, so that closing unmaps the storages the push is done with
            self.shared.finish(bucket)
            phases["close"] = time.perf_counter() - start

    def _apply_synced(self, named: NamedTensors, weight_version: int | None) -> None:
        self._apply(named, weight_version)
        if named and named[0][1].is_cuda:
            torch.cuda.current_stream(named[0][1].device).synchronize()   # done reading the sender's memory

    def update_weights_from_disk(self, model_path: str, weight_version: int | None = None) -> None:
        """Load every tensor of the HF folder's safetensors files, a bucket at a time."""
        from safetensors import safe_open

        files = sorted(Path(model_path).glob("*.safetensors"))
        if not files:
            raise WeightSyncError(f"update_weights_from_disk: {model_path!r} holds no *.safetensors files; "
                                  "expected an HF model folder")
        version = self._next_version(weight_version)

        def stream():
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)

        for bucket in bucket_named_tensors(stream(), self._disk_bucket_bytes):
            self._apply(bucket, version)

    def weight_checksums(self) -> dict[str, dict]:
        """{hf_name: checksum dict} of the engine's weights as it holds them now (plain data, to send back)."""
        return {name: c.to_dict() for name, c in checksums(self.target.named_hf_tensors()).items()}

    def _group(self, group_name: str) -> WeightUpdateGroup:
        if group_name not in self._groups:
            raise WeightSyncError(f"no weight-update group {group_name!r} on this engine; known: {sorted(self._groups)} "
                                  "(call init_weights_update_group first)")
        return self._groups[group_name]

    def _next_version(self, weight_version: int | None) -> int:
        return self.target.weight_version + 1 if weight_version is None else int(weight_version)

    def _apply(self, named: NamedTensors, weight_version: int | None) -> None:
        self.target.load_weights(named, weight_version=self._next_version(weight_version))

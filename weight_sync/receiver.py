"""Engine side of the transports: one engine rank's weight-update groups, the colocated storages it opened, the drain.

The engine's control surface (`update_weights_from_*`, `init_weights_update_group`, ...) is the engine's
own (`inference_engine.control.EngineControl`); a `WeightReceiver` is what one engine rank uses under it
to receive tensors. It loads nothing itself: the caller loads what it receives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from weight_sync.buckets import FlatLayout, NamedTensors
from weight_sync.config import PAUSE_MODES
from weight_sync.errors import WeightSyncError, WeightSyncTimeoutError
from weight_sync.group import WeightUpdateGroup
from weight_sync.ipc import ColocatedBucket, SharedStorages

T = TypeVar("T")


class WeightReceiver:
    """One engine rank's end of weight sync: its weight-update groups (as group rank `rank_offset + tp_rank`),
    the colocated senders' storages it keeps open (`shared`), and the wait of a "drain" pause."""

    def __init__(self, *, tp_rank: int = 0, drain_timeout_s: float = 600.0, drain_poll_s: float = 0.01):
        self.tp_rank = tp_rank
        self._drain_timeout_s = drain_timeout_s
        self._drain_poll_s = drain_poll_s
        self._groups: dict[str, WeightUpdateGroup] = {}
        self.shared = SharedStorages()   # colocated senders' storages, opened once

    def drain(self, mode: str, busy_requests: Callable[[], int]) -> None:
        """Check the pause mode; for "drain" wait until `busy_requests()` (running + queued) is 0 (a timeout raises)."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r}; expected one of {PAUSE_MODES}")
        if mode == "drain":
            deadline = time.monotonic() + self._drain_timeout_s
            while busy_requests():
                if time.monotonic() > deadline:
                    raise WeightSyncTimeoutError(f"drain: {busy_requests()} requests still in flight after "
                                                 f"{self._drain_timeout_s:g}s; use pause_mode='pause' or abort them")
                time.sleep(self._drain_poll_s)

    def join_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                   group_name: str, backend: str = "auto", timeout_s: float = 300.0) -> None:
        """Join the trainer's weight-update group as rank `rank_offset + tp_rank`; blocks until every rank arrived."""
        if group_name in self._groups:
            raise WeightSyncError(f"weight-update group {group_name!r} already exists on this engine; "
                                  "destroy_weights_update_group it first")
        self._groups[group_name] = WeightUpdateGroup(master_address, master_port, rank_offset + self.tp_rank,
                                                     world_size, group_name, backend, timeout_s)

    def leave_group(self, group_name: str) -> None:
        """Leave and release the named weight-update group."""
        self._group(group_name).close()
        del self._groups[group_name]

    def receive_distributed(self, group_name: str, names: Sequence[str], dtypes: Sequence[str],
                            shapes: Sequence[Sequence[int]]) -> NamedTensors:
        """The bucket group rank 0 broadcasts (one flat buffer per dtype), as (hf_name, tensor) pairs."""
        group = self._group(group_name)
        layout = FlatLayout.from_metadata(names, dtypes, shapes)
        buffers = layout.empty_buffers(group.device)
        for buf in buffers:
            group.broadcast(buf, src=0)
        return layout.unflatten(buffers)

    def receive_colocated(self, bucket: ColocatedBucket, load: Callable[[NamedTensors], T],
                          phases: dict[str, float] | None = None) -> T | None:
        """Open the bucket's tensors in the shared storages, `load` them (done reading when it returns), close what
        the push is done with.

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

    def close(self) -> None:
        """Leave every weight-update group this receiver joined and drop the colocated senders' storages."""
        for group_name in list(self._groups):
            self.leave_group(group_name)
        self.shared.close()

    def _group(self, group_name: str) -> WeightUpdateGroup:
        if group_name not in self._groups:
            raise WeightSyncError(f"no weight-update group {group_name!r} on this engine; "
                                  f"known: {sorted(self._groups)} "
                                  "(call init_weights_update_group first)")
        return self._groups[group_name]

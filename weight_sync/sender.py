"""Trainer side: send buckets of full HF-named tensors to every engine over the configured transport."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from weight_sync.buckets import FlatLayout, NamedTensors, tensor_bytes
from weight_sync.checksum import TensorChecksum, checksums, per_expert
from weight_sync.colocated import ColocatedChannel
from weight_sync.config import WeightSyncConfig
from weight_sync.errors import WeightSyncError, raise_engine_errors
from kiln_common.net import free_port
from weight_sync.group import WeightUpdateGroup


@dataclass
class SentCounts:
    """What one update delivered; `in_place_*`: the part colocated engines read straight out of the trainer's memory.

    `messages`: load calls per engine; `pack_s`: the sender's own work on the buckets (packing, handles);
    `wait_s`: blocked on the engines (or the broadcasts); `message_s[k]`: message k's round trip (slowest engine).
    """

    buckets: int = 0
    tensors: int = 0
    bytes: int = 0
    in_place_tensors: int = 0
    in_place_bytes: int = 0
    messages: int = 0
    pack_s: float = 0.0
    wait_s: float = 0.0
    message_s: list[float] = field(default_factory=list)


class WeightSender:
    """Trainer rank 0's end of weight sync; engines are objects with the weight members of
    `inference_engine.control.EngineControl` (an `Engine` in-process, `EngineProxy` for an actor)."""

    def __init__(self, config: WeightSyncConfig):
        self.config = config
        self.group: WeightUpdateGroup | None = None
        self.sent_checksums: dict[str, TensorChecksum] = {}   # filled per update when check_weight_update is on
        self._pool: ThreadPoolExecutor | None = None
        self._colocated: ColocatedChannel | None = None   # staging buffers and open handles, kept between pushes

    def connect(self, engines: Sequence[Any], ranks_per_engine: Sequence[int] | None = None) -> None:
        """Create the distributed group: this process is rank 0, engine i joins at rank 1 + the earlier engines'
        ranks."""
        if self.config.transport != "distributed":
            return
        if self.group is not None:
            raise WeightSyncError(f"weight-update group {self.config.group_name!r} is already connected")
        ranks = list(ranks_per_engine) if ranks_per_engine is not None else [1] * len(engines)
        if len(ranks) != len(engines) or any(r < 1 for r in ranks):
            raise ValueError(f"ranks_per_engine={ranks} must give >= 1 rank for each of the {len(engines)} engines")
        cfg = self.config
        port = cfg.master_port or free_port(cfg.master_address)
        world_size = 1 + sum(ranks)
        offsets = [1 + sum(ranks[:i]) for i in range(len(engines))]
        futures = [self._submit(e.init_weights_update_group, cfg.master_address, port, offset, world_size,
                                cfg.group_name, cfg.backend, cfg.timeout_s) for e, offset in zip(engines, offsets)]
        group, error = None, None
        try:
            group = WeightUpdateGroup(cfg.master_address, port, 0, world_size, cfg.group_name, cfg.backend,
                                      cfg.timeout_s)
        except WeightSyncError as e:
            error = e
        raise_engine_errors(futures, "init_weights_update_group", error)
        self.group = group

    def send_update(self, trainer_buckets: Iterable[NamedTensors], engines: Sequence[Any], weight_version: int,
                    resident: Iterable[torch.Tensor] = (), pause: str | None = None,
                    resume: bool = False) -> SentCounts:
        """Deliver every bucket to every engine; returns what was sent once every engine has loaded it.

        Colocated: tensors that view a storage of `resident` (the trainer's parameters, unchanged during the
        push) are read by the engines in place; the others go through persistent staging buffers. `pause` /
        `resume` ride along with the first / last message (colocated only: the distributed transport's
        engines are paused and resumed by the caller). With `check_weight_update` the checksum of every
        tensor sent is kept in `sent_checksums` (stacked expert tensors under the per-expert names engines
        report, `checksum.per_expert`).
        """
        self.sent_checksums = {}
        counts = SentCounts()
        layout, on_sender = self.config.fp8, self.config.quantize_on_sender
        if on_sender:   # FP8 engines: e4m3 weights + scales go out (half the bytes)
            trainer_buckets = (layout.quantize_bucket(bucket) for bucket in trainer_buckets)

        def count(bucket: NamedTensors, nbytes: int) -> None:
            if self.config.check_weight_update:   # over what the engines will hold
                held = layout.quantize_bucket(bucket) if layout is not None and not on_sender else bucket
                self.sent_checksums.update(checksums(per_expert(held)))
            counts.buckets += 1
            counts.tensors += len(bucket)
            counts.bytes += nbytes

        if self.config.transport == "distributed":
            if pause is not None or resume:
                raise WeightSyncError("the distributed transport does not fold pause / resume into its messages; "
                                      "call pause_generation / continue_generation on the engines")
            for bucket in trainer_buckets:
                if bucket:
                    count(bucket, sum(tensor_bytes(t) for _, t in bucket))
                    start = time.perf_counter()
                    self._send_distributed(bucket, engines, weight_version)
                    counts.message_s.append(time.perf_counter() - start)
            counts.messages = len(counts.message_s)
            counts.wait_s = sum(counts.message_s)
        else:
            if self._colocated is None:
                self._colocated = ColocatedChannel(self._submit, self.config.keep_resident_open)
            self._colocated.push(trainer_buckets, engines, weight_version, resident, counts, count, pause, resume)
        return counts

    def release(self, engines: Sequence[Any]) -> None:
        """Colocated: have the engines close the trainer's storages they keep open between pushes; call it before
        the trainer moves or frees its parameters (offload), or their memory stays mapped until the next push."""
        if self._colocated is not None:
            self._colocated.release(engines)

    def close(self, engines: Sequence[Any] = ()) -> None:
        """Tear down the group (on the engines too), the colocated storages (closed on `engines`), the staging
        buffers and the worker threads."""
        if self.group is not None:
            futures = [self._submit(e.destroy_weights_update_group, self.config.group_name) for e in engines]
            self.group.close()
            self.group = None
            raise_engine_errors(futures, "destroy_weights_update_group", None)
        if self._colocated is not None:
            try:
                self._colocated.release(engines, staging=True)
            finally:
                self._colocated.close()
            self._colocated = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _send_distributed(self, bucket: NamedTensors, engines: Sequence[Any], weight_version: int) -> None:
        if self.group is None:
            raise WeightSyncError("distributed transport is not connected; call WeightSender.connect(engines) first")
        layout = FlatLayout.of(bucket)
        meta = layout.metadata()
        futures = [self._submit(e.update_weights_from_distributed, meta["names"], meta["dtypes"], meta["shapes"],
                                self.config.group_name, weight_version) for e in engines]
        error = None
        try:
            for buf in layout.flatten(bucket, device=self.group.device):   # [numel] per dtype
                self.group.broadcast(buf, src=0)
        except WeightSyncError as e:
            error = e
        raise_engine_errors(futures, "update_weights_from_distributed", error)

    def _submit(self, fn, *args) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="weight-sync")
        return self._pool.submit(fn, *args)


"""push_weights: the one call the driver makes after each training step to move weights into the engines."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from weight_sync.buckets import NamedTensors
from weight_sync.checksum import TensorChecksum, compare_checksums
from weight_sync.errors import WeightSyncError
from weight_sync.sender import WeightSender


@dataclass(frozen=True)
class PushStats:
    """What one push moved and how long it took (pause to continue); `in_place_*`: the part colocated engines
    read straight out of the trainer's memory (the rest was packed into staging buffers or broadcast)."""

    weight_version: int
    buckets: int
    tensors: int
    bytes: int
    seconds: float
    in_place_tensors: int = 0
    in_place_bytes: int = 0

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0


def push_weights(trainer_buckets: Iterable[NamedTensors], engines: Sequence[Any], transport: WeightSender | None,
                 weight_version: int | None = None, resident: Iterable[torch.Tensor] = ()) -> PushStats:
    """Pause (or drain) engines -> stream buckets -> engines load, flush, set version -> verify -> continue.

    Every trainer rank calls this together (the bucket iterator is collective); ranks other than the
    sending one pass no engines and no transport and only take part in the iteration. The new version
    defaults to one past the highest engine version. `resident`: tensors whose storages stay put for
    the whole push (the trainer's parameters); colocated engines read bucket tensors that view them in
    place. Engines resume even when the update fails; the error is raised after they do.
    """
    start = time.perf_counter()
    if not engines:
        if any(bucket for bucket in trainer_buckets):
            raise WeightSyncError("push_weights got non-empty trainer buckets but no engines to send them to")
        return PushStats(weight_version or 0, 0, 0, 0, time.perf_counter() - start)
    if transport is None:
        raise WeightSyncError("push_weights got engines but no transport (a WeightSender)")
    version = weight_version if weight_version is not None else 1 + max(int(e.weight_version) for e in engines)
    config = transport.config
    for engine in engines:
        engine.pause_generation(mode=config.pause_mode)
    try:
        sent = transport.send_update(trainer_buckets, engines, version, resident)
        if sent.buckets == 0:
            raise WeightSyncError("the trainer yielded no weights; nothing was pushed (is this the sending rank?)")
        if config.check_weight_update:
            for i, engine in enumerate(engines):
                reported = {k: TensorChecksum.from_dict(v) for k, v in engine.weight_checksums().items()}
                compare_checksums(transport.sent_checksums, reported, where=f"engine {i}")
    finally:
        for engine in engines:
            engine.continue_generation()
    return PushStats(version, sent.buckets, sent.tensors, sent.bytes, time.perf_counter() - start,
                     sent.in_place_tensors, sent.in_place_bytes)

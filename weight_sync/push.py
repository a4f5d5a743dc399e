"""push_weights: the one call the driver makes after each training step to move weights into the engines."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from weight_sync.buckets import NamedTensors
from weight_sync.checksum import TensorChecksum, compare_checksums
from weight_sync.errors import WeightSyncError
from weight_sync.sender import WeightSender

PHASES = ("pause", "pack", "wait", "verify", "resume", "other", "total")


@dataclass(frozen=True)
class PushStats:
    """What one push moved and how long it took (pause to continue); `in_place_*`: the part colocated engines
    read straight out of the trainer's memory (the rest was packed into staging buffers or broadcast).

    `phases` (seconds, the sender's clock, summing to `total`): `pause` / `resume` the explicit
    pause_generation / continue_generation calls (0 when they ride along with the colocated messages),
    `pack` the sender's work on the buckets (staging copies, handles), `wait` blocked on the engines'
    loads (or the broadcasts), `verify` the checksum comparison, `other` the rest (the trainer's bucket
    iterator). `message_seconds[k]`: the round trip of load call k (slowest engine).
    """

    weight_version: int
    buckets: int
    tensors: int
    bytes: int
    seconds: float
    in_place_tensors: int = 0
    in_place_bytes: int = 0
    messages: int = 0
    phases: dict[str, float] = field(default_factory=dict)
    message_seconds: tuple[float, ...] = ()

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0


def push_weights(trainer_buckets: Iterable[NamedTensors], engines: Sequence[Any], transport: WeightSender | None,
                 weight_version: int, resident: Iterable[torch.Tensor] = ()) -> PushStats:
    """Pause (or drain) engines -> stream buckets -> engines load, flush, set version -> verify -> continue.

    Every trainer rank calls this together (the bucket iterator is collective); ranks other than the
    sending one pass no engines and no transport and only take part in the iteration. `weight_version`
    (an int, required) is the version the engines hold afterwards. `engines`: objects with the weight
    members of `inference_engine.control.EngineControl` (an `Engine`, an `EngineProxy`, the test double
    `weight_sync.testing.TensorDictEngine`). `resident`: tensors whose storages stay put for
    the whole push (the trainer's parameters); colocated engines read bucket tensors that view them in
    place. Colocated, the pause rides along with the first message and the continue with the last
    (unless checksums are verified, which happens while the engines are still paused), so a push that
    fits one message is one round trip per engine. Engines resume even when the update fails; the
    error is raised after they do.
    """
    start = time.perf_counter()
    if not isinstance(weight_version, int) or isinstance(weight_version, bool):
        raise TypeError(f"push_weights: weight_version must be an int (the version the engines hold afterwards), "
                        f"got {weight_version!r}")
    if not engines:
        if any(bucket for bucket in trainer_buckets):
            raise WeightSyncError("push_weights got non-empty trainer buckets but no engines to send them to")
        return PushStats(weight_version, 0, 0, 0, time.perf_counter() - start)
    if transport is None:
        raise WeightSyncError("push_weights got engines but no transport (a WeightSender)")
    version = weight_version
    config = transport.config
    folded = config.transport == "colocated"   # pause / continue travel with the first / last message
    resume_with_last = folded and not config.check_weight_update
    phases = dict.fromkeys(PHASES, 0.0)
    resumed = False
    if not folded:
        phases["pause"] = _timed_calls(engines, "pause_generation", mode=config.pause_mode)
    try:
        sent = transport.send_update(trainer_buckets, engines, version, resident,
                                     pause=config.pause_mode if folded else None, resume=resume_with_last)
        resumed = resume_with_last or sent.messages == 0   # no message: no engine was paused
        if sent.buckets == 0:
            raise WeightSyncError("the trainer yielded no weights; nothing was pushed (is this the sending rank?)")
        if config.check_weight_update:
            verify_start = time.perf_counter()
            for i, engine in enumerate(engines):
                reported = {k: TensorChecksum.from_dict(v) for k, v in engine.weight_checksums().items()}
                compare_checksums(transport.sent_checksums, reported, where=f"engine {i}")
            phases["verify"] = time.perf_counter() - verify_start
    finally:
        if not resumed:   # also after a failed push, whose first message may have paused an engine
            phases["resume"] = _timed_calls(engines, "continue_generation")
    phases["pack"], phases["wait"] = sent.pack_s, sent.wait_s
    phases["total"] = time.perf_counter() - start
    phases["other"] = max(0.0, phases["total"] - sum(v for k, v in phases.items() if k not in ("other", "total")))
    return PushStats(version, sent.buckets, sent.tensors, sent.bytes, phases["total"], sent.in_place_tensors,
                     sent.in_place_bytes, sent.messages, phases, tuple(sent.message_s))


def _timed_calls(engines: Sequence[Any], method: str, **kwargs: Any) -> float:
    """Call `method(**kwargs)` on every engine in turn; the seconds it took."""
    start = time.perf_counter()
    for engine in engines:
        getattr(engine, method)(**kwargs)
    return time.perf_counter() - start

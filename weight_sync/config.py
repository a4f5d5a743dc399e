"""WeightSyncConfig: how trainer weights reach the engines after each step."""

from __future__ import annotations

from dataclasses import dataclass

from weight_sync.fp8 import Fp8Layout

TRANSPORTS = ("colocated", "distributed")
BACKENDS = ("auto", "gloo", "nccl")
PAUSE_MODES = ("pause", "drain")
FP8_QUANTIZE_ON = ("auto", "sender", "engine")


@dataclass(frozen=True)
class WeightSyncConfig:
    """Typed settings for `WeightSender` / `push_weights`, validated at construction.

    transport: "colocated" (CUDA IPC on GPU, shared tensors on CPU; engines on the trainer's node)
        or "distributed" (a dedicated gloo/NCCL group between trainer rank 0 and every engine rank).
    bucket_bytes: target size of one bucket of full HF tensors; a tensor larger than this travels
        alone in its own bucket (tensors are never split).
    backend: collective backend of the distributed group; "auto" = NCCL with CUDA, else gloo.
    pause_mode: "pause" = engines stop stepping, in-flight requests resume on the new weights;
        "drain" = engines stop admitting and finish in-flight requests on the old weights first.
    check_weight_update: after each update compare per-tensor checksums of engine and trainer.
    keep_resident_open: colocated engines keep the trainer's parameter storages (read in place) open from
        push to push while they live, so a repeated push opens no handle and reuses the engines' views and
        copy lists; `WeightSender.release(engines)` closes them before the trainer moves its parameters.
        False: shared and closed within every push.
    timeout_s: rendezvous and per-collective timeout of the distributed group.
    fp8: the engines hold these weights in FP8 (`Fp8Layout`, the engines' `EngineConfig.fp8_layout`); None: as sent.
    fp8_quantize_on: where full-precision weights become FP8 + scales: "sender" (before the wire: half the bytes
        on the wire and in staging), "engine" (while loading; colocated engines read the trainer's bf16 in place
        and write FP8 straight into their weights), "auto" = sender for "distributed", engine for "colocated".
        Checksums (check_weight_update) are over what the engines hold, FP8 weights and scales, either way.
    """

    transport: str = "colocated"
    bucket_bytes: int = 512 << 20
    backend: str = "auto"
    pause_mode: str = "pause"
    check_weight_update: bool = False
    keep_resident_open: bool = True
    timeout_s: float = 300.0
    master_address: str = "127.0.0.1"
    master_port: int = 0
    group_name: str = "kiln_weight_sync"
    fp8: Fp8Layout | None = None
    fp8_quantize_on: str = "auto"

    def __post_init__(self):
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport={self.transport!r}; expected one of {TRANSPORTS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}; expected one of {BACKENDS}")
        if self.pause_mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode={self.pause_mode!r}; expected one of {PAUSE_MODES}")
        if not isinstance(self.bucket_bytes, int) or self.bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes={self.bucket_bytes!r}; expected a positive int of bytes")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s!r}; expected seconds > 0")
        if not 0 <= self.master_port <= 65535:
            raise ValueError(f"master_port={self.master_port!r}; expected 0 (pick a free port) to 65535")
        if self.fp8_quantize_on not in FP8_QUANTIZE_ON:
            raise ValueError(f"fp8_quantize_on={self.fp8_quantize_on!r}; expected one of {FP8_QUANTIZE_ON}")
        if not self.group_name:
            raise ValueError("group_name is empty; expected a name for the weight-update group")

    @property
    def quantize_on_sender(self) -> bool:
        """Whether the sender quantises FP8 weights before they go out (see fp8_quantize_on)."""
        if self.fp8 is None:
            return False
        if self.fp8_quantize_on == "auto":
            return self.transport == "distributed"
        return self.fp8_quantize_on == "sender"

"""TrainerGroup: one policy's N TrainerActor ranks as Ray actors, driven together, and their weight push.

Every method of the group calls all ranks at once (the ranks' collectives need each other) and
returns rank 0's answer. Rank 0 also owns the `weight_sync.WeightSender` that pushes the
policy's weights into its engines after each step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import ray

from orchestrator.placement import Slot, actor_options
from kiln_common.atomic_io import FileDigest
from kiln_common.logs import setup_logging
from kiln_common.sample import Sample
from trainer.actor import TrainerActor
from trainer.config import TrainerConfig
from weight_sync import WeightSender, WeightSyncConfig, push_weights
from kiln_common.net import free_port

logger = logging.getLogger(__name__)


class TrainerWorker(TrainerActor):
    """A TrainerActor rank plus the weight push (rank 0 sends, the others join the collective gather)."""

    def __init__(self, config: TrainerConfig, rank: int, world_size: int, master_addr: str, master_port: int):
        setup_logging(logging.INFO, "%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger("trainer.actor").setLevel(logging.WARNING)  # the driver logs one line per step
        super().__init__(config, rank, world_size, master_addr, master_port)
        self.sender: WeightSender | None = None
        self.engines: list[Any] = []

    def connect_engines(self, engines: Sequence[Any], sync: WeightSyncConfig,
                        ranks_per_engine: Sequence[int] | None = None) -> None:
        """Remember the policy's engines (EngineProxy objects) and, on rank 0, connect the weight sender.

        `ranks_per_engine[i]` is engine i's tp_size: each of its tp ranks joins the weight-update group.
        """
        if self.rank != 0:
            return
        self.engines = list(engines)
        self.sender = WeightSender(sync)
        self.sender.connect(self.engines, ranks_per_engine=ranks_per_engine)

    def push_weights(self, weight_version: int, verify: bool = False) -> dict[str, float]:
        """Push the current weights into the engines as `weight_version`; PushStats as a dict (rank 0).

        The parameters are resident for the push: over the colocated transport the engines copy the
        tensors that view them (without TP, all of rank 0's stage but q/k/v) straight out of them.
        `verify`: compare every engine's weight checksums with the trainer's after this push (as
        check_weight_update does on every push), e.g. after an engine was restarted.
        """
        buckets = self.iter_hf_weight_buckets(self.sender.config.bucket_bytes if self.sender else 1 << 30)
        config = self.sender.config if self.sender is not None else None
        if verify and config is not None and not config.check_weight_update:
            self.sender.config = dataclasses.replace(config, check_weight_update=True)
        try:
            stats = push_weights(buckets, self.engines, self.sender, weight_version,
                                 resident=list(self.model.parameters()))
        finally:
            if config is not None:
                self.sender.config = config
        return {**asdict(stats), "gb_per_s": stats.gb_per_s}

    def offload(self) -> int:
        """Offload (see TrainerActor.offload), after the engines closed the parameter storages they keep open."""
        if self.sender is not None:
            self.sender.release(self.engines)
        return super().offload()

    def disconnect_engines(self) -> None:
        """Tear down the weight sender (and the engines' ends of its group). An engine that cannot take part (dead,
        killed for a restart) is logged and skipped: the sender is closed on this side all the same."""
        sender, self.sender = self.sender, None
        engines, self.engines = self.engines, []
        if sender is None:
            return
        try:
            sender.close(engines)
        except Exception as e:  # noqa: BLE001 - a dead engine cannot leave the group; the rest is torn down
            logger.warning("closing the weight sender reached not every engine (a dead one is expected during a "
                           "restart): %s", e)
            sender.close(())


@ray.remote
def _rendezvous_address() -> tuple[str, int]:
    """The node IP Ray reports and a free port on it, for trainer rank 0's process group."""
    return ray.util.get_node_ip_address(), free_port("")


class TrainerGroup:
    """N Ray-wrapped TrainerWorker ranks of one policy, placed in their slots of the placement group."""

    def __init__(self, name: str, config: TrainerConfig, pg: Any, slots: Sequence[Slot],
                 env: dict[str, str] | None = None) -> None:
        if not slots:
            raise ValueError(f"policy {name!r}: a TrainerGroup needs at least one slot")
        self.name = name
        self.config = config
        self.world_size = len(slots)
        address = ray.get(_rendezvous_address.options(**{**actor_options(pg, slots[0]), "num_cpus": 0,
                                                           "num_gpus": 0}).remote())
        self.master_addr, self.master_port = address
        runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", **(env or {})}}
        worker = ray.remote(TrainerWorker)
        self.actors = [worker.options(**actor_options(pg, slot), runtime_env=runtime_env).remote(
                       config, rank, self.world_size, *address)
                       for rank, slot in enumerate(slots)]

    def remote(self, method: str, *args: Any) -> list[Any]:
        """Start `method(*args)` on every rank; the ObjectRefs (to wait on several groups at once)."""
        return [getattr(a, method).remote(*args) for a in self.actors]

    def _all(self, method: str, *args: Any) -> list[Any]:
        return ray.get(self.remote(method, *args))

    def init(self) -> None:
        """Build the model(s) and optimizer on every rank."""
        self._all("init")

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """One RL update on every rank (each takes its data-parallel share); rank 0's metrics."""
        ref = ray.put(samples)
        return self._all("train_step", ref)[0]

    def compute_log_probs(self, samples: list[Sample], model: str = "actor") -> list[Any]:
        ref = ray.put(samples)
        return self._all("compute_log_probs", ref, model)[0]

    def offload(self) -> int:
        """Move params, grads and optimizer state off the device; bytes moved by all ranks."""
        return sum(self._all("offload"))

    def onload(self) -> int:
        return sum(self._all("onload"))

    def save_checkpoint(self, ckpt_dir: str | os.PathLike) -> dict[str, FileDigest]:
        """Every rank writes its file into ckpt_dir; {file name: size and sha256} of all ranks' files."""
        return {name: digest for written in self._all("save_checkpoint", str(ckpt_dir))
                for name, digest in written.items()}

    def load_checkpoint(self, ckpt_dir: str | os.PathLike) -> None:
        self._all("load_checkpoint", str(ckpt_dir))

    def export_hf(self, out_dir: str | os.PathLike) -> Path:
        """Write the policy as an HF folder; its path."""
        self._all("export_hf", str(out_dir))
        return Path(out_dir)

    def connect_engines(self, engines: Sequence[Any], sync: WeightSyncConfig,
                        ranks_per_engine: Sequence[int] | None = None) -> None:
        """Connect rank 0's weight sender to the policy's engines (EngineProxy objects; tp ranks per engine)."""
        self._all("connect_engines", list(engines), sync, ranks_per_engine)

    def push_weights(self, weight_version: int, verify: bool = False) -> dict[str, float]:
        """Push the weights into the engines as `weight_version` (`verify`: then compare checksums); rank 0's
        PushStats as a dict."""
        return self._all("push_weights", weight_version, verify)[0]

    def shutdown(self) -> None:
        """Close the weight sender, tear down the process groups and end the actors."""
        try:
            self._all("disconnect_engines")
            self._all("shutdown")
        finally:
            for actor in self.actors:
                ray.kill(actor)

"""The driver's own config: `RunConfig` (model, steps, placement, checkpoints, logging, debug modes).

Each field's docstring is its `--help` text (see `orchestrator.cli`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from kiln_common.sample import DEFAULT_POLICY
from rollout.config import check_positive, check_positive_seconds


@dataclass
class RunConfig:
    """The driver's loop: model, steps, placement, checkpoints, logging and debug modes."""

    hf_checkpoint: str = ""
    """Local HF model folder the run starts from (weights, config, tokenizer)."""
    policies: list[str] = field(default_factory=list)
    """Several policies trained together, as NAME=PATH (e.g. doctor=/m/a patient=/m/b); default: one policy
    'default' = --hf-checkpoint. Each gets its own trainers, engines and weight pushes."""
    frozen_policies: list[str] = field(default_factory=list)
    """Policies of --policies that are served but never trained (e.g. a fixed partner in a multi-agent run): their
    engines serve their --policies checkpoint at weight version 0; no trainer, no weight push, no checkpoint or HF
    export; samples of theirs are not trained (rollout/<policy>/frozen_samples counts them)."""
    num_rollout: int = 100
    """Training steps (one rollout + one policy update each)."""
    seed: int = 1234
    """Seed of model init and everything not seeded elsewhere."""
    colocate: bool = True
    """Trainers and engines share the devices and take turns holding memory."""
    policies_share_devices: bool = False
    """Several policies (--policies), colocated on one set of devices: trainer i and engine i of every policy on
    device i, each policy's trainers onloaded in turn for its update and the engines' KV pools splitting the
    memory; default: each policy its own devices."""
    release_engine_weights: bool = False
    """Colocated: the engines give back their weights' device memory, not only their KV pool, while the trainers
    train (room for a larger policy, or for the activations); a trained policy's engines discard them (the push
    after training fills every weight again, so nothing is copied to the host), a frozen policy's keep them in host
    memory. Off by default until its GPU check has passed (docs/benchmarks.md, "Device calls not yet run")."""
    async_rollout: bool = False
    """Overlap the rollout of step k+1 with training of step k (staleness 1, TIS on; needs --no-colocate); the same
    as --async-mode one-step."""
    async_mode: Literal["off", "one-step", "fully"] = "off"
    """off: rollout, then train; one-step: = --async-rollout; fully: engines generate continuously from the prompt
    stream while the trainer consumes ready groups within --max-staleness (one policy, --no-colocate, TIS on;
    docs/async.md)."""
    actor_num_nodes: int = 1
    """Nodes of each policy's trainer ranks."""
    actor_num_gpus_per_node: int = 1
    """Trainer ranks per node (one device each; on CPU a device is --cpus-per-device CPUs)."""
    num_engines: int = field(default=1, metadata={"flag": "rollout-num-engines"})
    """Inference engines serving rollouts, per policy (colocated: each shares a trainer device; else --tp-size each)."""
    cpus_per_device: float = 1.0
    """CPUs in each placement-group bundle (without GPUs a bundle of this many CPUs is one device)."""
    rollout_client: Literal["http", "ray"] = "http"
    """How the rollout manager reaches the engines: their HTTP servers, or Ray calls."""
    health_check_interval: float = 10.0
    """Seconds between the router's engine health checks."""
    engine_health_timeout: float = 10.0
    """Seconds a health probe of an engine may take (the router's and the driver's); a probe that takes longer is
    counted and logged as slow, and the engine is kept: a slow engine is not a dead one."""
    engine_stall_window: float = 300.0
    """Seconds without any sign of life (an answered probe, a finished request) from an engine that holds requests
    (router) or owes the driver's check its answer before it counts as stalled and is restarted."""
    fault_tolerance: bool = True
    """After each rollout, restart engines that died or stalled (same placement bundle, weights re-pushed and
    checksum-verified before they serve again); --no-fault-tolerance stops the run instead."""
    max_engine_restarts: int = 3
    """Engine restarts allowed over the whole run (all policies); one more failure stops the run."""
    update_weight_buffer_size: int = 512 << 20
    """Bytes per weight-push bucket (a larger tensor travels alone)."""
    check_weight_update: bool = False
    """After each weight push, compare per-tensor checksums of engines and trainer."""
    weight_sync_timeout: float = 300.0
    """Seconds a weight push (rendezvous or broadcast) may wait for a peer before failing."""
    ray_address: str | None = None
    """Ray cluster to join ('auto' = the local node's); None = $RAY_ADDRESS if set, else start a local Ray."""
    ray_num_cpus: int | None = None
    """CPUs of a local Ray started by the driver; None = all."""
    load: str | None = None
    """Checkpoint folder to resume from (model, optimizer, data position)."""
    save: str | None = None
    """Checkpoint folder to save to."""
    save_interval: int | None = None
    """Save every this many steps (needs --save)."""
    save_hf: str | None = None
    """Folder of the HF exports: <save-hf>/<policy> at the end of the run, <save-hf>/<policy>/iter_<step> every
    --save-hf-interval steps; None = <save>/hf."""
    save_hf_interval: int | None = None
    """Also export each policy as an HF folder every this many steps (needs --save or --save-hf)."""
    eval_interval: int | None = None
    """Evaluate every eval set (--eval-prompt-data, --eval-config's) every this many steps (and before step 1)."""
    skip_eval_before_train: bool = False
    """With --eval-interval: no evaluation before step 1 (slime's flag of this name)."""
    debug_rollout_only: bool = False
    """Only generate rollouts: no trainer, no weight updates."""
    debug_train_only: bool = False
    """Only train (on --load-debug-rollout-data): no engines."""
    debug: bool = False
    """Show a user error (bad flag value, missing file) as the full traceback instead of one line."""
    use_wandb: bool = False
    """Log to Weights & Biases (offline unless WANDB_MODE says otherwise)."""
    wandb_project: str = "kiln"
    """Weights & Biases project name."""
    metrics_file: str | None = "metrics.jsonl"
    """JSON-lines file the driver appends one line of metrics per step to; None = off."""
    use_tensorboard: bool = False
    """Also log the step metrics to TensorBoard (event files in --tensorboard-dir)."""
    tensorboard_dir: str | None = None
    """TensorBoard log folder; None = <the metrics file's folder>/tensorboard."""
    opd_teacher_url: str | None = None
    """On-policy distillation (--use-opd, --opd-type engine) from an engine already served at this URL (Kiln's
    `python -m inference_engine.serve`; its key, if any, in $KILN_OPD_TEACHER_API_KEY); else the driver serves
    --opd-teacher-load on a device of its own."""

    def __post_init__(self) -> None:
        for name in ("num_rollout", "num_engines", "actor_num_nodes", "actor_num_gpus_per_node",
                     "update_weight_buffer_size"):
            check_positive(self, name)
        check_positive(self, "ray_num_cpus", allow_none=True)
        for name in ("cpus_per_device", "health_check_interval", "weight_sync_timeout", "engine_health_timeout",
                     "engine_stall_window"):
            check_positive_seconds(self, name)
        if self.engine_stall_window < self.engine_health_timeout:
            raise ValueError(f"RunConfig.engine_stall_window = {self.engine_stall_window:g}: expected at least "
                             f"--engine-health-timeout ({self.engine_health_timeout:g} s)")
        if not isinstance(self.max_engine_restarts, int) or isinstance(self.max_engine_restarts, bool) \
                or self.max_engine_restarts < 0:
            raise ValueError(f"RunConfig.max_engine_restarts = {self.max_engine_restarts!r}: expected an integer >= 0")
        if self.rollout_client not in ("http", "ray"):
            raise ValueError(f"RunConfig.rollout_client = {self.rollout_client!r}: expected 'http' or 'ray'")
        if self.async_mode not in ("off", "one-step", "fully"):
            raise ValueError(f"RunConfig.async_mode = {self.async_mode!r}: expected 'off', 'one-step' or 'fully'")
        if self.async_rollout and self.async_mode == "fully":
            raise ValueError("--async-rollout is --async-mode one-step; it cannot be combined with --async-mode fully")
        if self.async_rollout:
            self.async_mode = "one-step"
        self.async_rollout = self.async_mode == "one-step"
        flag = "--async-rollout" if self.async_rollout else f"--async-mode {self.async_mode}"
        if self.async_mode != "off" and self.colocate:
            raise ValueError(f"{flag} needs --no-colocate: colocated engines give up their memory while the trainers "
                             f"train, so rollout cannot overlap training (colocated: --partial-rollout; docs/async.md)")
        if self.policies_share_devices and not self.colocate:
            raise ValueError("--policies-share-devices needs --colocate: policies that share devices take turns "
                             "holding their memory")
        if self.async_mode != "off" and (self.debug_rollout_only or self.debug_train_only):
            raise ValueError(f"{flag} does not apply to --debug-rollout-only / --debug-train-only")
        if self.async_mode == "fully" and len(self.policies) > 1:
            raise ValueError("--async-mode fully trains one policy; drop --policies or use --async-mode one-step")
        self.check_frozen_policies()
        check_positive(self, "save_interval", allow_none=True)
        check_positive(self, "eval_interval", allow_none=True)
        if self.save_interval is not None and not self.save:
            raise ValueError(f"RunConfig.save_interval = {self.save_interval} needs --save (a folder)")
        check_positive(self, "save_hf_interval", allow_none=True)
        if self.save_hf_interval is not None and not (self.save or self.save_hf):
            raise ValueError(f"RunConfig.save_hf_interval = {self.save_hf_interval} needs --save-hf or --save "
                             f"(a folder)")
        if self.debug_rollout_only and self.debug_train_only:
            raise ValueError("--debug-rollout-only and --debug-train-only cannot both be set")

    def check_frozen_policies(self) -> None:
        """ValueError unless every --frozen-policies name is one of --policies and at least one policy is trained."""
        names = list(self.policy_paths())
        unknown = [name for name in self.frozen_policies if name not in names]
        if unknown:
            raise ValueError(f"--frozen-policies names {unknown[0]!r}, which is not one of --policies "
                             f"({', '.join(names)})")
        if self.frozen_policies and set(names) <= set(self.frozen_policies) and not self.debug_rollout_only:
            raise ValueError(f"--frozen-policies freezes every policy ({', '.join(names)}), so nothing is trained; "
                             f"to only generate rollouts use --debug-rollout-only")

    def trained_policies(self) -> list[str]:
        """The names of policy_paths() that are trained (not in --frozen-policies), in order."""
        return [name for name in self.policy_paths() if name not in self.frozen_policies]

    def policy_paths(self) -> dict[str, str]:
        """{policy name: HF folder}, in the order given; {'default': --hf-checkpoint} without --policies."""
        if not self.policies:
            return {DEFAULT_POLICY: self.hf_checkpoint}
        out: dict[str, str] = {}
        for item in self.policies:
            name, sep, path = item.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*", name) or not path:
                raise ValueError(f"RunConfig.policies entry {item!r}: expected NAME=PATH with NAME a word "
                                 f"(letters, digits, _ or -) and PATH a local HF model folder")
            if name in out:
                raise ValueError(f"RunConfig.policies names policy {name!r} twice")
            out[name] = path
        return out

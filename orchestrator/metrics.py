"""The driver's step metrics sinks: one JSON line per step (--metrics-file), wandb (--use-wandb) and TensorBoard
(--use-tensorboard); every sink gets the same keys at the same step."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from orchestrator.config import RunConfig

logger = logging.getLogger("kiln.driver")


def tensorboard_dir(run: RunConfig) -> Path:
    """--tensorboard-dir, else <the metrics file's folder>/tensorboard (./tensorboard without a metrics file)."""
    if run.tensorboard_dir:
        return Path(run.tensorboard_dir)
    return (Path(run.metrics_file).parent if run.metrics_file else Path(".")) / "tensorboard"


def eval_rewards(metrics: dict[str, Any]) -> str:
    """Each eval set's reward_mean for a log line: '0.500' (only the set 'default'), 'default 0.500 a 0.250', or
    '-' without any."""
    parts = [(key[len("eval/"):-len("/reward_mean")] or "default", value) for key, value in metrics.items()
             if key.startswith("eval/") and key.endswith("reward_mean") and isinstance(value, (int, float))]
    if not parts:
        return "-"
    if [name for name, _ in parts] == ["default"]:
        return f"{parts[0][1]:.3f}"
    return " ".join(f"{name} {value:.3f}" for name, value in parts)


class MetricsLogger:
    """One JSON line per step in --metrics-file, wandb when --use-wandb (offline unless WANDB_MODE says), and
    TensorBoard scalars when --use-tensorboard (numbers only: a string or None value is left out there)."""

    def __init__(self, run: RunConfig, config: dict[str, Any]) -> None:
        self.path = Path(run.metrics_file) if run.metrics_file else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb = None
        if run.use_wandb:
            try:
                import wandb
            except ImportError:
                logger.warning("--use-wandb is set but wandb is not installed; logging to %s only", self.path)
            else:
                mode = os.environ.get("WANDB_MODE", "offline")
                self.wandb = wandb.init(project=run.wandb_project, mode=mode, config=config,
                                        dir=str(self.path.parent) if self.path else None)
        self.tensorboard = None
        if run.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter   # needs the tensorboard package

            folder = tensorboard_dir(run)
            folder.mkdir(parents=True, exist_ok=True)
            self.tensorboard = SummaryWriter(log_dir=str(folder))
            self.tensorboard.add_text("config", "\n".join(f"    {k}: {v!r}" for k, v in sorted(config.items())), 0)
            logger.info("TensorBoard logs in %s", folder)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append `metrics` of `step`."""
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (bool, int, float)):
                    self.tensorboard.add_scalar(key, float(value), global_step=step)
            self.tensorboard.flush()

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()

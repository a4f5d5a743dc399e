"""The critic of PPO with a value model (--advantage-estimator gae): config, value model, its optimizer.

The critic is a megatron GPTModel like the policy (same layer spec, TP, loaded from an HF folder
through the bridge) whose LM head is replaced by a scalar value head on the final-norm hidden
states: V(prefix) = w . h + b, one value per response token, read at the same positions as the
policy's log-probs (the hidden state that predicts response token t scores the prefix before it).
It lives in the policy's TrainerActor ranks, on the same devices: built, offloaded and onloaded
with the policy, trained in the same train_step with its own AdamW (docs/trainer.md, "Critic").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class CriticConfig:
    """The value model of PPO with a critic (used with advantage_estimator='gae'); see docs/losses.md."""

    critic_load: str | None = None  # HF folder the critic's trunk starts from; None: the policy's --hf-checkpoint
    critic_lr: float | None = None  # learning rate of the critic's own AdamW (same schedule shape); None: --lr
    value_clip: float | None = 0.2  # PPO value clipping: V within V_old +- value_clip; None: unclipped value loss
    num_critic_only_steps: int = 0  # first N train steps update only the critic (the policy waits for its values)

    def __post_init__(self) -> None:
        if self.critic_load is not None and not (Path(self.critic_load) / "config.json").exists():
            raise ValueError(f"critic_load {self.critic_load!r} is not an HF model folder (no config.json)")
        if self.critic_lr is not None and not self.critic_lr > 0:
            raise ValueError(f"critic_lr={self.critic_lr}; must be > 0 (or None: --lr)")
        if self.value_clip is not None and not self.value_clip > 0:
            raise ValueError(f"value_clip={self.value_clip}; must be > 0 (or None: no value clipping)")
        if self.num_critic_only_steps < 0:
            raise ValueError(f"num_critic_only_steps={self.num_critic_only_steps}; must be >= 0")


class ValueModel(torch.nn.Module):
    """A GPTModel trunk run without its output layer, and a scalar value head (fp32) on its final hidden states."""

    def __init__(self, gpt: torch.nn.Module, hidden_size: int, device: torch.device):
        super().__init__()
        self.gpt = gpt
        # zero-initialised: every value starts at 0, so the first GAE advantages are the discounted returns
        self.value_head = torch.nn.Linear(hidden_size, 1, bias=True, device=device, dtype=torch.float32)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """Values of the response positions' hidden states [T, H] -> [T] (computed in fp32)."""
        return self.value_head(hidden.float()).squeeze(-1)


def drop_output_layer(gpt: torch.nn.Module) -> None:
    """Free an untied output layer's rows (the critic never computes logits); a tied one is the embedding, kept."""
    layer = getattr(gpt, "output_layer", None)
    if layer is None or getattr(gpt, "share_embeddings_and_output_weights", False):
        return
    layer.weight.requires_grad_(False)
    layer.weight.data = layer.weight.data.new_empty(0)


def critic_optimizer_config(cfg):
    """The TrainerConfig the critic's optimizer reads: the policy's, with critic_lr (min_lr scaled alike)."""
    lr = cfg.critic.critic_lr
    if lr is None or lr == cfg.lr:
        return cfg
    return dataclasses.replace(cfg, lr=lr, min_lr=cfg.min_lr * lr / cfg.lr)

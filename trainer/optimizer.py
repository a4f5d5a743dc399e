"""AdamW with data-parallel gradient reduction, global grad-norm clipping and the LR schedule."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from trainer.config import TrainerConfig


def lr_at(step: int, cfg: TrainerConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then constant/linear/cosine decay."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.lr_warmup_steps) / cfg.lr_decay_steps)
    if cfg.lr_decay_style == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


class PolicyOptimizer:
    """torch AdamW over this rank's parameter shards; grads summed over DP, norm taken over TP."""

    def __init__(self, model: torch.nn.Module, cfg: TrainerConfig, *, dp_group, tp_group, tp_rank: int):
        self.cfg = cfg
        self.dp_group, self.tp_group, self.tp_rank = dp_group, tp_group, tp_rank
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        # q/k norms are replicated but each TP rank only sees its own heads: their grads are partial sums.
        self.tp_partial = [p for n, p in named if "q_layernorm" in n or "k_layernorm" in n]
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]  # norms and biases
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr_at(0, cfg), betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
        self.step_count = 0

    def zero_grad(self) -> None:
        """Drop accumulated gradients."""
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self) -> float:
        """Global L2 norm of the gradients (TP shards counted once, replicated params once)."""
        sq = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        for p in self.params:
            if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or self.tp_rank == 0):
                sq += p.grad.float().square().sum()
        if dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(sq, group=self.tp_group)
        return float(sq.sqrt())

    def step(self) -> tuple[float, float]:
        """Reduce grads over TP (partial ones) and DP, clip, apply AdamW at this step's LR; returns (grad_norm, lr)."""
        for p in self.params:
            if p.grad is None:  # a rank without samples in this batch still joins the reduction
                p.grad = torch.zeros_like(p)
        if dist.get_world_size(self.tp_group) > 1:
            for p in self.tp_partial:
                dist.all_reduce(p.grad, group=self.tp_group)
        if dist.get_world_size(self.dp_group) > 1:
            for p in self.params:
                dist.all_reduce(p.grad, group=self.dp_group)
        norm = self.grad_norm()
        if self.cfg.clip_grad > 0 and norm > self.cfg.clip_grad:
            scale = self.cfg.clip_grad / (norm + 1e-6)
            for p in self.params:
                p.grad.mul_(scale)
        lr = lr_at(self.step_count, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step_count += 1
        return norm, lr

    def state_tensors(self) -> list[torch.Tensor]:
        """Optimizer state tensors (for offload)."""
        return [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]

    def state_dict(self) -> dict:
        """AdamW state and the step counter."""
        return {"optimizer": self.optimizer.state_dict(), "step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = state["step_count"]

"""AdamW with data-parallel gradient reduction, global grad-norm clipping and the LR schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

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
    """AdamW over this rank's parameter shards; grads summed over DP, norm taken over TP and PP.

    With pipeline stages and tied embeddings the first stage's embedding and the last stage's
    output-layer copy are one weight: their gradients are summed over `embedding_group` so both
    copies take the same step, and the norm counts the weight once (on the first stage).

    With fp32 parameters (CPU, or GPU with bf16=False) AdamW updates them directly. With bf16
    parameters each one has an fp32 master copy: every micro-batch's bf16 gradient is added into the
    master's fp32 `.grad` as soon as autograd has it (and the bf16 one dropped), AdamW updates the
    masters, and the bf16 parameters are refreshed from them.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainerConfig, *, dp_group, tp_group, tp_rank: int,
                 pp_group=None, embedding_group=None):
        self.cfg = cfg
        self.dp_group, self.tp_group, self.tp_rank = dp_group, tp_group, tp_rank
        self.pp_group, self.embedding_group = pp_group, embedding_group
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.model_params = [p for _, p in named]
        self.mixed = any(p.dtype != torch.float32 for p in self.model_params)
        # fp32 tensors AdamW steps: the parameters themselves, or their master copies
        self.params = [p.detach().float().clone() for p in self.model_params] if self.mixed else self.model_params
        if self.mixed:
            for p, main in zip(self.model_params, self.params):
                p.register_post_accumulate_grad_hook(self._accumulate_into(main))
        self.sharded = [getattr(p, "tensor_model_parallel", False) for p in self.model_params]
        # megatron marks both copies of a tied embedding split over pipeline stages `shared_embedding`,
        # and the last stage's copy `shared` as well
        self.tied = [main for p, main in zip(self.model_params, self.params) if getattr(p, "shared_embedding", False)]
        self.counted = [not getattr(p, "shared", False) for p in self.model_params]
        if self.tied and embedding_group is None:
            raise ValueError("tied embeddings split over pipeline stages need the embedding group (first and last "
                             "stage) to sum their gradients; got embedding_group=None")
        # q/k norms are replicated but each TP rank only sees its own heads: their grads are partial sums.
        self.tp_partial = [main for (n, _), main in zip(named, self.params) if "q_layernorm" in n or "k_layernorm" in n]
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]  # norms and biases
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr_at(0, cfg), betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            fused=True if self.params[0].is_cuda else None)
        self.step_count = 0

    @staticmethod
    def _accumulate_into(main: torch.Tensor):
        def hook(param: torch.Tensor) -> None:
            if main.grad is None:
                main.grad = param.grad.float()
            else:
                main.grad.add_(param.grad)
            param.grad = None

        return hook

    def zero_grad(self) -> None:
        """Drop accumulated gradients."""
        for p in self.model_params:
            p.grad = None
        self.optimizer.zero_grad(set_to_none=True)

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients, a 0-d device tensor (each TP shard, stage and tied weight counted once)."""
        grads = [p.grad for p, sharded, counted in zip(self.params, self.sharded, self.counted)
                 if p.grad is not None and counted and (sharded or self.tp_rank == 0)]
        sq = (torch.stack(torch._foreach_norm(grads)).square().sum() if grads
              else torch.zeros((), dtype=torch.float32, device=self.params[0].device))
        for group in (self.tp_group, self.pp_group):
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(sq, group=group)
        return sq.sqrt()

    def grad_norm(self) -> float:
        """Global L2 norm of the gradients (TP shards counted once, replicated params once, every stage)."""
        return float(self._grad_norm())

    def step(self) -> tuple[float, float]:
        """Reduce grads over TP (partial ones), tied stages and DP, clip, apply AdamW at this step's LR.

        Returns (grad_norm, lr).
        """
        for p in self.params:
            if p.grad is None:  # a rank without samples in this batch still joins the reduction
                p.grad = torch.zeros_like(p)
        if dist.get_world_size(self.tp_group) > 1:
            for p in self.tp_partial:
                dist.all_reduce(p.grad, group=self.tp_group)
        for p in self.tied:
            dist.all_reduce(p.grad, group=self.embedding_group)
        if dist.get_world_size(self.dp_group) > 1:
            for p in self.params:
                dist.all_reduce(p.grad, group=self.dp_group)
        norm = self._grad_norm()
        if self.cfg.clip_grad > 0:  # scale min(1, clip / norm) on the device: no host sync before AdamW
            torch._foreach_mul_([p.grad for p in self.params], (self.cfg.clip_grad / (norm + 1e-6)).clamp(max=1.0))
        lr = lr_at(self.step_count, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.mixed:
            with torch.no_grad():
                torch._foreach_copy_(self.model_params, self.params)  # bf16 <- fp32 masters, one call
        self.step_count += 1
        return float(norm), lr

    def move(self, move: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace master weights, their grads and AdamW state by `move(tensor)` (offload / onload)."""
        if self.mixed:
            for main in self.params:
                main.data = move(main.data)
                if main.grad is not None:
                    main.grad = move(main.grad)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    state[key] = move(value)

    def state_dict(self) -> dict:
        """AdamW state, the step counter and (bf16 parameters) the fp32 master weights."""
        state = {"optimizer": self.optimizer.state_dict(), "step_count": self.step_count}
        if self.mixed:
            state["master_weights"] = [p.detach().cpu() for p in self.params]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        if self.mixed != ("master_weights" in state):
            raise ValueError(f"checkpoint has{'' if 'master_weights' in state else ' no'} fp32 master weights but "
                             f"this run's parameters are {'bf16' if self.mixed else 'fp32'}; resume with the same bf16 "
                             "setting")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = state["step_count"]
        if self.mixed:
            with torch.no_grad():
                for p, main, saved in zip(self.model_params, self.params, state["master_weights"]):
                    main.copy_(saved)
                    p.copy_(saved)

"""TrainerConfig: everything the policy trainer needs, validated once at construction."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kiln_common.model_spec import hf_num_experts
from trainer.advantages import ESTIMATORS, load_custom_advantage_function
from trainer.critic import CriticConfig
from trainer.losses import LossConfig

LR_DECAY_STYLES = ("constant", "linear", "cosine")
RECOMPUTE = ("none", "selective", "full")
_KL_IN_REWARD_ESTIMATORS = ("reinforce_plus_plus", "reinforce_plus_plus_baseline", "gae")
OPD_TYPES = ("engine", "megatron")


@dataclass
class TrainerConfig:
    """Model, parallelism, optimisation and RL-loss settings of one policy's trainers."""

    hf_checkpoint: str
    ref_checkpoint: str | None = None  # reference model for KL; defaults to hf_checkpoint
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_model_parallel_size: int = 1  # MoE: each MoE layer's experts split over this many data-parallel ranks
    context_parallel_size: int = 1  # each packed sequence split over this many ranks (docs/trainer.md)
    seed: int = 1234
    # optimisation
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_steps: int | None = None  # None: no decay after warm-up
    lr_decay_style: str = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # max global grad norm; 0 disables clipping
    # batching
    global_batch_size: int = 8  # samples per optimizer step
    max_tokens_per_gpu: int = 4096  # tokens per micro-batch (padding included when pack_sequences=False)
    vocab_pad_multiple: int = 128
    pack_sequences: bool = True  # micro-batch = one packed row (varlen attention, no padding); False: padded rows
    # GPU memory and speed
    bf16: bool = True  # GPU: bf16 params, fp32 main grads / master weights / AdamW; False: fp32 params + autocast
    logprob_chunk_tokens: int = 1024  # tokens per chunk of the fused output-layer + log-softmax
    recompute: str = "none"  # activation recomputation: none, selective (MLPs), full (each layer)
    use_distributed_optimizer: bool = False  # ZeRO-1: fp32 master weights and AdamW moments sharded over the DP ranks
    optimizer_cpu_offload: bool = False  # masters and moments in pinned host memory, AdamW on the device in chunks
    balance_data: bool = False  # balance DP shares and micro-batches by tokens and attention cost (sum of len^2)
    # RL
    temperature: float = 1.0  # rollout sampling temperature (log-probs are of logits / temperature)
    advantage_estimator: str = "grpo"
    """grpo, dr_grpo, gspo (GRPO's advantages for --policy-loss gspo; refused without it), rloo, reinforce_plus_plus,
    reinforce_plus_plus_baseline, gae (PPO with a critic: --lambd, --value-clip, --critic-lr), custom; docs/losses.md"""
    normalize_advantages_std: bool = True
    gamma: float = 1.0  # discount of token returns (REINFORCE++, GAE)
    lambd: float = 1.0  # GAE lambda (advantage_estimator='gae'): 1 = Monte-Carlo returns minus values, 0 = TD(0)
    reward_key: str | None = None  # which entry of a dict reward to train on
    recompute_old_logprobs: bool = True  # False: the engine's rollout log-probs serve as the old policy
    old_logprobs_from_update: bool = True
    """With recompute_old_logprobs, when the step is one optimizer step and nothing needs the old log-probs before
    it (no KL in the reward, no OPD): take them from the update's own forward (detached) instead of a separate
    forward pass over the rollout. The weights are the same, so the values are those of the recompute and its cost
    (a forward over every token, ~1/4 of the train phase) is saved. False: always the separate pass."""
    # mixture of experts (docs/trainer.md "Mixture of experts")
    moe_aux_loss_coeff: float = 0.0  # load-balancing loss weight of the MoE routers; 0: off (RL's usual choice)
    use_routing_replay: bool = False  # MoE: routers replay the engine's experts (Sample.routed_experts), R3
    custom_advantage_function_path: str | None = None  # 'pkg.mod:fn' for advantage_estimator=custom (docs/losses.md)
    overlong_buffer_len: int = 0  # DAPO soft overlong punishment over the last N tokens below the max length; 0: off
    overlong_penalty_factor: float = 1.0  # DAPO: the overlong penalty reaches -factor at the max response length
    rollout_max_response_len: int = 512  # DAPO's L_max: the same flag as the rollout's max response length
    use_opd: bool = False  # on-policy distillation: advantages -= opd_kl_coef * (logp_student - logp_teacher)
    opd_type: str = "engine"  # engine: teacher log-probs from a served engine, on the samples; megatron: in the trainer
    opd_kl_coef: float = 1.0  # weight of the per-token reverse KL to the teacher (docs/losses.md)
    opd_teacher_load: str | None = None  # the teacher's HF folder (megatron: loaded by the trainer; engine: served)
    loss: LossConfig = field(default_factory=LossConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)

    def __post_init__(self):
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        if isinstance(self.critic, dict):
            self.critic = CriticConfig(**self.critic)
        if not (Path(self.hf_checkpoint) / "config.json").exists():
            raise ValueError(f"hf_checkpoint {self.hf_checkpoint!r} is not an HF model folder (no config.json)")
        if self.ref_checkpoint is not None and not (Path(self.ref_checkpoint) / "config.json").exists():
            raise ValueError(f"ref_checkpoint {self.ref_checkpoint!r} is not an HF model folder (no config.json)")
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size", "global_batch_size",
                     "max_tokens_per_gpu",
                     "vocab_pad_multiple", "logprob_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; must be >= 1")
        layers = json.loads((Path(self.hf_checkpoint) / "config.json").read_text()).get("num_hidden_layers")
        if isinstance(layers, int) and layers % self.pipeline_parallel_size:
            raise ValueError(f"pipeline_parallel_size={self.pipeline_parallel_size} does not divide the model's "
                             f"{layers} layers; use a divisor of {layers}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r}; valid: {', '.join(RECOMPUTE)}")
        if self.optimizer_cpu_offload and not self.use_distributed_optimizer:
            raise ValueError("optimizer_cpu_offload keeps the sharded optimizer's state on the host; add "
                             "--use-distributed-optimizer")
        self._check_moe()
        self._check_context_parallel()
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"lr={self.lr}, min_lr={self.min_lr}; need lr > 0 and 0 <= min_lr <= lr")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps={self.lr_warmup_steps}; must be >= 0")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"lr_decay_style={self.lr_decay_style!r}; valid: {', '.join(LR_DECAY_STYLES)}")
        if self.lr_decay_style != "constant" and (self.lr_decay_steps is None or self.lr_decay_steps < 1):
            raise ValueError(f"lr_decay_style={self.lr_decay_style!r} needs lr_decay_steps >= 1, "
                             f"got {self.lr_decay_steps}")
        if not 0 <= self.adam_beta1 < 1 or not 0 <= self.adam_beta2 < 1 or not self.adam_eps > 0:
            raise ValueError(f"adam betas ({self.adam_beta1}, {self.adam_beta2}) must be in [0, 1) and "
                             f"adam_eps={self.adam_eps} > 0")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError(f"weight_decay={self.weight_decay}, clip_grad={self.clip_grad}; both must be >= 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}; must be > 0")
        if self.advantage_estimator not in ESTIMATORS + ("custom",):
            raise ValueError(f"advantage_estimator={self.advantage_estimator!r}; valid: {', '.join(ESTIMATORS)}, "
                             "custom")
        if (self.advantage_estimator == "custom") != (self.custom_advantage_function_path is not None):
            raise ValueError(f"advantage_estimator={self.advantage_estimator!r} with custom_advantage_function_path="
                             f"{self.custom_advantage_function_path!r}: advantage_estimator='custom' and the path "
                             "go together")
        if self.custom_advantage_function_path is not None:
            load_custom_advantage_function(self.custom_advantage_function_path)
        if self.advantage_estimator == "gspo" and self.loss.policy_loss != "gspo":
            raise ValueError(f"advantage_estimator='gspo' gives GRPO's group advantages; GSPO itself is the "
                             f"sequence-level loss, and loss.policy_loss={self.loss.policy_loss!r}: pass "
                             "--policy-loss gspo too (or use advantage_estimator='grpo' for the token-level loss)")
        if not 0 <= self.overlong_buffer_len <= self.rollout_max_response_len:
            raise ValueError(f"overlong_buffer_len={self.overlong_buffer_len}; must be in [0, "
                             f"rollout_max_response_len={self.rollout_max_response_len}]")
        if not self.overlong_penalty_factor >= 0:
            raise ValueError(f"overlong_penalty_factor={self.overlong_penalty_factor}; must be >= 0")
        if self.loss.loss_type == "sft" and self.overlong_buffer_len:
            raise ValueError("overlong_buffer_len shapes rewards, which loss_type='sft' does not use; set it to 0")
        if self.kl_in_reward and self.advantage_estimator not in _KL_IN_REWARD_ESTIMATORS:
            raise ValueError(f"loss.kl_coef={self.loss.kl_coef} with use_kl_loss=False puts KL in the reward, which "
                             f"advantage_estimator={self.advantage_estimator!r} does not support; set "
                             f"loss.use_kl_loss=True or use one of {_KL_IN_REWARD_ESTIMATORS}")
        if not 0.0 <= self.lambd <= 1.0:
            raise ValueError(f"lambd={self.lambd}; GAE lambda must be in [0, 1]")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma={self.gamma}; must be in (0, 1]")
        if self.use_critic:
            if self.loss.loss_type == "sft":
                raise ValueError("advantage_estimator='gae' trains a critic for the policy loss; loss_type='sft' "
                                 "uses no advantages")
            if self.pipeline_parallel_size > 1:
                raise ValueError(f"advantage_estimator='gae' (a critic) supports pipeline_parallel_size=1 only, got "
                                 f"{self.pipeline_parallel_size}")
        elif self.critic.critic_load is not None or self.critic.num_critic_only_steps:
            raise ValueError(f"critic_load / num_critic_only_steps set the critic of advantage_estimator='gae'; "
                             f"this run uses {self.advantage_estimator!r}")
        if self.opd_type not in OPD_TYPES:
            raise ValueError(f"opd_type={self.opd_type!r}; valid: {', '.join(OPD_TYPES)}")
        if not self.opd_kl_coef >= 0:
            raise ValueError(f"opd_kl_coef={self.opd_kl_coef}; must be >= 0")
        if self.opd_teacher_load is not None and not (Path(self.opd_teacher_load) / "config.json").exists():
            raise ValueError(f"opd_teacher_load {self.opd_teacher_load!r} is not an HF model folder (no config.json)")
        if self.use_opd:
            if self.loss.loss_type == "sft":
                raise ValueError("use_opd shapes the advantages, which loss_type='sft' does not use")
            if self.opd_type == "megatron" and self.opd_teacher_load is None:
                raise ValueError("opd_type='megatron' loads the teacher into the trainer: set opd_teacher_load HF_DIR")
        if not self.recompute_old_logprobs and self.loss.use_tis:
            raise ValueError("loss.use_tis needs recompute_old_logprobs=True (TIS reweights old vs rollout log-probs)")
        if not self.recompute_old_logprobs and self.loss.use_mis:
            raise ValueError("loss.use_mis needs recompute_old_logprobs=True (MIS compares old vs rollout log-probs)")

    def _check_context_parallel(self) -> None:
        """The combinations context parallelism supports: packed dense policies without PP, critic or TE."""
        if self.context_parallel_size == 1:
            return
        from trainer.megatron_compat import has_transformer_engine

        hf = json.loads((Path(self.hf_checkpoint) / "config.json").read_text())
        refused = [(self.pipeline_parallel_size > 1, "pipeline_parallel_size > 1"),
                   (not self.pack_sequences, "pack_sequences=False (padded micro-batches)"),
                   (hf.get("model_type") == "qwen3_moe", "a mixture-of-experts model"),
                   (self.use_critic, "advantage_estimator='gae' (a critic)"),
                   (has_transformer_engine(), "Transformer Engine installed (its attention replaces Kiln's)")]
        for bad, what in refused:
            if bad:
                raise ValueError(f"context_parallel_size={self.context_parallel_size} with {what} is not supported; "
                                 "use context_parallel_size=1 (docs/trainer.md, 'Context parallelism')")

    def _check_moe(self) -> None:
        """The MoE settings against the model: experts to split, no TP, replay only of a MoE model."""
        hf = json.loads((Path(self.hf_checkpoint) / "config.json").read_text())
        experts = hf_num_experts(hf) if hf.get("model_type") == "qwen3_moe" else 0
        if self.expert_model_parallel_size < 1:
            raise ValueError(f"expert_model_parallel_size={self.expert_model_parallel_size}; must be >= 1")
        if not self.moe_aux_loss_coeff >= 0:
            raise ValueError(f"moe_aux_loss_coeff={self.moe_aux_loss_coeff}; must be >= 0")
        if not experts:
            for name, off in (("expert_model_parallel_size", 1), ("moe_aux_loss_coeff", 0.0),
                              ("use_routing_replay", False)):
                if getattr(self, name) != off:
                    raise ValueError(f"{name}={getattr(self, name)} needs a mixture-of-experts model; "
                                     f"{self.hf_checkpoint} is {hf.get('model_type')!r} (dense)")
            return
        if self.expert_model_parallel_size > 1 and self.use_distributed_optimizer:
            raise ValueError("expert_model_parallel_size > 1 with use_distributed_optimizer: the sharded optimizer "
                             "does not reduce expert gradients over the expert-data-parallel group yet; drop one")
        if experts % self.expert_model_parallel_size:
            raise ValueError(f"expert_model_parallel_size={self.expert_model_parallel_size} does not divide the "
                             f"model's {experts} experts")
        if self.tensor_parallel_size > 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} with a mixture-of-experts model: "
                             "megatron trains MoE layers under TP only with sequence parallelism, which Kiln's "
                             "trainer does not use; use expert_model_parallel_size (and data parallelism) instead")
        if self.use_routing_replay and self.recompute == "full" and self.pipeline_parallel_size > 1:
            raise ValueError("use_routing_replay with recompute='full' needs pipeline_parallel_size=1 (a layer is "
                             "recomputed while later micro-batches are in flight, and would replay their experts)")

    @property
    def use_reference(self) -> bool:
        """Whether a frozen reference model is built (KL in the loss or in the reward)."""
        return self.loss.kl_coef > 0

    @property
    def use_critic(self) -> bool:
        """Whether a critic (value model) is built and trained: PPO with GAE advantages."""
        return self.advantage_estimator == "gae"

    @property
    def kl_in_reward(self) -> bool:
        """KL penalty enters the reward (advantages) instead of the loss."""
        return self.loss.kl_coef > 0 and not self.loss.use_kl_loss

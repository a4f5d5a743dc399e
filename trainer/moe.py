"""Mixture-of-experts layers of the trainer (Qwen3-MoE) and routing replay.

A sparse layer is megatron-core's `MoELayer` in the local spec: `TopKRouter` (softmax over the
experts in fp32, top-k; with `norm_topk_prob` the k probabilities are renormalised, which is
megatron's softmax over the k chosen logits, `moe_router_pre_softmax=False`; without it they are
the full softmax's, `pre_softmax=True`), the all-to-all token dispatcher, and the experts:
`KilnGroupedExperts` where torch has `_grouped_mm` (every expert's tokens in one grouped GEMM for
gate/up, fused SwiGLU times the routing weight, one grouped GEMM for down; on CPU and CUDA, bf16 on
CUDA), else megatron's `SequentialMLP` (one MLP per expert in a loop; megatron's own grouped-GEMM
experts need the `grouped_gemm` package or Transformer Engine, neither of which Kiln installs).
The load-balancing loss is off unless `moe_aux_loss_coeff > 0`. Expert parallelism is megatron's
(`expert_model_parallel_size`, carved out of data parallelism); MoE layers need TP = 1 (megatron
trains MoE under TP only with sequence parallelism, which Kiln's trainer does not use).

Routing replay (R3, as slime's and verl's): the engine records, for every token it forwarded, the
top-k experts of every sparse layer (`Sample.routed_experts` [rows <= len(tokens) - 1, moe_layers, k]).
With replay on, each router takes those experts instead of its own top-k for the rollout tokens,
and the combine weights are recomputed from the trainer's logits over the replayed experts (the
gather of megatron's replay hook), so gradients still reach the router weights. The last token of
a sequence (never forwarded by the engine), tokens the engine has not recorded (a sample's rows
may stop short of len(tokens) - 1) and padding use the trainer's own routing. Each router
also counts how many replayed (token, slot) pairs its own top-k would not have chosen:
`routing_disagreement`.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch


def transformer_config_fields(spec, *, ep_size: int = 1, aux_loss_coeff: float = 0.0) -> dict:
    """megatron TransformerConfig fields for the MoE layers of `spec` (none for a dense model)."""
    if not spec.is_moe:
        if ep_size != 1:
            raise ValueError(f"expert_model_parallel_size={ep_size} needs a mixture-of-experts model; "
                             f"{spec.family} is dense")
        return {}
    if spec.num_experts % ep_size:
        raise ValueError(f"expert_model_parallel_size={ep_size} does not divide num_experts={spec.num_experts}")
    return dict(
        num_moe_experts=spec.num_experts,
        moe_router_topk=spec.moe_top_k,
        moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        moe_layer_freq=[int(i in spec.moe_layers) for i in range(spec.num_layers)],
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not spec.norm_topk_prob,  # softmax over the k chosen logits = renormalised
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=aux_loss_coeff,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        expert_model_parallel_size=ep_size,
    )


def grouped_experts() -> bool:
    """Whether the experts run as Kiln's grouped GEMM (torch has `_grouped_mm`) rather than megatron's SequentialMLP.

    The bridge reads the same answer to lay out the expert weights.
    """
    return hasattr(torch, "_grouped_mm")


@functools.cache
def grouped_experts_class():
    """KilnGroupedExperts: a MoE layer's local experts as two stacked weights and torch's grouped matmul."""
    from megatron.core.transformer.module import MegatronModule

    from trainer import fused

    class KilnGroupedExperts(MegatronModule):
        """Local experts: weight1 [experts, 2 * ffn, hidden] (per expert [gate; up]), weight2 [experts, hidden, ffn].

        Takes the dispatcher's tokens sorted by local expert; each grouped GEMM covers every expert
        (`offs`: where each expert's tokens end). Parameters are marked like megatron's expert
        weights (`allreduce=False` under expert parallelism: gradients over the expert-data-parallel
        group). On CUDA the GEMMs run in bf16 (torch's grouped kernel), casting fp32 parameters.
        """

        def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None):
            super().__init__(config=config)
            self.num_local_experts = num_local_experts
            ffn, hidden = config.moe_ffn_hidden_size, config.hidden_size
            device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
            self.weight1 = torch.nn.Parameter(torch.empty(num_local_experts, 2 * ffn, hidden,
                                                          dtype=config.params_dtype, device=device))
            self.weight2 = torch.nn.Parameter(torch.empty(num_local_experts, hidden, ffn, dtype=config.params_dtype,
                                                          device=device))
            for weight in (self.weight1, self.weight2):
                weight.allreduce = config.expert_model_parallel_size == 1

        def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor):
            """hidden [N, H] sorted by expert, tokens_per_expert [experts], probs [N] -> ([N, H], None)."""
            w1, w2, x = self.weight1, self.weight2, hidden
            if x.is_cuda and x.dtype != torch.bfloat16:
                w1, w2, x = w1.bfloat16(), w2.bfloat16(), x.bfloat16()
            counts = torch.as_tensor(tokens_per_expert)
            offs = counts.to(device=x.device, non_blocking=True).cumsum(0).to(torch.int32)  # [experts]
            gate_up = torch._grouped_mm(x, w1.transpose(1, 2), offs=offs)  # [N, 2 * ffn]
            act = (fused.swiglu_op(gate_up) * probs.unsqueeze(-1)).to(x.dtype)  # [N, ffn]
            return torch._grouped_mm(act, w2.transpose(1, 2), offs=offs).to(hidden.dtype), None  # [N, H]

        def backward_dw(self):
            """Nothing deferred (megatron's delayed weight-gradient hook)."""

    return KilnGroupedExperts


def moe_mlp_spec():
    """ModuleSpec of a sparse MLP: megatron's MoELayer with TopKRouter and Kiln's grouped (or sequential) experts."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    if grouped_experts():
        experts = ModuleSpec(module=grouped_experts_class())
    else:
        experts = ModuleSpec(module=SequentialMLP,
                             submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    return ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=experts))


def block_spec(spec, config, dense_layer_spec):
    """This pipeline stage's TransformerBlockSubmodules: `dense_layer_spec`, its MLP made MoE in sparse layers."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from trainer import fused, megatron_compat

    if megatron_compat.has_transformer_engine():
        raise ValueError("mixture-of-experts models are wired for megatron's local spec only; Transformer Engine "
                         "is installed (uninstall it for the trainer's local spec)")
    sparse = copy.deepcopy(dense_layer_spec)
    sparse.submodules.mlp = moe_mlp_spec()
    offset = get_transformer_layer_offset(config)
    layers = [sparse if offset + i in spec.moe_layers else dense_layer_spec
              for i in range(get_num_layers_to_build(config))]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=fused.layer_classes()[0])


def check_routed_experts(routed, num_tokens: int, spec) -> None:
    """Raise ValueError unless `routed` is an integer array [rows < num_tokens, moe_layers, top_k] of expert ids."""
    want = (spec.num_moe_layers, spec.moe_top_k)
    if not isinstance(routed, np.ndarray) or routed.dtype.kind not in "iu" or routed.ndim != 3 or \
            routed.shape[1:] != want or routed.shape[0] > num_tokens - 1:
        got = (f"{routed.dtype} {routed.shape}" if isinstance(routed, np.ndarray) else type(routed).__name__)
        raise ValueError(f"routed_experts must be an integer array [rows <= {num_tokens - 1} (tokens - 1), "
                         f"{want[0]} (MoE layers), {want[1]} (top-k)]; got {got}")
    if routed.size and (routed.min() < 0 or routed.max() >= spec.num_experts):
        raise ValueError(f"routed_experts holds expert ids outside [0, {spec.num_experts})")


class RoutingReplay:
    """The replayed experts of the micro-batch being forwarded, shared by one model's routers, and their tallies.

    `set_micro_batch` installs [moe_layers, tokens, k] expert ids (tokens in megatron's [s, b]
    order) and a [tokens] mask of the rows to replay (the others keep the router's own top-k).
    Disagreement is tallied once per micro-batch and layer (activation recomputation re-runs the
    routers) until `reset_counts`.
    """

    def __init__(self):
        self.indices: torch.Tensor | None = None  # [moe_layers, tokens, k] int64
        self.valid: torch.Tensor | None = None  # [tokens] bool
        self.mismatched = self.total = None  # 0-d device tensors while counting
        self._counted: set[int] = set()  # MoE layers tallied for the current micro-batch

    def set_micro_batch(self, indices: torch.Tensor, valid: torch.Tensor) -> None:
        """Replay `indices` [moe_layers, tokens, k] on the rows where `valid` [tokens] is True."""
        self.indices, self.valid = indices, valid
        self._counted = set()

    def reset_counts(self) -> None:
        """Start a new tally of (mismatched, total) replayed slots."""
        self.mismatched = self.total = None

    def counts(self, device) -> torch.Tensor:
        """[mismatched, total] replayed slots since `reset_counts`, float64 on `device`."""
        if self.total is None:
            return torch.zeros(2, dtype=torch.float64, device=device)
        return torch.stack([self.mismatched, self.total]).double().to(device)

    def topk(self, moe_index: int, scores: torch.Tensor, topk: int, num_groups, group_topk, own_topk):
        """megatron's replay hook: (probs [N, k], expert ids [N, k]) over the replayed experts where replaying."""
        probs, own = own_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if self.indices is None:
            return probs, own
        target = self.indices[moe_index]  # [N, k]
        if target.shape != own.shape:
            raise ValueError(f"routing replay: {tuple(target.shape)} expert ids for a router of {tuple(own.shape)}")
        valid = self.valid.unsqueeze(-1)  # [N, 1]
        chosen = torch.where(valid, target, own)
        if moe_index not in self._counted:
            self._counted.add(moe_index)
            with torch.no_grad():
                missed = ~(target.unsqueeze(-1) == own.unsqueeze(-2)).any(-1) & valid  # [N, k]
                mismatched, total = missed.sum(), valid.sum() * topk
                self.mismatched = mismatched if self.mismatched is None else self.mismatched + mismatched
                self.total = total if self.total is None else self.total + total
        return scores.gather(1, chosen), chosen


class _RouterHook:
    """Stands in for megatron's RouterReplay on one router: forwards `get_replay_topk` to the shared RoutingReplay."""

    def __init__(self, replay: RoutingReplay, moe_index: int):
        self.replay, self.moe_index = replay, moe_index

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        """(probs, expert ids) of `scores` [N, E]: replayed where the micro-batch says so, else the own top-k."""
        return self.replay.topk(self.moe_index, scores, topk, num_groups, group_topk, default_compute_topk)


def install_routing_replay(model, spec) -> RoutingReplay:
    """Hook every router of `model` (this pipeline stage) to one RoutingReplay; returns it."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    while hasattr(model, "module"):
        model = model.module
    replay = RoutingReplay()
    for layer in model.decoder.layers:
        if isinstance(layer.mlp, MoELayer):
            moe_index = spec.moe_layers.index(layer.layer_number - 1)  # layer_number is global, from 1
            layer.mlp.router.router_replay = _RouterHook(replay, moe_index)
    return replay


def micro_batch_routing(routed: list[np.ndarray | None], lengths: list[int], packed: bool, width: int,
                        spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids [moe_layers, s * b, k] and replay mask [s * b] of one micro-batch, in megatron's [s, b] order.

    `routed[j]`: sequence j's recorded experts [rows <= lengths[j] - 1, moe_layers, k] for its first rows
    tokens, or None; tokens without a row use the router's own top-k.
    Packed: one row, sequences back to back (s = sum(lengths), b = 1); padded: row j is sequence j,
    right-padded to `width` (s = width, b = rows).
    """
    layers, k = spec.num_moe_layers, spec.moe_top_k
    rows = 1 if packed else len(lengths)
    seq = sum(lengths) if packed else width
    ids = np.zeros((seq, rows, layers, k), dtype=np.int64)  # [s, b, L, k]
    valid = np.zeros((seq, rows), dtype=bool)
    start = 0
    for j, (r, n) in enumerate(zip(routed, lengths)):
        row, offset = (0, start) if packed else (j, 0)
        if r is not None:
            ids[offset:offset + len(r), row] = r
            valid[offset:offset + len(r), row] = True
        start += n
    ids = torch.from_numpy(ids.reshape(seq * rows, layers, k)).permute(1, 0, 2).contiguous()  # [L, s * b, k]
    return ids, torch.from_numpy(valid.reshape(-1))

"""HF <-> megatron-core bridge: model construction from an HF config and ONE name/layout table per family.

The table (`weight_mappings`) says, for every megatron parameter, which HF tensors it is made
of and how they are laid out across tensor-parallel ranks. The same table drives loading HF
safetensors into a (TP/PP-sharded) GPTModel, exporting back to HF names, and the bucketed
iteration used for weight sync (`iter_hf_tensors`).

Megatron layouts handled here:
- qkv: one fused `linear_qkv` whose rows are, per query group, [q heads of the group, k, v];
  TP ranks take contiguous blocks of whole query groups.
- gate_up: one fused `linear_fc1`; each TP rank holds [its slice of gate; its slice of up].
- vocab: embedding / output layer rows padded to a multiple of `vocab_pad_multiple * tp`,
  split in contiguous row blocks (padding rows are zero and dropped on export).
- column / row: plain split of dim 0 / dim 1; replicated: same on every rank.

Qwen3-MoE layers (`trainer.moe`) add the router (`mlp.router.weight` <- `mlp.gate.weight`, replicated)
and the experts, HF's `mlp.experts.{e}.{gate,up,down}_proj`:
- experts_gate_up / experts_down: Kiln's grouped-GEMM experts (where torch has `_grouped_mm`) stack a
  rank's experts in `mlp.experts.weight1` [experts, 2 * ffn, hidden] (per expert [gate; up]) and
  `mlp.experts.weight2` [experts, hidden, ffn]; one row per layer (per expert-parallel rank's block
  of experts in whole-model tables);
- otherwise megatron's SequentialMLP pair `mlp.experts.local_experts.{e}.linear_fc1/fc2` (gate_up / row).
With expert parallelism a rank holds experts [ep_rank * E / ep, (ep_rank + 1) * E / ep), numbered from
0 on the megatron side. MoE layers train with TP = 1, so the expert layouts are not split further.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from kiln_common.model_spec import FAMILIES
LAYOUTS = ("replicated", "column", "row", "qkv", "gate_up", "vocab", "experts_gate_up", "experts_down")


@dataclass(frozen=True)
class MegatronSpec:
    """Architecture facts of a supported HF decoder, read once from its config."""

    family: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    # mixture of experts (qwen3_moe; 0 / () for dense families)
    num_experts: int = 0
    moe_top_k: int = 0
    moe_ffn_hidden_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = ()  # global indices of the sparse layers

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"model family {self.family!r} is not supported; expected one of {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def is_moe(self) -> bool:
        """Whether some layers route tokens to experts."""
        return bool(self.moe_layers)

    @property
    def num_moe_layers(self) -> int:
        """How many layers route tokens to experts."""
        return len(self.moe_layers)

    def padded_vocab_size(self, vocab_pad_multiple: int, tp_size: int) -> int:
        """Vocabulary rounded up to a multiple of vocab_pad_multiple * tp_size."""
        step = vocab_pad_multiple * tp_size
        return -(-self.vocab_size // step) * step


def spec_from_hf_config(hf_config) -> MegatronSpec:
    """Read a MegatronSpec from an HF config (Llama, Qwen2, Qwen3) by the engine's rules, plus the trainer's limits.

    The config is parsed once, by `kiln_common.model_spec` (the engine builds its model from the same
    reading), so the trainer and the engines cannot disagree on RoPE base, eps, head_dim or biases.
    """
    from kiln_common.model_spec import ModelSpec as HFSpec

    hf = HFSpec.from_hf_config(hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config))
    if hf.rope_scaling is not None:
        raise ValueError(f"rope_scaling {hf.rope_scaling!r} is not supported by the trainer; only plain RoPE (None)")
    if hf.family == "llama" and hf.qkv_bias:
        raise ValueError("llama with attention_bias is not supported by the trainer; expected False")
    return MegatronSpec(
        family=hf.family,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_layers=hf.num_layers,
        num_heads=hf.num_heads,
        num_kv_heads=hf.num_kv_heads,
        head_dim=hf.head_dim,
        rope_theta=hf.rope_theta,
        rms_eps=hf.rms_norm_eps,
        tie_embeddings=hf.tie_word_embeddings,
        qkv_bias=hf.qkv_bias,
        qk_norm=hf.qk_norm,
        max_position_embeddings=hf.max_position_embeddings,
        num_experts=hf.num_experts,
        moe_top_k=hf.num_experts_per_tok,
        moe_ffn_hidden_size=hf.moe_intermediate_size,
        norm_topk_prob=hf.norm_topk_prob,
        moe_layers=hf.moe_layers,
    )


def load_spec(hf_dir: str | os.PathLike) -> MegatronSpec:
    """MegatronSpec of the HF model folder `hf_dir`."""
    from transformers import AutoConfig

    return spec_from_hf_config(AutoConfig.from_pretrained(hf_dir))


# ----------------------------------------------------------------------------------------------
# Model construction
# ----------------------------------------------------------------------------------------------

def _recompute_settings(recompute: str) -> dict:
    """TransformerConfig fields for activation recomputation `recompute` (none / selective / full)."""
    if recompute == "none":
        return {}
    if recompute == "selective":  # MLPs recomputed in backward (megatron's norm recompute needs Transformer Engine)
        return dict(recompute_granularity="selective", recompute_modules=["mlp"])
    if recompute == "full":  # only each layer's input is kept
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    raise ValueError(f"recompute={recompute!r}; valid: none, selective, full")


def build_transformer_config(spec: MegatronSpec, *, tp_size: int = 1, pp_size: int = 1,
                             params_dtype: torch.dtype = torch.float32, recompute: str = "none",
                             ep_size: int = 1, moe_aux_loss_coeff: float = 0.0):
    """megatron TransformerConfig for `spec` (RMSNorm, SwiGLU, RoPE, GQA, MoE; fusions off on CPU)."""
    from megatron.core.transformer import TransformerConfig

    from trainer import moe

    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        **_recompute_settings(recompute),
        **moe.transformer_config_fields(spec, ep_size=ep_size, aux_loss_coeff=moe_aux_loss_coeff),
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=False,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        rotary_interleaved=False,
    )


def build_gpt_model(spec: MegatronSpec, config, *, vocab_pad_multiple: int = 128, pre_process: bool = True,
                    post_process: bool = True, layer_spec=None):
    """GPTModel for `spec` on this rank's pipeline stage (layer spec: `attention.gpt_layer_spec` unless given)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.process_groups_config import ProcessGroupCollection

    from trainer import attention, megatron_compat

    megatron_compat.apply()
    if layer_spec is None:
        layer_spec = attention.gpt_layer_spec(spec.qk_norm)
        if spec.is_moe:
            from trainer import moe

            layer_spec = moe.block_spec(spec, config, layer_spec)
        elif not megatron_compat.has_transformer_engine():  # the final norm as Kiln's (weight in the parameter dtype)
            from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

            from trainer import fused

            layer_spec = TransformerBlockSubmodules(layer_specs=[layer_spec] * get_num_layers_to_build(config),
                                                    layer_norm=fused.layer_classes()[0])
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    # No embedding group: megatron would copy the tied embedding to the last stage through `.cuda()`; the
    # bridge loads that copy from HF instead and PolicyOptimizer all-reduces the two copies' gradients.
    groups = ProcessGroupCollection.use_mpu_process_groups()
    groups.embd = None
    model = GPTModel(
        config,
        transformer_layer_spec=layer_spec,
        vocab_size=spec.padded_vocab_size(vocab_pad_multiple, tp_size),
        max_sequence_length=spec.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=spec.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(spec.rope_theta),
        rotary_percent=1.0,
        pg_collection=groups,
    )
    _mark_tensor_parallel(model, spec)
    return model.to(torch.cuda.current_device()) if torch.cuda.is_available() else model


def final_hidden_states(model, tokens: torch.Tensor, positions: torch.Tensor, packed_seq_params=None) -> torch.Tensor:
    """The decoder's output after the final norm, [s, b, H] (the output layer is not run)."""
    if not _unwrap(model).post_process:
        raise ValueError("final_hidden_states needs the last pipeline stage (post_process=True)")
    return stage_forward(model, tokens, positions, packed_seq_params)


def stage_forward(model, tokens: torch.Tensor, positions: torch.Tensor, packed_seq_params=None,
                  input_tensor: torch.Tensor | None = None) -> torch.Tensor:
    """This pipeline stage's output [s, b, H]: after the final norm on the last stage (no output layer).

    `input_tensor` is the previous stage's output [s, b, H]; the first stage embeds `tokens` instead.
    """
    model = _unwrap(model)
    if model.pre_process != (input_tensor is None):
        raise ValueError(f"pipeline stage with pre_process={model.pre_process} got "
                         f"{'no' if input_tensor is None else 'an'} input tensor; the first stage takes none, "
                         "the others the previous stage's output")
    if input_tensor is not None:
        model.set_input_tensor(input_tensor)
    post_process = model.post_process
    model.post_process = False  # GPTModel._postprocess returns the hidden states unprojected
    try:
        return model(tokens, positions, None, packed_seq_params=packed_seq_params)
    finally:
        model.post_process = post_process


def output_weight(model) -> torch.Tensor:
    """This rank's output-layer rows [V_local, H] (the embedding when tied)."""
    model = _unwrap(model)
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def _mark_tensor_parallel(model, spec: MegatronSpec) -> None:
    """Set megatron's tensor-parallel attributes from the table (megatron skips them without random init)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    params = dict(model.named_parameters())
    for m in stage_mappings(model, spec):
        param = _param(params, m.megatron)
        if m.layout != "replicated" and not getattr(param, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(param, True, 1 if m.layout == "row" else 0, 1)


# ----------------------------------------------------------------------------------------------
# The mapping table (one per family)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightMapping:
    """One megatron parameter, the HF tensors it is made of, and its tensor-parallel layout."""

    megatron: str
    hf: tuple[str, ...]
    layout: str

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} not in {LAYOUTS}")

    def at_layer(self, local: int, global_: int) -> "WeightMapping":
        """This mapping with `{layer}` filled: local index on the megatron side, global on the HF side."""
        return self._filled("{layer}", local, global_)

    def at_expert(self, local: int, global_: int) -> "WeightMapping":
        """This mapping with `{expert}` filled: this rank's index on the megatron side, global on the HF side."""
        return self._filled("{expert}", local, global_)

    def _filled(self, key: str, local: int, global_: int) -> "WeightMapping":
        return WeightMapping(self.megatron.replace(key, str(local)), tuple(h.replace(key, str(global_))
                                                                           for h in self.hf), self.layout)


_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."
_LAYER_ATTENTION = (
    WeightMapping(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), "replicated"),
    WeightMapping(_L + "self_attention.linear_qkv.weight",
                  (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
                  "qkv"),
    WeightMapping(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), "row"),
    WeightMapping(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), "replicated"),
)
_DENSE_MLP = (
    WeightMapping(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), "gate_up"),
    WeightMapping(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), "row"),
)
_LAYER_COMMON = _LAYER_ATTENTION + _DENSE_MLP
MOE_ROUTER = WeightMapping(_L + "mlp.router.weight", (_H + "mlp.gate.weight",), "replicated")
_E = _L + "mlp.experts.local_experts.{expert}."
_HE = _H + "mlp.experts.{expert}."
MOE_EXPERT = (
    WeightMapping(_E + "linear_fc1.weight", (_HE + "gate_proj.weight", _HE + "up_proj.weight"), "gate_up"),
    WeightMapping(_E + "linear_fc2.weight", (_HE + "down_proj.weight",), "row"),
)


def _grouped_expert_rows(experts: range) -> list[WeightMapping]:
    """The stacked rows of a block of experts ({layer} not yet filled): weight1 <- gate/up, weight2 <- down."""
    gate_up = tuple(_HE.replace("{expert}", str(e)) + name for e in experts
                    for name in ("gate_proj.weight", "up_proj.weight"))
    down = tuple(_HE.replace("{expert}", str(e)) + "down_proj.weight" for e in experts)
    return [WeightMapping(_L + "mlp.experts.weight1", gate_up, "experts_gate_up"),
            WeightMapping(_L + "mlp.experts.weight2", down, "experts_down")]
_LAYER_FAMILY = {
    "llama": (),
    "qwen2": (WeightMapping(_L + "self_attention.linear_qkv.bias",
                            (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
                            "qkv"),),
    "qwen3": (WeightMapping(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",), "replicated"),
              WeightMapping(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",), "replicated")),
}
_LAYER_FAMILY["qwen3_moe"] = _LAYER_FAMILY["qwen3"]
EMBEDDING = WeightMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")
FINAL_NORM = WeightMapping("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated")
OUTPUT_LAYER = WeightMapping("output_layer.weight", ("lm_head.weight",), "vocab")
# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear layer.
_TE_ALIASES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
               "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def layer_mappings(family: str) -> tuple[WeightMapping, ...]:
    """The per-layer rows of `family`'s dense layers ({layer} not yet filled)."""
    return _LAYER_COMMON + _LAYER_FAMILY[family]


def spec_layer_mappings(spec: MegatronSpec, layer: int, experts: range | None = None,
                        expert_blocks: int = 1) -> list[WeightMapping]:
    """The rows of global layer `layer` ({layer} not yet filled): dense, or router and `experts` (all by default).

    Expert rows number the experts from 0 on the megatron side (a rank's local experts) and by
    their global index on the HF side. Grouped experts get one stacked row pair per block of
    `experts` (`expert_blocks` equal blocks: the expert-parallel ranks' shares in a whole-model table).
    """
    from trainer import moe

    if layer not in spec.moe_layers:
        return list(layer_mappings(spec.family))
    experts = range(spec.num_experts) if experts is None else experts
    rows = list(_LAYER_ATTENTION + _LAYER_FAMILY[spec.family]) + [MOE_ROUTER]
    if moe.grouped_experts():
        size = len(experts) // expert_blocks
        for start in range(0, len(experts), size):
            rows += _grouped_expert_rows(experts[start:start + size])
        return rows
    for local, global_ in enumerate(experts):
        rows += [m.at_expert(local, global_) for m in MOE_EXPERT]
    return rows


def weight_mappings(spec: MegatronSpec, *, layers: range | None = None, pre_process: bool = True,
                    post_process: bool = True, experts: range | None = None,
                    expert_blocks: int = 1) -> list[WeightMapping]:
    """The table for one pipeline stage: its layers (global indices `layers`), embedding, head.

    `experts`: the global experts this rank holds in each MoE layer (all by default), in
    `expert_blocks` blocks (`spec_layer_mappings`).
    """
    layers = range(spec.num_layers) if layers is None else layers
    rows = [EMBEDDING] if pre_process else []
    for local, global_ in enumerate(layers):
        rows += [m.at_layer(local, global_) for m in spec_layer_mappings(spec, global_, experts, expert_blocks)]
    if post_process:
        rows.append(FINAL_NORM)
        if not spec.tie_embeddings:
            rows.append(OUTPUT_LAYER)
    return rows


def hf_shapes(spec: MegatronSpec, m: WeightMapping) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors of mapping `m`."""
    h, d, f = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    shapes = []
    for name in m.hf:
        if ".mlp.experts." in name or name.endswith(".mlp.gate.weight"):  # MoE: expert width / router
            f = spec.moe_ffn_hidden_size
            if name.endswith(".mlp.gate.weight"):
                shapes.append((spec.num_experts, h))
                continue
        leaf = name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]
        shapes.append({
            "embed_tokens.weight": (spec.vocab_size, h), "lm_head.weight": (spec.vocab_size, h),
            "norm.weight": (h,), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h),
            "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,),
            "o_proj.weight": (h, q), "q_norm.weight": (d,), "k_norm.weight": (d,),
            "gate_proj.weight": (f, h), "up_proj.weight": (f, h), "down_proj.weight": (h, f),
        }[leaf])
    return shapes


# ----------------------------------------------------------------------------------------------
# Layouts: full HF tensors <-> this rank's megatron shard
# ----------------------------------------------------------------------------------------------

def to_shard(m: WeightMapping, hf: list[torch.Tensor], spec: MegatronSpec, *, tp_rank: int, tp_size: int,
             padded_vocab: int) -> torch.Tensor:
    """This TP rank's megatron shard of mapping `m`, built from its full HF tensors."""
    if m.layout == "replicated":
        return hf[0]
    if m.layout == "column":
        return hf[0].chunk(tp_size, dim=0)[tp_rank]
    if m.layout == "row":
        return hf[0].chunk(tp_size, dim=1)[tp_rank]
    if m.layout == "vocab":
        full = hf[0].new_zeros((padded_vocab,) + tuple(hf[0].shape[1:]))
        full[: hf[0].shape[0]] = hf[0]
        return full.chunk(tp_size, dim=0)[tp_rank]
    if m.layout == "gate_up":
        gate, up = hf
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    if m.layout == "experts_gate_up":  # [experts, 2 * ffn, hidden], per expert [gate; up]
        return torch.stack([torch.cat([gate, up]) for gate, up in zip(hf[0::2], hf[1::2])])
    if m.layout == "experts_down":  # [experts, hidden, ffn]
        return torch.stack(hf)
    q, k, v = hf  # qkv: [groups, (heads_per_group + 2) * head_dim, ...] then whole groups per rank
    groups, d = spec.num_kv_heads, spec.head_dim
    rest = tuple(q.shape[1:])
    fused = torch.cat([q.reshape((groups, -1) + rest), k.reshape((groups, d) + rest),
                       v.reshape((groups, d) + rest)], dim=1)
    return fused.chunk(tp_size, dim=0)[tp_rank].reshape((-1,) + rest)


def _joined(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """`parts` concatenated along `dim`; the one part itself (no copy) when there is only one."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def from_shards(m: WeightMapping, shards: list[torch.Tensor], spec: MegatronSpec) -> list[torch.Tensor]:
    """The full HF tensors of mapping `m` from all TP ranks' shards (rank order).

    With one shard every layout but qkv gives views of it (no copy), so callers that keep, save or
    change the tensors must copy them. q/k/v interleave per query group: copies (views with one group).
    """
    if m.layout == "replicated":
        return [shards[0]]
    if m.layout == "column":
        return [_joined(shards, 0)]
    if m.layout == "row":
        return [_joined(shards, 1)]
    if m.layout == "vocab":
        return [_joined(shards, 0)[: spec.vocab_size]]
    if m.layout == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [_joined([g for g, _ in halves], 0), _joined([u for _, u in halves], 0)]
    if m.layout == "experts_gate_up":  # experts are not tensor-parallel: one shard
        return [half for expert in shards[0] for half in expert.chunk(2, dim=0)]
    if m.layout == "experts_down":
        return list(shards[0].unbind(0))
    groups, d = spec.num_kv_heads, spec.head_dim
    rest = tuple(shards[0].shape[1:])
    fused = _joined(shards, 0).reshape((groups, -1) + rest)  # [groups, (hpg + 2) * d, ...]
    q_rows = fused.shape[1] - 2 * d
    q, k, v = fused.split([q_rows, d, d], dim=1)
    return [q.reshape((-1,) + rest), k.reshape((-1,) + rest), v.reshape((-1,) + rest)]  # copies unless one group


# ----------------------------------------------------------------------------------------------
# Model <-> HF tensors
# ----------------------------------------------------------------------------------------------

def _stage_layers(model) -> range:
    """Global indices of the transformer layers this pipeline stage holds."""
    numbers = [layer.layer_number - 1 for layer in model.decoder.layers]
    return range(numbers[0], numbers[-1] + 1) if numbers else range(0)


def _local_experts(spec: MegatronSpec) -> range:
    """Global indices of the experts this rank holds (all of them without expert parallelism)."""
    from megatron.core import parallel_state

    if not spec.is_moe:
        return range(0)
    ep = parallel_state.get_expert_model_parallel_world_size()
    per_rank = spec.num_experts // ep
    start = parallel_state.get_expert_model_parallel_rank() * per_rank
    return range(start, start + per_rank)


def stage_mappings(model, spec: MegatronSpec) -> list[WeightMapping]:
    """The table rows held by this rank's pipeline stage (and expert-parallel rank) of `model`."""
    return weight_mappings(spec, layers=_stage_layers(model), pre_process=model.pre_process,
                           post_process=model.post_process, experts=_local_experts(spec))


def _param(params: dict[str, torch.nn.Parameter], name: str) -> torch.nn.Parameter:
    """The parameter called `name`, or its Transformer Engine alias."""
    if name in params:
        return params[name]
    for local, te in _TE_ALIASES.items():
        if name.endswith(local) and name.replace(local, te) in params:
            return params[name.replace(local, te)]
    raise KeyError(f"megatron model has no parameter {name!r}")


def _unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


@torch.no_grad()
def load_hf_tensors(model, spec: MegatronSpec, get_hf: Callable[[str], torch.Tensor]) -> None:
    """Copy HF tensors (fetched by name through `get_hf`) into this rank's shards of `model`."""
    from megatron.core import parallel_state

    model = _unwrap(model)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    padded = model.vocab_size
    params = dict(model.named_parameters())
    rows = stage_mappings(model, spec)
    if spec.tie_embeddings and model.post_process and not model.pre_process:
        rows.append(WeightMapping(OUTPUT_LAYER.megatron, EMBEDDING.hf, "vocab"))  # last stage's tied copy
    for m in rows:
        param = _param(params, m.megatron)
        shard = to_shard(m, [get_hf(n) for n in m.hf], spec, tp_rank=tp_rank, tp_size=tp_size, padded_vocab=padded)
        if shard.shape != param.shape:
            raise ValueError(f"{m.megatron}: HF tensors {m.hf} give shard {tuple(shard.shape)}, "
                             f"parameter is {tuple(param.shape)}")
        param.copy_(shard)


def load_hf_checkpoint(model, spec: MegatronSpec, hf_dir: str | os.PathLike) -> None:
    """Load the safetensors of HF folder `hf_dir` into `model` (each rank reads only what it holds)."""
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        single = hf_dir / "model.safetensors"
        if not single.exists():
            raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json")
        with safe_open(single, framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    handles = {}

    def get_hf(name: str) -> torch.Tensor:
        if name not in weight_map:
            raise KeyError(f"{hf_dir} has no tensor {name!r}")
        fname = weight_map[name]
        if fname not in handles:
            handles[fname] = safe_open(hf_dir / fname, framework="pt")
        return handles[fname].get_tensor(name)

    load_hf_tensors(model, spec, get_hf)


def _bucket_plan(spec: MegatronSpec, bucket_bytes: int, element_size: int,
                 ep_size: int = 1) -> list[list[WeightMapping]]:
    """Whole-model mappings grouped into buckets of about `bucket_bytes` (same on every rank)."""
    buckets, current, size = [], [], 0
    for m in weight_mappings(spec, expert_blocks=ep_size):
        nbytes = sum(int(torch.Size(s).numel()) for s in hf_shapes(spec, m)) * element_size
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(m)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def _global_mapping_names(model, spec: MegatronSpec) -> dict[str, WeightMapping]:
    """This stage's mappings keyed by their HF names (which are global across stages)."""
    return {m.hf[0]: m for m in stage_mappings(model, spec)}


@torch.no_grad()
def iter_hf_tensors(model, spec: MegatronSpec, bucket_bytes: int = 512 << 20
                    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of (hf_name, full tensor); collective: every rank iterates, rank 0's buckets are full.

    Each parameter is gathered over its TP group (and sent from its pipeline stage to rank 0) only
    when its bucket is built, so at most one bucket of full tensors exists at a time. Ranks of data-
    parallel index > 0 take part in nothing and yield as many empty buckets. Without TP, rank 0's
    tensors of its own stage (all but q/k/v) are views of its parameters, valid until they change:
    a caller that keeps or saves them copies them.
    """
    from megatron.core import parallel_state

    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    model = _unwrap(model)
    params = dict(model.named_parameters())
    dtype = next(iter(params.values())).dtype
    element_size = torch.empty((), dtype=dtype).element_size()
    ep_size = parallel_state.get_expert_model_parallel_world_size() if spec.is_moe else 1
    plan = _bucket_plan(spec, bucket_bytes, element_size, ep_size)
    if parallel_state.get_data_parallel_rank() != 0:
        if ep_size > 1 and parallel_state.get_expert_data_parallel_rank() == 0:
            yield from _send_local_experts(model, spec, plan)  # experts held by expert-parallel ranks > 0
            return
        for _ in plan:
            yield []
        return
    ep_ranks = dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group()) if ep_size > 1 else []
    if ep_size > 1 and parallel_state.get_expert_model_parallel_rank() != 0:
        raise RuntimeError("megatron placed data-parallel rank 0 on an expert-parallel rank > 0; Kiln expects the "
                           "default rank order (tp-cp-ep-dp-pp)")
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    held = _global_mapping_names(model, spec)
    stage_names = {m.hf[0] for m in weight_mappings(spec, layers=_stage_layers(model), pre_process=model.pre_process,
                                                    post_process=model.post_process, expert_blocks=ep_size)
                   } if ep_size > 1 else set()
    owner_of = _stage_owners(spec, pp_size, ep_size) if pp_size > 1 else None
    is_rank0 = dist.get_rank() == 0
    for bucket in plan:
        out = []
        for m in bucket:
            mine = held.get(m.hf[0])
            full = None
            expert_owner = _expert_owner(spec, m, ep_size) if m.hf[0] in stage_names else 0
            if expert_owner:  # held by expert-parallel rank `expert_owner` of this stage: received from it
                full = [torch.empty(s, dtype=dtype, device=local_device(params)) for s in hf_shapes(spec, m)]
                for t in full:
                    dist.recv(t, src=ep_ranks[expert_owner])
            elif mine is not None:
                local = _param(params, mine.megatron).detach()
                if tp_size > 1:
                    shards = [torch.empty_like(local) for _ in range(tp_size)]
                    dist.all_gather(shards, local.contiguous(), group=tp_group)
                else:
                    shards = [local]
                full = from_shards(m, shards, spec) if tp_rank == 0 else None
            if pp_size > 1 and tp_rank == 0:
                owner = owner_of[m.hf[0]]
                if owner != 0:
                    if pp_rank == owner:
                        for t in full:
                            dist.send(t.contiguous(), dst=pp_ranks[0])
                    elif pp_rank == 0:
                        full = [torch.empty(s, dtype=dtype, device=local_device(params)) for s in hf_shapes(spec, m)]
                        for t in full:
                            dist.recv(t, src=pp_ranks[owner])
            if is_rank0:
                out.extend(zip(m.hf, full))
        yield out


def _expert_owner(spec: MegatronSpec, m: WeightMapping, ep_size: int) -> int:
    """The expert-parallel rank holding the expert of mapping `m` (0 for anything that is not an expert)."""
    if ep_size == 1 or ".mlp.experts." not in m.hf[0]:
        return 0
    expert = int(m.hf[0].split(".mlp.experts.")[1].split(".")[0])
    return expert // (spec.num_experts // ep_size)


def _send_local_experts(model, spec: MegatronSpec, plan: list[list[WeightMapping]]
                        ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """`iter_hf_tensors` on an expert-parallel rank > 0: send each held expert to EP rank 0 when its bucket comes.

    Expert weights are not tensor-parallel here (MoE training runs with TP = 1), so a shard is the full tensor.
    """
    from megatron.core import parallel_state

    params = dict(model.named_parameters())
    held = {m.hf[0]: m for m in stage_mappings(model, spec) if ".mlp.experts." in m.hf[0]}
    ep_root = dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group())[0]
    for bucket in plan:
        for m in bucket:
            mine = held.get(m.hf[0])
            if mine is not None:
                for t in from_shards(m, [_param(params, mine.megatron).detach()], spec):
                    dist.send(t.contiguous(), dst=ep_root)
        yield []


def local_device(params: dict[str, torch.nn.Parameter]) -> torch.device:
    """Device of the model's parameters."""
    return next(iter(params.values())).device


def _stage_owners(spec: MegatronSpec, pp_size: int, ep_size: int = 1) -> dict[str, int]:
    """Pipeline stage holding each mapping (keyed by first HF name), as megatron splits layers evenly."""
    per_stage = spec.num_layers // pp_size
    owners = {EMBEDDING.hf[0]: 0, FINAL_NORM.hf[0]: pp_size - 1, OUTPUT_LAYER.hf[0]: pp_size - 1}
    for layer in range(spec.num_layers):
        for m in spec_layer_mappings(spec, layer, expert_blocks=ep_size):
            owners[m.at_layer(layer, layer).hf[0]] = layer // per_stage
    return owners


def export_hf_checkpoint(model, spec: MegatronSpec, out_dir: str | os.PathLike, *, source_dir: str | os.PathLike,
                         shard_bytes: int = 2 << 30) -> None:
    """Write `model` as an HF folder (config and tokenizer copied from `source_dir`); collective, rank 0 writes."""
    import shutil

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if is_rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    files = []
    for i, bucket in enumerate(iter_hf_tensors(model, spec, shard_bytes)):
        if not is_rank0:
            continue
        fname = f"model-{i + 1:05d}.safetensors"
        # own contiguous copies: without TP the tensors view the parameters' storages (gate and up one storage, the
        # embedding a slice of its padded rows), which safetensors accepts only while views neither overlap nor stride
        tensors = {n: t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for n, t in bucket}
        save_file(tensors, out_dir / fname, metadata={"format": "pt"})
        files.append(fname)
        weight_map.update({n: fname for n, _ in bucket})
    if not is_rank0:
        return
    total = len(files)
    renamed = {}
    for i, fname in enumerate(files):
        final = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(out_dir / fname, out_dir / final)
        renamed[fname] = final
    if total > 1:
        index = {"metadata": {}, "weight_map": {n: renamed[f] for n, f in sorted(weight_map.items())}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    source_dir = Path(source_dir)
    for path in source_dir.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != "model.safetensors.index.json":
            shutil.copy2(path, out_dir / path.name)

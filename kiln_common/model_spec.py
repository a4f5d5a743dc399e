"""ModelSpec: the architecture facts of a supported HF decoder, read from its config.json by one set of rules.

The engine builds its model from it and the trainer's bridge derives its Megatron spec from it, so the
two sides cannot read a config differently (a different RoPE base, say, would be a silent train /
inference log-prob mismatch). Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")


def rope_settings(cfg: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) of a config dict, in the transformers 4 or the transformers >= 5 form.

    transformers 4 writes `rope_theta` and `rope_scaling` at the top level; transformers >= 5 writes one
    `rope_parameters` dict holding `rope_theta`, `rope_type` and the scaling fields.
    """
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta")
    theta = float(rope.get("rope_theta", 10000.0) if theta is None else theta)
    scaling = cfg.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"} or None
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


@dataclass(frozen=True)
class ModelSpec:
    """The shape and per-family flags of a model, read from its HF config.json."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None: plain RoPE; else HF's scaling dict ("linear", "llama3", ...)
    max_position_embeddings: int
    qkv_bias: bool  # Qwen2 always, Llama when attention_bias
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    # mixture of experts (qwen3_moe; 0 / () for dense families): softmax top-k router, no shared expert
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # each expert's SwiGLU width (dense layers keep intermediate_size)
    norm_topk_prob: bool = False  # renormalise the top-k probabilities to sum to 1
    moe_layers: tuple[int, ...] = ()  # indices of the sparse (MoE) layers, ascending

    @property
    def num_moe_layers(self) -> int:
        """How many layers route their tokens to experts."""
        return len(self.moe_layers)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelSpec":
        """Read a config.json dict (or `PretrainedConfig.to_dict()`); unsupported families/features raise ValueError."""
        family = cfg.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"model_type {family!r} is not supported; expected one of {FAMILIES}")
        if cfg.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported (no supported family uses it)")
        if family in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported; only full attention")
        heads = cfg["num_attention_heads"]
        if heads % (cfg.get("num_key_value_heads") or heads):
            raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads "
                             f"{cfg['num_key_value_heads']}")
        eos = cfg.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        rope_theta, rope_scaling = rope_settings(cfg)
        moe = _moe_settings(cfg) if family == "qwen3_moe" else {}
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            qkv_bias=True if family == "qwen2" else bool(cfg.get("attention_bias", False)),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=eos,
            **moe,
        )


def hf_num_experts(cfg: dict[str, Any]) -> int:
    """Routed experts of an HF config dict: `num_experts` (the Hub's Qwen3-MoE configs, transformers 4) or
    `num_local_experts` (what newer transformers may write); 0 when neither is set."""
    return int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)


def _moe_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The MoE fields of a Qwen3-MoE config: experts, top-k, expert width, renormalisation, sparse layers.

    As transformers' Qwen3MoeDecoderLayer: layer i is sparse unless it is in `mlp_only_layers` or
    (i + 1) is not a multiple of `decoder_sparse_step`.
    """
    experts, top_k = hf_num_experts(cfg), int(cfg.get("num_experts_per_tok") or 0)
    if experts < 1 or not 1 <= top_k <= experts:
        raise ValueError(f"qwen3_moe needs num_experts >= 1 and 1 <= num_experts_per_tok <= num_experts; got "
                         f"{experts} and {top_k}")
    if cfg.get("shared_expert_intermediate_size"):
        raise ValueError("shared experts (shared_expert_intermediate_size) are not supported; Qwen3-MoE has none")
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense = set(cfg.get("mlp_only_layers") or ())
    layers = tuple(i for i in range(cfg["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0)
    return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), moe_layers=layers)

"""One decoder-only transformer for the Llama, Qwen2, Qwen3 and Qwen3-MoE families, told apart by flags (the MoE
layers' sparse MLP lives in `moe.py`)."""

from __future__ import annotations

import torch
from torch import nn

from inference_engine import ops
from inference_engine.forward_batch import ForwardBatch
from inference_engine.models.moe import SparseMoE
from inference_engine.models.layers import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RMSNorm,
                                            RotaryEmbedding, RowParallelLinear, VocabParallelEmbedding)
from kiln_common.model_spec import FAMILIES, ModelSpec  # noqa: F401 - re-exported
from inference_engine.parallel import TPGroup


class Attention(nn.Module):
    """Self-attention: fused qkv projection, optional q/k norm + RoPE + KV-cache write in one op, then the
    attention backend.
    """

    def __init__(self, spec: ModelSpec, layer_id: int, tp: TPGroup | None):
        super().__init__()
        self.layer_id = layer_id
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads,
                                          spec.qkv_bias, tp)
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, False, tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = spec.head_dim
        self.scaling = spec.head_dim ** -0.5
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None

    def forward(self, x: torch.Tensor, fb: ForwardBatch, rotary: RotaryEmbedding) -> torch.Tensor:
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.q_norm is not None else (None, None)
        kv_cache = (fb.kv_pool.k_buffer[self.layer_id], fb.kv_pool.v_buffer[self.layer_id], fb.out_cache_loc)
        q, k, v = ops.qk_norm_rope(self.qkv_proj(x), fb.positions, rotary.cos, rotary.sin, self.num_heads,
                                   self.num_kv_heads, self.head_dim, *norms, kv_cache=kv_cache,
                                   kv_inv_scale=fb.kv_pool.layer_inv_scales(self.layer_id)
                                   )  # [T, H, D], [T, KVH, D], [T, KVH, D]; k, v in the cache (fp8: quantised)
        out = fb.attn_backend.forward(q, k, v, self, fb)  # [T, H, D]
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward with a fused gate_up projection."""

    def __init__(self, spec: ModelSpec, tp: TPGroup | None):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(spec.hidden_size, [spec.intermediate_size] * 2, False, tp)
        self.down_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size, False, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x), silu_mul=True)  # SiLU-and-mul fused into the down projection


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; each residual add is fused into the norm that follows it."""

    def __init__(self, spec: ModelSpec, layer_id: int, tp: TPGroup | None, ep_size: int = 1):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer_id, tp)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        sparse = layer_id in spec.moe_layers
        self.mlp = SparseMoE(spec, spec.moe_layers.index(layer_id), tp, ep_size) if sparse else MLP(spec, tp)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, fb: ForwardBatch,
                rotary: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual stream before adding it): the caller's next norm adds the two."""
        if residual is None:  # first layer: the residual stream is the embedding
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm(h, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x, fb, rotary), residual)
        return (self.mlp(x, fb) if isinstance(self.mlp, SparseMoE) else self.mlp(x)), residual


class DecoderBody(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, spec: ModelSpec, tp: TPGroup | None, ep_size: int = 1):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, tp, ep_size) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class CausalLM(nn.Module):
    """The full model: token ids of a ForwardBatch in, hidden states out; `logits` projects chosen rows.

    ep_size > 1 (MoE models, a divisor of the tp size): the sparse layers' experts are split over the tp ranks
    (`moe.Experts`) instead of every expert's width."""

    def __init__(self, spec: ModelSpec, tp: TPGroup | None = None, ep_size: int = 1):
        super().__init__()
        self.spec = spec
        self.model = DecoderBody(spec, tp, ep_size)
        self.rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta, spec.rope_scaling)
        self.lm_head = None if spec.tie_word_embeddings else ParallelLMHead(spec.vocab_size, spec.hidden_size, tp)

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        """Hidden states after the final norm, [T, hidden], for the batch's T tokens (KV written to the pool)."""
        h, residual = self.model.embed_tokens(fb.input_ids), None  # [T, hidden]
        for layer in self.model.layers:
            h, residual = layer(h, residual, fb, self.rotary)
        return self.model.norm(h, residual)[0]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] of hidden rows [N, hidden] (gathered over tp ranks)."""
        return self._head().logits(hidden)

    @torch.inference_mode()
    def logits_and_greedy(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`logits(hidden)` with each row's argmax [N] and its log-prob [N] (T = 1); one rank: `ops.linear_greedy`."""
        head = self._head()
        if head.tp_size == 1 and not head.fp8_block:
            return ops.linear_greedy(hidden, head.weight)
        logits = head.logits(hidden)  # [N, vocab] gathered over tp ranks
        return logits, *ops.greedy(logits)

    def _head(self) -> VocabParallelEmbedding:
        """The output projection: the embedding table when tied, else lm_head."""
        return self.model.embed_tokens if self.lm_head is None else self.lm_head

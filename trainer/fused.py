"""Fused elementwise parts of the trainer's decoder layer: RMSNorm, q/k norm + RoPE, SwiGLU.

megatron's local spec runs these as chains of small torch ops (RoPE on packed rows also reads
`cu_seqlens` on the host twice per layer). Here each is one plain torch function, run eagerly on
CPU and the reference of the GPU path. Math, as megatron's local spec:

- RMSNorm: `F.rms_norm` with the weight in the parameters' dtype (torch's fused CUDA kernel; the
  local spec's `torch.nn.RMSNorm` keeps an fp32 weight, which sends bf16 inputs down the unfused path);
- q/k norm + RoPE: per-head RMSNorm of q and k, then rotate-half RoPE (`rotary_interleaved=False`)
  with cos/sin of megatron's `RotaryEmbedding` frequencies at each token's position, computed in
  fp32 and rounded once;
- SwiGLU: `silu(gate) * up` of the fused `linear_fc1` output `[gate | up]`.

On CUDA, q/k norm + RoPE and SwiGLU run as hand-written triton kernels (`trainer.fused_kernels`:
compiled functions cost about 1 ms of host time per call, which left the GPU idle); `torch.compile`
remains for the q/k norm + RoPE cases the kernels do not take.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dim, in fp32, cast back to x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [..., D] with fp32 cos/sin broadcastable to it; fp32 result."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return xf * cos + rotated * sin


def qkv_norm_rope(mixed_qkv: torch.Tensor, q_per_group: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
                  q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [s, b, np, hn], k and v [s, b, ng, hn] of megatron's mixed qkv; q/k normed (if weights) and rotated.

    mixed_qkv: [s, b, ng, (q_per_group + 2) * hn], per query group [its q heads, k, v];
    cos, sin: fp32 [s, b or 1, 1, hn].
    """
    s, b, groups, _ = mixed_qkv.shape
    q, k, v = mixed_qkv.split([q_per_group * head_dim, head_dim, head_dim], dim=-1)
    q = q.reshape(s, b, groups * q_per_group, head_dim)  # [s, b, np, hn]
    if q_weight is not None:
        q, k = _rms_norm(q, q_weight, eps), _rms_norm(k, k_weight, eps)
    return _rotate(q, cos, sin).to(q.dtype), _rotate(k, cos, sin).to(k.dtype), v.contiguous()


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [..., 2I] = [gate | up]; returns [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(gate_up.dtype)


@functools.cache
def _kernels():
    """trainer.fused_kernels, or None without triton."""
    if importlib.util.find_spec("triton") is None:
        return None
    from trainer import fused_kernels

    return fused_kernels


def swiglu_op(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU of gate_up [..., 2I] -> [..., I]: triton kernels on CUDA, eager `swiglu` elsewhere."""
    if gate_up.is_cuda and _kernels() is not None:
        return _kernels().SwiGLU.apply(gate_up)
    return swiglu(gate_up)


def qkv_norm_rope_op(mixed_qkv: torch.Tensor, q_per_group: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
                     q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`qkv_norm_rope`: triton kernels on CUDA where they apply, else compiled (CUDA) or eager (CPU)."""
    args = (mixed_qkv, q_per_group, head_dim, cos, sin, q_weight, k_weight, eps)
    if _kernels() is not None and _kernels().qk_norm_rope_supported(mixed_qkv, head_dim, cos):
        return _kernels().QKNormRoPE.apply(*args)
    return run(qkv_norm_rope, *args)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def run(fn, *args):
    """fn(*args): compiled (one fused kernel per pass) when the first argument is on CUDA, else eager."""
    return _compiled(fn)(*args) if args[0].is_cuda else fn(*args)


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [n, 1, 1, hn] of megatron's RoPE freqs [max_s, 1, 1, hn] at positions [n] (or 0..length-1)."""
    angles = freqs[:length] if positions is None else freqs[positions]
    return torch.cos(angles).float(), torch.sin(angles).float()


@functools.cache
def layer_classes():
    """(KilnRMSNorm, KilnSelfAttention, KilnMLP): megatron modules whose elementwise work runs fused."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    class KilnRMSNorm(torch.nn.Module):
        """RMSNorm with its weight in the model's parameter dtype (megatron's norm-module signature)."""

        def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
            super().__init__()
            self.eps = eps
            self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """weight * RMSNorm(x) over the last dim."""
            return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)

    class KilnSelfAttention(SelfAttention):
        """megatron SelfAttention whose q/k norm and RoPE run as one fused op on device-side positions."""

        def _takes_fused_path(self, rotary_pos_emb, **others) -> bool:
            plain_norms = all(isinstance(n, KilnRMSNorm) for n in (self.q_layernorm, self.k_layernorm)) or \
                all(n is None or type(n).__name__ == "IdentityOp" for n in (self.q_layernorm, self.k_layernorm))
            freqs = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
            return (plain_norms and all(v is None for v in others.values()) and freqs is not None
                    and freqs.shape[-1] == self.hidden_size_per_attention_head
                    and self.config.num_query_groups >= self.world_size and not self.config.attention_output_gate
                    and not self.checkpoint_core_attention and not self.config.rotary_interleaved)

        def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                    rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                    attention_bias=None, packed_seq_params=None, sequence_len_offset=None, *, inference_params=None):
            """Training forward [s, b, h] -> ([s, b, h], bias); anything else goes to megatron's own forward."""
            if not self._takes_fused_path(rotary_pos_emb, key_value_states=key_value_states,
                                          inference_context=inference_context, inference_params=inference_params,
                                          rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                                          rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias):
                if getattr(packed_seq_params, "context_parallel", None) is not None:
                    raise ValueError("context parallelism needs the fused q/k-norm + RoPE path (RoPE at the global "
                                     "positions); this layer takes megatron's own")
                return super().forward(hidden_states, attention_mask, key_value_states, inference_context,
                                       rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
                                       attention_bias, packed_seq_params, sequence_len_offset,
                                       inference_params=inference_params)
            freqs = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
            packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
            mixed_qkv, _ = self.get_query_key_value_tensors(hidden_states, None, split_qkv=False)  # [s, b, ng, .]
            cos, sin = rope_tables(packed_seq_params if packed else None, freqs, mixed_qkv.shape[0])
            norm = isinstance(self.q_layernorm, KilnRMSNorm)
            query, key, value = qkv_norm_rope_op(
                mixed_qkv, self.num_attention_heads_per_partition // self.num_query_groups_per_partition,
                self.hidden_size_per_attention_head, cos, sin, self.q_layernorm.weight if norm else None,
                self.k_layernorm.weight if norm else None, self.q_layernorm.eps if norm else 0.0)
            if packed:  # [t, 1, heads, hn] -> [t, heads, hn]
                query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
            core = self.core_attention(query, key, value, attention_mask, attn_mask_type=self.attn_mask_type,
                                       attention_bias=None, packed_seq_params=packed_seq_params)
            if packed:
                core = core.reshape(core.shape[0], 1, -1)  # [t, 1, np * hn]
            return self.linear_proj(core)

    class KilnMLP(MLP):
        """megatron's dense MLP (fc1 -> SwiGLU -> fc2) with the SwiGLU fused; a plain class in the layer spec."""

        def __init__(self, config, submodules=None, **kwargs):
            super().__init__(config, submodules or MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                 linear_fc2=RowParallelLinear), **kwargs)

        def forward(self, hidden_states, per_token_scale=None, **kwargs):
            """[s, b, h] -> ([s, b, h], bias)."""
            if per_token_scale is not None or not self.config.gated_linear_unit or \
                    self.config.activation_func is not F.silu or self.config.add_bias_linear:
                return super().forward(hidden_states, per_token_scale, **kwargs)
            intermediate, _ = self.linear_fc1(hidden_states)  # [s, b, 2 * ffn / tp]
            return self.linear_fc2(swiglu_op(intermediate))

    return KilnRMSNorm, KilnSelfAttention, KilnMLP


def rope_tables(packed_seq_params, freqs: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [s, 1, 1, hn] for this micro-batch: per-sequence positions when packed, 0..s-1 otherwise.

    Packed positions come from `attention.packed_seq_params` (made on the host, no device sync); the
    tables are computed once per micro-batch and kept on that object for the other layers.
    """
    if packed_seq_params is None:
        return rope_cos_sin(freqs, None, length)
    cache = getattr(packed_seq_params, "rope_cache", None)
    if cache is None:
        raise ValueError("packed micro-batches need PackedSeqParams from trainer.attention.packed_seq_params "
                         "(it carries the per-sequence RoPE positions)")
    key = (freqs.data_ptr(), freqs.shape, freqs.device)
    if key not in cache:
        cache.clear()
        cache[key] = rope_cos_sin(freqs, packed_seq_params.positions, length)
    return cache[key]

"""Kiln's core attention for megatron-core: causal attention over packed (THD) or padded (SBHD) batches.

Packed micro-batches are one row of several sequences back to back; `cu_seqlens` ([seqs + 1],
int32) marks where each starts. Every sequence attends causally to itself only, with RoPE
positions restarting at 0 (megatron's rotary embedding already restarts per sequence when it
gets a THD `PackedSeqParams`). The leaves:

- GPU, bf16/fp16: FlashAttention-2's varlen kernels as shipped inside PyTorch
  (`aten._flash_attention_forward/backward`), GQA native, no padding, no score matrix;
- anywhere else (CPU, fp32): the reference, one causal SDPA call per sequence — what the flash
  path is tested against.

Measured against it on the H100 (docs/benchmarks.md, 2026-11-27): PyTorch 2.11's cuDNN attention
over ragged inputs (`aten._cudnn_attention_forward` with `cum_seq_q`) ran 100x slower and returned
wrong gradients; cuDNN's dense SDPA once per sequence was faster forward (359 vs 294 TFLOP/s) but
slower backward (191 vs 225). FlashAttention-2 stays.

With context parallelism (`trainer.context_parallel`) the packed params carry this CP rank's chunks
of every sequence; the core attention then attends them to their whole sequences (K/V all-gathered).

Padded batches (one sequence per row, right-padded) use causal SDPA, which picks the flash or
cuDNN kernel on GPU. With Transformer Engine installed, megatron's TE spec is used instead.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F

from kiln_common.tensors import to_device

BACKENDS = ("auto", "flash", "reference")


def cu_seqlens_from_lengths(lengths: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Cumulative sequence starts [len(lengths) + 1], int32 (what varlen kernels take)."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return out.to(device)


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """Causal attention of each packed sequence on its own, one SDPA call per sequence; [T, Hq, D].

    q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq a multiple of Hkv (GQA); cu_seqlens: [seqs + 1].
    """
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to T={q.shape[0]}, got {bounds[0]}..{bounds[-1]}")
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, L, D]
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                             enable_gqa=qs.shape[1] != ks.shape[1])
        outs.append(out.squeeze(0).transpose(0, 1))  # [L, Hq, D]
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


class _FlashVarlen(torch.autograd.Function):
    """FlashAttention-2 varlen forward/backward (PyTorch's aten kernels), causal (aligned at the end of each key
    range when it is longer than the query's), no dropout."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng_state, unused)
        ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_q, cu_k, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k,
            0.0, True, rng_state, unused, scale=ctx.scale)
        return dq, dk, dv, None, None, None, None, None


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                 max_q: int, max_k: int, scale: float) -> torch.Tensor:
    """The flash varlen kernel with separate query / key ranges (context parallelism); error if unsupported."""
    if not flash_varlen_supported(q, k):
        raise ValueError(f"flash varlen needs CUDA sm80+, bf16/fp16, head_dim % 8 == 0 and <= 256; got "
                         f"{q.device} {q.dtype} head_dim {q.shape[-1]}")
    return _FlashVarlen.apply(q, k, v, cu_q, cu_k, int(max_q), int(max_k), scale)


def flash_varlen_supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the flash varlen kernel takes these inputs (CUDA sm80+, bf16/fp16, head_dim <= 256, GQA ratio)."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and q.shape[1] % k.shape[1] == 0
            and torch.cuda.get_device_capability(q.device)[0] >= 8)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Causal attention per packed sequence; q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D].

    backend: "flash" (GPU kernel; error if unsupported), "reference" (per-sequence SDPA) or "auto"
    (flash where supported, else reference).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; valid: {BACKENDS}")
    if q.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[1] % k.shape[1]:
        raise ValueError(f"expected q [T, Hq, D] and k, v [T, Hkv, D] with Hkv dividing Hq; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be a 1-d int32 tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if backend == "auto":
        backend = "flash" if flash_varlen_supported(q, k) else "reference"
    if backend == "reference":
        return varlen_attention_reference(q, k, v, cu_seqlens, scale)
    return flash_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale)


def padded_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA over right-padded rows; q [s, b, Hq, D], k/v [s, b, Hkv, D] -> [s, b, Hq * D]."""
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, H, s, D]
    out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale,
                                         enable_gqa=qb.shape[1] != kb.shape[1])  # [b, Hq, s, D]
    return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)


@functools.cache
def _core_attention_class():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule

    class KilnCoreAttention(MegatronModule):
        """Drop-in for megatron's DotProductAttention: causal, THD (varlen) or SBHD (SDPA), no score matrix."""

        def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                     attention_dropout: float | None = None, softmax_scale: float | None = None,
                     cp_comm_type: str | None = None, pg_collection=None):
            super().__init__(config=config)
            dropout = config.attention_dropout if attention_dropout is None else attention_dropout
            if attn_mask_type != AttnMaskType.causal:
                raise ValueError(f"KilnCoreAttention supports attn_mask_type=causal only, got {attn_mask_type}")
            if dropout != 0.0 or config.context_parallel_size != 1 or config.window_size is not None:
                raise ValueError(f"KilnCoreAttention needs attention_dropout=0, context_parallel_size=1 and no "
                                 f"window; got {dropout}, {config.context_parallel_size}, {config.window_size}")
            self.layer_number = max(1, layer_number)
            self.softmax_scale = 1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            """THD: q [t, np, hn] -> [t, np * hn]; SBHD: q [s, b, np, hn] -> [s, b, np * hn]."""
            if attention_bias is not None or attention_mask is not None:
                raise ValueError("KilnCoreAttention is causal by construction: pass attention_mask=None and no "
                                 "attention_bias")
            if packed_seq_params is not None:
                if packed_seq_params.qkv_format != "thd":
                    raise ValueError(f"packed_seq_params.qkv_format={packed_seq_params.qkv_format!r}; valid: 'thd'")
                cp = getattr(packed_seq_params, "context_parallel", None)
                if cp is not None:  # this rank's chunks of each sequence, against the whole sequence
                    from trainer.context_parallel import context_parallel_attention

                    out = context_parallel_attention(query, key, value, cp, self.softmax_scale)
                    return out.reshape(out.shape[0], -1)
                out = varlen_attention(query, key, value, packed_seq_params.cu_seqlens_q,
                                       packed_seq_params.max_seqlen_q, self.softmax_scale)  # [t, np, hn]
                return out.reshape(out.shape[0], -1)
            return padded_causal_attention(query, key, value, self.softmax_scale)

    return KilnCoreAttention


@functools.cache
def _packed_seq_params_class():
    from dataclasses import dataclass, field

    from megatron.core.packed_seq_params import PackedSeqParams

    @dataclass
    class KilnPackedSeqParams(PackedSeqParams):
        """megatron's THD PackedSeqParams plus per-token RoPE positions (restarting per sequence), made on the host."""

        positions: torch.Tensor | None = None  # [T] int64
        rope_cache: dict = field(default_factory=dict)  # cos/sin tables of this micro-batch (trainer.fused)
        context_parallel: object = None  # trainer.context_parallel.ContextParallel: this CP rank's chunks

    return KilnPackedSeqParams


def packed_seq_params(lengths: list[int], device: torch.device | str, context_parallel=None):
    """megatron PackedSeqParams (THD) for one packed row of sequences of `lengths`, with per-token RoPE positions.

    Built on the host and sent in one asynchronous copy: no device sync. With `context_parallel` (a
    `trainer.context_parallel.ContextParallel` of these lengths) it describes this CP rank's chunks:
    two per sequence, at their global positions.
    """
    if not lengths or min(lengths) < 1:
        raise ValueError(f"packed sequences need lengths >= 1, got {lengths}")
    cp = context_parallel
    if cp is not None:
        local = [2 * p // (2 * cp.size) for p in cp.padded]
        host = torch.cat([cu_seqlens_from_lengths(local).long(), cp.positions])
        longest = max(cp.padded)  # megatron sizes its RoPE table from max_seqlen: the global positions
    else:
        local = lengths
        host = torch.cat([cu_seqlens_from_lengths(lengths).long()] + [torch.arange(n) for n in lengths])
        longest = max(lengths)
    staged = to_device(host, device)  # [seqs + 1 + T]
    cu, positions = staged[:len(local) + 1].int(), staged[len(local) + 1:]  # [seqs + 1] int32, [T] int64
    return _packed_seq_params_class()(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                                      max_seqlen_kv=longest, positions=positions,
                                      context_parallel=None if cp is None else cp.to(device))


def gpt_layer_spec(qk_norm: bool):
    """The trainer's layer spec: Transformer Engine's when installed, else megatron's local spec with Kiln's modules.

    Kiln's modules: `KilnCoreAttention` (varlen flash / SDPA), and from `trainer.fused` RMSNorms with
    weights in the parameter dtype, self-attention with fused q/k norm + RoPE, MLP with fused SwiGLU.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    from trainer import fused, megatron_compat

    if megatron_compat.has_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)
    spec = copy.deepcopy(gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=qk_norm, normalization="RMSNorm"))
    norm, self_attention, mlp = fused.layer_classes()
    layer = spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = norm
    layer.self_attention.module = self_attention
    attn = layer.self_attention.submodules
    attn.core_attention = _core_attention_class()
    if qk_norm:
        attn.q_layernorm = attn.k_layernorm = norm
    layer.mlp = mlp  # a class, not a ModuleSpec: megatron passes it config only and it builds its linears
    return spec

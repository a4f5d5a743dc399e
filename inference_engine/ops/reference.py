"""The torch specification of the fused ops: what the triton kernels must compute, and what CPU engines run.

Every function rounds where HF transformers rounds (bf16 / fp16 results of each elementwise op, norms in
float32 cast back before the weight), so a low-precision engine step matches HF's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inference_engine.kv_cache import quantize_kv


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * RMSNorm(x) over the last dim, normalised in float32 and cast back before the weight."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the pre-norm block's residual add and the next norm."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [T, heads, D] by float32 cos / sin [T, D/2] (cast to x's dtype first, as HF does)."""
    cos = torch.cat([cos, cos], dim=-1)[:, None, :].to(x.dtype)  # [T, 1, D]
    sin = torch.cat([sin, sin], dim=-1)[:, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def qk_norm_rope(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                 num_heads: int, num_kv_heads: int, head_dim: int, q_weight: torch.Tensor | None,
                 k_weight: torch.Tensor | None, eps: float,
                 kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 kv_inv_scale: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split qkv [T, (H + 2 KVH) * D] into q [T, H, D], k [T, KVH, D] (per-head RMSNorm if weights, then RoPE) and v.

    kv_cache = (k_buffer, v_buffer [slots, KVH, D], loc [T]): also store each token's k and v at slot loc
    (quantised to e4m3 with kv_inv_scale = (1 / k_scale, 1 / v_scale) [KVH] for an fp8 cache)."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(-1, num_heads, head_dim)  # [T, H, D]
    k = k.view(-1, num_kv_heads, head_dim)  # [T, KVH, D]
    v = v.view(-1, num_kv_heads, head_dim)
    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    cos, sin = cos_table[positions], sin_table[positions]  # [T, D/2] float32
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    if kv_cache is not None:
        k_buffer, v_buffer, loc = kv_cache
        if kv_inv_scale is not None:
            k_buffer[loc] = quantize_kv(k, kv_inv_scale[0])
            v_buffer[loc] = quantize_kv(v, kv_inv_scale[1])
        else:
            k_buffer[loc] = k.to(k_buffer.dtype)
            v_buffer[loc] = v.to(v_buffer.dtype)
    return q, k, v


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2I] laid out [gate | up]; returns [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias [N]) in x's dtype, then cast to out_dtype if given."""
    out = F.linear(x, weight, bias)
    return out if out_dtype is None else out.to(out_dtype)


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The argmax [B] of float32 logits [B, V] and its log-prob [B] (T = 1), without a full log_softmax."""
    tokens = logits.argmax(dim=-1)
    return tokens, logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def context_slots(table: torch.Tensor, rows: torch.Tensor, kv_indptr: torch.Tensor, total: int,
                  max_len: int) -> torch.Tensor:
    """kv_indices [total]: request i's KV slots table[rows[i], :len_i] back to back from kv_indptr[i], where
    len_i = kv_indptr[i + 1] - kv_indptr[i] <= max_len and total = kv_indptr[-1] (both known on the host)."""
    lens = kv_indptr[1:] - kv_indptr[:-1]
    ctx_rows = rows.repeat_interleave(lens, output_size=total)
    ctx_pos = torch.arange(total, device=table.device) - kv_indptr[:-1].repeat_interleave(lens, output_size=total)
    return table[ctx_rows, ctx_pos]


def linear_greedy(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 logits [M, N] of x @ weight^T (rounded to x's dtype first), their argmax [M] and its log-prob [M]."""
    logits = linear(x, weight, out_dtype=torch.float32)
    return logits, *greedy(logits)


MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32 constants) of int64 values in [0, 2^32); products stay below 2^63."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK32
    return x ^ (x >> 15)


def race_keys(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """One 32-bit key [B] per row from its seed [B] (int64 >= 0) and draw number [B]: the row's noise stream."""
    key = mix32(offsets & MASK32)
    key = mix32(key ^ ((seeds >> 32) & MASK32))
    return mix32(key ^ (seeds & MASK32))


def race_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [B, vocab] float32, a pure function of each row's key and the token id (counter-based)."""
    ids = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    h = mix32((keys[:, None] + ids[None, :] * GOLDEN32) & MASK32)  # [B, V]
    u = ((h >> 9).float() * 2 + 1) * 2.0 ** -24  # odd multiples of 2^-24: exact in float32, strictly inside (0, 1)
    return -torch.log(u)


def seeded_race(probs: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Token [B] drawn from each row of probs [B, V] (not necessarily normalised) by an exponential race.

    argmax_v probs[v] / E[v] with E ~ Exp(1) picks v with probability probs[v] / sum(probs); the noise is
    a function of (seed, offset, v) only, so a row's draw does not depend on the batch it is in."""
    return (probs / race_noise(race_keys(seeds, offsets), probs.shape[-1])).argmax(dim=-1)


def truncation_threshold(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                         min_p: torch.Tensor) -> torch.Tensor:
    """The smallest probability [B] that top-k, top-p and min-p keep in each row of probs [B, V] (values >= 0).

    Token i of a row p is kept iff count(p > p_i) < top_k, mass(p > p_i) < top_p (a float64 sum; top_p >= 1 is
    off, as a float32 softmax may sum past 1) and p_i >= min_p * max(p) (a product in probs' dtype), or p_i = max(p):
    the most likely tokens always survive. Tied probabilities are kept or dropped together, so the kept set is
    {p >= T} with T returned here. Computed by a sort (the triton kernel bisects instead)."""
    desc = probs.sort(dim=-1, descending=True).values  # [B, V]
    pos = torch.arange(probs.shape[-1], device=probs.device).expand_as(desc)
    starts = torch.ones_like(desc, dtype=torch.bool)
    starts[:, 1:] = desc[:, 1:] != desc[:, :-1]  # first entry of each run of equal values
    above = torch.where(starts, pos, 0).cummax(dim=-1).values  # [B, V] count(p > desc[:, j])
    csum = desc.double().cumsum(dim=-1)
    mass = torch.cat([torch.zeros_like(csum[:, :1]), csum[:, :-1]], dim=-1).gather(-1, above)  # mass(p > desc)
    keep = above < top_k[:, None]
    keep &= (mass < top_p[:, None].double()) | (top_p[:, None] >= 1)
    keep &= desc >= min_p[:, None].to(desc.dtype) * desc[:, :1]
    keep |= desc == desc[:, :1]
    return desc.gather(-1, keep.sum(dim=-1, keepdim=True) - 1)[:, 0]  # keep is a prefix of the sorted row


def truncate(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """probs [B, V] with the entries that top-k, top-p and min-p drop set to 0 (see truncation_threshold)."""
    return probs.masked_fill(probs < truncation_threshold(probs, top_k, top_p, min_p)[:, None], 0.0)

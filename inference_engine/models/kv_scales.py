"""FP8 KV-cache scales from the weights: per (layer, kv head), a bound on |K| and |V| that no input can exceed.

Every layer's K and V are linear in the normalised hidden state `a * n`, where `a` is the input RMSNorm's
weight and `n = x / rms(x)`, so `||n||_2 <= sqrt(hidden)`. By Cauchy-Schwarz, element j of the projection is at
most `c_j = ||W[j] * a||_2 * sqrt(hidden) + |b_j|` in magnitude. RoPE rotates the pairs (j, j + D/2), so a key
element is at most `sqrt(c_j^2 + c_(j+D/2)^2)`; with a per-head q/k RMSNorm (Qwen3) the key is `w * m` with
`||m||_2 <= sqrt(D)` instead, so at most `max|w| * sqrt(D)`. A head's bound is the largest over its D elements,
and its scale `bound / 448` maps it onto e4m3's largest value: nothing saturates in exact arithmetic (the
clamp in `kv_cache.quantize_kv` catches what rounding of the inputs may add), and since e4m3 is a floating-point
format the bound's slack costs no relative precision as long as values stay above e4m3's smallest normal
(2^-6 of the scale): a bound loose by a factor F puts typical values near 448 / F (F ~ sqrt(hidden) at worst).
The scales depend on the weights only: the same on every engine and tp layout, whatever the traffic, and
recomputed whenever a weight update touches a layer's input norm, q/k norm or k/v projection.
"""

from __future__ import annotations

import math
import re

import torch

from inference_engine.kv_cache import FP8_MAX
from weight_sync.fp8 import dequantize_weight

_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|self_attn\.(k_norm|k_proj|v_proj))\.")
TINY = 1e-30  # a head whose bound is at most this (all-zero weights) gets scale 1


def _rows(linear, offset: int, size: int) -> torch.Tensor:
    """Rows [offset, offset + size) of a (possibly FP8) linear's weight, in float32."""
    weight = linear.weight
    if not linear.fp8_block:
        return weight[offset:offset + size].float()
    block = linear.fp8_block
    scale = linear.weight_scale_inv[offset // block:-(-(offset + size) // block)]
    return dequantize_weight(weight[offset:offset + size], scale, block)  # block-aligned (fp8._check_alignment)


def _projection_bounds(attn, norm_weight: torch.Tensor, part: int) -> torch.Tensor:
    """c [KVH, D]: |element| bounds of the k (part 1) or v (part 2) projection of this rank's kv heads."""
    qkv = attn.qkv_proj
    offset, size = qkv.part_slices()[part]
    w = _rows(qkv, offset, size) * norm_weight.float()  # [KVH * D, hidden]
    c = w.norm(dim=1) * math.sqrt(w.shape[1])
    if qkv.bias is not None:
        c = c + qkv.bias[offset:offset + size].float().abs()
    return c.view(attn.num_kv_heads, attn.head_dim)


@torch.no_grad()
def layer_kv_bounds(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(K bound, V bound), each [KVH] float32: no key / value element of this decoder layer exceeds them."""
    attn = layer.self_attn
    norm = layer.input_layernorm.weight
    if attn.k_norm is not None:  # per-head RMSNorm then RoPE: |k| <= max|w| * sqrt(D) in every head
        k = attn.k_norm.weight.float().abs().max() * math.sqrt(attn.head_dim)
        k_bound = k.expand(attn.num_kv_heads).clone()
    else:
        c = _projection_bounds(attn, norm, 1)  # [KVH, D]
        half = attn.head_dim // 2
        k_bound = torch.sqrt(c[:, :half] ** 2 + c[:, half:] ** 2).amax(dim=1)  # RoPE mixes element j with j + D/2
    v_bound = _projection_bounds(attn, norm, 2).amax(dim=1)
    return k_bound, v_bound


def scale_of_bound(bound: torch.Tensor) -> torch.Tensor:
    """The e4m3 scale that maps |x| <= bound onto [-448, 448] (1 where the bound is 0)."""
    # a tensor divisor: CUDA divides by a Python scalar as a multiply by its reciprocal, a last-bit difference from
    # the CPU's true division (as in weight_sync/fp8.py)
    return torch.where(bound > TINY, bound / torch.full_like(bound, FP8_MAX), torch.ones_like(bound))


@torch.no_grad()
def compute_kv_scales(model, layer_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_scale, v_scale) [len(layer_ids), KVH] float32 of these layers of a CausalLM (this tp rank's heads)."""
    layers = model.model.layers
    bounds = [layer_kv_bounds(layers[i]) for i in layer_ids]
    return (scale_of_bound(torch.stack([k for k, _ in bounds])),
            scale_of_bound(torch.stack([v for _, v in bounds])))


def layers_touched(hf_names, num_layers: int) -> list[int]:
    """The layers whose KV scales depend on one of these HF tensor names (their input norm, k/v projections or
    k norm), sorted."""
    matches = (_LAYER_NAME.match(name) for name in hf_names)
    return sorted({int(m.group(1)) for m in matches if m and int(m.group(1)) < num_layers})

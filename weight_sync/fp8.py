"""FP8 (e4m3) blockwise quantisation: the one definition of the numerics that the weight push and the engine share.

Weights: every `[N, K]` linear weight is cut into blocks of `block x block` (the last row / column block may
be partial); each block's scale is `amax(|w|) / 448` (1 for a block whose amax is at most `TINY`) and its
elements are `e4m3(clamp(w * (1 / scale), -448, 448))`, rounded to nearest even, where `1 / scale` is
rounded to float32 once per block (a multiply per element instead of a division, since the kernels that
quantise activations on the fly repeat it in every program; within 2 float32 ulps of `w / scale`). The
scales are float32 `[ceil(N/B), ceil(K/B)]`, stored under `<name>_scale_inv` (the HF / DeepSeek-V3 FP8
checkpoint convention: dequantised `w ~ q * scale_inv`). A stack of expert matrices `[E, N, K]` (a
mixture-of-experts layer's `mlp.experts.{gate_up,down}_proj`) is quantised matrix by matrix, scales
`[E, ceil(N/B), ceil(K/B)]`: expert e's blocks and scales are bit for bit those of `quantize_weight(w[e])`.
Activations: the same per row and group of `block` columns (`1 x block`), done on the fly by the engine.
Everything here is plain torch, bit-identical on CPU and CUDA (IEEE division and multiplication, one rounding
to e4m3), so the sender can quantise before the wire, the engine at load, and the checksums of both agree bit
for bit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from weight_sync.buckets import NamedTensors

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
TINY = 1e-30  # a block with amax at most this gets scale 1 (its values round to 0): 1 / scale stays finite
BLOCK_SIZES = (16, 32, 64, 128)
SCALE_SUFFIX = "_scale_inv"
# the HF names of the linears that run in FP8 (the LM head only when asked): attention and MLP projections (also
# the per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` of a mixture-of-experts layer)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# a mixture-of-experts layer's expert stacks [E, N, K] under their transformers >= 5 names
STACKED_EXPERT_NAMES = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")


def check_block(block: int) -> int:
    """`block` if it is a supported block size, else ValueError naming the valid ones."""
    if block not in BLOCK_SIZES:
        raise ValueError(f"fp8 block size {block!r} is not supported; expected one of {BLOCK_SIZES}")
    return block


def _blocks(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """t [..., N, K] zero-padded to whole blocks and viewed as [..., N/rows, rows, K/cols, cols]."""
    n, k = t.shape[-2:]
    pad_n, pad_k = -n % rows, -k % cols
    if pad_n or pad_k:
        t = F.pad(t, (0, pad_k, 0, pad_n))
    return t.reshape(*t.shape[:-2], (n + pad_n) // rows, rows, (k + pad_k) // cols, cols)


def _quantize(t: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = t.shape[-2:]
    blocks = _blocks(t, rows, cols)
    amax = blocks.abs().amax(dim=(-3, -1)).float()  # [..., N/rows, K/cols]
    # IEEE division by a tensor: CUDA torch turns `tensor / python_scalar` into a multiply by the scalar's reciprocal,
    # which is not the correctly rounded quotient the kernels and the CPU compute
    scale = torch.where(amax > TINY, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))
    inv = 1.0 / scale  # rounded to float32 once per block
    q = (blocks.float() * inv[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(*blocks.shape[:-4], blocks.shape[-4] * rows, blocks.shape[-2] * cols)[..., :n, :k]
    return q.contiguous(), scale


def quantize_weight(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [..., N, K], float32 scale_inv [..., ceil(N/B), ceil(K/B)]) of a weight [N, K] in `block x block`
    blocks, or of each matrix of a stack [..., N, K] (experts) on its own. On CUDA one triton pass
    (`weight_sync.fp8_kernels`, bit for bit the torch form `quantize_weight_torch`)."""
    if w.dim() < 2:
        raise ValueError(f"quantize_weight takes a [..., N, K] weight, got shape {tuple(w.shape)}")
    if _kernel_takes(w):
        n, k = w.shape[-2:]
        q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
        s = torch.empty(*w.shape[:-2], -(-n // block), -(-k // block), dtype=torch.float32, device=w.device)
        quantize_weight_into(w, q, s, block)
        return q, s
    return quantize_weight_torch(w, block)


def quantize_weight_torch(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_weight` in plain torch on any device: the specification the kernel is tested against."""
    return _quantize(w, block, block)


def _kernel_takes(w: torch.Tensor) -> bool:
    """Whether the triton kernel quantises w: a CUDA matrix or expert stack [E, N, K] of a float dtype, with triton."""
    if not w.is_cuda or w.dim() > 3 or w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def quantize_weight_into(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block: int) -> None:
    """Quantise w [..., N, K] (on any device: it moves to q's first) into the e4m3 tensor q (its shape) and the
    float32 scale_inv [..., ceil(N/B), ceil(K/B)] in place: views of an engine's FP8 parameter (their last dimension
    contiguous) are written directly on CUDA, without a temporary."""
    w = w.to(q.device)
    if _kernel_takes(w) and scale.device == q.device and q.stride(-1) == 1 and scale.stride(-1) == 1:
        from weight_sync.fp8_kernels import quantize_weight_into as kernel
        kernel(w, q, scale, block, FP8_MAX, TINY)
        return
    wq, ws = quantize_weight_torch(w, block)
    q.copy_(wq)
    scale.copy_(ws)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, block: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [..., N, K] (in dtype) that e4m3 q [..., N, K] with scale_inv [..., ceil(N/B), ceil(K/B)] stands
    for."""
    n, k = q.shape[-2:]
    full = scale.repeat_interleave(block, -2)[..., :n, :].repeat_interleave(block, -1)[..., :k]  # [..., N, K]
    return (q.float() * full).to(dtype)


def quantize_activation(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [M, K], float32 scales [M, ceil(K/B)]) of activations [M, K], per row and group of `block` columns."""
    return _quantize(x.reshape(-1, x.shape[-1]), 1, block)


def fake_quantize_activation(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., K] quantised per row and `block` group and dequantised again, in float32."""
    q, s = quantize_activation(x, block)
    k = q.shape[1]
    return (q.float() * s.repeat_interleave(block, 1)[:, :k]).reshape(x.shape)


def scale_name(weight_name: str) -> str:
    """'<...>.weight_scale_inv' for '<...>.weight'."""
    return weight_name + SCALE_SUFFIX


@dataclass(frozen=True)
class Fp8Layout:
    """Which HF tensors an FP8 engine holds as e4m3 + scale_inv, and in which blocks.

    Every 2-D `*.{q,k,v,o,gate,up,down}_proj.weight` (per-expert ones included), every 3-D expert stack
    `*.mlp.experts.{gate_up,down}_proj`; `lm_head.weight` too when `lm_head`. The router (`mlp.gate`) is not.
    """

    block: int = 128
    lm_head: bool = False

    def __post_init__(self):
        check_block(self.block)

    def quantized(self, name: str, tensor: torch.Tensor | None = None) -> bool:
        """Whether the engine holds HF tensor `name` in FP8."""
        if name.endswith(STACKED_EXPERT_NAMES):
            return tensor is None or tensor.dim() == 3
        if tensor is not None and tensor.dim() != 2:
            return False
        if name == "lm_head.weight":
            return self.lm_head
        return name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEAR_NAMES

    def quantize_bucket(self, bucket: Iterable[tuple[str, torch.Tensor]]) -> NamedTensors:
        """The bucket as the engine holds it: each FP8 weight as (name, e4m3) and (name_scale_inv, float32);
        others (and tensors already in e4m3) as they are."""
        out: NamedTensors = []
        for name, tensor in bucket:
            if self.quantized(name, tensor) and tensor.dtype != FP8_DTYPE:
                q, s = quantize_weight(tensor, self.block)
                out += [(name, q), (scale_name(name), s)]
            else:
                out.append((name, tensor))
        return out

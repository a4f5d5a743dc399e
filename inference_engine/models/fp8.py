"""FP8 rollout weights: the engine's linears held as e4m3 with one float32 scale per `block x block` block.

`convert(model, layout)` turns a built model's linears (qkv, o, gate_up, down; the untied LM head when
`layout.lm_head`) into FP8: each `weight` becomes float8_e4m3fn and gets a `weight_scale_inv` parameter
[ceil(rows/B), ceil(cols/B)] beside it, with weight targets in block units so that the loader places HF
`*_scale_inv` tensors the way it places weights (fused parts, tp shards). A mixture-of-experts layer's expert
stacks get the same per expert matrix (`moe.Experts.make_fp8`). A full-precision HF weight loaded into an FP8
weight is quantised on the way in (`weight_sync.fp8.quantize_weight_into`); an e4m3 weight with its scale (a
sender that quantised before the wire, an FP8 checkpoint) is copied as it is. Numerics: `weight_sync.fp8`.

`linear` is the FP8 x @ W^T: the activations are quantised per row and `block` group on the fly. On CUDA
the triton kernels run (`kernels/fp8_gemm.py`: the GEMV for decode rows, the blockwise GEMM or
torch._scaled_mm otherwise); elsewhere the torch reference dequantises both operands and multiplies in
float32, which is the same function up to float32 summation order.

Tuned kernels (`EngineConfig.fp8_kernel_configs`): a JSON that `benchmarks/fp8_linear.py --write-configs` writes on
one GPU model names, per linear shape (N, K), the fastest correct kernel it timed: the GEMV's config and whether x
is quantised once before it (`gemv_prequant`) or in every program, and per decode batch size (rows up to 64,
up to 256, ...) torch._scaled_mm or the triton GEMM with a config. Where a tensor-core kernel beat every GEMV at
one row (the row padded to a 16-row tile), the table has no GEMV for that shape and a 1-row GEMM entry instead.
`convert` gives each linear of a shape in the table its `KernelChoice`; shapes not in it (other models, tp shards),
a table of another GPU model or block size, and more rows than the table's largest keep the built-in choices.
Every choice computes the same function as the default (the same quantisation; the products summed in another
order).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from inference_engine import ops
from weight_sync.fp8 import (FP8_DTYPE, Fp8Layout, dequantize_weight, fake_quantize_activation, quantize_weight,
                             scale_name)

log = logging.getLogger(__name__)

GEMV_MAX_ROWS = 1  # FP8 linears of at most this many rows run the GEMV with the activation quantisation fused in
SCALE_SUFFIX = "weight_scale_inv"


def _kernels():
    from inference_engine.kernels import fp8_gemm

    return fp8_gemm


def _use_scaled_mm(device: torch.device, block: int) -> bool:
    return block == 128 and _kernels().scaled_mm_works(device)


Config = tuple[int, int, int, int]
GEMM_KERNELS = ("scaled_mm", "gemm")


@dataclass(frozen=True)
class KernelChoice:
    """The CUDA kernels of one FP8 linear shape, as tuned (see the module docstring); None / () fields: built-in."""

    gemv: Config | None = None  # (BLOCK_M, BLOCK_N, groups of `block` columns per K tile, warps) of the GEMV
    prequant: bool = False  # quantise x once (quantize_activation), then gemv_prequant, instead of in every program
    gemm: tuple[tuple[int, str, Config | None], ...] = ()  # (up to rows, "scaled_mm" or "gemm", (BLOCK_M, BLOCK_N,
    # warps, stages) of the GEMM), by rows ascending

    def for_rows(self, rows: int) -> tuple[str, Config | None] | None:
        """(kernel, config) for a GEMM of `rows` rows: the entry of the fewest rows >= rows; None past the last."""
        return next(((kind, cfg) for limit, kind, cfg in self.gemm if rows <= limit), None)


@dataclass(frozen=True)
class KernelTable:
    """A tuned-kernels JSON (benchmarks/fp8_linear.py --write-configs): the GPU model it was measured on, the scale
    block, and a KernelChoice per (N, K)."""

    device: str
    block: int
    choices: dict[tuple[int, int], KernelChoice]

    @classmethod
    def load(cls, path: str | Path) -> KernelTable:
        """Read and check one; ValueError naming the file and what is wrong."""
        def bad(what: str) -> ValueError:
            return ValueError(f"fp8_kernel_configs {path}: {what}")

        def config(value, where: str, pow2: int) -> Config:
            """4 positive integers, the first pow2 of them powers of two (tile sizes and warps)."""
            if not (isinstance(value, list) and len(value) == 4 and all(isinstance(v, int) and v > 0 for v in value)
                    and all(v & (v - 1) == 0 for v in value[:pow2])):
                raise bad(f"{where}: config must be 4 positive integers, the first {pow2} powers of two, got {value!r}")
            return tuple(value)

        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise bad(f"cannot be read as JSON ({type(e).__name__}: {e})") from None
        fields = {"device": str, "block": int, "linears": list}
        if not isinstance(data, dict) or not all(isinstance(data.get(f), t) for f, t in fields.items()):
            raise bad("expected an object with 'device' (str), 'block' (int) and 'linears' (list)")
        choices = {}
        for i, entry in enumerate(data["linears"]):
            where = f"linears[{i}]"
            if not isinstance(entry, dict) or not all(isinstance(entry.get(f), int) for f in ("n", "k")):
                raise bad(f"{where}: expected an object with integer 'n' and 'k'")
            gemv, prequant = None, False
            if entry.get("gemv") is not None:
                g = entry["gemv"]
                if not isinstance(g, dict) or g.get("kernel") not in ("gemv", "prequant"):
                    raise bad(f"{where}.gemv: expected {{'kernel': 'gemv' or 'prequant', 'config': [...]}}")
                gemv, prequant = config(g.get("config"), f"{where}.gemv", 4), g["kernel"] == "prequant"
                if data["block"] % gemv[1]:
                    raise bad(f"{where}.gemv: BLOCK_N {gemv[1]} must divide the block {data['block']}")
            gemm = []
            for j, g in enumerate(entry.get("gemm") or []):
                w = f"{where}.gemm[{j}]"
                if not isinstance(g, dict) or not isinstance(g.get("rows"), int) or g.get("kernel") not in GEMM_KERNELS:
                    raise bad(f"{w}: expected {{'rows': int, 'kernel': 'scaled_mm' or 'gemm', 'config': [...] "
                              "or null}")
                cfg = None if g.get("config") is None else config(g["config"], w, 3)  # BLOCK_M, BLOCK_N, warps; stages
                gemm.append((g["rows"], g["kernel"], cfg))
            choices[(entry["n"], entry["k"])] = KernelChoice(gemv, prequant, tuple(sorted(gemm)))
        return cls(data["device"], data["block"], choices)


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: int, bias: torch.Tensor | None = None,
           silu_mul: bool = False, out_dtype: torch.dtype | None = None,
           kernels: KernelChoice | None = None) -> torch.Tensor:
    """x [..., K] @ dequant(weight [N, K] e4m3, scale)^T (+ bias) with x quantised per row and `block` columns, in
    out_dtype (default x's; rounded to x's dtype first). silu_mul: x is [..., 2K] and the input silu_and_mul(x).
    kernels: this shape's tuned CUDA kernels (None: the built-in choices)."""
    shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    out_dtype = out_dtype or x.dtype
    n = weight.shape[0]
    if x.device.type == "cuda":
        k = _kernels()
        pick = kernels.for_rows(x2.shape[0]) if kernels is not None else None  # a tuned GEMM for these rows
        tensor_cores = pick is not None and kernels.gemv is None  # a table may send decode rows to the GEMM
        if x2.shape[0] <= GEMV_MAX_ROWS and not tensor_cores:
            if kernels is not None and kernels.prequant:
                xq, xs = k.quantize_activation(x2, block, silu_mul=silu_mul)
                out = k.gemv_prequant(xq, xs, weight, scale, block, bias, out_dtype, x.dtype, config=kernels.gemv)
            else:
                out = k.gemv(x2, weight, scale, block, bias, out_dtype, silu_mul=silu_mul,
                             config=kernels and kernels.gemv)
        else:
            xq, xs = k.quantize_activation(x2, block, silu_mul=silu_mul)
            out = None
            if (pick is None or pick[0] == "scaled_mm") and _use_scaled_mm(x.device, block):
                try:
                    out = k.scaled_mm(xq, xs, weight, scale, bias, out_dtype, x.dtype)
                except RuntimeError:  # a shape cuBLAS's blockwise kernels refuse (checked before any launch)
                    out = None
            if out is None:
                out = k.gemm(xq, xs, weight, scale, block, bias, out_dtype, x.dtype,
                             config=pick[1] if pick is not None and pick[0] == "gemm" else None)
        return out.view(*shape, n)
    return reference_linear(x2, weight, scale, block, bias, silu_mul, out_dtype).view(*shape, n)


def reference_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: int,
                     bias: torch.Tensor | None = None, silu_mul: bool = False,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The torch specification of `linear` for x [M, K]: dequantised operands multiplied in float32."""
    if silu_mul:
        x = ops.silu_and_mul(x)
    xd = fake_quantize_activation(x, block)  # [M, K] float32
    out = F.linear(xd, dequantize_weight(weight, scale, block), None if bias is None else bias.float())
    return out.to(x.dtype).to(out_dtype or x.dtype)


def _hf_shape(module: nn.Module, shard_id) -> tuple[int, int]:
    """The shape of the full HF weight that part `shard_id` of this linear (this rank's piece) comes from."""
    from inference_engine.models.layers import (MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                                VocabParallelEmbedding)

    rows, cols = module.weight.shape
    if isinstance(module, QKVParallelLinear):
        part = "qkv".index(shard_id)
        heads = module.num_heads if part == 0 else module.num_kv_heads
        sharing = 1 if part == 0 else module.kv_replicas
        return heads * module.tp_size // sharing * module.head_dim, cols
    if isinstance(module, MergedColumnParallelLinear):
        return module.out_sizes[shard_id] * module.tp_size, cols
    if isinstance(module, RowParallelLinear):
        return rows, cols * module.tp_size
    if isinstance(module, VocabParallelEmbedding):
        return module.vocab_size, cols
    return rows * module.tp_size, cols


def _part_rows(module: nn.Module) -> list[tuple[int, int]]:
    """(offset, rows) of each part of this rank's fused weight (one part for an unfused linear)."""
    return module.part_slices() if hasattr(module, "part_slices") else [(0, module.weight.shape[0])]


def _check_alignment(name: str, module: nn.Module, block: int) -> None:
    """Every part's rows (and a row-parallel shard's columns) start on a block boundary, so that the scale grid of a
    part (or a shard) of the full HF weight is a slice of this rank's grid; ValueError naming the linear otherwise."""
    from inference_engine.models.layers import RowParallelLinear

    parts = _part_rows(module)
    tp_size = getattr(module, "tp_size", 1)
    for i, (offset, rows) in enumerate(parts):
        last = i == len(parts) - 1
        if offset % block or (rows % block and (tp_size > 1 or not last)):
            raise ValueError(f"fp8 weights: {name} has parts of {[r for _, r in parts]} rows per tp rank; each must "
                             f"be a multiple of fp8_block_size {block} (set a smaller --fp8-block-size, e.g. "
                             f"{math.gcd(block, *[r for _, r in parts])})")
    cols = module.weight.shape[1]
    if isinstance(module, RowParallelLinear) and tp_size > 1 and cols % block:
        raise ValueError(f"fp8 weights: {name} has {cols} input columns per tp rank, not a multiple of "
                         f"fp8_block_size {block}")


def _scale_rows_unshard(rows: int):
    """The unshard of a vocab-parallel head's scales: every rank's block rows, the padding blocks dropped."""
    def unshard(pieces: list[torch.Tensor], shard_id=None) -> torch.Tensor:
        return torch.cat(pieces, dim=0)[:rows]

    return unshard


class _ScaleTarget:
    """Weight targets of a `weight_scale_inv` parameter: the weight's own slice of the HF tensor, in block units."""

    def __init__(self, module: nn.Module, block: int):
        self.module, self.block = module, block

    def weight_target(self, param: nn.Parameter, shape: torch.Size, shard_id=None):
        from inference_engine.models.layers import WeightSlice

        b = self.block
        rows, cols = _hf_shape(self.module, shard_id)
        expected = (-(-rows // b), -(-cols // b))
        if tuple(shape) != expected:
            raise ValueError(f"weight scale {getattr(param, 'hf_name', '?')}: shape {tuple(shape)} does not match the "
                             f"engine's {expected} (a {rows} x {cols} weight in {b} x {b} blocks)")
        target = self.module.weight_target(self.module.weight, torch.Size((rows, cols)), shard_id)
        weight = self.module.weight
        row0 = (target.dst.storage_offset() - weight.storage_offset()) // weight.stride(0)
        dst = param.data.narrow(0, row0 // b, -(-target.dst.shape[0] // b))
        if target.dim is None:
            return WeightSlice(dst)
        return WeightSlice(dst, target.dim, target.start // b, -(-target.length // b))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        self.weight_target(param, loaded.shape, shard_id).load(loaded)


def convert(model: nn.Module, layout: Fp8Layout, kernels: KernelTable | None = None) -> int:
    """Make the model's linears and expert stacks FP8 (see the module docstring); returns how many. Call before
    loading weights. kernels: tuned CUDA kernels, used where the table's GPU model and block are this model's."""
    from inference_engine.models.layers import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear)
    from inference_engine.models.moe import Experts

    block = layout.block
    converted = stacks = tuned = 0
    device = next(model.parameters()).device
    kernels = _usable(kernels, device, block)
    for name, module in model.named_modules():
        if isinstance(module, Experts):  # both stacks, per-expert block scales (the router stays as it is)
            module.make_fp8(block, name)
            stacks += 2
            continue
        head = isinstance(module, ParallelLMHead)
        if not (isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or (head and layout.lm_head)):
            continue
        _check_alignment(name, module, block)
        weight = module.weight
        rows, cols = weight.shape
        q, s = quantize_weight(weight.data, block)
        weight.data = q
        scale = nn.Parameter(s, requires_grad=False)
        targets = _ScaleTarget(module, block)
        scale.weight_target, scale.weight_loader = targets.weight_target, targets.weight_loader
        scale.unshard = weight.unshard if not head else _scale_rows_unshard(-(-module.vocab_size // block))
        scale.fp8_block = block  # rows of the scale are blocks of the weight's rows (loader._local_hf_pieces)
        module.register_parameter(SCALE_SUFFIX, scale)
        weight.fp8_module = module  # where the loader finds the scale of a full-precision weight
        module.fp8_block = block
        module.fp8_kernels = kernels.choices.get((rows, cols)) if kernels is not None else None
        tuned += module.fp8_kernels is not None
        converted += 1
    gemm = "CPU reference (dequantised, float32)"
    if device.type == "cuda":  # probed now, eagerly, not inside a graph capture
        gemm = "torch._scaled_mm (blockwise)" if _use_scaled_mm(device, block) else "triton blockwise GEMM"
        gemm += f"; up to {GEMV_MAX_ROWS} row(s) the triton FP8 GEMV"
        if kernels is not None:
            gemm += f"; tuned kernels ({kernels.device}) for {tuned} of the {converted} linears"
    fp8_head = any(isinstance(m, ParallelLMHead) for m in model.modules()) and layout.lm_head
    head_note = "fp8" if fp8_head else ("tied to the embedding, kept in the model dtype" if layout.lm_head
                                        else "kept in the model dtype")
    experts = ""
    if stacks:
        experts = f", {stacks} expert stacks (" + ("fused triton MoE, e4m3 x e4m3" if device.type == "cuda"
                                                   else "CPU reference") + ")"
    log.info("fp8 weights: %d linears%s in e4m3 with %dx%d block scales (LM head %s); GEMM: %s", converted, experts,
             block, block, head_note, gemm)
    return converted + stacks


def _usable(table: KernelTable | None, device: torch.device, block: int) -> KernelTable | None:
    """The table if it was tuned on this GPU model for this block; else None, with a warning saying why."""
    if table is None or device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if table.device != name or table.block != block:
        log.warning("fp8 kernel configs tuned on %s for block %d; this is %s with block %d: built-in kernels",
                    table.device, table.block, name, block)
        return None
    return table


def is_fp8_weight(param: nn.Parameter) -> bool:
    """Whether param is an FP8 linear weight (that takes full-precision HF tensors by quantising them)."""
    return param.dtype == FP8_DTYPE and getattr(param, "fp8_module", None) is not None


def scale_view(param: nn.Parameter, target, shape: torch.Size, shard_id=None) -> torch.Tensor:
    """The view of FP8 weight `param`'s scale parameter that goes with its weight target `target` (a WeightSlice)
    of an HF tensor of `shape` and `shard_id`: a stack of experts' is the same target in block units."""
    module = param.fp8_module
    if hasattr(module, "scale_target"):  # moe.Experts
        return module.scale_target(param, torch.Size(shape), shard_id).dst
    return scale_dst(param, target.dst)


def scale_dst(param: nn.Parameter, weight_dst: torch.Tensor) -> torch.Tensor:
    """The view of the scale parameter that belongs to `weight_dst`, a row range of the FP8 weight `param`."""
    module = param.fp8_module
    block = module.fp8_block
    scale = getattr(module, SCALE_SUFFIX)
    row0 = (weight_dst.storage_offset() - param.storage_offset()) // param.stride(0)
    return scale.data.narrow(0, row0 // block, -(-weight_dst.shape[0] // block))


def scale_hf_name(hf_weight_name: str) -> str:
    """The HF name of a weight's scale ('<...>.weight_scale_inv')."""
    return scale_name(hf_weight_name)


def check_device(device: torch.device) -> None:
    """ValueError unless FP8 linears can run on device: any CPU (the torch reference), CUDA of compute capability
    8.9 or later (e4m3 tensor cores) with triton."""
    if device.type == "cpu":
        return
    if device.type != "cuda" or not ops.runs_triton(device) or torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"weight_dtype 'fp8' needs a CUDA GPU of compute capability 8.9 or later with triton "
                         f"(or device 'cpu'); {device} is not one")

"""Per-tensor checksums of weights, and the comparison of an engine's against the trainer's."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from weight_sync.buckets import dtype_name, parse_dtype
from weight_sync.errors import WeightChecksumError

_F64_REL = 1e-9    # float64 summation-order noise, relative to sum |x|
_CHUNK = 1 << 24


@dataclass(frozen=True)
class TensorChecksum:
    """A tensor's dtype, shape, exact bit fingerprint, and float64 sum, sum of squares and sum of |x|.

    Same dtype on both sides: the fingerprint must match exactly (any changed bit or moved element
    shows). Different dtypes (a bf16 engine fed fp32): the float64 moments must agree within what
    rounding to the coarser dtype can explain.
    """

    dtype: str
    shape: tuple[int, ...]
    bits: int
    sum: float
    sumsq: float
    sumabs: float

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "bits": self.bits, "sum": self.sum,
                "sumsq": self.sumsq, "sumabs": self.sumabs}

    @classmethod
    def from_dict(cls, d: Mapping) -> "TensorChecksum":
        return cls(d["dtype"], tuple(d["shape"]), int(d["bits"]), float(d["sum"]), float(d["sumsq"]),
                   float(d["sumabs"]))

    def matches(self, other: "TensorChecksum") -> bool:
        """Bit-equal for equal dtypes; else equal within what casting between the two dtypes can explain."""
        if tuple(self.shape) != tuple(other.shape):
            return False
        if self.dtype == other.dtype:
            return self.bits == other.bits
        eps = _F64_REL
        eps += max(_unit_roundoff(self.dtype), _unit_roundoff(other.dtype))   # |x - round(x)| <= u * |x|
        scale_abs = max(self.sumabs, other.sumabs)
        scale_sq = max(self.sumsq, other.sumsq)
        return (abs(self.sum - other.sum) <= eps * scale_abs
                and abs(self.sumabs - other.sumabs) <= eps * scale_abs
                and abs(self.sumsq - other.sumsq) <= 3 * eps * scale_sq)


def _unit_roundoff(dtype: str) -> float:
    dt = parse_dtype(dtype)
    return torch.finfo(dt).eps / 2 if dt.is_floating_point else 0.0


def _bit_fingerprint(flat: torch.Tensor) -> int:
    """sum_i bits(x_i) * (i mod 65521 + 1) in wrapping int64 arithmetic: exact and independent of reduction order."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    bits = flat.view(ints)
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), _CHUNK):   # bounded scratch memory for big tensors
        chunk = bits[start:start + _CHUNK].to(torch.int64)
        weights = torch.arange(start, start + chunk.numel(), device=flat.device, dtype=torch.int64) % 65521 + 1
        total += (chunk * weights).sum()
    return int(total.item())


def tensor_checksum(t: torch.Tensor) -> TensorChecksum:
    """The checksum of one tensor (computed on its own device)."""
    flat = t.detach().contiguous().reshape(-1)
    x = flat.to(torch.float64)
    return TensorChecksum(dtype_name(t.dtype), tuple(t.shape), _bit_fingerprint(flat), x.sum().item(),
                          x.square().sum().item(), x.abs().sum().item())


def checksums(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, TensorChecksum]:
    """{hf_name: checksum} of a stream of named tensors."""
    return {name: tensor_checksum(t) for name, t in named_tensors}


_STACKED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up|down)_proj(_scale_inv)?$")


def per_expert(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors with every stacked expert tensor (transformers >= 5's `mlp.experts.{gate_up,down}_proj` [E, ...],
    or an FP8 stack's `..._scale_inv`) split into the per-expert HF tensors (`mlp.experts.{e}.{gate,up,down}_proj
    .weight[_scale_inv]`) that engines report: the names their checksums are compared under."""
    for name, tensor in named_tensors:
        match = _STACKED_EXPERTS.match(name)
        if match is None or tensor.dim() != 3:
            yield name, tensor
            continue
        prefix, stack, suffix = match.groups()
        projs = ("gate", "up") if stack == "gate_up" else ("down",)
        for e in range(tensor.shape[0]):
            for proj, part in zip(projs, tensor[e].chunk(len(projs))):  # gate_up: gate rows, then up rows
                yield f"{prefix}.{e}.{proj}_proj.weight{suffix or ''}", part


def checksum_report(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, dict]:
    """{hf_name: checksum dict} of an engine's weights, plain data to send back to the trainer."""
    return {name: c.to_dict() for name, c in checksums(named_tensors).items()}


def compare_checksums(expected: Mapping[str, TensorChecksum], actual: Mapping[str, TensorChecksum],
                      where: str = "engine") -> None:
    """Raise `WeightChecksumError` naming every tensor whose `actual` checksum differs from `expected` or is missing."""
    missing = sorted(set(expected) - set(actual))
    differ = sorted(name for name in set(expected) & set(actual) if not expected[name].matches(actual[name]))
    if not missing and not differ:
        return
    lines = [f"{where}: weights differ from the trainer's after the update in {len(differ) + len(missing)} "
             f"of {len(expected)} tensors"]
    for name in differ[:20]:
        e, a = expected[name], actual[name]
        lines.append(f"  {name}: trainer {e.dtype}{list(e.shape)} sum={e.sum:.9g} sumsq={e.sumsq:.9g}; "
                     f"engine {a.dtype}{list(a.shape)} sum={a.sum:.9g} sumsq={a.sumsq:.9g}")
    if missing:
        lines.append(f"  not reported by the engine: {missing[:20]}")
    if len(differ) > 20 or len(missing) > 20:
        lines.append("  (lists cut at 20)")
    raise WeightChecksumError("\n".join(lines), differ + missing)

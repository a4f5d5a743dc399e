"""Buckets of full HF-named tensors, and their flat one-buffer-per-dtype layout on the wire."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

NamedTensors = list[tuple[str, torch.Tensor]]


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bucket_named_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[NamedTensors]:
    """Group a stream of (hf_name, tensor) into lists of at most `bucket_bytes` each, lazily.

    A tensor larger than `bucket_bytes` is never split: it travels alone in a bucket of its own.
    Only one bucket is held at a time, so the whole model is never materialised twice.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes}; expected a positive number of bytes")
    bucket: NamedTensors = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor_bytes(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


# on CUDA a tensor this large is copied by its own copy_ (a device memcpy at full bandwidth)
LARGE_COPY_BYTES = 4 << 20


class StableBucket(list):
    """(hf_name, tensor) pairs that a receiver keeps and hands over again for every push that repeats them.

    The same object, holding the same views of storages that stay open, comes back push after push, so a
    loader may keep what it derives from it (its copy list) for as long as the bucket lives: it holds the
    bucket weakly, and the derived work goes when the receiver drops the bucket (when a storage closes).
    """


def copy_tensors(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> None:
    """dsts[i].copy_(srcs[i]) for every i: small ones as one multi-tensor copy (few launches), large CUDA ones
    one by one."""
    small_dsts, small_srcs = [], []
    for dst, src in zip(dsts, srcs):
        if dst.is_cuda and dst.numel() * dst.element_size() >= LARGE_COPY_BYTES:
            dst.copy_(src)
        else:
            small_dsts.append(dst)
            small_srcs.append(src)
    if small_dsts:
        torch._foreach_copy_(small_dsts, small_srcs)


def dtype_name(dtype: torch.dtype | str) -> str:
    """'bfloat16' for torch.bfloat16 or 'torch.bfloat16' or 'bfloat16'."""
    return str(parse_dtype(dtype)).removeprefix("torch.")


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype named by `dtype` ("bfloat16", "torch.float32", torch.float16, ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    parsed = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(parsed, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; expected a torch dtype name such as 'bfloat16' or 'float32'")
    return parsed


@dataclass(frozen=True)
class FlatLayout:
    """Where each tensor of a bucket lives in one flat buffer per dtype; both ends derive it from the metadata."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    buffer_dtypes: tuple[torch.dtype, ...]     # one flat buffer per distinct dtype, in order of first use
    buffer_numels: tuple[int, ...]
    slots: tuple[tuple[int, int, int], ...]    # per tensor: (buffer index, offset, numel) in elements

    @classmethod
    def from_metadata(cls, names: Sequence[str], dtypes: Sequence[torch.dtype | str],
                      shapes: Sequence[Sequence[int]]) -> "FlatLayout":
        """Lay out tensors named `names` with these dtypes and shapes, same-dtype tensors packed back to back."""
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError(
                f"bucket metadata disagrees: {len(names)} names, {len(dtypes)} dtypes, {len(shapes)} shapes"
            )
        dup = sorted(n for n, count in Counter(names).items() if count > 1)
        if dup:
            raise ValueError(f"bucket names tensors more than once: {dup}")
        parsed = tuple(parse_dtype(d) for d in dtypes)
        shapes_t = tuple(tuple(int(s) for s in shape) for shape in shapes)
        for name, shape in zip(names, shapes_t):
            if any(s < 0 for s in shape):
                raise ValueError(f"tensor {name!r} has a negative dimension in shape {list(shape)}")
        buffer_dtypes: list[torch.dtype] = []
        numels: list[int] = []
        slots = []
        for dtype, shape in zip(parsed, shapes_t):
            if dtype not in buffer_dtypes:
                buffer_dtypes.append(dtype)
                numels.append(0)
            b = buffer_dtypes.index(dtype)
            numel = 1
            for s in shape:
                numel *= s
            slots.append((b, numels[b], numel))
            numels[b] += numel
        return cls(tuple(names), shapes_t, parsed, tuple(buffer_dtypes), tuple(numels), tuple(slots))

    @classmethod
    def of(cls, named_tensors: NamedTensors) -> "FlatLayout":
        """The layout of a bucket of (name, tensor)."""
        return cls.from_metadata([n for n, _ in named_tensors], [t.dtype for _, t in named_tensors],
                                 [t.shape for _, t in named_tensors])

    def metadata(self) -> dict:
        """Names, dtype names and shapes: what goes over the control channel."""
        return {"names": list(self.names), "dtypes": [dtype_name(d) for d in self.dtypes],
                "shapes": [list(s) for s in self.shapes]}

    @property
    def nbytes(self) -> int:
        return sum(n * torch.empty((), dtype=d).element_size() for d, n in zip(self.buffer_dtypes, self.buffer_numels))

    def empty_buffers(self, device: torch.device | str) -> list[torch.Tensor]:
        """Uninitialised flat buffers to receive into, one per dtype: each [numel]."""
        return [torch.empty(n, dtype=d, device=device) for d, n in zip(self.buffer_dtypes, self.buffer_numels)]

    def flatten(self, named_tensors: NamedTensors, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Copy the bucket's tensors into fresh flat buffers (on `device`, default that of the first tensor)."""
        if [n for n, _ in named_tensors] != list(self.names):
            raise ValueError("flatten() got tensors that do not match the layout's names")
        if device is None:
            device = named_tensors[0][1].device if named_tensors else "cpu"
        buffers = self.empty_buffers(device)
        with torch.no_grad():
            for (name, tensor), (b, offset, numel) in zip(named_tensors, self.slots):
                buffers[b][offset:offset + numel].copy_(tensor.reshape(-1), non_blocking=True)
        return buffers

    def unflatten(self, buffers: Sequence[torch.Tensor]) -> NamedTensors:
        """Views of the received flat buffers as (name, tensor of its shape); no copy."""
        if len(buffers) != len(self.buffer_dtypes):
            raise ValueError(
                f"expected {len(self.buffer_dtypes)} flat buffers ({self.buffer_dtypes}), got {len(buffers)}"
            )
        for buf, dtype, numel in zip(buffers, self.buffer_dtypes, self.buffer_numels):
            if buf.dtype != dtype or buf.numel() != numel:
                raise ValueError(f"flat buffer is {buf.dtype}[{buf.numel()}], layout expects {dtype}[{numel}]")
        return [(name, buffers[b][offset:offset + numel].view(shape))
                for name, shape, (b, offset, numel) in zip(self.names, self.shapes, self.slots)]

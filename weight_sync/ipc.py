"""Colocated transport: tensors shared by handle (CUDA IPC on GPU, shared memory on CPU).

Two forms. `SharedBucket` (`share_bucket` / `open_bucket`): one bucket flattened into fresh buffers
with fresh handles, for one-off callers (the HTTP route). `ColocatedBucket`: what `WeightSender`
sends, entries pointing into storages that are shared once and opened once (`SharedStorages` on the
receiving side): the sender's persistent staging buffers, and the trainer's own tensors read in place.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import reduce_tensor

from weight_sync.buckets import FlatLayout, NamedTensors, StableBucket, parse_dtype
from weight_sync.errors import WeightSyncError


@dataclass
class SharedBucket:
    """A picklable bucket: its layout metadata and one reduced (handle) per flat dtype buffer.

    On GPU each handle is a CUDA IPC handle: the receiving process maps the sender's memory, no copy.
    On CPU the buffers are moved to shared memory: pickled by `torch.multiprocessing` they travel as
    shared-memory handles, by plain pickle (Ray) as a copy, and within one process they are shared.
    The sender must keep `buffers` alive until every receiver has loaded the bucket.
    """

    metadata: dict
    handles: list[tuple[Any, tuple]]
    buffers: list[torch.Tensor] | None = None   # sender-side references only; never pickled

    def __getstate__(self):
        return {"metadata": self.metadata, "handles": self.handles, "buffers": None}


def share_bucket(named_tensors: NamedTensors) -> SharedBucket:
    """Flatten a bucket into one buffer per dtype on the tensors' device and share the buffers by handle."""
    layout = FlatLayout.of(named_tensors)
    buffers = layout.flatten(named_tensors)
    if buffers and buffers[0].is_cuda:
        torch.cuda.current_stream(buffers[0].device).synchronize()   # the copies land before a peer reads them
    else:
        buffers = [b.share_memory_() for b in buffers]
    return SharedBucket(layout.metadata(), [reduce_tensor(b) for b in buffers], buffers)


def open_bucket(bucket: SharedBucket) -> NamedTensors:
    """The bucket's tensors as (hf_name, tensor) views of the shared buffers (opened from the handles)."""
    layout = FlatLayout.from_metadata(**bucket.metadata)
    if bucket.buffers is not None:   # same process as the sender: the buffers themselves
        return layout.unflatten(bucket.buffers)
    buffers = [rebuild(*args) for rebuild, args in bucket.handles]
    return layout.unflatten(buffers)


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor [nbytes] over the whole storage that `t` views (CPU storages are moved to shared memory first)."""
    storage = t.untyped_storage()
    if not t.is_cuda:
        storage._share_filename_cpu_()   # in place (a no-op once shared): every tensor viewing it sees the shared copy
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage, 0, (storage.nbytes(),), (1,))


def _reduce_storage(whole: torch.Tensor) -> tuple[Any, tuple]:
    """(rebuild, args) that reopen `whole` in another process under any pickler (Ray's included): a CUDA IPC
    handle on GPU; on CPU the shared-memory file's name, so the storage is mapped, never copied by value."""
    if whole.is_cuda:
        return reduce_tensor(whole)
    return _open_shared_file, whole.untyped_storage()._share_filename_cpu_()


def _open_shared_file(manager: bytes, name: bytes, nbytes: int) -> torch.Tensor:
    storage = torch.UntypedStorage._new_shared_filename_cpu(manager, name, nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))


@dataclass
class StorageHandle:
    """One storage shared by handle: its id at the sender, whether it outlives the push, and its reduced form.

    Persistent storages (the sender's staging buffers, and the trainer's own tensors read in place while
    the sender keeps them shared between pushes) stay open on the receiver until the sender retires them
    or starts a new generation; the others (in-place storages shared for one push) are closed after the
    push's last bucket, so the trainer may free or move them.
    """

    storage_id: int
    persistent: bool
    handle: tuple[Any, tuple]
    # the sender's uint8 tensor itself, for a receiver in the same process; never pickled
    local: torch.Tensor | None = None

    def __getstate__(self):
        return {**self.__dict__, "local": None}

    def open(self) -> torch.Tensor:
        """The storage as a uint8 tensor [nbytes] in this process (maps CUDA IPC / shared memory)."""
        if self.local is not None:
            return self.local
        rebuild, args = self.handle
        return rebuild(*args)


def share_storage(storage_id: int, whole: torch.Tensor, persistent: bool) -> StorageHandle:
    """A handle on `whole` (a uint8 tensor over one storage, from `storage_bytes`) for one receiver to open once."""
    return StorageHandle(storage_id, persistent, _reduce_storage(whole), whole)


@dataclass
class ColocatedBucket:
    """One bucket of a colocated push, as `WeightSender` sends it: where each tensor lies in storages shared by handle.

    `storages` are the handles this receiver has not opened yet (each storage travels once per
    generation, or once per push for in-place storages not kept between pushes); `retired` are storage
    ids to close. Tensor i is `dtypes[i]` with `shapes[i]` / `strides[i]` at element offset `offsets[i]`
    of storage `storage_ids[i]`. `layout` names these entries: the sender gives the same id to the same
    entries (within a generation), so the receiver can keep the views it made for them while their
    storages stay open. A bucket without tensors only opens and retires storages (nothing is loaded).
    The receiver must be done reading the storages when its load call returns.
    `pause` / `resume` fold the push's pause and continue into its first / last message: the receiver
    pauses (that mode) before loading and continues after, one round trip for a one-message push.
    """

    sender: str
    generation: int
    storages: list[StorageHandle]
    retired: list[int]
    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    strides: list[tuple[int, ...]]
    storage_ids: list[int]
    offsets: list[int]
    last: bool   # the push's last bucket: the receiver closes the push's in-place (non-persistent) storages after it
    pause: str | None = None   # pause_generation(mode=pause) before loading (the push's first message)
    resume: bool = False       # continue_generation() after loading (the push's last message)
    layout: int | None = None  # the sender's id of these entries; None: not to be kept

    @property
    def nbytes(self) -> int:
        """Bytes of the bucket's tensors (not of the storages they lie in)."""
        total = 0
        for dtype, shape in zip(self.dtypes, self.shapes):
            numel = 1
            for s in shape:
                numel *= s
            total += numel * parse_dtype(dtype).itemsize
        return total


MAX_LAYOUTS = 64   # kept bucket views per sender; more (a sender whose buckets never repeat) start the cache over


@dataclass
class _SenderState:
    """What a receiver holds of one sender: its generation, opened storages and the views made of them per layout."""

    generation: int
    opened: dict[int, tuple[torch.Tensor, bool]]   # storage id -> (uint8 [nbytes], persistent)
    views: dict[int, StableBucket]                  # layout id -> the bucket's (hf_name, view) pairs


class SharedStorages:
    """A receiver's opened storages, per sender: what `ColocatedBucket`s point into. Thread-safe.

    The views of a bucket whose layout comes back (every push, while the storages stay open) are made
    once and handed out again as the same `StableBucket`; closing any of the sender's storages drops them.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._senders: dict[str, _SenderState] = {}
        self.opened_total = 0   # handles opened so far: each storage once per stretch that it stays open

    def tensors(self, bucket: ColocatedBucket) -> NamedTensors:
        """The bucket's (hf_name, tensor) as views of the shared storages, opening the handles it brings."""
        with self._lock:
            state = self._senders.get(bucket.sender)
            if state is None or state.generation != bucket.generation:   # new sender, or it started over
                state = self._senders[bucket.sender] = _SenderState(bucket.generation, {}, {})
            for storage_id in bucket.retired:
                if state.opened.pop(storage_id, None) is not None:
                    state.views.clear()
            for handle in bucket.storages:
                state.opened[handle.storage_id] = (handle.open(), handle.persistent)
                self.opened_total += 1
            kept = state.views.get(bucket.layout) if bucket.layout is not None else None
            if kept is not None:
                return kept
            storages = dict(state.opened)
        named = StableBucket(self._views(bucket, storages))
        if bucket.layout is not None and named:
            with self._lock:   # kept only while every storage it views is still open (none retired meanwhile)
                if self._senders.get(bucket.sender) is state and state.opened.keys() >= set(bucket.storage_ids):
                    if len(state.views) >= MAX_LAYOUTS:
                        state.views.clear()
                    state.views[bucket.layout] = named
        return named

    @staticmethod
    def _views(bucket: ColocatedBucket, storages: dict[int, tuple[torch.Tensor, bool]]) -> NamedTensors:
        typed: dict[tuple[int, str], torch.Tensor] = {}
        out = []
        for name, dtype, shape, stride, storage_id, offset in zip(bucket.names, bucket.dtypes, bucket.shapes,
                                                                  bucket.strides, bucket.storage_ids, bucket.offsets):
            flat = typed.get((storage_id, dtype))
            if flat is None:
                if storage_id not in storages:
                    raise WeightSyncError(f"tensor {name!r} lies in shared storage {storage_id} of sender "
                                          f"{bucket.sender} (generation {bucket.generation}), which this receiver "
                                          f"never opened; known: {sorted(storages)} (was the receiver restarted?)")
                whole, dt = storages[storage_id][0], parse_dtype(dtype)
                flat = typed[(storage_id, dtype)] = whole[:whole.numel() // dt.itemsize * dt.itemsize].view(dt)
            out.append((name, flat.as_strided(shape, stride, offset)))
        return out

    def finish(self, bucket: ColocatedBucket) -> None:
        """After the bucket is loaded: on the push's last bucket close its in-place storages."""
        if not bucket.last:
            return
        with self._lock:
            state = self._senders.get(bucket.sender)
            if state is None:
                return
            closing = [i for i, (_, persistent) in state.opened.items() if not persistent]
            for storage_id in closing:
                del state.opened[storage_id]
            if closing:
                state.views.clear()

    def open_count(self, persistent: bool | None = None) -> int:
        """How many storages are open now (of every sender), optionally only persistent / only in-place ones."""
        with self._lock:
            return sum(1 for state in self._senders.values() for _, p in state.opened.values()
                       if persistent is None or p == persistent)

    def close(self) -> None:
        """Drop every mapping."""
        with self._lock:
            self._senders.clear()

"""Trainer side of the colocated transport: tensors read in place, or packed into persistent double-buffered staging."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING, Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from weight_sync.buckets import NamedTensors, copy_tensors, dtype_name, tensor_bytes
from weight_sync.errors import raise_engine_errors
from weight_sync.ipc import ColocatedBucket, StorageHandle, share_storage, storage_bytes

if TYPE_CHECKING:
    from weight_sync.sender import SentCounts

SLOTS = 2      # staging buffers: the sender packs bucket k + 1 into one while the engines load bucket k from the other
ALIGN = 256    # byte alignment of each packed tensor in a staging buffer


class ColocatedChannel:
    """What a colocated `WeightSender` keeps between pushes: staging buffers, and which engine opened which.

    Each tensor of a bucket either lies in a `resident` storage (the trainer's own parameters, stable for
    the push) and is read by the engines in place, one copy in all, or is packed into one of `SLOTS`
    persistent staging buffers. Buckets with nothing to pack need no buffer: their entries ride along
    with the next message (one message for a push that packs nothing), saving a round trip each. A staging
    buffer is shared once and opened once per engine; it is replaced (the old one retired on the engines)
    only when a bucket outgrows it, which after the first push no longer happens.

    In-place storages: with `keep_resident` each is shared once and stays open on the engines from push to
    push for as long as it lives (the sender holds it weakly: one that the trainer freed, e.g. by moving
    its parameters, is retired at the next push, and `release` closes them all before the trainer moves);
    a repeated push then opens nothing and the engines reuse the views and copy lists they made for it.
    Without `keep_resident` they are shared once per push and closed after its last bucket.
    """

    def __init__(self, submit: Callable[..., Future], keep_resident: bool = True):
        self.sender_id = uuid.uuid4().hex[:12]
        self.generation = 0
        self.weight_version = 0   # the last push's version: a message that only closes storages carries it
        self.keep_resident = keep_resident
        self._submit = submit
        self._ids = itertools.count()
        # storage data_ptr -> (storage id, weak ref): open on the engines
        self._kept: dict[int, tuple[int, StorageWeakRef]] = {}
        self._layouts: dict[tuple, int] = {}   # a message's entries -> its layout id, for the last push's messages
        self._staging: list[tuple[int, torch.Tensor] | None] = [None] * SLOTS   # (storage id, uint8 [nbytes])
        self._opened: dict[int, set[int]] = {}    # id(engine) -> staging storage ids it has open (this generation)
        self._retired: dict[int, list[int]] = {}  # id(engine) -> storage ids it should close with its next bucket
        self._dtype_names: dict[torch.dtype, str] = {}

    def push(self, buckets: Iterable[NamedTensors], engines: Sequence[Any], weight_version: int,
             resident: Iterable[torch.Tensor], counts: "SentCounts", on_bucket: Callable[[NamedTensors, int], None],
             pause: str | None = None, resume: bool = False) -> None:
        """Deliver every non-empty bucket to every engine and wait until all have loaded them.

        `pause`: the first message has the engines pause (that mode) before loading, and is loaded before
        any other message goes out (else a later one could overtake it and load into a running engine);
        `resume`: the last one has them continue after loading; a push that fits one message is one round trip.
        `on_bucket(bucket, nbytes)` sees every bucket before it goes out. `counts` gets the in-place part,
        the messages and where the sender's time went: `pack_s` placing buckets (packing into staging, sharing
        handles, waiting for the sender's stream), `wait_s` blocked on the engines' load calls.
        """
        self.weight_version = weight_version
        resident_storages = {}   # storage data_ptr -> uint8 [nbytes] over it (CPU storages: moved to shared memory)
        for t in resident:
            if t.untyped_storage().data_ptr() not in resident_storages:   # parameters of one flat buffer: one storage
                whole = storage_bytes(t)
                resident_storages[whole.untyped_storage().data_ptr()] = whole
        in_place = self._still_kept(resident_storages)   # storage data_ptr -> storage id, for the resident storages
        layouts: dict[tuple, int] = {}
        shown: dict[int, set[int]] = {id(e): set() for e in engines}   # in-place storage ids each engine has open
        pending: list[list[Future]] = [[] for _ in range(SLOTS + 1)]   # per staging slot; the last: in-place only
        deferred: tuple[list, dict] = ([], {})   # entries of in-place-only buckets, sent with the next message
        packed_buckets = 0
        rounds: list[list[float]] = []

        def wait_for(futures: list[Future]) -> None:
            start = time.perf_counter()
            raise_engine_errors(futures, "update_weights_from_tensor", None)
            counts.wait_s += time.perf_counter() - start

        try:
            for bucket, last in _with_last(b for b in buckets if b):
                located = [(t.untyped_storage().data_ptr(), tensor_bytes(t)) for _, t in bucket]   # (storage, nbytes)
                on_bucket(bucket, sum(nbytes for _, nbytes in located))
                read_in_place = [nbytes for ptr, nbytes in located if ptr in resident_storages]
                counts.in_place_tensors += len(read_in_place)
                counts.in_place_bytes += sum(read_in_place)
                packs = len(read_in_place) < len(bucket)
                slot = packed_buckets % SLOTS if packs else SLOTS
                packed_buckets += packs
                wait_for(pending[slot])   # its staging buffer is free
                start = time.perf_counter()
                entries, used = self._place(bucket, located, slot, resident_storages, in_place)
                deferred[0].extend(entries)
                deferred[1].update(used)
                counts.pack_s += time.perf_counter() - start
                if not packs and not last:   # nothing to wait for: one message carries many in-place buckets
                    continue
                if last:   # the last message closes the push's in-place storages: every earlier one is loaded first
                    for futures in pending:
                        wait_for(futures)
                start = time.perf_counter()
                first = pause if counts.messages == 0 else None
                layout = self._layout(deferred[0], layouts)
                messages = [self._message(engine, deferred[0], deferred[1], shown[id(engine)], last, first,
                                          resume and last, layout) for engine in engines]
                counts.pack_s += time.perf_counter() - start
                start = time.perf_counter()
                at_once = last or first is not None   # a pausing message is loaded before any other goes out
                submit = _run_now if at_once and len(engines) == 1 else self._submit   # no hand-off to a thread
                round_trips = [0.0] * len(engines)   # filled by the calls: this message's time at each engine
                futures = [submit(_timed, round_trips, i, engine.update_weights_from_tensor, message, weight_version)
                           for i, (engine, message) in enumerate(zip(engines, messages))]
                counts.wait_s += time.perf_counter() - start
                rounds.append(round_trips)
                counts.messages += 1
                if at_once:
                    wait_for(futures)
                pending[slot] = futures
                deferred = ([], {})
            for futures in pending:
                wait_for(futures)
            counts.message_s = [max(times) for times in rounds]
            self._layouts = layouts
        except BaseException:
            wait([f for futures in pending for f in futures])   # nobody reads the buffers any more
            self._start_over()
            raise
        finally:
            if torch.cuda.is_available():
                torch.cuda.ipc_collect()   # free sender blocks whose receivers closed their mappings

    def _place(self, bucket: NamedTensors, located: list[tuple[int, int]], slot: int, resident: dict[int, torch.Tensor],
               in_place: dict[int, int]) -> tuple[list[tuple], dict[int, tuple[bool, torch.Tensor]]]:
        """Pack the bucket's non-resident tensors into staging slot `slot`; each tensor's (name, dtype, shape,
        stride, storage id, offset).

        `located[i]`: tensor i's (storage data_ptr, nbytes).
        """
        used: dict[int, tuple[bool, torch.Tensor]] = {}   # storage id -> (persistent, uint8 [nbytes])
        packed, offsets, total = [], [], 0
        for (_, t), (ptr, nbytes) in zip(bucket, located):
            if ptr not in resident:
                total = -(-total // ALIGN) * ALIGN
                packed.append((t, nbytes))
                offsets.append(total)
                total += nbytes
        staging_id, staging = self._staging_buffer(slot, total, packed[0][0].device) if packed else (None, None)
        if packed:
            used[staging_id] = (True, staging)
            copies: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
            for (t, nbytes), offset in zip(packed, offsets):
                dsts, srcs = copies.setdefault((t.dtype, t.device), ([], []))
                dsts.append(staging[offset:offset + nbytes].view(t.dtype).view(t.shape))
                srcs.append(t)
            with torch.no_grad():
                for dsts, srcs in copies.values():
                    copy_tensors(dsts, srcs)
        entries, next_packed = [], iter(offsets)
        for (name, t), (ptr, _) in zip(bucket, located):
            dtype = self._dtype_names.get(t.dtype) or self._dtype_names.setdefault(t.dtype, dtype_name(t.dtype))
            if ptr in resident:
                storage_id = in_place.get(ptr)
                if storage_id is None:
                    storage_id = in_place[ptr] = next(self._ids)
                    if self.keep_resident:
                        if ptr in self._kept:   # another storage at that address before: no longer this one
                            self._retire(self._kept[ptr][0])
                        self._kept[ptr] = (storage_id, StorageWeakRef(resident[ptr].untyped_storage()))
                used[storage_id] = (self.keep_resident, resident[ptr])
                entries.append((name, dtype, tuple(t.shape), tuple(t.stride()), storage_id, t.storage_offset()))
            else:
                entries.append((name, dtype, tuple(t.shape), _contiguous_strides(t.shape), staging_id,
                                next(next_packed) // t.element_size()))
        devices = {whole.device for _, whole in used.values() if whole.is_cuda}
        for device in devices:   # the producer's and the packing's kernels are done before an engine reads
            torch.cuda.current_stream(device).synchronize()
        return entries, used

    def _staging_buffer(self, slot: int, nbytes: int, device: torch.device) -> tuple[int, torch.Tensor]:
        """Slot `slot`'s staging buffer, replaced by a larger one (the old one retired) when `nbytes` do not fit."""
        current = self._staging[slot]
        if current is not None and current[1].numel() >= nbytes and current[1].device == device:
            return current
        if current is not None:
            self._retire(current[0])
        buffer = storage_bytes(torch.empty(max(nbytes, ALIGN), dtype=torch.uint8, device=device))
        self._staging[slot] = (next(self._ids), buffer)
        return self._staging[slot]

    def _still_kept(self, resident: dict[int, torch.Tensor]) -> dict[int, int]:
        """{data_ptr: storage id} of the kept storages that `resident` still holds; the freed ones are retired."""
        in_place = {}
        for ptr, (storage_id, ref) in list(self._kept.items()):
            whole = resident.get(ptr)
            if whole is not None and StorageWeakRef(whole.untyped_storage()) == ref:   # the very storage, alive
                in_place[ptr] = storage_id
            elif ref.expired():   # the trainer freed it: the engines unmap it with their next message
                del self._kept[ptr]
                self._retire(storage_id)
        return in_place

    def _retire(self, storage_id: int) -> None:
        """Have every engine that opened the storage close it with its next message."""
        for engine_id, opened in self._opened.items():
            if storage_id in opened:
                opened.discard(storage_id)
                self._retired.setdefault(engine_id, []).append(storage_id)

    def _layout(self, entries: list[tuple], layouts: dict[tuple, int]) -> int:
        """The id of these entries: the one the last push gave the same entries, else a new one."""
        key = tuple(entries)
        layout = self._layouts.get(key)
        layouts[key] = layout = next(self._ids) if layout is None else layout
        return layout

    def release(self, engines: Sequence[Any], staging: bool = False) -> None:
        """Have the engines close the trainer's storages they keep open (and with `staging` the staging buffers)."""
        for storage_id, _ in self._kept.values():
            self._retire(storage_id)
        self._kept.clear()
        if staging:
            for slot in (s for s in self._staging if s is not None):
                self._retire(slot[0])
        futures = [self._submit(engine.update_weights_from_tensor, self._message(engine, [], {}, set(), False, None,
                                                                                 False, None), self.weight_version)
                   for engine in engines if self._retired.get(id(engine))]
        raise_engine_errors(futures, "update_weights_from_tensor", None)

    def _message(self, engine: Any, entries: list[tuple], used: dict[int, tuple[bool, torch.Tensor]],
                 shown: set[int], last: bool, pause: str | None, resume: bool, layout: int | None) -> ColocatedBucket:
        """The bucket as `engine` gets it: handles of the storages it has not opened yet, then the entries."""
        opened = self._opened.setdefault(id(engine), set())
        handles: list[StorageHandle] = []
        for storage_id, (persistent, whole) in used.items():
            seen = opened if persistent else shown
            if storage_id not in seen:
                handles.append(share_storage(storage_id, whole, persistent))
                seen.add(storage_id)
        names, dtypes, shapes, strides, storage_ids, offsets = (list(column) for column in zip(*entries)) \
            if entries else ([], [], [], [], [], [])
        return ColocatedBucket(self.sender_id, self.generation, handles, self._retired.pop(id(engine), []), names,
                               dtypes, shapes, strides, storage_ids, offsets, last, pause, resume, layout)

    def _start_over(self) -> None:
        """After a failed push: a new generation, so every engine drops its mappings and gets fresh handles."""
        self.generation += 1
        self._opened.clear()
        self._retired.clear()
        self._kept.clear()
        self._layouts.clear()

    def close(self) -> None:
        """Free the staging buffers (engines drop their mappings when they see the next generation)."""
        self._staging = [None] * SLOTS
        self._start_over()


def _run_now(fn: Callable, *args: Any) -> Future:
    """fn(*args) in this thread, as a finished Future (its result or its exception)."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:
        future.set_exception(exc)
    return future


def _timed(seconds: list[float], index: int, fn: Callable, *args: Any) -> Any:
    """fn(*args), its wall time stored at seconds[index] (also when it raises)."""
    start = time.perf_counter()
    try:
        return fn(*args)
    finally:
        seconds[index] = time.perf_counter() - start


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _with_last(items: Iterable) -> Iterator[tuple[Any, bool]]:
    """(item, is_last) for each item, looking one ahead."""
    it = iter(items)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, False
        current = following
    yield current, True

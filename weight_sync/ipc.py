"""Colocated transport: a bucket as flat buffers shared by handle (CUDA IPC on GPU, shared memory on CPU)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import reduce_tensor

from weight_sync.buckets import FlatLayout, NamedTensors


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

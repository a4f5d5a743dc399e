"""Process helpers for benchmarks: an object living in its own (GPU-pinned) process, called over a pipe.

(N ranks of one function: `trainer.testing.run_ranks`.) The child is started with torch
multiprocessing's spawn start method, so it is a fresh interpreter and CUDA is initialised
there, never inherited. A child pinned to GPU g starts with CUDA_VISIBLE_DEVICES=g and sees that
GPU as cuda:0 (every thread of it, the engine's scheduler thread too). Errors in the child come
back with their traceback; a child that dies is reported instead of waited for.
"""

from __future__ import annotations

import contextlib
import os
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.multiprocessing as mp


@contextlib.contextmanager
def visible_gpu(gpu: int | None) -> Iterator[None]:
    """While inside, processes started see only GPU `gpu` (None: leave CUDA_VISIBLE_DEVICES as it is)."""
    if gpu is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _shutdown(obj: Any) -> None:
    """Call the object's `shutdown` (or else `close`) if it has one."""
    for method in ("shutdown", "close"):
        if callable(getattr(obj, method, None)):
            getattr(obj, method)()
            return


def _object_main(factory: Callable, args: tuple, conn) -> None:
    """The child: build the object, then answer (kind, name, args, kwargs) messages until told to stop."""
    try:
        obj = factory(*args)
    except BaseException:  # noqa: BLE001 - the parent raises it
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    while True:
        try:
            kind, name, call_args, call_kwargs = conn.recv()
        except EOFError:  # the parent went away: shut down, nobody to answer
            _shutdown(obj)
            return
        if kind == "stop":
            _shutdown(obj)
            conn.send(("ok", None))
            return
        try:
            value = getattr(obj, name)
            conn.send(("ok", value(*call_args, **call_kwargs) if kind == "call" else value))
        except BaseException:  # noqa: BLE001 - the error travels back to the caller
            conn.send(("error", traceback.format_exc()))


class RemoteObject:
    """`factory(*args)` built in its own spawned process (optionally on one GPU); its methods called over a pipe.

    Calls block until the child answers and are serialised (one at a time), so the object can be
    driven from several threads, as `weight_sync.WeightSender` does. `remote.method(*a)` calls a
    method; `remote.get(name)` reads an attribute or property.
    """

    def __init__(self, factory: Callable, *args: Any, gpu: int | None = None, name: str = "remote"):
        ctx = mp.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        self._lock = threading.Lock()
        with visible_gpu(gpu):
            self._proc = ctx.Process(target=_object_main, args=(factory, args, child), daemon=True)
            self._proc.start()
        child.close()  # only the child holds its end, so its death reads as EOF here instead of a hang
        self._reply()

    def _reply(self) -> Any:
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name} process exited (code {self._proc.exitcode}) without answering") from None
        if status == "error":
            raise RuntimeError(f"{self.name} process:\n{value}")
        return value

    def _send(self, kind: str, name: str, args: tuple = (), kwargs: dict | None = None) -> Any:
        with self._lock:
            self._conn.send((kind, name, args, kwargs or {}))
            return self._reply()

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """The child object's `method(*args, **kwargs)`."""
        return self._send("call", method, args, kwargs)

    def get(self, name: str) -> Any:
        """The child object's attribute (or property) `name`."""
        return self._send("get", name)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.call(name, *args, **kwargs)

    def close(self, timeout_s: float = 60.0) -> None:
        """Shut the object down (its `shutdown` or `close`) and end the process."""
        if self._proc.is_alive():
            try:
                self._send("stop", "")
            except (RuntimeError, OSError, BrokenPipeError):
                pass
        self._proc.join(timeout=timeout_s)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()


class RemoteWeightEndpoint(RemoteObject):
    """A RemoteObject whose object is a weight-sync endpoint (an `Engine` or a `WeightReceiver`), for `push_weights`."""

    @property
    def weight_version(self) -> int:
        return int(self.get("weight_version"))


def make_tensor_receiver(shapes: list[tuple[str, tuple[int, ...]]], dtype: str, device: str):
    """A weight-sync endpoint that loads into preallocated tensors of these shapes (no model around them)."""
    from weight_sync import WeightReceiver
    from weight_sync.testing import TensorDictEngine

    return WeightReceiver(TensorDictEngine({name: torch.zeros(shape, dtype=getattr(torch, dtype), device=device)
                                            for name, shape in shapes}))

"""Process helpers for benchmarks: an object living in its own (GPU-pinned) process, called over a pipe.

(N ranks of one function: `trainer.testing.run_ranks`.) The child is started with torch
multiprocessing's spawn start method, so it is a fresh interpreter and CUDA is initialised
there, never inherited. A child pinned to GPU g starts with CUDA_VISIBLE_DEVICES=g and sees that
GPU as cuda:0 (every thread of it, the engine's scheduler thread too). Errors in the child come
back with their traceback; a child that dies is reported instead of waited for, and one that does
not answer within the call's timeout has every thread's stack printed (SIGUSR1) and is killed.

Closing shuts the object down (its `shutdown` or `close`), and then the child leaves with os._exit:
the object released what it held, and interpreter teardown would only run destructors of CUDA,
NCCL and JIT-extension state in arbitrary order, which can block with nobody left to wait for.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.multiprocessing as mp

EXIT_TIMEOUT_S = 30.0  # a closed child has this long to exit after acknowledging the stop


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
    faulthandler.enable()  # a native crash still prints where each thread was
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for the stacks of a stuck child
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
            _exit_now(0)
        if kind == "stop":
            try:
                _shutdown(obj)
            except BaseException:  # noqa: BLE001 - the parent raises it
                conn.send(("error", traceback.format_exc()))
                _exit_now(1)
            conn.send(("ok", None))
            _exit_now(0)
        try:
            value = getattr(obj, name)
            conn.send(("ok", value(*call_args, **call_kwargs) if kind == "call" else value))
        except BaseException:  # noqa: BLE001 - the error travels back to the caller
            conn.send(("error", traceback.format_exc()))


def _exit_now(code: int) -> None:
    """Leave the child process without interpreter teardown (see the module docstring)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class RemoteObject:
    """`factory(*args)` built in its own spawned process (optionally on one GPU); its methods called over a pipe.

    Calls block until the child answers and are serialised (one at a time), so the object can be
    driven from several threads, as `weight_sync.WeightSender` does. `remote.method(*a)` calls a
    method; `remote.get(name)` reads an attribute or property. Building the object and each call
    must answer within timeout_s, else RuntimeError (the child's stacks printed, the child killed).
    """

    def __init__(self, factory: Callable, *args: Any, gpu: int | None = None, name: str = "remote",
                 timeout_s: float = 600.0):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        ctx = mp.get_context("spawn")
        self.name = name
        self.timeout_s = timeout_s
        self._conn, child = ctx.Pipe()
        self._lock = threading.Lock()
        with visible_gpu(gpu):
            self._proc = ctx.Process(target=_object_main, args=(factory, args, child), daemon=True)
            self._proc.start()
        child.close()  # only the child holds its end, so its death reads as EOF here instead of a hang
        self._reply("start", timeout_s)

    def _reply(self, what: str, timeout_s: float) -> Any:
        """The child's answer to `what`; raises RuntimeError on its error, its death or no answer within timeout_s."""
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
            if not self._proc.is_alive() and not self._conn.poll():
                raise RuntimeError(f"{self.name} process exited (code {self._proc.exitcode}) without answering {what}")
            if time.monotonic() >= deadline:
                self._kill_stuck()
                raise RuntimeError(f"{self.name} process did not answer {what} within {timeout_s:g} s; its stacks "
                                   "are printed above, and it was killed")
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name} process exited (code {self._proc.exitcode}) without answering "
                               f"{what}") from None
        if status == "error":
            raise RuntimeError(f"{self.name} process:\n{value}")
        return value

    def _kill_stuck(self) -> None:
        """Have the child print every thread's stack, then kill it."""
        if self._proc.is_alive():
            os.kill(self._proc.pid, signal.SIGUSR1)
            time.sleep(1.0)  # faulthandler writes from a signal handler: give it a moment
            self._proc.kill()
        self._proc.join()

    def _send(self, kind: str, name: str, args: tuple = (), kwargs: dict | None = None,
              timeout_s: float | None = None) -> Any:
        with self._lock:
            if not self._proc.is_alive():
                raise RuntimeError(f"{self.name} process is not running (exit code {self._proc.exitcode})")
            self._conn.send((kind, name, args, kwargs or {}))
            return self._reply(f"{kind} {name!r}" if name else kind, timeout_s or self.timeout_s)

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
        """Shut the object down (its `shutdown` or `close`) and end the process; RuntimeError if either fails.

        The child must answer within timeout_s and then exit within EXIT_TIMEOUT_S; a child that
        does not is killed (after printing its stacks), and the error says which step it missed.
        """
        if self._conn.closed:
            return
        error = None
        try:
            if self._proc.is_alive():
                self._send("stop", "", timeout_s=timeout_s)
            self._proc.join(timeout=EXIT_TIMEOUT_S)
            if self._proc.is_alive():
                self._kill_stuck()
                error = f"{self.name} process shut its object down but did not exit within {EXIT_TIMEOUT_S:g} s; killed"
        except (RuntimeError, OSError) as e:  # stuck, dead or failed shutdown: the process is gone after this
            if self._proc.is_alive():
                self._kill_stuck()
            error = str(e)
        finally:
            self._conn.close()
        if error:
            raise RuntimeError(error)


class RemoteWeightEndpoint(RemoteObject):
    """A RemoteObject whose object is a weight-sync endpoint (an `Engine` or a `TensorDictEngine`): `push_weights`'s."""

    @property
    def weight_version(self) -> int:
        return int(self.get("weight_version"))


def make_tensor_receiver(shapes: list[tuple[str, tuple[int, ...]]], dtype: str, device: str):
    """A weight-sync endpoint that loads into preallocated tensors of these shapes (no model around them)."""
    from weight_sync.testing import TensorDictEngine

    return TensorDictEngine({name: torch.zeros(shape, dtype=getattr(torch, dtype), device=device)
                             for name, shape in shapes})

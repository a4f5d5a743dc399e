"""The engine's control surface, defined once: `EngineControl` states it, `MEMBERS` says how each member travels.

`inference_engine.Engine` implements `EngineControl`. Everything that forwards it does so by the names in
`MEMBERS`, never by restating a signature: the Ray actor and its synchronous proxy
(`orchestrator.actors.EngineActor` / `EngineProxy`, one generated method per member), the HTTP routes
(`server.py`: one route per member with a `route`, its JSON body bound by the member's signature here),
and the tensor-parallel workers (`tp_worker.py`: the members marked `tp_ranks` are run by every tp rank).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Union

import torch

from weight_sync import ColocatedBucket, SharedBucket

NamedTensors = Iterable[tuple[str, torch.Tensor]]


class EngineControl(Protocol):
    """What an inference engine offers to clients and to the RL loop (SGLang's names and semantics)."""

    # ---------------------------------------------------------------- generation
    def generate(self, prompt: str | list[str] | None = None, input_ids: list[int] | list[list[int]] | None = None,
                 sampling_params: dict | list[dict] | None = None, return_logprob: bool | list[bool] = False,
                 rid: str | list[str] | None = None) -> dict | list[dict]:
        """Generate for one prompt (returns a dict) or a batch / n > 1 (returns a list, n dicts per prompt)."""

    async def async_generate(self, prompt: str | list[str] | None = None,
                             input_ids: list[int] | list[list[int]] | None = None,
                             sampling_params: dict | list[dict] | None = None,
                             return_logprob: bool | list[bool] = False, rid: str | list[str] | None = None,
                             stream: bool = False) -> dict | list[dict] | AsyncIterator[dict]:
        """Like generate, awaitable; stream=True returns an async iterator of cumulative outputs (with "index")."""

    def abort(self, rid: str | None = None, abort_all: bool = False) -> None:
        """Abort the request (or n-sample group) rid, or every request with abort_all; they finish with "abort"."""

    def flush_cache(self) -> bool:
        """Empty the radix cache."""

    # ---------------------------------------------------------------- RL: pausing and weights
    def pause_generation(self, mode: str = "pause") -> None:
        """Stop stepping after the current step ("pause": in-flight requests keep their state; "drain": first wait
        until no request is running or queued)."""

    def continue_generation(self) -> None:
        """Resume stepping after pause_generation."""

    def update_weights_from_tensor(self, named_tensors: ColocatedBucket | SharedBucket | NamedTensors,
                                   weight_version: int) -> int:
        """Load a colocated bucket (shared handles) or (hf_name, tensor) pairs between two steps, flush the radix
        cache and set `weight_version` (returned; a bucket without tensors loads nothing and keeps the version).

        In-process and over Ray only: tensors never travel over HTTP.
        """

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]], group_name: str, weight_version: int) -> int:
        """Receive one bucket broadcast by rank 0 of the weight-update group (one flat buffer per dtype; every tp
        rank takes its own copy and loads its shard), flush the radix cache, set and return `weight_version`."""

    def update_weights_from_disk(self, model_path: str, weight_version: int) -> int:
        """Load every weight of an HF folder of the same architecture; flush, set and return `weight_version`."""

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str = "auto", timeout_s: float = 300.0) -> None:
        """Join a trainer's weight-update group (tp rank r as group rank rank_offset + r); blocks until every
        rank arrived."""

    def destroy_weights_update_group(self, group_name: str) -> None:
        """Leave the named weight-update group (every tp rank)."""

    def weight_checksums(self) -> dict[str, dict]:
        """{hf_name: checksum dict} of the engine's full weights (weight_sync's verification)."""

    def named_hf_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The engine's weights under HF names, unfused (views: clone to keep)."""

    def release_memory(self, weights: bool = False, keep_weights: bool = True) -> None:
        """Free the KV pool (and with weights=True the weights' device memory, their contents kept in host memory,
        or discarded with keep_weights=False when every weight is pushed before the next request); only while no
        request is queued or running."""

    def resume_memory(self, weights: bool = True, kv_cache: bool = True) -> None:
        """Take back what was released of the weights and / or the KV pool (weights alone first to push into them,
        then the KV pool); requests are served again once both are back."""

    # ---------------------------------------------------------------- information
    def metrics(self) -> dict:
        """Load and cache numbers (a snapshot, possibly a step old)."""

    def get_model_info(self) -> dict:
        """Model path, family and sizes."""

    @property
    def weight_version(self) -> int:
        """The version of the weights the engine holds (0 until the first update)."""

    def health(self) -> dict:
        """Liveness report: {"ok", "status", "reason", "scheduler_alive", "tp_workers_alive", "stall_s" (seconds
        without a step while there is work), "stall_timeout_s", "memory_released", "weights_released", "paused",
        "weight_version", "running", "queued"}; HTTP answers 200 when ok, else 503 (no token needed)."""


@dataclass(frozen=True)
class Member:
    """How one member of `EngineControl` travels.

    `route`: SGLang's HTTP path (None: not served over HTTP); `http_methods`: its verbs; `admin`: it changes
    the engine's weights or state, so the server refuses it unless admin routes are on (an api key or
    --enable-admin-routes); `admin_if`: a bool argument that makes the call an admin one when true;
    `generated_route`: server.py builds the route from the signature (False: it is
    hand-written there, e.g. /generate); `blocking`: callers off the scheduler thread run it in a worker
    thread (False: cheap, call it inline); `tp_ranks`: every tp rank runs it itself (rank 0 sends it to the
    workers with its bound arguments); `host_tensors`: the result holds tensor views, which a forwarder
    across processes sends as CPU copies.
    """

    name: str
    route: str | None
    http_methods: tuple[str, ...] = ("POST",)
    admin: bool = False
    admin_if: str | None = None
    generated_route: bool = True
    blocking: bool = True
    tp_ranks: bool = False
    host_tensors: bool = False

    @property
    def is_attribute(self) -> bool:
        """A property of the engine (read, not called)."""
        return isinstance(inspect.getattr_static(EngineControl, self.name), property)

    @property
    def is_async(self) -> bool:
        """A coroutine method of the engine (awaited)."""
        return inspect.iscoroutinefunction(getattr(EngineControl, self.name))

    @property
    def doc(self) -> str:
        """The member's docstring in `EngineControl`."""
        return inspect.getdoc(inspect.getattr_static(EngineControl, self.name)) or ""


MEMBERS: dict[str, Member] = {m.name: m for m in (
    Member("generate", "/generate", generated_route=False),
    Member("async_generate", "/generate", generated_route=False, blocking=False),
    Member("abort", "/abort_request", blocking=False, admin_if="abort_all"),
    Member("flush_cache", "/flush_cache", ("GET", "POST"), admin=True),
    Member("pause_generation", "/pause_generation", admin=True),
    Member("continue_generation", "/continue_generation", admin=True),
    Member("update_weights_from_tensor", None, admin=True),   # tensors never travel over HTTP (no pickle)
    Member("update_weights_from_distributed", "/update_weights_from_distributed", admin=True, tp_ranks=True),
    Member("update_weights_from_disk", "/update_weights_from_disk", admin=True),
    Member("init_weights_update_group", "/init_weights_update_group", admin=True, tp_ranks=True),
    Member("destroy_weights_update_group", "/destroy_weights_update_group", admin=True, tp_ranks=True),
    Member("weight_checksums", "/weights_checksum", ("GET",)),
    Member("named_hf_tensors", None, host_tensors=True),
    Member("release_memory", "/release_memory_occupation", admin=True),
    Member("resume_memory", "/resume_memory_occupation", admin=True),
    Member("metrics", "/metrics", ("GET",), blocking=False),
    Member("get_model_info", "/get_model_info", ("GET",), blocking=False),
    Member("weight_version", "/get_weight_version", ("GET",), blocking=False),
    Member("health", "/health", ("GET", "POST"), blocking=False),
)}


def declared_members() -> set[str]:
    """The public names `EngineControl` defines (what `MEMBERS` must list, no more and no less)."""
    return {name for name in vars(EngineControl) if not name.startswith("_")}


def signature(name: str) -> inspect.Signature:
    """The member's signature without `self` (an attribute takes no arguments)."""
    if MEMBERS[name].is_attribute:
        return inspect.Signature()
    sig = inspect.signature(getattr(EngineControl, name))
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def bind(name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The member's arguments by name, defaults filled in; a missing or unknown argument raises ValueError naming it."""
    sig = signature(name)
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - set(sig.parameters))
    if unknown:
        raise ValueError(f"{name} got unknown field(s) {unknown}; it takes {list(sig.parameters)}")
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        missing = [p for p in list(sig.parameters)[len(args):] if p not in kwargs
                   and sig.parameters[p].default is inspect.Parameter.empty]
        if missing:
            raise ValueError(f"{name} needs field(s) {missing}; it takes {list(sig.parameters)}") from exc
        raise ValueError(f"{name}: {exc}") from exc
    bound.apply_defaults()
    return dict(bound.arguments)


def check_json_types(name: str, arguments: dict[str, Any], aliases: dict[str, str] | None = None) -> None:
    """Raise ValueError naming the first argument whose JSON value does not fit the member's annotation
    (`aliases`: argument -> the field name the request used for it)."""
    if MEMBERS[name].is_attribute:
        return
    hints = typing.get_type_hints(getattr(EngineControl, name))
    for arg, value in arguments.items():
        hint = hints.get(arg)
        if hint is not None and not _fits(value, hint):
            field = (aliases or {}).get(arg, arg)
            raise ValueError(f"{name}: field {field!r} = {_short(value)} does not fit {_hint_name(hint)}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value (dict / list / str / int / float / bool / None) fits a type annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if origin in (list, Sequence, typing.Sequence) or hint in (list, Sequence):
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    return False   # tensors, buckets and other Python-only values never come from JSON


def _hint_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

"""Load user functions (generate, reward, filter) from import paths like 'package.module:function'."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from typing import Any, Callable


def load_function(path: str) -> Callable:
    """The callable at 'package.module:function' (or 'package.module.function'); clear errors if missing."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"expected an import path 'package.module:function', got {path!r}")
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"import path {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ImportError(f"cannot load {path!r}: module {module_name!r} not found ({e})") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise ImportError(f"cannot load {path!r}: module {module_name!r} has no attribute {attr!r}; "
                              f"its callables are {public}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{path!r} is a {type(obj).__name__}, not a function")
    return obj


async def call_maybe_async(fn: Callable, *args: Any) -> Any:
    """Await `fn(*args)` if it is async; run it in a worker thread otherwise (so timeouts still apply)."""
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):
        return await fn(*args)
    result = await asyncio.to_thread(fn, *args)
    if inspect.isawaitable(result):
        return await result
    return result

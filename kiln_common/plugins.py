"""Load user functions (generate, reward, filter) and env classes from import paths like 'package.module:function'."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from typing import Any, Callable


def import_object(path: str) -> Any:
    """The object at 'package.module:name' (or 'package.module.name'); ImportError naming what is missing."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"expected an import path 'package.module:name', got {path!r}")
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"import path {path!r} must look like 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"cannot import module {module_name!r} of {path!r}: module {module_name!r} not found "
                          f"or its import failed ({type(e).__name__}: {e})") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise ImportError(f"cannot load {path!r}: module {module_name!r} has no attribute {attr!r}; "
                              f"its callables are {public}")
        obj = getattr(obj, part)
    return obj


def load_function(path: str) -> Callable:
    """The callable at 'package.module:function' (or 'package.module.function'); clear errors if missing."""
    obj = import_object(path)
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

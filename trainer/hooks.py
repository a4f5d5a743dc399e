"""User hooks by import path (custom loss, custom advantages): loaded and signature-checked at config time."""

from __future__ import annotations

import inspect
from typing import Callable

from kiln_common.plugins import load_function


def load_hook(path: str, what: str, positional: tuple[str, ...], keywords: tuple[str, ...]) -> Callable:
    """The function at 'pkg.mod:fn', checked to accept `positional` args then `keywords` by name.

    Raises ImportError / TypeError / ValueError with one line naming the path, the found signature and
    the expected call, so a wrong hook fails when the config is built, not mid-step.
    """
    try:
        fn = load_function(path)
    except (ImportError, ValueError) as e:
        raise type(e)(f"{what} {path!r}: {e}") from e
    expected = f"fn({', '.join(positional)}, *, {', '.join(keywords)})"
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} {path!r}: cannot read its signature ({e}); it must be callable as {expected}") from e
    try:
        sig.bind(*positional, **{k: None for k in keywords})
    except TypeError as e:
        raise TypeError(f"{what} {path!r} has signature {getattr(fn, '__name__', 'fn')}{sig}, which cannot be "
                        f"called as {expected} ({e})") from None
    return fn

"""Routed experts: the experts a mixture-of-experts engine chose for each token, as they travel to the trainer.

An array [tokens, moe layers, top_k] of expert ids (uint8 for up to 256 experts, else int16), row j for the
token at position j of the sequence (each token the engine forwarded; the last sampled token never is). The
engine's output carries it as a JSON-safe dict {"data": base64 of the C-order bytes, "shape", "dtype"} (the same
in-process, over Ray and over HTTP; never a pickle); `Sample.routed_experts` holds it decoded (a numpy array).
"""

from __future__ import annotations

import base64
from typing import Any

DTYPES = ("uint8", "int16")


def encode(array: Any) -> dict[str, Any]:
    """The wire form of a [tokens, layers, top_k] uint8 / int16 array (numpy or a CPU torch tensor)."""
    import numpy as np

    a = np.ascontiguousarray(array.numpy() if hasattr(array, "numpy") else array)
    if a.ndim != 3 or str(a.dtype) not in DTYPES:
        raise ValueError(f"routed experts must be a [tokens, layers, top_k] array of {DTYPES}; "
                         f"got shape {a.shape} {a.dtype}")
    return {"data": base64.b64encode(a.tobytes()).decode("ascii"), "shape": list(a.shape), "dtype": str(a.dtype)}


def decode(wire: dict[str, Any]):
    """The numpy array [tokens, layers, top_k] of an `encode` dict; ValueError names what is malformed."""
    import numpy as np

    if not isinstance(wire, dict) or set(wire) != {"data", "shape", "dtype"}:
        raise ValueError(f"routed experts must be a dict with data, shape and dtype; got {_brief(wire)}")
    shape, dtype = wire["shape"], wire["dtype"]
    if dtype not in DTYPES or not isinstance(shape, list) or len(shape) != 3 or \
            not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"routed experts: dtype {dtype!r} (expected one of {DTYPES}) and shape {shape!r} "
                         "(expected 3 non-negative ints)")
    raw = base64.b64decode(wire["data"], validate=True)
    expected = shape[0] * shape[1] * shape[2] * np.dtype(dtype).itemsize
    if len(raw) != expected:
        raise ValueError(f"routed experts: {len(raw)} bytes for shape {shape} {dtype}; expected {expected}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def extend(old: Any, new: Any, num_tokens: int):
    """Routing of a sequence of `num_tokens` tokens after a turn: the rows already known (`old`, earlier turns' own
    routing) followed by the rows of `new` (the latest engine call's, from row 0 of the sequence) past them."""
    import numpy as np

    if new.ndim != 3 or new.shape[0] > max(num_tokens - 1, 0):
        raise ValueError(f"routed experts of shape {tuple(new.shape)} for a sequence of {num_tokens} tokens; "
                         f"expected at most {max(num_tokens - 1, 0)} rows (every token but the last)")
    if old is None or old.shape[0] == 0:
        return new
    if old.shape[1:] != new.shape[1:] or old.dtype != new.dtype:
        raise ValueError(f"routed experts {tuple(new.shape[1:])} {new.dtype} do not continue the sample's "
                         f"{tuple(old.shape[1:])} {old.dtype}")
    if new.shape[0] <= old.shape[0]:
        return old
    return np.concatenate([old, new[old.shape[0]:]])


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

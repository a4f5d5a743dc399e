"""Attention backends behind one interface, found by name (EngineConfig.attention_backend)."""

from __future__ import annotations

import importlib

from inference_engine.attention.base import AttentionBackend

# name -> "module:Class"; imported only when chosen, so GPU-only backends cost nothing on CPU
_BACKENDS: dict[str, str] = {
    "torch": "inference_engine.attention.torch_backend:TorchAttentionBackend",
    "triton": "inference_engine.attention.triton_backend:TritonAttentionBackend",
    "flashinfer": "inference_engine.attention.flashinfer_backend:FlashInferAttentionBackend",
}


def register_backend(name: str, target: str) -> None:
    """Make a backend class ("package.module:Class") available under `name`."""
    if ":" not in target:
        raise ValueError(f"backend target {target!r} must look like 'package.module:Class'")
    _BACKENDS[name] = target


def available_backends() -> list[str]:
    """Registered backend names."""
    return sorted(_BACKENDS)


def get_backend_class(name: str) -> type[AttentionBackend]:
    """The backend class registered under `name`."""
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; expected one of {available_backends()}")
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["AttentionBackend", "available_backends", "get_backend_class", "register_backend"]

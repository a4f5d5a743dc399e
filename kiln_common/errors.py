"""Errors that an engine raises and its clients (the rollout side) recognise, without importing each other."""

from __future__ import annotations


class EngineNotServingError(RuntimeError):
    """The engine is alive but serves no requests now (its memory is released; it serves again after
    `resume_memory()`): the request was refused at once, and another engine may take it."""

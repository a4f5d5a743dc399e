"""Errors raised by weight sync; each names what went wrong and where."""

from __future__ import annotations


class WeightSyncError(RuntimeError):
    """A weight update could not be completed."""


class WeightSyncTimeoutError(WeightSyncError, TimeoutError):
    """A peer of the weight-update group did not arrive or answer in time."""


class WeightChecksumError(WeightSyncError):
    """Engine weights differ from the trainer's after an update; `names` lists the tensors that differ."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names

"""Errors raised by weight sync; each names what went wrong and where."""

from __future__ import annotations

from concurrent.futures import Future, wait


class WeightSyncError(RuntimeError):
    """A weight update could not be completed."""


class WeightSyncTimeoutError(WeightSyncError, TimeoutError):
    """A peer of the weight-update group did not arrive or answer in time."""


class WeightChecksumError(WeightSyncError):
    """Engine weights differ from the trainer's after an update; `names` lists the tensors that differ."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names


def raise_engine_errors(futures: list[Future], what: str, own_error: BaseException | None) -> None:
    """Wait for every engine call, then raise one error naming each engine that failed (and the sender's own error)."""
    wait(futures)
    failed = [(i, f.exception()) for i, f in enumerate(futures) if f.exception() is not None]
    if not failed and own_error is None:
        return
    lines = [f"{what} failed"]
    if own_error is not None:
        lines.append(f"  trainer: {own_error}")
    lines += [f"  engine {i}: {type(e).__name__}: {e}" for i, e in failed]
    cause = own_error if own_error is not None else failed[0][1]
    raise WeightSyncError("\n".join(lines)) from cause

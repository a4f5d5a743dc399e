"""Logs for people: no colour codes in files, one note instead of third-party import noise, ETA text.

`setup_logging` is what the driver, its actors and `python -m inference_engine.serve` call first: records go through
`tqdm.write` (a progress bar on the terminal is not split by a log line) and lose ANSI escapes when the stream
is not a terminal. `QUIET_WARNINGS` are the "not installed, falling back" warnings megatron-core prints at
import on a machine without Apex / Transformer Engine; `pythonwarnings` turns them into a PYTHONWARNINGS value
for processes started later (Ray workers), and `optional_kernels_note` is the one line that replaces them.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import warnings
from typing import TextIO

ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
# message prefixes (matched case-insensitively at the start, as PYTHONWARNINGS does): the "not installed" fallbacks,
# and the deprecation megatron-core's own cuda_graph_scope default ("full") triggers in every TransformerConfig
QUIET_WARNINGS = (
    "Apex is not installed",
    "Transformer Engine and Apex are not installed",
    "Transformer Engine is not installed",
    "Megatron Core is not installed",
    "full scope is deprecated",
)
# third-party loggers whose INFO lines only restate that (megatron-FSDP's "without Transformer Engine")
QUIET_LOGGERS = ("megatron.core.distributed.fsdp",)


def strip_ansi(text: str) -> str:
    """`text` without ANSI escape sequences (colours, cursor moves)."""
    return ANSI_ESCAPE.sub("", text)


def is_terminal(stream: TextIO | None) -> bool:
    """True when `stream` is an interactive terminal (colours and progress bars belong there only)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class StripAnsi(logging.Filter):
    """Removes ANSI escapes from a record's message (for handlers that write to files or pipes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\x1b" in message:
            record.msg, record.args = strip_ansi(message), None
        return True


class TqdmHandler(logging.StreamHandler):
    """A stream handler that writes through `tqdm.write`, so a record does not land on a progress bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


def setup_logging(level: int | str = logging.INFO, fmt: str = "%(asctime)s %(levelname)s %(message)s",
                  stream: TextIO | None = None) -> None:
    """Root logging to `stream` (stderr) through tqdm.write, ANSI-free unless it is a terminal, and the
    QUIET_WARNINGS hidden; like logging.basicConfig, nothing changes where the root logger has handlers already."""
    quiet_third_party_warnings()
    root = logging.getLogger()
    if root.handlers:
        return
    stream = sys.stderr if stream is None else stream
    handler = TqdmHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    if not is_terminal(stream):
        handler.addFilter(StripAnsi())
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())


def quiet_third_party_warnings() -> None:
    """Hide QUIET_WARNINGS and QUIET_LOGGERS' INFO lines in this process (`optional_kernels_note` replaces them)."""
    for prefix in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(prefix))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def pythonwarnings(existing: str | None = None) -> str:
    """A PYTHONWARNINGS value that hides QUIET_WARNINGS in a new Python process, after `existing` entries."""
    ours = [f"ignore:{prefix}" for prefix in QUIET_WARNINGS]
    return ",".join([existing] + ours if existing else ours)


def optional_kernels_note() -> str | None:
    """One line naming the optional NVIDIA kernel packages that are not installed (their warnings hidden); None
    when both are there."""
    missing = [name for name, module in (("Apex", "apex"), ("Transformer Engine", "transformer_engine"))
               if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return (f"note: {' and '.join(missing)} not installed; megatron-core uses its PyTorch fallbacks "
            f"(its import warnings about this are hidden)")


def format_duration(seconds: float) -> str:
    """A short duration for a log line: '45s', '3m05s', '2h07m', '3d04h'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def eta(step_seconds: list[float], steps_left: int, window: int = 10) -> str:
    """The time `steps_left` more steps take at the mean of the last `window` step times ('-' without any)."""
    recent = step_seconds[-window:]
    if not recent:
        return "-"
    return format_duration(sum(recent) / len(recent) * max(steps_left, 0))

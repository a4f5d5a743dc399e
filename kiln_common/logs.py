"""Logs for people: no colour codes in files, one note instead of third-party import noise, ETA text.

`setup_logging` is what the driver, its actors and `python -m inference_engine.serve` call first: records go through
`tqdm.write` (a progress bar on the terminal is not split by a log line) and lose ANSI escapes when the stream
is not a terminal. `QUIET_WARNINGS` are the "not installed, falling back" warnings megatron-core prints at
import on a machine without Apex / Transformer Engine; `pythonwarnings` turns them into a PYTHONWARNINGS value
for processes started later (Ray workers), and `optional_kernels_note` is the one line that replaces them.

Progress bars belong on a terminal only: the driver decides once (`is_terminal(sys.stderr)`) and turns
RolloutConfig.progress off otherwise; `progress_bar` draws a bar that is on through Ray's driver-rendered bars
inside an actor (a plain tqdm bar there is cut into stale `1/4 25%` lines by Ray's line-by-line log forwarding),
and `QUIET_PROGRESS_ENV` keeps third-party libraries' own bars (datasets, huggingface_hub) out of the actors and
out of a driver whose output is a file.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import warnings
from typing import Any, TextIO

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
# third-party libraries' own progress bars, off in every Ray actor and in a driver that does not write to a terminal
QUIET_PROGRESS_ENV = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
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


def in_ray_actor() -> bool:
    """True inside a Ray actor process (whose output reaches the driver's console line by line)."""
    ray = sys.modules.get("ray")
    try:
        return bool(ray and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None)
    except Exception:  # noqa: BLE001 - a Ray without a runtime context here: not an actor
        return False


def progress_bar(total: int, desc: str, unit: str, enabled: bool) -> Any:
    """A tqdm-style bar (update, refresh, close, a settable total): a no-op one unless `enabled`; inside a Ray
    actor Ray's `tqdm_ray`, which the driver draws on its own terminal; elsewhere tqdm on stderr."""
    from tqdm import tqdm

    if not enabled:
        return tqdm(total=total, disable=True)
    if in_ray_actor():
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return ray_tqdm(total=total, desc=desc, unit=unit)
    return tqdm(total=total, desc=desc, unit=unit, leave=False)


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

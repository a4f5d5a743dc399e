"""Reward of the quickstart task: 1.0 if the response is exactly the right number (and then stops)."""

from __future__ import annotations

import re
from typing import Any

from kiln_common.sample import Sample, Status

_INTEGER = re.compile(r"-?\d+")
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")  # chat special tokens, e.g. <|im_end|>, if not stripped by the engine


def arithmetic_reward(args: Any, sample: Sample) -> float:
    """1.0 if the response is the label's integer and nothing else (a truncated response scores 0), else 0.0."""
    if sample.status == Status.TRUNCATED:
        return 0.0
    text = _SPECIAL.sub("", sample.response).strip()
    if not _INTEGER.fullmatch(text):
        return 0.0
    return float(int(text) == int(str(sample.label).strip()))

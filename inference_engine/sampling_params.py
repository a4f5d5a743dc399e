"""SamplingParams: SGLang's sampling parameters, validated at construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


# A temperature below this is greedy (SGLang's rule): 1 / T would overflow float32 (1e-300 is 0 in float32), and
# logits / T with it, giving NaN log-probs; greedy requests report log-probs at T = 1.
GREEDY_TEMPERATURE = 1e-6


_TYPES = {
    "max_new_tokens": (int,), "temperature": (int, float), "top_p": (int, float), "top_k": (int,),
    "min_p": (int, float), "repetition_penalty": (int, float), "frequency_penalty": (int, float),
    "presence_penalty": (int, float), "stop": (list,), "stop_token_ids": (list,), "ignore_eos": (bool,),
    "n": (int,), "seed": (int, type(None)), "skip_special_tokens": (bool,), "no_stop_trim": (bool,),
    "top_logprobs_num": (int,), "return_prompt_logprobs": (bool,), "return_routed_experts": (bool,),
}


@dataclass
class SamplingParams:
    """How to sample one request; a temperature below GREEDY_TEMPERATURE (0 included) or top_k 1 is greedy."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF semantics, over prompt and output tokens
    frequency_penalty: float = 0.0  # OpenAI semantics, over output tokens
    presence_penalty: float = 0.0  # OpenAI semantics, over output tokens
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    top_logprobs_num: int = 0
    return_prompt_logprobs: bool = False
    return_routed_experts: bool = False  # MoE models: meta_info.routed_experts, the experts of every forwarded token

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), _TYPES[f.name]
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
                raise ValueError(f"sampling parameter {f.name}={value!r} has type {type(value).__name__}; "
                                 f"expected {' or '.join(k.__name__ for k in kinds)}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"sampling parameter {name}={getattr(self, name)!r} is invalid; "
                                 "expected a finite number")
        checks = [
            (self.max_new_tokens >= 0, "max_new_tokens", "an int >= 0"),
            (self.temperature >= 0.0, "temperature", ">= 0 (0 = greedy)"),
            (0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 1, "top_k", "-1 (off) or >= 1 (the vocabulary size or more: off)"),
            (0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]"),
            (self.repetition_penalty > 0.0, "repetition_penalty", "> 0 (1 = off)"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "in [-2, 2]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "in [-2, 2]"),
            (self.n >= 1, "n", "an int >= 1"),
            (self.top_logprobs_num >= 0, "top_logprobs_num", "an int >= 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings"),
            (all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids), "stop_token_ids",
             "a list of ints"),
        ]
        for ok, name, valid in checks:
            if not ok:
                raise ValueError(f"sampling parameter {name}={getattr(self, name)!r} is invalid; expected {valid}")

    @property
    def greedy(self) -> bool:
        """Whether this request takes the argmax (temperature below GREEDY_TEMPERATURE, or top_k 1)."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def for_vocab(self, vocab_size: int) -> "SamplingParams":
        """These parameters for a vocabulary of `vocab_size` tokens: a top_k of the vocabulary size or more is off
        (-1), never an int64 overflow that would silently change the sampling."""
        return dataclasses.replace(self, top_k=-1) if self.top_k >= vocab_size else self

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SamplingParams":
        """Build from a JSON-style dict; unknown keys raise ValueError naming them."""
        if d is not None and not isinstance(d, dict):
            raise ValueError(f"sampling_params must be a JSON object (dict), got {type(d).__name__}")
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; valid ones are {sorted(known)}")
        if d.get("stop") is None:
            d.pop("stop", None)
        if d.get("stop_token_ids") is None:
            d.pop("stop_token_ids", None)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """As a plain dict."""
        return dataclasses.asdict(self)

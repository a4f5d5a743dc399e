"""Rewards: math answer checking, exact match, format regex, a remote reward model, and custom functions.

`RewardScorer` puts a reward on every sample of a group that has none yet; a reward
function that raises or exceeds --reward-timeout marks its sample FAILED (reward None)
with the error, and the run goes on.
"""

from __future__ import annotations

import asyncio
import logging
import re
from fractions import Fraction
from typing import Any, Callable

import httpx

from rollout.config import RolloutConfig
from kiln_common.plugins import call_maybe_async, load_function
from kiln_common.sample import Sample, Status

logger = logging.getLogger(__name__)

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def extract_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        rest = text[start + len("\\boxed"):].strip()  # \boxed 5
        return rest.split()[0] if rest else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a response: the last \\boxed{} content, else the last number; None if neither."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _unwrap(s: str, command: str) -> str:
    """Replace \\command{x} by x (balanced braces)."""
    key = "\\" + command + "{"
    while (start := s.find(key)) >= 0:
        depth, j = 0, start + len(key) - 1
        for j in range(start + len(key) - 1, len(s)):
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            if depth == 0:
                break
        s = s[:start] + s[start + len(key):j] + s[j + 1:]
    return s


def normalize_answer(answer: Any) -> str:
    """Canonical text of an answer: no LaTeX wrappers, spaces, units of %, thousands separators or trailing zeros."""
    s = str(answer).strip()
    s = s.replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "").replace("%", "")
    for command in ("text", "textbf", "mathrm", "mbox", "boxed"):
        s = _unwrap(s, command)
    s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\1/\2", s)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = s.rstrip(".").strip()
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    s = s.replace(" ", "")
    s = re.sub(r"\((-?[\d.]+)\)", r"\1", s)  # "(1)/(2)" -> "1/2"
    value = _as_fraction(s)
    if value is not None:
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    return s


def _as_fraction(s: str) -> Fraction | None:
    try:
        if "/" in s:
            num, den = s.split("/")
            return Fraction(num) / Fraction(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: Any, reference: Any) -> bool:
    """True if two answers are equal after normalisation ("1,000" == "1000" == "1000.0", "1/2" == "0.5")."""
    if predicted is None or reference is None:
        return False
    return normalize_answer(predicted) == normalize_answer(reference)


def math_reward(response: str, label: Any) -> float:
    """1.0 if the response's final answer (\\boxed{} or last number) equals the label, else 0.0."""
    return float(answers_match(extract_answer(response), label))


def exact_match_reward(response: str, label: Any) -> float:
    """1.0 if the response equals the label up to surrounding whitespace, else 0.0."""
    return float(label is not None and response.strip() == str(label).strip())


def format_reward(response: str, pattern: str | re.Pattern) -> float:
    """1.0 if the whole response matches the regex `pattern` (DOTALL), else 0.0."""
    regex = re.compile(pattern, re.DOTALL) if isinstance(pattern, str) else pattern
    return float(regex.fullmatch(response.strip()) is not None)


class RemoteRewardModel:
    """Scores a sample by POSTing {prompt, response, label, metadata} to a reward-model server."""

    def __init__(self, url: str, timeout: float | None = 60.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self._transport = transport

    async def __call__(self, args: Any, sample: Sample) -> float | dict[str, float]:
        """The server's reward: a JSON number, or an object with "reward" (a number or a dict of numbers)."""
        payload = {"prompt": sample.prompt, "response": sample.response, "label": sample.label,
                   "metadata": sample.metadata}
        async with httpx.AsyncClient(timeout=self.timeout, transport=self._transport) as client:
            response = await client.post(self.url, json=payload)
        if response.status_code != 200:
            raise RuntimeError(f"reward model {self.url} answered {response.status_code}: {response.text[:200]}")
        body = response.json()
        reward = body.get("reward") if isinstance(body, dict) else body
        if isinstance(reward, bool) or not isinstance(reward, (int, float, dict)):
            raise RuntimeError(f"reward model {self.url} returned {body!r}; expected a number or {{'reward': ...}}")
        return float(reward) if isinstance(reward, (int, float)) else reward


def builtin_reward(config: RolloutConfig) -> Callable[[Any, Sample], Any]:
    """The per-sample reward function `fn(args, sample)` selected by --rm-type."""
    if config.rm_type == "math":
        async def reward(args: Any, s: Sample) -> float:
            return math_reward(s.response, s.label)
    elif config.rm_type == "exact_match":
        async def reward(args: Any, s: Sample) -> float:
            return exact_match_reward(s.response, s.label)
    elif config.rm_type == "format":
        regex = re.compile(config.format_reward_pattern, re.DOTALL)

        async def reward(args: Any, s: Sample) -> float:
            return format_reward(s.response, regex)
    else:
        return RemoteRewardModel(config.rm_url, timeout=config.reward_timeout)
    return reward


def _check_reward(reward: Any, where: str) -> float | dict[str, float]:
    if isinstance(reward, bool) or not isinstance(reward, (int, float, dict)):
        raise TypeError(f"{where} returned {reward!r}; expected a float or a dict of floats")
    return float(reward) if isinstance(reward, (int, float)) else reward


class RewardScorer:
    """Computes rewards for groups of samples with the configured (built-in or custom) reward function."""

    def __init__(self, config: RolloutConfig, args: Any) -> None:
        self.config = config
        self.args = args
        if config.custom_rm_path:
            self.fn = load_function(config.custom_rm_path)
            self.name = config.custom_rm_path
        else:
            self.fn = builtin_reward(config)
            self.name = f"rm_type {config.rm_type}"
        self.batched = config.group_rm

    async def score(self, samples: list[Sample]) -> None:
        """Reward every sample that is COMPLETED or TRUNCATED and has no reward yet; failures mark it FAILED."""
        todo = [s for s in samples if s.reward is None and s.status in (Status.COMPLETED, Status.TRUNCATED)]
        if not todo:
            return
        if self.batched:
            try:
                rewards = await asyncio.wait_for(call_maybe_async(self.fn, self.args, todo), self.config.reward_timeout)
                if not isinstance(rewards, (list, tuple)) or len(rewards) != len(todo):
                    raise TypeError(f"batched reward {self.name} returned {rewards!r}; "
                                    f"expected a list of {len(todo)} rewards")
                for s, r in zip(todo, rewards):
                    s.reward = _check_reward(r, self.name)
            except Exception as e:  # noqa: BLE001 - a broken reward fails its samples, not the run
                for s in todo:
                    self._fail(s, e)
            return
        await asyncio.gather(*(self._score_one(s) for s in todo))

    async def _score_one(self, sample: Sample) -> None:
        try:
            reward = await asyncio.wait_for(call_maybe_async(self.fn, self.args, sample), self.config.reward_timeout)
            sample.reward = _check_reward(reward, self.name)
        except Exception as e:  # noqa: BLE001 - a broken reward fails its sample, not the run
            self._fail(sample, e)

    def _fail(self, sample: Sample, error: BaseException) -> None:
        if isinstance(error, asyncio.TimeoutError):
            message = f"reward {self.name} timed out after {self.config.reward_timeout}s"
        else:
            message = f"reward {self.name} raised {type(error).__name__}: {error}"
        logger.warning("sample %d: %s", sample.index, message)
        sample.reward = None
        sample.status = Status.FAILED
        sample.error = message

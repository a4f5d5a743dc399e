"""A small arithmetic word-problem environment that gives the model the calculator tool."""

from __future__ import annotations

import random
import re

from envs.calculator import CALCULATOR, evaluate, format_number
from envs.registry import register
from envs.tools import ToolEnv
from kiln_common.sample import Sample

ANSWER_PATTERN = r"Answer:\s*(-?[\d,]*\.?\d+)"
_ANSWER = re.compile(ANSWER_PATTERN)
INSTRUCTIONS = ("Solve the arithmetic problem. Use the calculator tool for any computation, then reply "
                "with the final line 'Answer: <number>'.")


def parse_answer(text: str) -> float | None:
    """The number after the last 'Answer:' in a turn, or None."""
    found = _ANSWER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


@register("arithmetic")
class ArithmeticEnv(ToolEnv):
    """Reward 1 for a final 'Answer: <number>' equal to the sample's label, else 0."""

    def __init__(self, tolerance: float = 1e-6):
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        super().__init__([CALCULATOR], final_answer_pattern=ANSWER_PATTERN, instructions=INSTRUCTIONS)
        self.tolerance = tolerance

    async def reset(self, sample: Sample) -> str:
        if sample.label is None:
            raise ValueError(f"sample {sample.index} has no label (the expected answer)")
        return await super().reset(sample)

    async def score(self, final_text: str) -> float:
        answer = parse_answer(final_text)
        if answer is None:
            return 0.0
        expected = float(self.sample.label)
        return float(abs(answer - expected) <= self.tolerance * max(1.0, abs(expected)))


def arithmetic_samples(n: int, seed: int = 0) -> list[Sample]:
    """`n` deterministic two-step arithmetic problems with their answers as labels."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b, c = rng.randint(2, 999), rng.randint(2, 99), rng.randint(2, 99)
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        expression = f"({a} {op1} {b}) {op2} {c}"
        out.append(Sample(index=i, group_index=i, prompt=f"What is {expression}?",
                          label=format_number(evaluate(expression))))
    return out

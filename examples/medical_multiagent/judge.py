"""An optional LLM-judge reward for the patient, as in MrlX: information control, completeness, factual conflict.

Off by default. Turn it on with `--env-kwargs '{"patient_judge": "POLICY", "patient_judge_weight": 0.5}'`:
POLICY is one of the run's policies (the patient's own, or a third one given with `--policies judge=PATH`),
whose engines are reached through the run's router like any rollout request (so a judge policy must use
the run's tokenizer). Each (doctor question, patient answer) exchange is scored by one greedy request:

    information_control: 0-10   (answers only what was asked; does not volunteer the whole history)
    completeness: 0-10          (gives what was asked for, as far as the case holds it)
    factual_conflict: 0-10      (0 = agrees with the case, 10 = contradicts it)

`judge_reward` averages each score over the exchanges whose reply parses (`parse_judge_scores`) and gives
(information_control + completeness - factual_conflict) / 10 / 2 in [-0.5, 1]; `generate_dialogue` adds
`patient_judge_weight` times it to the rule-based patient reward and puts `judge_*` figures in the
patient's reward breakdown (`judge_unparsed`: the share of exchanges whose reply did not parse; when none
parses the judge adds nothing). The judge's own tokens are not trained: they are separate requests.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from examples.medical_multiagent.cases import Case
from examples.medical_multiagent.patient import RuleBasedPatient

SCORES = ("information_control", "completeness", "factual_conflict")
_SCORE = {name: re.compile(rf"{name.replace('_', '[ _]')}\s*[:=]\s*(\d+(?:\.\d+)?)", re.I) for name in SCORES}

JUDGE_INSTRUCTIONS = (
    "You judge a simulated patient. Given the patient's true case, the doctor's question and the patient's "
    "answer, give three scores from 0 to 10, one per line, in exactly this format:\n"
    "information_control: <0-10, 10 = answers only what was asked>\n"
    "completeness: <0-10, 10 = gives everything asked that the case holds>\n"
    "factual_conflict: <0-10, 0 = agrees with the case, 10 = contradicts it>")


@dataclass(frozen=True)
class JudgeConfig:
    """Which policy judges, how much its score weighs, how it samples."""

    policy: str
    weight: float = 0.5
    max_new_tokens: int = 48

    def __post_init__(self):
        if not isinstance(self.policy, str) or not self.policy:
            raise ValueError(f"patient_judge must name a policy, got {self.policy!r}")
        if not self.weight >= 0:
            raise ValueError(f"patient_judge_weight must be >= 0, got {self.weight!r}")

    @classmethod
    def from_env_kwargs(cls, env_kwargs: dict[str, Any]) -> "JudgeConfig | None":
        """The judge of `--env-kwargs` (`patient_judge`, `patient_judge_weight`), or None when it is off."""
        if not env_kwargs.get("patient_judge"):
            return None
        return cls(env_kwargs["patient_judge"], float(env_kwargs.get("patient_judge_weight", 0.5)))


def case_facts(case: Case) -> str:
    """The case as the judge sees it: symptoms, onset, background."""
    symptoms = "; ".join(RuleBasedPatient.finding_phrase(f) for f in case.symptoms)
    return (f"Symptoms (all, nothing else): {symptoms}. Onset: {case.onset or 'unknown'}. "
            f"Background: {'; '.join(case.history) or 'nothing of note'}.")


def judge_messages(case: Case, question: str, answer: str) -> list[dict[str, str]]:
    """The chat of one judge request."""
    return [{"role": "system", "content": JUDGE_INSTRUCTIONS},
            {"role": "user", "content": f"Case: {case_facts(case)}\nDoctor: {question}\nPatient: {answer}"}]


def parse_judge_scores(text: str) -> dict[str, float] | None:
    """The three scores of a judge reply (each clipped to [0, 10]), or None when one is missing."""
    out = {}
    for name, pattern in _SCORE.items():
        found = pattern.findall(text)
        if not found:
            return None
        out[name] = min(10.0, max(0.0, float(found[-1])))
    return out


def judge_reward(replies: Sequence[str]) -> tuple[float, dict[str, float]]:
    """(reward, breakdown) of the judge replies of one patient's exchanges; reward 0 when none parses."""
    parsed = [s for s in map(parse_judge_scores, replies) if s is not None]
    breakdown = {"judge_unparsed": 1.0 - len(parsed) / len(replies) if replies else 0.0}
    if not parsed:
        return 0.0, {**breakdown, "judge_reward": 0.0}
    means = {name: sum(s[name] for s in parsed) / len(parsed) for name in SCORES}
    reward = (means["information_control"] + means["completeness"] - means["factual_conflict"]) / 20.0
    return reward, {**breakdown, **{f"judge_{k}": v for k, v in means.items()}, "judge_reward": reward}


async def judge_patient(client: Any, tokenizer: Any, case: Case, exchanges: Sequence[tuple[str, str]],
                        config: JudgeConfig, session_id: str | None = None) -> tuple[float, dict[str, float]]:
    """Score every exchange with one greedy request to `client`; `judge_reward` of the replies."""
    async def one(question: str, answer: str) -> str:
        prompt = tokenizer.apply_chat_template(judge_messages(case, question, answer), tokenize=False,
                                               add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out = await client.generate(input_ids=ids, sampling_params={"max_new_tokens": config.max_new_tokens,
                                                                    "temperature": 0.0},
                                    return_logprob=False, session_id=session_id)
        return tokenizer.decode(out["output_ids"], skip_special_tokens=True)

    replies = await asyncio.gather(*(one(q, a) for q, a in exchanges))
    return judge_reward(replies)

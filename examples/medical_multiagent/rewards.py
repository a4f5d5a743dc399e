"""Rule-judged rewards: the doctor's (diagnosis, format, speed, tests), the patient's (faithful, discreet, on topic)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

from envs.tools import ToolCall, parse_tool_calls
from examples.medical_multiagent.cases import Case
from examples.medical_multiagent.conditions import CONDITIONS, CONDITIONS_LIST
from examples.medical_multiagent.lexicon import (NEGATION, SYMPTOM_MATCHER, SYMPTOMS, PhraseMatcher, normalize,
                                                 resolve_test, symptom_mentions, with_implied)

DIAGNOSIS_LINE = re.compile(r"^[\s*_#>-]*diagnosis[\s*_]*:[\s*_]*(.*?)[\s*_.]*$", re.I | re.M)
_TIME = re.compile(r"\b(\d+|an?|one|two|three|few|couple|hours?|days?|weeks?|months?|years?|yesterday|today|"
                   r"ago|since|last night|this morning|suddenly|gradually)\b", re.I)
_YES_NO = re.compile(r"^\W*(yes|yeah|yep|no|nope|not really|i have|i haven't|i do|i don't)\b", re.I)
_ONSET_Q = re.compile(r"\b(when did|how long|start|began|begin|since when|onset)", re.I)


@lru_cache(maxsize=1)
def _table_matcher() -> PhraseMatcher:
    return PhraseMatcher({c.name: c.names for c in CONDITIONS_LIST})


def parse_diagnosis(text: str) -> str | None:
    """The condition on the last 'Diagnosis: <condition>' line of a turn, or None."""
    found = [d for d in DIAGNOSIS_LINE.findall(text) if d.strip()]
    return found[-1].strip() if found else None


def diagnosis_matches(diagnosis: str, case: Case) -> bool:
    """True if the stated diagnosis names the case's condition (any synonym) and no other, without negation."""
    if NEGATION.search(normalize(diagnosis)):
        return False
    matcher = _table_matcher()
    if case.condition not in CONDITIONS:
        matcher = PhraseMatcher({**{c.name: c.names for c in CONDITIONS_LIST if c.name != case.condition},
                                 case.condition: case.diagnosis_names})
    named = set(matcher.keys(diagnosis))
    return named == {case.condition}


def tests_ordered(doctor_turns: Sequence[str]) -> list[str]:
    """Canonical names of the tests the doctor ordered through `order_test` tool calls (unknown names kept as given)."""
    out = []
    for turn in doctor_turns:
        for call in parse_tool_calls(turn):
            if isinstance(call, ToolCall) and call.name == "order_test" and isinstance(call.arguments.get("test"), str):
                out.append(resolve_test(call.arguments["test"]) or call.arguments["test"])
    return out


@dataclass(frozen=True)
class DoctorRewardConfig:
    """Weights of the doctor's reward."""

    correct: float = 1.0
    format: float = 0.1
    efficiency: float = 0.2  # x (1 - turns / max_turns), only for a correct diagnosis
    diagnostic_test: float = 0.1  # ordered a test specific to the true condition, only for a correct diagnosis
    free_tests: int = 3
    excess_test_penalty: float = 0.05  # per test beyond `free_tests`
    max_turns: int = 10

    def __post_init__(self):
        for name in ("correct", "format", "efficiency", "diagnostic_test", "excess_test_penalty"):
            if getattr(self, name) < 0:
                raise ValueError(f"DoctorRewardConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_turns < 1 or self.free_tests < 0:
            raise ValueError(f"need max_turns >= 1 and free_tests >= 0, got {self.max_turns}, {self.free_tests}")


def doctor_reward(case: Case, doctor_turns: Sequence[str],
                  config: DoctorRewardConfig = DoctorRewardConfig()) -> tuple[float, dict[str, float]]:
    """Reward and breakdown of a doctor's turns; the last turn must hold 'Diagnosis: <condition>'."""
    if not doctor_turns:
        raise ValueError("doctor_reward needs at least one doctor turn")
    diagnosis = parse_diagnosis(doctor_turns[-1])
    well_formed = diagnosis is not None
    correct = well_formed and diagnosis_matches(diagnosis, case)
    turns = len(doctor_turns)
    efficiency = max(0.0, 1.0 - turns / config.max_turns) if correct else 0.0
    ordered = tests_ordered(doctor_turns)
    specific = set(CONDITIONS[case.condition].tests) if case.condition in CONDITIONS else set()
    diagnostic = float(any(t in specific for t in ordered))
    excess = max(0, len(ordered) - config.free_tests)
    # The shaping terms (speed, a specific test) count only with the right diagnosis: ungated, a group in which no
    # doctor is right is ranked by them alone, and GRPO's std normalisation blows that up to full-size advantages
    # (the doctors then learn to order tests and stop asking instead of diagnosing better).
    total = (config.correct * correct + config.format * well_formed + config.efficiency * efficiency
             + config.diagnostic_test * diagnostic * correct - config.excess_test_penalty * excess)
    return total, {"correct": float(correct), "format": float(well_formed), "efficiency": efficiency,
                   "diagnostic_test": diagnostic, "tests_ordered": float(len(ordered)),
                   "excess_tests": float(excess), "turns": float(turns), "total": total}


@dataclass(frozen=True)
class PatientRewardConfig:
    """Weights of the patient's reward."""

    faithfulness: float = 1.0  # x the fraction of symptom claims that agree with the case
    answered: float = 0.5  # x the fraction of questions answered on topic
    complaint: float = 0.5  # the first answer (to the greeting) states the chief complaint
    leak_penalty: float = 1.0  # if the diagnosis (or a synonym) is ever named

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value < 0:
                raise ValueError(f"PatientRewardConfig.{name} must be >= 0, got {value}")


def _answers_question(question: str, answer: str, mentioned: set[str]) -> bool:
    asked = set(SYMPTOM_MATCHER.keys(question))
    if asked:
        return bool(_YES_NO.search(answer)) or any(asked & with_implied([k]) for k in mentioned)
    if _ONSET_Q.search(question):
        return bool(_TIME.search(answer))
    return bool(answer.strip())


def states_complaint(case: Case, answer: str) -> bool:
    """True if `answer` asserts the case's chief complaint (or a more specific kind of it); for a free-text
    complaint (MTMedDialog, DDXPlus) not in the lexicon: half or more of its content words appear."""
    chief = case.chief_complaint
    if chief.key in SYMPTOMS:
        return any(asserted and chief.key in with_implied([k]) for k, asserted in symptom_mentions(answer))
    words = {w for w in re.findall(r"[a-z]+", chief.text.lower()) if len(w) > 3}
    said = set(re.findall(r"[a-z]+", answer.lower()))
    return bool(words) and len(words & said) >= len(words) / 2


def patient_reward(case: Case, exchanges: Sequence[tuple[str, str]],
                   config: PatientRewardConfig = PatientRewardConfig()) -> tuple[float, dict[str, float]]:
    """Reward and breakdown of a patient's answers, given as (doctor question, patient answer) pairs.

    Every symptom the patient asserts must be in the case and every symptom it denies must not be;
    it must never name its diagnosis; each answer must address the symptoms (or onset) asked about; the first
    answer (to the doctor's greeting) must state the chief complaint. Without that last term a patient trained on
    the others learns to open with "Hello doctor." and say nothing: no claim is an unfaithful claim.
    """
    if not exchanges:
        raise ValueError("patient_reward needs at least one (question, answer) exchange")
    has = case.symptom_keys()
    diagnosis = PhraseMatcher({case.condition: case.diagnosis_names})
    claims = hallucinated = contradicted = leaks = answered = questions = 0
    for question, answer in exchanges:
        mentions = symptom_mentions(answer)
        claims += len(mentions)
        hallucinated += sum(1 for k, asserted in mentions if asserted and k not in has)
        contradicted += sum(1 for k, asserted in mentions if not asserted and k in has)
        leaks += bool(diagnosis.find(answer))
        if question.strip():
            questions += 1
            answered += _answers_question(question, answer, {k for k, _ in mentions})
    faithful = 1.0 - (hallucinated + contradicted) / claims if claims else 1.0
    on_topic = answered / questions if questions else 1.0
    complaint = states_complaint(case, exchanges[0][1])
    total = (config.faithfulness * faithful + config.answered * on_topic + config.complaint * complaint
             - config.leak_penalty * (leaks > 0))
    return total, {"faithfulness": faithful, "answered": on_topic, "complaint": float(complaint),
                   "leaked": float(leaks > 0),
                   "claims": float(claims), "hallucinated": float(hallucinated), "contradicted": float(contradicted),
                   "total": total}

"""The doctor's environment: a rule-based patient answers questions, `order_test` returns the case's results."""

from __future__ import annotations

from collections.abc import Callable

from envs.base import StepResult
from envs.registry import register
from envs.tools import Tool, ToolEnv, parse_tool_calls
from examples.medical_multiagent.cases import Case
from examples.medical_multiagent.lexicon import TESTS, resolve_test
from examples.medical_multiagent.patient import RuleBasedPatient
from examples.medical_multiagent.rewards import DIAGNOSIS_LINE, DoctorRewardConfig, doctor_reward
from kiln_common.sample import Sample

DOCTOR_INSTRUCTIONS = (
    "You are a doctor seeing a patient. Ask one short question per turn to find out what is wrong. You can order "
    "tests with the order_test tool. When you are confident, reply with a final line 'Diagnosis: <condition>' "
    "naming one condition.")
DOCTOR_BRIEF = (
    "You are a doctor seeing a patient. Ask one short question per turn. To order a test, write "
    '<tool_call>{"name": "order_test", "arguments": {"test": "<test>"}}</tool_call>. '
    "End with a line 'Diagnosis: <condition>'.")
NOT_AVAILABLE = "not available"


def case_sample(case: Case, index: int = 0) -> Sample:
    """A Sample whose label carries the case (JSON-able), for `DoctorEnv`."""
    return Sample(index=index, group_index=index, prompt="", label=case.to_dict(),
                  metadata={"case_id": case.case_id, "split": case.split})


def order_test_result(case: Case, test: str) -> str:
    """The case's result for a test as the doctor named it, or 'not available'."""
    name = resolve_test(test)
    if name is None or name not in case.tests:
        return f"{test}: {NOT_AVAILABLE}"
    return f"{name}: {case.tests[name]}"


def order_test_tool(case_of: Callable[[], Case]) -> Tool:
    """The `order_test` tool over the case that `case_of()` returns when it is called."""
    return Tool(
        "order_test", "Order a test or investigation for the patient and get its result.",
        {"type": "object", "properties": {"test": {
            "type": "string", "description": f"the test, e.g. one of: {', '.join(sorted(TESTS)[:12])}, ..."}},
         "required": ["test"]},
        lambda test: order_test_result(case_of(), test))


@register("medical_doctor")
class DoctorEnv(ToolEnv):
    """One consultation from the doctor's side; the reward (on 'Diagnosis: ...') is `doctor_reward`.

    `brief_prompt`: the short system prompt `DOCTOR_BRIEF` (about 50 tokens, for small models that learn the
    tool-call format by SFT) instead of the instructions and the full tool schema (about 300 tokens).
    """

    def __init__(self, case: Case | None = None, reward_config: DoctorRewardConfig = DoctorRewardConfig(),
                 brief_prompt: bool = False):
        super().__init__([order_test_tool(lambda: self.case)], instructions=DOCTOR_INSTRUCTIONS)
        self.brief_prompt = brief_prompt
        self.fixed_case = case
        self.case: Case | None = None
        self.patient: RuleBasedPatient | None = None
        self.reward_config = reward_config
        self.doctor_turns: list[str] = []

    def system_prompt(self) -> str | None:
        return DOCTOR_BRIEF if self.brief_prompt else super().system_prompt()

    async def reset(self, sample: Sample) -> str:
        await super().reset(sample)
        if self.fixed_case is not None:
            self.case = self.fixed_case
        elif isinstance(sample.label, Case):
            self.case = sample.label
        elif isinstance(sample.label, dict):
            self.case = Case.from_dict(sample.label)
        else:
            raise ValueError(f"sample {sample.index}: label must be a Case or Case.to_dict(), "
                             f"got {type(sample.label).__name__}")
        self.patient = RuleBasedPatient(self.case)
        self.doctor_turns = []
        return self.patient.opening()

    async def step(self, action_text: str) -> StepResult:
        self.doctor_turns.append(action_text)
        if DIAGNOSIS_LINE.search(action_text):
            reward, breakdown = doctor_reward(self.case, self.doctor_turns, self.reward_config)
            return StepResult("", reward, True, {"reward_breakdown": breakdown})
        if parse_tool_calls(action_text):
            return await super().step(action_text)
        return StepResult(self.patient.answer(action_text), 0.0, False, {})

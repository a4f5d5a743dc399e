"""The consultation as a two-role dialogue: an LLM doctor (with the order_test tool) and an LLM patient."""

from __future__ import annotations

from envs.multiagent import MultiAgentEnv, Opening, RoleSpec, TurnResult
from envs.registry import register
from envs.tools import ToolEnv, parse_tool_calls
from examples.medical_multiagent.cases import Case
from examples.medical_multiagent.doctor_env import DOCTOR_BRIEF, DOCTOR_INSTRUCTIONS, order_test_tool
from examples.medical_multiagent.patient import patient_system_prompt
from examples.medical_multiagent.rewards import (DIAGNOSIS_LINE, DoctorRewardConfig, PatientRewardConfig,
                                                 doctor_reward, patient_reward)
from kiln_common.sample import Sample

DOCTOR, PATIENT = "doctor", "patient"
GREETING = "Hello, I'm the doctor. What brings you in today?"


def case_of(sample: Sample) -> Case:
    """The case a sample's label carries (a Case or `Case.to_dict()`)."""
    if isinstance(sample.label, Case):
        return sample.label
    if isinstance(sample.label, dict):
        return Case.from_dict(sample.label)
    raise ValueError(
        f"sample {sample.index}: label must be a Case or Case.to_dict(), got {type(sample.label).__name__}"
    )


@register("medical_dialogue")
class MedicalDialogue(MultiAgentEnv):
    """The patient opens, the doctor asks (or orders tests, answered by the tool) until 'Diagnosis: ...'.

    Rewards: the doctor's is `doctor_reward` over its turns (tool turns included); the patient's is
    `patient_reward` over its (doctor question, patient answer) exchanges. The episode is truncated after
    `reward_config.max_turns` doctor turns without a diagnosis. `brief_prompts`: both roles get short system
    prompts (`DOCTOR_BRIEF`, `patient_brief_prompt`), for small models trained from scratch.
    """

    def __init__(self, doctor_reward_config: DoctorRewardConfig = DoctorRewardConfig(),
                 patient_reward_config: PatientRewardConfig = PatientRewardConfig(),
                 patient_max_new_tokens: int | None = None, brief_prompts: bool = False):
        if patient_max_new_tokens is not None and patient_max_new_tokens < 1:
            raise ValueError(f"patient_max_new_tokens must be >= 1 or None, got {patient_max_new_tokens}")
        self.doctor_config = doctor_reward_config
        self.patient_config = patient_reward_config
        self.patient_max_new_tokens = patient_max_new_tokens
        self.brief_prompts = brief_prompts
        self.case: Case | None = None
        self.tools = ToolEnv([order_test_tool(lambda: self.case)], instructions=DOCTOR_INSTRUCTIONS)
        self.doctor_turns: list[str] = []
        self.exchanges: list[tuple[str, str]] = []  # (what the patient was asked, what it answered)
        self._question = GREETING

    def doctor_prompt(self) -> str:
        """The doctor's system prompt."""
        return DOCTOR_BRIEF if self.brief_prompts else self.tools.system_prompt()

    async def reset(self, sample: Sample) -> Opening:
        self.case = case_of(sample)
        await self.tools.reset(sample)
        self.doctor_turns, self.exchanges, self._question = [], [], GREETING
        patient_params = {} if self.patient_max_new_tokens is None else {"max_new_tokens": self.patient_max_new_tokens}
        return Opening(roles=[
            RoleSpec(DOCTOR, [{"role": "system", "content": self.doctor_prompt()}]),
            RoleSpec(PATIENT, [{"role": "system", "content": patient_system_prompt(self.case, self.brief_prompts)},
                               {"role": "user", "content": GREETING}], patient_params),
        ], first=PATIENT)

    async def step(self, role: str, text: str) -> TurnResult:
        if role == PATIENT:
            self.exchanges.append((self._question, text))
            return TurnResult(next_role=DOCTOR, deliver={DOCTOR: text})
        self.doctor_turns.append(text)
        if DIAGNOSIS_LINE.search(text):
            return TurnResult(done=True)
        if len(self.doctor_turns) >= self.doctor_config.max_turns:
            return TurnResult(done=True, truncated=True)
        if parse_tool_calls(text):
            result = await self.tools.step(text)
            return TurnResult(next_role=DOCTOR, deliver={DOCTOR: result.observation}, info=result.info)
        self._question = text
        return TurnResult(next_role=PATIENT, deliver={PATIENT: text})

    async def score(self) -> dict[str, tuple[float, dict[str, float]]]:
        scores = {}
        if self.doctor_turns:
            scores[DOCTOR] = doctor_reward(self.case, self.doctor_turns, self.doctor_config)
        else:  # the episode ended before the doctor spoke
            scores[DOCTOR] = (0.0, {"correct": 0.0, "format": 0.0, "turns": 0.0, "total": 0.0})
        if self.exchanges:
            scores[PATIENT] = patient_reward(self.case, self.exchanges, self.patient_config)
        else:  # cut off during its opening
            scores[PATIENT] = (0.0, {"faithfulness": 0.0, "answered": 0.0, "leaked": 0.0, "total": 0.0})
        return scores

"""Generate functions of the medical example: the doctor alone with the rule-based patient, or doctor + LLM patient.

    --custom-generate-function-path examples.medical_multiagent.generate:generate_doctor     (one policy)
    --custom-generate-function-path examples.medical_multiagent.generate:generate_dialogue   (co-training)
    --custom-generate-function-path examples.medical_multiagent.generate:generate_dialogue_fixed_patient
        (doctor trained against an LLM patient that is served but not trained, `--frozen-policies patient`: only
        the doctor's Samples return)

The dialogue's roles are played by the policies named "doctor" and "patient" when the run has them
(two models), else by the run's one policy (one shared model; the role is in each system prompt).
Both take `args: rollout.generate.GenerateArgs`; `args.env_config.env_max_turns` counts the doctor's turns,
`env_max_total_tokens` bounds each role's conversation; `--env-kwargs '{"brief_prompts": true}'` gives both
roles short system prompts (for the small models of the warm start).
Rewards are set here (`rewards.py`): no --custom-rm-path is needed.
"""

from __future__ import annotations

from typing import Any

from envs.generate import EnvConfig, resolve_policy
from envs.multiagent import new_episode_id, run_dialogue
from envs.multiturn import run_episode
from examples.medical_multiagent.dialogue import DOCTOR, PATIENT, MedicalDialogue, case_of
from examples.medical_multiagent.doctor_env import DoctorEnv
from examples.medical_multiagent.judge import JudgeConfig, judge_patient
from examples.medical_multiagent.rewards import DoctorRewardConfig, PatientRewardConfig, doctor_reward
from kiln_common.sample import Sample, Status
from rollout.generate import GenerateArgs, check_args


def brief_prompts(config: EnvConfig) -> bool:
    """`env_kwargs["brief_prompts"]` (short system prompts for both roles), False when absent."""
    return bool(config.env_kwargs.get("brief_prompts", False))


def _weights(config: EnvConfig, key: str, cls: type, **fixed: Any) -> Any:
    """`cls(**env_kwargs[key], **fixed)`: reward weights from the run's config, e.g. `env_kwargs:
    {doctor_reward: {efficiency: 0.0}}` (an unknown or bad weight raises, naming it)."""
    given = config.env_kwargs.get(key) or {}
    if not isinstance(given, dict):
        raise ValueError(f"env_kwargs.{key} must be a mapping of weights, got {given!r}")
    known = set(cls.__dataclass_fields__) - set(fixed)
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"env_kwargs.{key}: unknown weight(s) {unknown}; known: {sorted(known)}")
    return cls(**given, **fixed)


def doctor_reward_config(config: EnvConfig) -> DoctorRewardConfig:
    """The doctor's reward weights: `env_kwargs["doctor_reward"]` over the defaults; max_turns from the env."""
    return _weights(config, "doctor_reward", DoctorRewardConfig, max_turns=config.env_max_turns)


def patient_reward_config(config: EnvConfig) -> PatientRewardConfig:
    """The patient's reward weights: `env_kwargs["patient_reward"]` over the defaults."""
    return _weights(config, "patient_reward", PatientRewardConfig)


async def generate_doctor(args: GenerateArgs, sample: Sample, sampling_params: dict[str, Any]) -> Sample:
    """One consultation of the doctor policy with the rule-based patient; reward and breakdown from `doctor_reward`."""
    config = check_args(args, "generate_doctor").env_config
    sample.policy = resolve_policy(args.clients, DOCTOR)
    reward_config = doctor_reward_config(config)
    env = DoctorEnv(case_of(sample), reward_config, brief_prompt=brief_prompts(config))
    episode_id = new_episode_id(sample)
    sample.metadata.update(episode_id=episode_id, role=DOCTOR)
    out = await run_episode(args.clients[sample.policy], args.tokenizer, env, sample, sampling_params,
                            max_turns=config.env_max_turns, max_total_tokens=config.env_max_total_tokens,
                            step_timeout=config.env_step_timeout, episode_timeout=config.env_episode_timeout,
                            session_id=episode_id)
    if out.status in (Status.COMPLETED, Status.TRUNCATED) and env.doctor_turns:
        out.reward, out.metadata["reward_breakdown"] = doctor_reward(env.case, env.doctor_turns, reward_config)
    return out


async def generate_dialogue(args: GenerateArgs, sample: Sample, sampling_params: dict[str, Any]) -> list[Sample]:
    """One consultation between the doctor and the LLM patient: the doctor's Sample and the patient's, rewarded."""
    config = check_args(args, "generate_dialogue").env_config
    env = MedicalDialogue(doctor_reward_config(config), patient_reward_config(config),
                          brief_prompts=brief_prompts(config))
    samples = await run_dialogue(env, sample, tokenizer=args.tokenizer, clients=args.clients, policies=None,
                                 sampling_params=sampling_params, max_turns=2 * config.env_max_turns + 1,
                                 max_total_tokens=config.env_max_total_tokens, step_timeout=config.env_step_timeout,
                                 episode_timeout=config.env_episode_timeout)
    judge = JudgeConfig.from_env_kwargs(config.env_kwargs)
    patient = next((s for s in samples if s.metadata.get("role") == PATIENT), None)
    if judge is not None and patient is not None and env.exchanges and isinstance(patient.reward, (int, float)) \
            and patient.status in (Status.COMPLETED, Status.TRUNCATED):
        if judge.policy not in args.clients:
            raise ValueError(f"patient_judge names policy {judge.policy!r}; policies: {sorted(args.clients)}")
        score, parts = await judge_patient(args.clients[judge.policy], args.tokenizer, env.case, env.exchanges, judge,
                                           session_id=f"{patient.metadata.get('episode_id')}-judge")
        patient.reward += judge.weight * score
        patient.metadata["reward_breakdown"] = {**patient.metadata.get("reward_breakdown", {}), **parts,
                                                "total": patient.reward}
    return samples


async def generate_dialogue_fixed_patient(args: GenerateArgs, sample: Sample,
                                          sampling_params: dict[str, Any]) -> list[Sample]:
    """As `generate_dialogue`, but only the doctor's Sample comes back: the patient policy plays, is never trained.

    Meant for `--policies doctor=D patient=P --frozen-policies patient` (the experiment's arm (a)): the patient is
    served from P and has no trainer. (Without --frozen-policies the patient's trainer gets no samples and is not
    updated; the driver logs that each step.) The patient's reward breakdown is kept in the doctor Sample's
    `metadata["patient_breakdown"]`.
    """
    samples = await generate_dialogue(args, sample, sampling_params)
    doctor = [s for s in samples if s.metadata.get("role") == DOCTOR]
    patient = next((s for s in samples if s.metadata.get("role") == PATIENT), None)
    if doctor and patient is not None and "reward_breakdown" in patient.metadata:
        doctor[0].metadata["patient_breakdown"] = patient.metadata["reward_breakdown"]
    return doctor or samples

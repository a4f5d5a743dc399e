"""Generate functions of the medical example: the doctor alone with the rule-based patient, or doctor + LLM patient.

    --custom-generate-function-path examples.medical_multiagent.generate:generate_doctor     (one policy)
    --custom-generate-function-path examples.medical_multiagent.generate:generate_dialogue   (co-training)

The dialogue's roles are played by the policies named "doctor" and "patient" when the run has them
(two models), else by the run's one policy (one shared model; the role is in each system prompt).
Both take `args: rollout.generate.GenerateArgs`; `args.env_config.env_max_turns` counts the doctor's turns,
`env_max_total_tokens` bounds each role's conversation.
Rewards are set here (`rewards.py`): no --custom-rm-path is needed.
"""

from __future__ import annotations

from typing import Any

from envs.generate import resolve_policy
from envs.multiagent import new_episode_id, run_dialogue
from envs.multiturn import run_episode
from examples.medical_multiagent.dialogue import DOCTOR, MedicalDialogue, case_of
from examples.medical_multiagent.doctor_env import DoctorEnv
from examples.medical_multiagent.rewards import DoctorRewardConfig, doctor_reward
from kiln_common.sample import Sample, Status
from rollout.generate import GenerateArgs, check_args


async def generate_doctor(args: GenerateArgs, sample: Sample, sampling_params: dict[str, Any]) -> Sample:
    """One consultation of the doctor policy with the rule-based patient; reward and breakdown from `doctor_reward`."""
    config = check_args(args, "generate_doctor").env_config
    sample.policy = resolve_policy(args.clients, DOCTOR)
    reward_config = DoctorRewardConfig(max_turns=config.env_max_turns)
    env = DoctorEnv(case_of(sample), reward_config)
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
    env = MedicalDialogue(DoctorRewardConfig(max_turns=config.env_max_turns))
    return await run_dialogue(env, sample, tokenizer=args.tokenizer, clients=args.clients, policies=None,
                              sampling_params=sampling_params, max_turns=2 * config.env_max_turns + 1,
                              max_total_tokens=config.env_max_total_tokens, step_timeout=config.env_step_timeout,
                              episode_timeout=config.env_episode_timeout)

"""Medical example in the RL loop: generate functions with scripted doctors/patients, data writer, evaluation."""

import json
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from envs.generate import EnvConfig
from examples.medical_multiagent.cases import Case, generate_case, generate_cases
from examples.medical_multiagent.dialogue import GREETING
from examples.medical_multiagent.doctor_env import case_sample
from examples.medical_multiagent.eval import eval_args, load_samples, patient_exchanges, report, run_cases
from examples.medical_multiagent.generate import generate_dialogue, generate_doctor
from examples.medical_multiagent.make_data import make_data
from examples.medical_multiagent.rewards import DoctorRewardConfig, doctor_reward, patient_reward
from rollout.config import DataConfig, RolloutConfig
from rollout.data import PromptDataset
from rollout.generate import GenerateArgs
from rollout.manager import RolloutManager
from kiln_common.sample import Sample, Status
from rollout.testing import FakeEngineClient
from test_multiagent import assert_token_exact

ORDER_CT = '<tool_call>{"name": "order_test", "arguments": {"test": "CT abdomen and pelvis"}}</tool_call>'
BAD_CALL = '<tool_call>{"name": "order_test", "arguments": {"test": </tool_call>'


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def appendicitis():
    for i in range(200):
        case = generate_case(i, seed=11, condition="acute appendicitis")
        if {"rlq_pain", "nausea"} <= {f.key for f in case.symptoms}:
            return case
    raise AssertionError("no appendicitis case with right lower quadrant pain and nausea")


def speaker(tok, ids):
    text = tok.decode(ids)
    return "patient" if "role-playing a patient" in text else "doctor"


def scripted(tok, turns):
    """A fake engine answering doctor and patient requests (told apart by their system prompts) from scripts."""
    queues = {role: list(t) for role, t in turns.items()}
    return FakeEngineClient(script=lambda ids: queues[speaker(tok, ids)].pop(0), tokenizer=tok,
                            eos_id=tok.eos_token_id)


def args_for(tok, clients, **env):
    first = next(iter(clients.values()))
    return GenerateArgs(client=first, tokenizer=tok, config=RolloutConfig(progress=False), clients=clients,
                        env_config=EnvConfig(**env))


@pytest.mark.parametrize("policies", [("default",), ("doctor", "patient")])
async def test_doctor_alone_with_the_rule_based_patient(tok, appendicitis, policies):
    turns = ["Do you feel sick?", ORDER_CT, "Diagnosis: acute appendicitis"]
    client = scripted(tok, {"doctor": turns})
    clients = {p: client for p in policies}
    out = await generate_doctor(args_for(tok, clients), case_sample(appendicitis, index=3), {"max_new_tokens": 64})
    assert out.status is Status.COMPLETED and out.policy == ("doctor" if len(policies) == 2 else "default")
    expected, breakdown = doctor_reward(appendicitis, turns, DoctorRewardConfig(max_turns=8))
    assert out.reward == pytest.approx(expected) and out.metadata["reward_breakdown"] == breakdown
    assert breakdown["correct"] == 1.0 and breakdown["diagnostic_test"] == 1.0
    messages = out.metadata["messages"]
    assert messages[3]["content"].startswith("Yes, I've")  # the rule-based patient's answer
    assert appendicitis.tests["ct abdomen"] in messages[5]["content"]
    assert_token_exact(tok, out, turns)
    assert {c["session_id"] for c in client.calls} == {out.metadata["episode_id"]}


async def test_doctor_and_llm_patient_co_training(tok, appendicitis):
    doctor_turns = ["Do you feel sick?", ORDER_CT, BAD_CALL, "Diagnosis: appendicitis"]
    patient_turns = ["My tummy hurts low down on the right.", "Yes, I've felt sick to my stomach."]
    clients = {"doctor": scripted(tok, {"doctor": doctor_turns}), "patient": scripted(tok, {"patient": patient_turns})}
    doctor, patient = await generate_dialogue(args_for(tok, clients), case_sample(appendicitis, index=5),
                                              {"max_new_tokens": 64})
    assert (doctor.policy, patient.policy) == ("doctor", "patient")
    assert doctor.status is patient.status is Status.COMPLETED
    assert doctor.metadata["episode_id"] == patient.metadata["episode_id"]
    assert doctor.reward == pytest.approx(doctor_reward(appendicitis, doctor_turns, DoctorRewardConfig(max_turns=8))[0])
    exchanges = [(GREETING, patient_turns[0]), (doctor_turns[0], patient_turns[1])]
    assert patient.reward == pytest.approx(patient_reward(appendicitis, exchanges)[0])
    assert patient.metadata["reward_breakdown"]["faithfulness"] == 1.0
    assert doctor.metadata["turns"] == 4 and patient.metadata["turns"] == 2
    d_msgs, p_msgs = doctor.metadata["messages"], patient.metadata["messages"]
    assert d_msgs[1] == {"role": "user", "content": patient_turns[0]}
    assert appendicitis.tests["ct abdomen"] in d_msgs[5]["content"]  # the tool answers the doctor only
    assert "not valid JSON" in d_msgs[7]["content"]  # a malformed call gets an error, the consultation goes on
    assert not any("tool_response" in m["content"] for m in p_msgs)
    assert p_msgs[1]["content"] == GREETING and p_msgs[3]["content"] == doctor_turns[0]
    assert_token_exact(tok, doctor, doctor_turns)
    assert_token_exact(tok, patient, patient_turns)


async def test_shared_policy_truncation_and_bad_labels(tok, appendicitis):
    shared = scripted(tok, {"doctor": ["Any fever?", "Any cough?"], "patient": ["My belly hurts.", "No.", "No."]})
    doctor, patient = await generate_dialogue(args_for(tok, {"default": shared}, env_max_turns=2),
                                              case_sample(appendicitis), {})
    assert doctor.policy == patient.policy == "default"
    assert doctor.status is Status.TRUNCATED and doctor.metadata["turns"] == 2 and patient.metadata["turns"] == 2
    assert doctor.metadata["reward_breakdown"]["format"] == 0.0 and doctor.reward == 0.0
    assert patient.reward == pytest.approx(patient_reward(
        appendicitis, [(GREETING, "My belly hurts."), ("Any fever?", "No.")])[0])
    bad = await generate_dialogue(args_for(tok, {"default": shared}), Sample(index=2, prompt="x", label="flu"), {})
    assert len(bad) == 1 and bad[0].status is Status.FAILED
    assert "label must be a Case or Case.to_dict(), got str" in bad[0].error
    unplayed = await generate_dialogue(args_for(tok, {"doctor": shared, "a": shared}), case_sample(appendicitis), {})
    assert all(s.status is Status.FAILED for s in unplayed)
    assert "role 'patient' has no policy: policies are ['a', 'doctor']" in unplayed[0].error
    loose = SimpleNamespace(clients={"default": shared}, tokenizer=tok, env_config=EnvConfig())
    with pytest.raises(TypeError, match=r"generate_doctor: args is a SimpleNamespace, expected .*GenerateArgs"):
        await generate_doctor(loose, case_sample(appendicitis), {})
    with pytest.raises(TypeError, match=r"generate_dialogue: args is a SimpleNamespace, expected .*GenerateArgs"):
        await generate_dialogue(loose, case_sample(appendicitis), {})


def test_data_writer_rows_load_as_prompts(tmp_path, tok):
    splits = make_data(tmp_path, n_train=12, n_test=4, seed=3)
    assert [c.case_id for c in splits["test"]] == [c.case_id for c in generate_cases(4, 3, split="test")]
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["metadata"]["split"] == "train" for r in rows)
    assert not {r["metadata"]["case_id"] for r in rows} & {c.case_id for c in splits["test"]}
    data = PromptDataset(DataConfig(prompt_data=str(tmp_path / "test.jsonl"), metadata_key="metadata"), tok)
    prompt = data.next_prompts(1)[0]
    assert Case.from_dict(prompt.label) == splits["test"][0]
    assert prompt.prompt.startswith("Hello doctor.") and prompt.metadata["case_id"] == splits["test"][0].case_id


async def test_co_training_batch_through_the_rollout_manager(tmp_path, tok):
    make_data(tmp_path, n_train=2, n_test=0)

    def play(ids):
        return "Where does it hurt?\nDiagnosis: influenza" if speaker(tok, ids) == "doctor" else "It hurts."

    clients = {name: [FakeEngineClient(script=play, tokenizer=tok, eos_id=tok.eos_token_id)]
               for name in ("doctor", "patient")}
    config = RolloutConfig(progress=False, rollout_batch_size=2, n_samples_per_prompt=2,
                           custom_generate_function_path="examples.medical_multiagent.generate:generate_dialogue")
    data = PromptDataset(DataConfig(prompt_data=str(tmp_path / "train.jsonl"), metadata_key="metadata"), tok)
    batch = await RolloutManager(config, data, clients, tok).generate(0)
    assert not batch.failed and len(batch.samples) == 8
    by_policy = batch.by_policy()
    assert len(by_policy["doctor"]) == len(by_policy["patient"]) == 4
    assert all(s.metadata["role"] == s.policy for s in batch.samples)


async def test_eval_reports_accuracy_turns_and_faithfulness(tok):
    samples = load_samples(None, n_cases=4, seed=0)
    truth = {s.prompt: Case.from_dict(s.label).condition for s in samples}
    wrong = {samples[1].prompt, samples[3].prompt}

    def doctor(ids):
        text = tok.decode(ids)
        opening = next(p for p in truth if p in text)
        if text.count("<|im_start|>assistant") == 1:
            return "Do you have a fever?"
        return "Diagnosis: " + ("tension headache" if opening in wrong else truth[opening])

    client = FakeEngineClient(script=doctor, tokenizer=tok, eos_id=tok.eos_token_id)
    args = eval_args({"doctor": client}, tok, EnvConfig(env_max_turns=4))
    result = report(await run_cases(args, samples, llm_patient=False, sampling_params={}), "rule")
    assert result.episodes == 4 and result.failed == 0
    assert result.accuracy == 0.5 and result.format_rate == 1.0 and result.avg_doctor_turns == 2.0
    assert result.patient_faithfulness == 1.0 and result.patient_leak_rate == 0.0  # the rule-based patient
    assert "diagnosis accuracy  0.500" in result.summary()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ORDER_CT},
                {"role": "user", "content": "<tool_response>x</tool_response>"},
                {"role": "assistant", "content": "Fever?"}, {"role": "user", "content": "No."}]
    assert patient_exchanges(messages) == [(GREETING, "hi"), ("Fever?", "No.")]


async def test_reward_weights_from_env_kwargs(tok, appendicitis):
    """`env_kwargs: {doctor_reward: {...}}` sets the doctor's weights (here: no speed bonus, a double format
    bonus); an unknown weight fails the sample with a message that names it."""
    turns = ["Do you feel sick?", "Diagnosis: acute appendicitis"]
    weights = {"efficiency": 0.0, "format": 0.2}
    out = await generate_doctor(args_for(tok, {"doctor": scripted(tok, {"doctor": turns})},
                                         env_max_turns=8, env_kwargs={"doctor_reward": weights}),
                                case_sample(appendicitis), {"max_new_tokens": 64})
    expected, _ = doctor_reward(appendicitis, turns, DoctorRewardConfig(max_turns=8, **weights))
    assert out.reward == pytest.approx(expected) == pytest.approx(1.0 + 0.2)
    with pytest.raises(ValueError, match=r"env_kwargs.patient_reward: unknown weight\(s\) \['faithful'\]"):
        await generate_dialogue(args_for(tok, {"doctor": scripted(tok, {"doctor": turns})},
                                         env_kwargs={"patient_reward": {"faithful": 1.0}}),
                                case_sample(appendicitis), {"max_new_tokens": 64})

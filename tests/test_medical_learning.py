"""The medical example learns: SFT warm start from scratch, a co-trained RL run in which both policies update,
token exactness of a whole co-trained episode played by the SFT models, the MTMedDialog loader, the judge reward."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from envs.generate import EnvConfig
from examples.medical_multiagent.cases import generate_case
from examples.medical_multiagent.dialogue import GREETING
from examples.medical_multiagent.doctor_env import case_sample
from examples.medical_multiagent.eval import eval_args, load_samples, report, run_cases
from examples.medical_multiagent.generate import generate_dialogue
from examples.medical_multiagent.judge import judge_reward, parse_judge_scores
from examples.medical_multiagent.make_data import make_data
from examples.medical_multiagent.mtmed import dialogue_messages, load_mtmed, to_case
from examples.medical_multiagent.rewards import DIAGNOSIS_LINE, patient_reward
from examples.medical_multiagent.warm_start import warm_start
from kiln_common.sample import Status
from rollout.client import LocalEngineClient
from rollout.testing import FakeEngineClient

FIXTURE = Path(__file__).parent / "fixtures" / "mtmed_dialogues.json"
REPO = Path(__file__).resolve().parents[1]
BRIEF = EnvConfig(env_max_turns=6, env_max_total_tokens=1024, env_kwargs={"brief_prompts": True})


# ---------------------------------------------------------------- MTMedDialog loader

def test_mtmed_loader_reads_turns_roles_labels_and_skips_bad_rows(tmp_path):
    records, skipped = load_mtmed(FIXTURE)
    assert [r.index for r in records] == [0, 4]
    assert [i for i, _ in skipped] == [1, 2, 3, 5]
    reasons = dict(skipped)
    assert "'dialogue' must be a non-empty list" in reasons[1]
    assert "'diagnosis' must be a non-empty string" in reasons[2]
    assert "expected an object, got str" in reasons[3] and "turn 0 patient_response" in reasons[5]
    first, second = records
    assert first.self_report == "I've had a bad cough and a fever for three days."
    assert [role for role, _ in first.turns] == ["doctor", "patient", "doctor", "doctor", "patient"]
    assert first.turns[3] == ("doctor", "Are you short of breath?")
    assert (first.diagnosis, first.category) == ("Community-acquired pneumonia", "respiratory")
    assert first.recommendation.startswith("Chest x-ray") and first.description.startswith("A 52-year-old smoker")
    assert [role for role, _ in second.turns] == ["doctor", "patient", "doctor", "patient", "patient"]
    assert (second.diagnosis, second.recommendation) == ("food allergy", "")
    # the reference consultation from the doctor's side: same-role turns joined, the diagnosis last
    messages = dialogue_messages(first)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == "Does it hurt when you breathe in?\nAre you short of breath?"
    assert messages[-1]["content"] == "Diagnosis: Community-acquired pneumonia"
    assert dialogue_messages(second)[-2]["content"] == "A little swelling of the lips.\nIt started an hour ago."
    # as a Case: a table diagnosis gets its synonyms, free-text findings, rewards work on it
    case = to_case(first)
    assert case.condition == "pneumonia" and "chest infection" in case.diagnosis_names
    assert {"fever", "productive_cough", "shortness_of_breath"} <= case.symptom_keys()
    allergy = to_case(second)
    assert allergy.condition == "food allergy" and allergy.diagnosis_names == ("food allergy",)
    assert patient_reward(case, [("Any fever?", "Yes, I've had a fever.")])[1]["faithfulness"] == 1.0
    assert patient_reward(case, [("Any fever?", "No fever at all.")])[1]["faithfulness"] == 0.0
    # JSON lines too, with a line that does not parse; make_data --mtmed writes the split rows
    lines = tmp_path / "mtmed.jsonl"
    rows = json.loads(FIXTURE.read_text())
    lines.write_text(json.dumps(rows[0]) + "\n{not json\n" + json.dumps(rows[4]) + "\n")
    records, skipped = load_mtmed(lines)
    assert [r.diagnosis for r in records] == ["Community-acquired pneumonia", "food allergy"]
    assert [i for i, _ in skipped] == [1] and skipped[0][1].startswith("not JSON")
    splits = make_data(tmp_path / "data", n_train=10, n_test=10, mtmed=FIXTURE)
    written = [json.loads(line) for split in ("train", "test")
               for line in (tmp_path / "data" / f"{split}.jsonl").read_text().splitlines()]
    assert sorted(r["metadata"]["case_id"] for r in written) == ["mtmed-0000000", "mtmed-0000004"]
    assert sum(len(v) for v in splits.values()) == 2
    assert next(r for r in written if r["label"]["condition"] == "pneumonia")["prompt"] == first.self_report
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mtmed(tmp_path / "missing.json")


# ---------------------------------------------------------------- judge reward

def test_judge_reply_parsing_and_aggregation():
    assert parse_judge_scores("information_control: 8\ncompleteness: 6\nfactual_conflict: 1") == {
        "information_control": 8.0, "completeness": 6.0, "factual_conflict": 1.0}
    # other spellings, values clipped to [0, 10], the last value of a repeated score counts
    assert parse_judge_scores("Information Control = 12\ncompleteness: 3.5 completeness: 4\nFACTUAL_CONFLICT: 0") == {
        "information_control": 10.0, "completeness": 4.0, "factual_conflict": 0.0}
    assert parse_judge_scores("information_control: 8\ncompleteness: 6") is None  # one missing
    replies = ["information_control: 8\ncompleteness: 6\nfactual_conflict: 2",
               "information_control: 4 completeness: 10 factual_conflict: 6", "I cannot judge this."]
    reward, parts = judge_reward(replies)
    # means over the two replies that parse: ic 6, completeness 8, conflict 4 -> (6 + 8 - 4) / 20
    assert reward == pytest.approx(0.5) and parts["judge_unparsed"] == pytest.approx(1 / 3)
    assert (parts["judge_information_control"], parts["judge_completeness"], parts["judge_factual_conflict"]) == (
        6.0, 8.0, 4.0)
    assert judge_reward(["nothing"]) == (0.0, {"judge_unparsed": 1.0, "judge_reward": 0.0})


async def test_judge_adds_to_the_patient_reward_in_a_dialogue(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    case = next(c for c in (generate_case(i, 5, "migraine") for i in range(100))
                if "nausea" in {f.key for f in c.symptoms})
    doctor_turns = ["Do you feel sick?", "Diagnosis: migraine"]
    patient_turns = ["My head is pounding on one side.", "Yes, I feel sick."]
    queues = {"doctor": list(doctor_turns), "patient": list(patient_turns)}
    judged = []

    def judge(ids):
        judged.append(tok.decode(ids))
        return "information_control: 9\ncompleteness: 7\nfactual_conflict: 0" if len(judged) == 1 else "no idea"

    clients = {name: FakeEngineClient(name, script=lambda ids, n=name: queues[n].pop(0), tokenizer=tok,
                                      eos_id=tok.eos_token_id) for name in ("doctor", "patient")}
    clients["judge"] = FakeEngineClient("judge", script=judge, tokenizer=tok, eos_id=tok.eos_token_id)
    config = EnvConfig(env_kwargs={"patient_judge": "judge", "patient_judge_weight": 0.5})
    doctor, patient = await generate_dialogue(eval_args(clients, tok, config), case_sample(case), {})
    rule, _ = patient_reward(case, [(GREETING, patient_turns[0]), (doctor_turns[0], patient_turns[1])])
    assert len(judged) == 2 and "Doctor: Do you feel sick?" in "".join(judged)  # one request per exchange
    assert patient.reward == pytest.approx(rule + 0.5 * (9 + 7 - 0) / 20)
    parts = patient.metadata["reward_breakdown"]
    assert parts["judge_unparsed"] == 0.5 and parts["total"] == pytest.approx(patient.reward)
    assert doctor.reward == doctor.metadata["reward_breakdown"]["total"]  # the doctor's is untouched
    queues.update(doctor=list(doctor_turns), patient=list(patient_turns))
    with pytest.raises(ValueError, match=r"patient_judge names policy 'nobody'; policies: \['doctor', 'judge'"):
        await generate_dialogue(eval_args(clients, tok, EnvConfig(env_kwargs={"patient_judge": "nobody"})),
                                case_sample(case), {})  # the manager fails the sample with this message


# ---------------------------------------------------------------- warm start, RL, token exactness

@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A small warm start: 300 scripted consultations, tokenizer, SFT doctor and patient (hidden 64)."""
    out = tmp_path_factory.mktemp("warm")
    torch.set_num_threads(2)
    warm_start(out, n_dialogues=300, n_train=64, n_test=24, steps=150, patient_steps=120, lr=3e-3, batch_size=8,
               patient_batch_size=8, hidden_size=64, layers=2, vocab_size=1024, seed=0)
    return out


def test_sft_doctor_writes_parsable_diagnosis_lines(warm):
    from inference_engine import Engine

    stats = json.loads((warm / "warm_start.json").read_text())
    assert 0.2 <= stats["scripted_accuracy"] <= 0.45  # the scripted doctor is right about 30% of the time
    tok = AutoTokenizer.from_pretrained(warm / "tokenizer")
    samples = load_samples(str(warm / "data" / "test.jsonl"), 24, seed=0)
    assert all(json.loads(json.dumps(s.label))["case_id"] for s in samples)
    with Engine(str(warm / "sft-doctor"), device="cpu") as engine:
        args = eval_args({"doctor": LocalEngineClient(engine)}, tok, BRIEF)
        episodes = asyncio.run(run_cases(args, samples, llm_patient=False,
                                         sampling_params={"max_new_tokens": 48, "temperature": 0.0}))
    result = report(episodes, "rule")
    assert result.failed == 0 and result.format_rate >= 0.75, result.summary()
    last_turns = [e[0].metadata["messages"][-1]["content"] for e in episodes]
    assert sum(bool(DIAGNOSIS_LINE.search(t)) for t in last_turns) >= 0.75 * len(episodes)


class Recorder:
    """An engine client that records each request's input ids and the ids it generated."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    async def generate(self, input_ids, sampling_params, return_logprob=True, session_id=None):
        out = await self.inner.generate(input_ids=input_ids, sampling_params=sampling_params,
                                        return_logprob=return_logprob, session_id=session_id)
        entries = out["meta_info"]["output_token_logprobs"]  # (log-prob, token id, text) per output token
        assert [e[1] for e in entries] == list(out["output_ids"])
        self.calls.append((list(input_ids), list(out["output_ids"]), [float(e[0]) for e in entries]))
        return out


def test_token_exactness_of_a_co_trained_episode(warm):
    """Each role's Sample holds exactly what its engine saw and generated: every generated run (loss mask 1, the
    engine's log-probs) is one engine output, the tokens before it are that request's prompt, and the rest
    (loss mask 0, log-prob 0) is the chat template's rendering of the other role's turns."""
    from inference_engine import Engine

    tok = AutoTokenizer.from_pretrained(warm / "tokenizer")
    case = generate_case(3, 0, "influenza")
    with Engine(str(warm / "sft-doctor"), device="cpu") as d, Engine(str(warm / "sft-patient"), device="cpu") as p:
        clients = {"doctor": Recorder(LocalEngineClient(d)), "patient": Recorder(LocalEngineClient(p))}
        args = eval_args(clients, tok, BRIEF)
        samples = asyncio.run(generate_dialogue(args, case_sample(case), {"max_new_tokens": 48, "temperature": 1.0,
                                                                          "seed": 7}))
    assert {s.metadata["role"] for s in samples} == {"doctor", "patient"}
    for s in samples:
        calls = clients[s.policy].calls
        assert s.status in (Status.COMPLETED, Status.TRUNCATED) and len(calls) == s.metadata["turns"] >= 1
        runs, start, pos = [], s.prompt_length, 0
        for i, m in enumerate(s.loss_mask):
            if m and (i == 0 or not s.loss_mask[i - 1]):
                pos = i
            if m and (i + 1 == len(s.loss_mask) or not s.loss_mask[i + 1]):
                runs.append((pos, i + 1))
        assert len(runs) == len(calls)
        for (a, b), (prompt, output, logprobs) in zip(runs, calls):
            assert s.tokens[:start + a] == prompt  # what the engine saw
            assert s.tokens[start + a:start + b] == output  # what it generated, all of it, nothing else
            assert s.rollout_logprobs[a:b] == pytest.approx(logprobs)
        masked = [i for i, m in enumerate(s.loss_mask) if not m]
        assert all(s.rollout_logprobs[i] == 0.0 for i in masked)
        rendered = tok.apply_chat_template(s.metadata["messages"], tokenize=False)
        text = tok.decode(s.tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert rendered.startswith(text.rstrip("\n")) and len(rendered) - len(text) <= 2  # only a closing newline
        s.validate()


def test_evaluation_engines_are_sized_for_the_evaluation(warm, monkeypatch):
    """The evaluation's engines (experiment.evaluate's doctor and patient in one process, eval.py's) get a KV pool,
    running requests and decode-graph batches sized for the consultations in flight, not the free memory's share
    that left the second engine of an H100 no room for its graphs."""
    import inference_engine
    from examples.medical_multiagent import eval as medical_eval
    from examples.medical_multiagent.experiment import evaluate

    built = []

    class Recording(inference_engine.Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append((self.config, self.context_length, self.runner.kv_pool.capacity))

    monkeypatch.setattr(inference_engine, "Engine", Recording)
    data = warm / "data" / "test.jsonl"
    result = evaluate(warm / "sft-doctor", warm / "sft-patient", data, 4, max_turns=6, max_new_tokens=48,
                      max_total_tokens=1024)
    assert result.episodes == 4 and result.failed == 0, result.summary()
    assert [c.model_path for c, _, _ in built] == [str(warm / "sft-doctor"), str(warm / "sft-patient")]
    for config, context, capacity in built:  # 32 consultations in flight of at most 1024 tokens, and one more
        assert config.max_running_requests == 32 and context == 1024
        assert config.max_total_tokens == capacity == 33 * 1024
    built.clear()
    result = medical_eval.main(["--doctor", str(warm / "sft-doctor"), "--patient", "shared", "--data", str(data),
                                "--n-cases", "2", "--concurrency", "4", "--max-total-tokens", "4096",
                                "--max-new-tokens", "48"])
    assert result.episodes == 2 and result.failed == 0, result.summary()
    (config, context, capacity), = built  # both roles on the doctor's engine; the model's 1024 positions bound it
    assert config.max_running_requests == 8 and context == 1024 and config.max_total_tokens == capacity == 9 * 1024


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _start_local_ray(ray) -> None:
    """A fresh two-CPU local Ray whose workers import the repository and the tests."""
    if ray.is_initialized():
        ray.shutdown()
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled"}
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)


def test_short_co_trained_run_updates_both_policies(warm, tmp_path):
    """Two steps of train.py's driver with the SFT doctor and patient co-trained: both losses non-zero, both
    policies' weights change (their exports differ from the SFT weights), the engines follow."""
    ray = pytest.importorskip("ray")
    from orchestrator.driver import Driver, resolve

    _start_local_ray(ray)
    driver = Driver(resolve({
        "policies": [f"doctor={warm / 'sft-doctor'}", f"patient={warm / 'sft-patient'}"],
        "prompt-data": str(warm / "data" / "train.jsonl"), "metadata-key": "metadata", "rollout-client": "ray",
        "progress": False, "custom-generate-function-path": "examples.medical_multiagent.generate:generate_dialogue",
        "rollout-batch-size": 4, "n-samples-per-prompt": 4, "rollout-max-response-len": 48, "num-rollout": 2,
        "global-batch-size": 16, "lr": 1e-3, "env-max-turns": 6, "env-max-total-tokens": 1024,
        "env-kwargs": {"brief_prompts": True}, "rollout-temperature": 1.0, "seed": 3,
        "metrics-file": str(tmp_path / "metrics.jsonl")}))
    try:
        driver.setup()
        history = driver.run()
        exported = driver.export_hf(tmp_path / "hf")
    finally:
        driver.shutdown()
        ray.shutdown()
    assert [h["step"] for h in history] == [1, 2]
    for policy in ("doctor", "patient"):
        losses = [h[f"train/{policy}/loss"] for h in history]
        assert all(math.isfinite(v) for v in losses) and any(abs(v) > 1e-6 for v in losses), (policy, losses)
        before, after = _weights(warm / f"sft-{policy}"), _weights(exported[policy])
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert len(changed) >= len(before) // 2, (policy, len(changed), len(before))
    assert history[-1]["weight_version/doctor/engine"] == history[-1]["weight_version/patient/engine"] == 2
    assert all(h["rollout/failed_samples"] == 0 for h in history)
    # the SFT doctor diagnoses in the RL rollouts too: most doctor turns counts are below the limit
    assert history[0]["rollout/doctor/turns_mean"] < 6


def test_every_gpu_experiment_arm_takes_one_gpu(warm, tmp_path):
    """scripts/medical_gpu.sh's arms, as train.py parses them: the two-policy arms share the one GPU (arm (a)'s
    patient frozen: its engine only)."""
    from examples.medical_multiagent.experiment import arm_flags
    from orchestrator.driver import parse_args
    from orchestrator.placement import plan_placement

    config = REPO / "examples" / "medical_multiagent" / "config_gpu_rl.yaml"
    for arm, policies, frozen in (("fixed", 2, ["patient"]), ("cotrain", 2, []), ("rule", 1, [])):
        cfg = parse_args(arm_flags(arm, warm, tmp_path, 0, 40, config, save_interval=5))  # as the script runs it
        run = cfg.run
        assert cfg.engine.attention_backend == "triton" and cfg.engine.max_total_tokens == 262144
        # medical_gpu.sh's fallback when the float32 triton GPU test fails: the flag wins over the config
        fallback = parse_args(arm_flags(arm, warm, tmp_path, 0, 40, config, 5, ["--attention-backend", "torch"]))
        assert fallback.engine.attention_backend == "torch"
        assert len(cfg.policies) == policies and run.colocate and run.policies_share_devices
        assert run.save == run.load == str(tmp_path / "checkpoints") and run.save_interval == 5
        assert run.frozen_policies == frozen
        plan = plan_placement(list(cfg.policies), num_trainers=run.actor_num_nodes * run.actor_num_gpus_per_node,
                              num_engines=run.num_engines, colocate=run.colocate, use_gpu=True,
                              engine_devices=cfg.engine.tp_size, share_devices=run.policies_share_devices,
                              frozen=run.frozen_policies)
        assert sum(b["GPU"] for b in plan.bundles) == 1.0, (arm, plan.bundles)
        slots = [s for p in plan.policies.values() for s in p.trainers + p.engines]
        assert len(slots) == 2 * policies - len(frozen) and sum(s.num_gpus for s in slots) <= 1.0


def test_an_arm_cut_off_resumes_from_its_checkpoint(warm, tmp_path):
    """experiment.py --save-interval: an arm (here arm (a), whose patient is frozen) that stopped after its
    checkpoint goes on from it when run again: the second run trains only the steps after the checkpoint, each step
    is in the curves once, and the doctor's export is the resumed run's."""
    ray = pytest.importorskip("ray")
    from examples.medical_multiagent.eval import curves
    from examples.medical_multiagent.experiment import DOCTOR, train_arm

    config = tmp_path / "tiny.yaml"
    config.write_text((REPO / "examples" / "medical_multiagent" / "config_cpu_rl.yaml").read_text()
                      + "rollout_batch_size: 2\nn_samples_per_prompt: 2\nglobal_batch_size: 4\n")
    _start_local_ray(ray)
    run = tmp_path / "fixed-s0"
    try:
        train_arm("fixed", warm, run, 0, 1, config, save_interval=1)  # "cut off" after step 1's checkpoint
        first = _weights(run / "hf" / DOCTOR)
        (run / "hf" / DOCTOR / "config.json").unlink()  # no export: the arm counts as not trained
        train_arm("fixed", warm, run, 0, 2, config, save_interval=1)
    finally:
        ray.shutdown()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the resumed run began after the checkpoint of step 1
    assert [s for s, _ in curves(run / "metrics.jsonl")["doctor/loss"]] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["iter_0000001", "iter_0000002"]
    second = _weights(run / "hf" / DOCTOR)
    assert any(not torch.equal(first[k], second[k]) for k in first)  # step 2 trained the doctor further


def test_curves_count_a_step_logged_twice_once(tmp_path):
    """A run resumed from a checkpoint logs the steps after it again: the curves keep the last record of each."""
    from examples.medical_multiagent.eval import curves

    rows = [{"step": 1, "train/doctor/loss": 0.5}, {"step": 2, "train/doctor/loss": 0.4},
            {"step": 2, "train/doctor/loss": 0.3}, {"step": 3, "train/doctor/loss": 0.2}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert curves(path)["doctor/loss"] == [(1, 0.5), (2, 0.3), (3, 0.2)]


def test_saved_only_builds_the_table_from_saved_evaluations_without_models(tmp_path):
    """experiment.py --saved-only (a device call's runs.tar.gz unpacked: evaluations and metrics, no models): the
    table's means, spreads and per-seed differences are those of the saved reports; an arm cut off before its
    evaluation (metrics but no eval_rule.json) and one trained from another warm start (another session's, unpacked
    into the same folder) are left out of the table and the curves."""
    from examples.medical_multiagent.experiment import main

    out = tmp_path / "run"
    (out / "warm").mkdir(parents=True)
    (out / "warm" / "warm_start.json").write_text(json.dumps({"brief_prompts": True, "doctor_sha256": "ab" * 32,
                                                              "patient_sha256": "cd" * 32, "device": "cpu"}))

    def save(folder: str, setting: str, accuracy: float) -> None:
        (out / folder).mkdir(exist_ok=True)
        report = {"accuracy": accuracy, "format_rate": 1.0, "avg_doctor_turns": 3.0, "patient_faithfulness": 1.0,
                  "patient_leak_rate": 0.0}
        (out / folder / f"eval_{setting}.json").write_text(
            json.dumps({"n_cases": 7, "report": report, "seconds": 1.0}))

    save("warm", "rule", 0.25)
    save("warm", "llm", 0.5)  # the SFT doctor with the SFT patient
    for seed, (fixed, cotrain) in enumerate([(0.75, 0.5), (1.0, 0.75)]):
        for arm, acc in (("fixed", fixed), ("cotrain", cotrain)):
            save(f"{arm}-s{seed}", "rule", acc)
            save(f"{arm}-s{seed}", "llm", acc)
            (out / f"{arm}-s{seed}" / "metrics.jsonl").write_text(
                json.dumps({"step": 1, "rollout/doctor/reward": acc}) + "\n")
    save("cotrain-s2", "rule", 0.0)  # an arm of another session's warm start, unpacked into the same folder
    other = json.loads((out / "cotrain-s2" / "eval_rule.json").read_text())
    other["warm_start"] = {"doctor_sha256": "ef" * 32}
    (out / "cotrain-s2" / "eval_rule.json").write_text(json.dumps(other))
    (out / "rule-s0").mkdir()
    (out / "rule-s0" / "metrics.jsonl").write_text(json.dumps({"step": 1, "rollout/doctor/reward": 0.1}) + "\n")
    results = main([str(out), "--seeds", "0", "1", "2", "--n-eval", "7", "--saved-only"])
    table = (out / "table.md").read_text()
    assert table.startswith("Warm start: SFT doctor sha256 " + "ab" * 8 + ", patient " + "cd" * 8 + " (cpu)")
    assert "| (a) vs fixed SFT patient | 2 | 0.875 ± 0.177 |" in table  # mean and sample sd of 0.75, 1.0
    assert "| (b) co-trained with patient | 2 | 0.625 ± 0.177 |" in table
    assert "(c) vs rule-based patient" not in table  # cut off: no evaluation
    assert "Co-trained doctor - SFT doctor (accuracy, rule-based patient): 0.375 ± 0.177 over 2 seeds" in table
    assert "per seed [-0.25, -0.25]" in table
    assert set(results["curves"]) == {"fixed-s0", "fixed-s1", "cotrain-s0", "cotrain-s1"}
    assert json.loads((out / "results.json").read_text())["evals"] == results["evals"]


def _tiny_warm_start(out: Path, seed: int, device: str = "cpu") -> dict:
    warm_start(out, n_dialogues=40, n_train=16, n_test=8, steps=12, patient_steps=8, lr=3e-3, batch_size=4,
               patient_batch_size=4, hidden_size=32, layers=1, vocab_size=512, seed=seed, device=device)
    return json.loads((out / "warm_start.json").read_text())


def test_warm_start_records_its_weights_and_repeats_them_for_a_seed(tmp_path):
    """warm_start.json carries each SFT model's sha256 (of its safetensors, as written); the same seed gives the
    same weights again (what lets the experiment's arms be trained in separate sessions from one warm start), and
    another seed other ones."""
    from examples.medical_multiagent.warm_start import weights_sha256

    torch.set_num_threads(2)
    first = _tiny_warm_start(tmp_path / "a", seed=0)
    for role in ("doctor", "patient"):
        files = sorted((tmp_path / "a" / f"sft-{role}").glob("*.safetensors"))
        assert files and first[f"{role}_sha256"] == hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
        assert weights_sha256(tmp_path / "a" / f"sft-{role}") == first[f"{role}_sha256"]
    again = _tiny_warm_start(tmp_path / "b", seed=0)
    other = _tiny_warm_start(tmp_path / "c", seed=1)
    assert (again["doctor_sha256"], again["patient_sha256"]) == (first["doctor_sha256"], first["patient_sha256"])
    assert other["doctor_sha256"] != first["doctor_sha256"] and other["patient_sha256"] != first["patient_sha256"]
    assert first["device"] == "cpu" and first["deterministic"] is True


@pytest.mark.gpu
def test_cuda_warm_start_is_deterministic(tmp_path):
    """On CUDA (bf16 autocast, eager attention, deterministic algorithms) two warm starts of one seed write the same
    weights, bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    first = _tiny_warm_start(tmp_path / "a", seed=0, device="cuda")
    again = _tiny_warm_start(tmp_path / "b", seed=0, device="cuda")
    assert (again["doctor_sha256"], again["patient_sha256"]) == (first["doctor_sha256"], first["patient_sha256"])
    assert first["deterministic"] is True and first["device"] != "cpu"

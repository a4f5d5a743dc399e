"""Evaluate a doctor (and patient) on the test split: diagnosis, questions, tests, patient faithfulness.

    python -m examples.medical_multiagent.eval --doctor MODEL_DIR                       # rule-based patient
    python -m examples.medical_multiagent.eval --doctor MODEL_DIR --patient PATIENT_DIR  # LLM patient
    python -m examples.medical_multiagent.eval --doctor http://host:30000 --patient shared \
        --data data/medical/test.jsonl

A model is a local HF folder (served in-process by `inference_engine.Engine`) or the URL of a running
engine server. `--patient shared` lets the doctor's model play the patient too (one shared policy).

Metrics (`EvalReport`): diagnosis accuracy by any accepted name (the reward's `correct`) and by the exact
table name (top-1 exact), the share of consultations ending with a parsable `Diagnosis:` line, average
doctor turns; information gathering: the share of the doctor's questions that ask about one of the case's
key symptoms (the condition's symptoms with frequency >= 0.5, not already told in the opening) and how
many distinct key symptoms a consultation asks about, the share of symptom questions whose answer is yes;
tests: how many are ordered and the share of consultations with a test specific to the condition; patient:
faithfulness (symptom claims that agree with the case), leak rate (consultations where it names its
diagnosis) and answer relevance (questions answered on topic). `curves(metrics.jsonl)` reads the
per-step series of a run for both roles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from envs.generate import EnvConfig
from envs.tools import parse_tool_calls
from examples.medical_multiagent.cases import Case, generate_cases
from examples.medical_multiagent.conditions import CONDITIONS
from examples.medical_multiagent.dialogue import DOCTOR, GREETING, PATIENT, case_of
from examples.medical_multiagent.generate import generate_dialogue, generate_doctor
from examples.medical_multiagent.make_data import case_row
from examples.medical_multiagent.lexicon import SYMPTOM_MATCHER, with_implied
from examples.medical_multiagent.rewards import DIAGNOSIS_LINE, parse_diagnosis, patient_reward
from kiln_common.sample import Sample, Status
from rollout.client import EngineClient, HttpEngineClient, LocalEngineClient
from rollout.config import RolloutConfig
from rollout.generate import GenerateArgs

RULE_BASED = "rule"
SHARED = "shared"


@dataclass
class EvalReport:
    """Test-split figures of a doctor (and patient)."""

    episodes: int
    failed: int
    accuracy: float  # correct diagnoses / episodes (a failed episode counts as wrong)
    format_rate: float  # episodes ending with a parsable 'Diagnosis: ...' line
    avg_doctor_turns: float
    patient_faithfulness: float  # share of the patient's symptom claims that agree with the case
    patient_leak_rate: float  # episodes where the patient named its diagnosis
    patient: str
    accuracy_exact: float = 0.0  # the diagnosis is the condition's table name exactly (top-1, exact name)
    key_question_rate: float = 0.0  # doctor questions asking about a key symptom of the case / questions
    key_symptoms_asked: float = 0.0  # distinct key symptoms asked about per consultation
    positive_rate: float = 0.0  # symptom questions about a symptom the case has / symptom questions
    tests_ordered: float = 0.0  # per consultation
    specific_test_rate: float = 0.0  # consultations with a test specific to the condition
    patient_answered: float = 0.0  # questions the patient answered on topic (answer relevance)
    patient_complaint: float = 0.0  # episodes whose patient opening states the chief complaint

    def summary(self) -> str:
        """The lines eval prints."""
        return "\n".join([
            f"episodes            {self.episodes} ({self.failed} failed), patient: {self.patient}",
            f"diagnosis accuracy  {self.accuracy:.3f}",
            f"  exact name        {self.accuracy_exact:.3f}",
            f"diagnosis format    {self.format_rate:.3f}",
            f"avg doctor turns    {self.avg_doctor_turns:.2f}",
            f"key-symptom qs      {self.key_question_rate:.3f} ({self.key_symptoms_asked:.2f} per consultation)",
            f"yes to symptom qs   {self.positive_rate:.3f}",
            f"tests ordered       {self.tests_ordered:.2f} (specific {self.specific_test_rate:.3f})",
            f"patient faithful    {self.patient_faithfulness:.3f}",
            f"patient leak rate   {self.patient_leak_rate:.3f}",
            f"patient relevance   {self.patient_answered:.3f}",
            f"patient complaint   {self.patient_complaint:.3f}",
        ])

    def row(self) -> dict[str, float]:
        """The figures as a flat dict (for tables)."""
        return {k: v for k, v in asdict(self).items() if isinstance(v, (int, float))}


def eval_args(clients: dict[str, EngineClient], tokenizer: Any, env_config: EnvConfig) -> GenerateArgs:
    """The medical generate functions' `args` outside a run: the policies' clients, tokenizer and episode limits."""
    return GenerateArgs(client=next(iter(clients.values())), tokenizer=tokenizer, config=RolloutConfig(),
                        clients=dict(clients), env_config=env_config)


def patient_exchanges(doctor_messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    """(question, answer) pairs of the patient as the doctor saw them; tool turns and their results skipped."""
    exchanges: list[tuple[str, str]] = []
    question = GREETING
    for message in doctor_messages:
        if message["role"] == "assistant":
            question = None if parse_tool_calls(message["content"]) else message["content"]
        elif message["role"] == "user" and question is not None:
            exchanges.append((question, message["content"]))
    return exchanges


async def run_cases(args: GenerateArgs, samples: list[Sample], *, llm_patient: bool, sampling_params: dict[str, Any],
                    concurrency: int = 8) -> list[list[Sample]]:
    """Each case's episode: [doctor sample] with the rule-based patient, [doctor, patient] with the LLM one."""
    sem = asyncio.Semaphore(concurrency)

    async def one(sample: Sample) -> list[Sample]:
        async with sem:
            if llm_patient:
                return await generate_dialogue(args, sample, dict(sampling_params))
            return [await generate_doctor(args, sample, dict(sampling_params))]

    return await asyncio.gather(*(one(s) for s in samples))


def key_symptoms(case: Case) -> set[str]:
    """The symptoms a doctor should ask about: the condition's frequent ones (>= 0.5), or for a condition not
    in the table the case's own; the chief complaint (told in the opening) excluded."""
    if case.condition in CONDITIONS:
        keys = {k for k, f in CONDITIONS[case.condition].symptoms.items() if f >= 0.5}
    else:
        keys = case.symptom_keys()
    return keys - with_implied([case.chief_complaint.key])


def doctor_questions(doctor_messages: list[dict[str, str]]) -> list[str]:
    """The doctor's turns that are neither tool calls nor a diagnosis."""
    return [m["content"] for m in doctor_messages if m["role"] == "assistant"
            and not parse_tool_calls(m["content"]) and not DIAGNOSIS_LINE.search(m["content"])]


def question_stats(case: Case, questions: list[str]) -> tuple[int, int, set[str], int, int]:
    """(questions, key questions, key symptoms asked, symptom questions, those about a symptom the case has)."""
    key, has = key_symptoms(case), case.symptom_keys()
    n_key = n_symptom = n_yes = 0
    asked_keys: set[str] = set()
    for q in questions:
        asked = with_implied(SYMPTOM_MATCHER.keys(q))
        n_key += bool(asked & key)
        asked_keys |= asked & key
        if asked:
            n_symptom += 1
            n_yes += bool(asked & has)
    return len(questions), n_key, asked_keys, n_symptom, n_yes


def exact_match(doctor_messages: list[dict[str, str]], case: Case) -> bool:
    """The last turn's diagnosis is the condition's table name (case and spacing aside)."""
    last = next((m["content"] for m in reversed(doctor_messages) if m["role"] == "assistant"), "")
    said = parse_diagnosis(last)
    return said is not None and " ".join(said.lower().split()) == case.condition.lower()


def report(episodes: list[list[Sample]], patient: str) -> EvalReport:
    """Accuracy, format, turns, questions, tests and patient faithfulness over episodes from `run_cases`."""
    ok = [e for e in episodes if all(s.status in (Status.COMPLETED, Status.TRUNCATED) for s in e)]
    doctor = [next(s for s in e if s.metadata.get("role") == DOCTOR) for e in ok]
    breakdowns = [s.metadata.get("reward_breakdown", {}) for s in doctor]
    stats = [question_stats(case_of(d), doctor_questions(d.metadata["messages"])) for d in doctor]
    questions, key_qs = sum(s[0] for s in stats), sum(s[1] for s in stats)
    symptom_qs, yes_qs = sum(s[3] for s in stats), sum(s[4] for s in stats)
    patient_parts = []
    for e, d in zip(ok, doctor):
        llm = next((s for s in e if s.metadata.get("role") == PATIENT), None)
        if llm is not None:
            patient_parts.append(llm.metadata["reward_breakdown"])
        else:
            exchanges = patient_exchanges(d.metadata["messages"])
            patient_parts.append(patient_reward(case_of(d), exchanges)[1] if exchanges else {})
    n, k = max(len(episodes), 1), max(len(ok), 1)
    return EvalReport(
        episodes=len(episodes), failed=len(episodes) - len(ok),
        accuracy=sum(b.get("correct", 0.0) for b in breakdowns) / n,
        format_rate=sum(b.get("format", 0.0) for b in breakdowns) / n,
        avg_doctor_turns=sum(s.metadata.get("turns", 0) for s in doctor) / k,
        patient_faithfulness=sum(p.get("faithfulness", 0.0) for p in patient_parts) / k,
        patient_leak_rate=sum(p.get("leaked", 0.0) for p in patient_parts) / k,
        patient=patient,
        accuracy_exact=sum(exact_match(d.metadata["messages"], case_of(d)) for d in doctor) / n,
        key_question_rate=key_qs / max(questions, 1),
        key_symptoms_asked=sum(len(s[2]) for s in stats) / k,
        positive_rate=yes_qs / max(symptom_qs, 1),
        tests_ordered=sum(b.get("tests_ordered", 0.0) for b in breakdowns) / k,
        specific_test_rate=sum(b.get("diagnostic_test", 0.0) for b in breakdowns) / k,
        patient_answered=sum(p.get("answered", 0.0) for p in patient_parts) / k,
        patient_complaint=sum(p.get("complaint", 0.0) for p in patient_parts) / k)


def curves(metrics_file: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Per-step series of a run's metrics.jsonl for both roles: reward, loss, turns, response length.

    Keys are named by role (`doctor/reward`, `patient/loss`, ...) whether the run had two policies
    (`rollout/doctor/reward_mean`, `train/doctor/loss`) or one (`rollout/reward_mean`, `train/loss`). A step logged
    twice (a run resumed from a checkpoint logs the steps after it again) counts once, as logged last.
    """
    wanted = {"reward": "rollout/{r}/reward_mean", "loss": "train/{r}/loss", "turns": "rollout/{r}/turns_mean",
              "response_len": "rollout/{r}/response_len_mean"}
    single = {"reward": "rollout/reward_mean", "loss": "train/loss"}
    by_step: dict[str, dict[int, float]] = {}
    for line in Path(metrics_file).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for role in (DOCTOR, PATIENT):
            for name, pattern in wanted.items():
                key = pattern.format(r=role)
                if key not in row and role == DOCTOR and name in single:  # a one-policy run: the doctor's
                    key = single[name]
                if key in row and isinstance(row[key], (int, float)):
                    by_step.setdefault(f"{role}/{name}", {})[int(row["step"])] = float(row[key])
    return {name: sorted(series.items()) for name, series in by_step.items()}


def load_samples(data: str | None, n_cases: int, seed: int) -> list[Sample]:
    """Test cases as Samples: from a jsonl written by make_data, else the synthetic test split."""
    if data is None:
        rows = [case_row(c) for c in generate_cases(n_cases, seed, split="test")]
    else:
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"--data {data!r} is not a file "
                                    "(write one with examples.medical_multiagent.make_data)")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:n_cases]
    return [Sample(index=i, group_index=i, prompt=r["prompt"], label=Case.from_dict(r["label"]).to_dict(),
                   metadata=dict(r.get("metadata") or {})) for i, r in enumerate(rows)]


def engine_options(model_dir: str | Path, conversations: int, max_total_tokens: int) -> dict[str, int]:
    """`Engine` options of an in-process evaluation engine that serves at most `conversations` conversations at once
    (one request in flight each: the roles take turns), each at most `max_total_tokens` tokens: that many running
    requests (so decode graphs up to that batch size), a context of that budget (the model's, if shorter) and a KV
    pool of one context more than they need at once (the admission's reserve page per request, some radix cache).

    Left unset, an engine's pool takes a share of the GPU memory still free (mem_fraction_static), and the second
    engine of a process (the patient's) finds almost none left for its decode graphs."""
    positions = json.loads(Path(model_dir, "config.json").read_text())["max_position_embeddings"]
    context = min(max_total_tokens, positions)
    return {"max_running_requests": conversations, "context_length": context,
            "max_total_tokens": (conversations + 1) * context}


def _client(target: str, device: str, stack: contextlib.ExitStack, conversations: int,
            max_total_tokens: int) -> tuple[EngineClient, str]:
    """(client, tokenizer folder) of a model folder (in-process engine sized by `engine_options`) or an engine server
    URL (its api key, if it has one, from $KILN_API_KEY)."""
    if target.startswith(("http://", "https://")):
        return HttpEngineClient(target, api_key=os.environ.get("KILN_API_KEY") or None), ""
    if not (Path(target) / "config.json").is_file():
        raise ValueError(f"{target!r} is neither an engine URL nor a local HF model folder (no config.json)")
    from inference_engine import Engine
    engine = stack.enter_context(Engine(target, device=device,
                                        **engine_options(target, conversations, max_total_tokens)))
    return LocalEngineClient(engine, name=Path(target).name), target


def main(argv: Sequence[str] | None = None) -> EvalReport:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--doctor", required=True, help="doctor model: local HF folder or engine URL")
    parser.add_argument("--patient", default=RULE_BASED,
                        help="'rule' (rule-based patient), 'shared' (the doctor's model), a HF folder or a URL")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the doctor's model folder)")
    parser.add_argument("--data", default=None, help="test.jsonl from make_data (default: synthetic test split)")
    parser.add_argument("--n-cases", type=int, default=100, help="how many test cases")
    parser.add_argument("--seed", type=int, default=0, help="synthetic case generator seed")
    parser.add_argument("--max-turns", type=int, default=8, help="most doctor turns per consultation")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per turn")
    parser.add_argument("--max-total-tokens", type=int, default=4096, help="most tokens per conversation")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--device", default="cpu", help="device of in-process engines (cpu, cuda)")
    parser.add_argument("--concurrency", type=int, default=16, help="consultations in flight")
    ns = parser.parse_args(argv)
    if ns.n_cases < 1:
        parser.error(f"--n-cases must be >= 1, got {ns.n_cases}")
    from transformers import AutoTokenizer

    samples = load_samples(ns.data, ns.n_cases, ns.seed)
    with contextlib.ExitStack() as stack:
        roles = 2 if ns.patient == SHARED else 1  # conversations per consultation on the doctor's engine
        doctor, doctor_dir = _client(ns.doctor, ns.device, stack, roles * ns.concurrency, ns.max_total_tokens)
        clients = {DOCTOR: doctor}
        if ns.patient not in (RULE_BASED, SHARED):
            clients[PATIENT] = _client(ns.patient, ns.device, stack, ns.concurrency, ns.max_total_tokens)[0]
        tokenizer_dir = ns.tokenizer or doctor_dir
        if not tokenizer_dir:
            parser.error("--tokenizer is needed when --doctor is a URL")
        args = eval_args(clients, AutoTokenizer.from_pretrained(tokenizer_dir),
                         EnvConfig(env_max_turns=ns.max_turns, env_max_total_tokens=ns.max_total_tokens))
        params = {"max_new_tokens": ns.max_new_tokens, "temperature": ns.temperature}
        episodes = asyncio.run(run_cases(args, samples, llm_patient=ns.patient != RULE_BASED, sampling_params=params,
                                         concurrency=ns.concurrency))
    result = report(episodes, ns.patient)
    print(result.summary())
    return result


if __name__ == "__main__":
    main()

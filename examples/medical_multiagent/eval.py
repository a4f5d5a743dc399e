"""Evaluate a doctor on the test split: diagnosis accuracy, average doctor turns and patient faithfulness.

    python -m examples.medical_multiagent.eval --doctor MODEL_DIR                       # rule-based patient
    python -m examples.medical_multiagent.eval --doctor MODEL_DIR --patient PATIENT_DIR  # LLM patient
    python -m examples.medical_multiagent.eval --doctor http://host:30000 --patient shared \
        --data data/medical/test.jsonl

A model is a local HF folder (served in-process by `inference_engine.Engine`) or the URL of a running
engine server. `--patient shared` lets the doctor's model play the patient too (one shared policy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envs.generate import EnvConfig
from envs.tools import parse_tool_calls
from examples.medical_multiagent.cases import Case, generate_cases
from examples.medical_multiagent.dialogue import DOCTOR, GREETING, PATIENT, case_of
from examples.medical_multiagent.generate import generate_dialogue, generate_doctor
from examples.medical_multiagent.make_data import case_row
from examples.medical_multiagent.rewards import patient_reward
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

    def summary(self) -> str:
        """The lines eval prints."""
        return "\n".join([
            f"episodes            {self.episodes} ({self.failed} failed), patient: {self.patient}",
            f"diagnosis accuracy  {self.accuracy:.3f}",
            f"diagnosis format    {self.format_rate:.3f}",
            f"avg doctor turns    {self.avg_doctor_turns:.2f}",
            f"patient faithful    {self.patient_faithfulness:.3f}",
            f"patient leak rate   {self.patient_leak_rate:.3f}",
        ])


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


def report(episodes: list[list[Sample]], patient: str) -> EvalReport:
    """Accuracy, format, turns and patient faithfulness over episodes from `run_cases`."""
    ok = [e for e in episodes if all(s.status in (Status.COMPLETED, Status.TRUNCATED) for s in e)]
    doctor = [next(s for s in e if s.metadata.get("role") == DOCTOR) for e in ok]
    breakdowns = [s.metadata.get("reward_breakdown", {}) for s in doctor]
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
        patient=patient)


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


def _client(target: str, device: str, stack: contextlib.ExitStack) -> tuple[EngineClient, str]:
    """(client, tokenizer folder) of a model folder (in-process engine) or an engine server URL (its api key, if it
    has one, from $KILN_API_KEY)."""
    if target.startswith(("http://", "https://")):
        return HttpEngineClient(target, api_key=os.environ.get("KILN_API_KEY") or None), ""
    if not (Path(target) / "config.json").is_file():
        raise ValueError(f"{target!r} is neither an engine URL nor a local HF model folder (no config.json)")
    from inference_engine import Engine
    engine = stack.enter_context(Engine(target, device=device))
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
        doctor, doctor_dir = _client(ns.doctor, ns.device, stack)
        clients = {DOCTOR: doctor}
        if ns.patient not in (RULE_BASED, SHARED):
            clients[PATIENT] = _client(ns.patient, ns.device, stack)[0]
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

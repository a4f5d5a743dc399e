"""Warm start of the medical example: a shared medical tokenizer and SFT doctor and patient models, from scratch.

    python -m examples.medical_multiagent.warm_start runs/medical/warm    # 1500 consultations, 400 + 300 SFT steps

1. Cases of a subset of conditions (`CPU_CONDITIONS`, 14 conditions in three look-alike clusters on CPU;
   `--conditions all` for the full table), the fixed hash split (`cases.split_of`): train and test rows
   are written to `OUT/data/{train,test}.jsonl` (`make_data.case_row`).
2. Scripted consultations on train cases: a noisy scripted doctor (`scripted_doctor`) asks one to three
   questions about symptoms of the case's differential (the condition and its look-alikes), sometimes
   orders a test, and ends with `Diagnosis: <condition>` -- the right one only `P_CORRECT` of the time,
   otherwise the condition's first look-alike (`P_LOOKALIKE`) or another one. The rule-based patient
   answers. Its strategy is weak on purpose: RL has something to improve.
3. A byte-level BPE tokenizer trained on those conversations (both roles' views), shared by both models.
4. Each consultation is replayed through the real episode code (`generate.generate_dialogue` with scripted
   engine clients), so each role's SFT example is exactly the token stream and loss mask an RL rollout
   of that role produces; two tiny Qwen3 models (doctor, patient) are trained on them from scratch by
   a plain PyTorch/HF loop (loss on each role's own turns only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from envs.generate import EnvConfig
from envs.tools import tool_response
from examples.medical_multiagent.cases import Case, iter_cases
from examples.medical_multiagent.conditions import CONDITIONS
from examples.medical_multiagent.dialogue import DOCTOR, PATIENT
from examples.medical_multiagent.doctor_env import case_sample, order_test_result
from examples.medical_multiagent.lexicon import SYMPTOMS
from examples.medical_multiagent.make_data import write_rows
from examples.medical_multiagent.patient import RuleBasedPatient
from kiln_common.sample import Sample, Status

CPU_CONDITIONS = (
    "pneumonia", "influenza", "covid-19", "common cold", "acute bronchitis",
    "migraine", "tension headache", "subarachnoid hemorrhage", "bacterial meningitis",
    "acute appendicitis", "gastroenteritis", "kidney stone", "pyelonephritis", "urinary tract infection")
P_CORRECT, P_LOOKALIKE = 0.3, 0.5  # the rest: another look-alike
P_TEST = 0.35  # consultations in which the scripted doctor orders one test
MAX_QUESTIONS = 3
ENV_MAX_TURNS = 6  # doctor turns; the scripted doctor uses at most MAX_QUESTIONS + 2
CONTEXT = 1024


def resolve_conditions(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'cpu' -> CPU_CONDITIONS, 'all' -> the whole table, else comma-separated names (checked)."""
    if isinstance(spec, str):
        if spec == "cpu":
            return CPU_CONDITIONS
        if spec == "all":
            return tuple(CONDITIONS)
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in spec if s not in CONDITIONS]
    if unknown or not spec:
        raise ValueError(f"unknown conditions {unknown}; known: {sorted(CONDITIONS)}")
    return tuple(spec)


OPENINGS = ("typical", "shared")
SHARED_FREQUENCY = 0.3  # a symptom is "shared" by the conditions that have it at least this often


def symptom_shares(conditions: Sequence[str]) -> Counter:
    """How many of `conditions` have each symptom at least SHARED_FREQUENCY of the time."""
    return Counter(k for name in conditions for k, f in CONDITIONS[name].symptoms.items() if f >= SHARED_FREQUENCY)


def shared_opening(case: Case, share: Counter) -> Case:
    """The case with its chief complaint re-chosen among its own symptoms: the one the most conditions share
    (`share`: `symptom_shares` of the conditions in play; ties: the one the condition has most often).

    The generator opens with the condition's most frequent symptom, which with age and sex names the condition
    83% of the time among the 14 CPU conditions (a doctor does best by not asking anything); a shared complaint
    (fever, nausea, fatigue, ...) leaves about half of the cases to the questions.
    """
    own = CONDITIONS[case.condition].symptoms if case.condition in CONDITIONS else {}
    chief = max(case.symptoms, key=lambda f: (share[f.key], own.get(f.key, 0.0)))
    return dataclasses.replace(case, chief_complaint=chief)


def subset_cases(n: int, split: str, conditions: Sequence[str], seed: int = 0, opening: str = "typical") -> list[Case]:
    """The first `n` synthetic cases of generator `seed` in `split` whose condition is in `conditions`
    (`opening`: "typical", the generator's chief complaint, or "shared", `shared_opening`)."""
    if opening not in OPENINGS:
        raise ValueError(f"opening={opening!r}; valid: {', '.join(OPENINGS)}")
    wanted, share, out = set(conditions), symptom_shares(conditions), []
    for case in iter_cases(seed, split):
        if len(out) >= n:
            break
        if case.condition in wanted:
            out.append(shared_opening(case, share) if opening == "shared" else case)
    return out


def differential(condition: str, conditions: Sequence[str]) -> list[str]:
    """The condition and its look-alikes that are in `conditions` (the table's order)."""
    return [condition, *(d for d in CONDITIONS[condition].distractors if d in conditions)]


def scripted_doctor(case: Case, rng: random.Random, conditions: Sequence[str]) -> tuple[list[str], list[str]]:
    """One noisy scripted consultation with the rule-based patient: (doctor turns, patient turns).

    The patient's turns are its opening and its answers to the doctor's questions (not to tool calls).
    """
    patient = RuleBasedPatient(case)
    patient_turns = [patient.opening()]
    ddx = differential(case.condition, conditions)
    told = {case.chief_complaint.key}
    pool: dict[str, float] = {}
    for name in ddx:
        for key, freq in CONDITIONS[name].symptoms.items():
            if key not in told and key in SYMPTOMS:
                pool[key] = max(pool.get(key, 0.0), freq)
    doctor_turns = []
    keys = list(pool)
    for _ in range(rng.randint(1, MAX_QUESTIONS)):
        if not keys:
            break
        key = rng.choices(keys, weights=[pool[k] for k in keys])[0]
        keys.remove(key)
        question = f"Have you {SYMPTOMS[key].lay}?"
        doctor_turns.append(question)
        patient_turns.append(patient.answer(question))
    if rng.random() < P_TEST:
        target = CONDITIONS[rng.choice(ddx)]
        test = rng.choice(sorted(target.tests))
        doctor_turns.append('<tool_call>\n{"name": "order_test", "arguments": {"test": "%s"}}\n</tool_call>' % test)
    lookalikes = ddx[1:]
    roll = rng.random()
    if roll < P_CORRECT or not lookalikes:
        said = case.condition
    elif roll < P_CORRECT + P_LOOKALIKE or len(lookalikes) == 1:
        said = lookalikes[0]
    else:
        said = rng.choice(lookalikes[1:])
    doctor_turns.append(f"Diagnosis: {said}")
    return doctor_turns, patient_turns


def _render(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def corpus_texts(case: Case, doctor_turns: list[str], patient_turns: list[str], brief: bool = True) -> list[str]:
    """Both roles' views of a consultation as chat text (for training the tokenizer)."""
    from examples.medical_multiagent.dialogue import GREETING, MedicalDialogue
    from examples.medical_multiagent.patient import patient_system_prompt

    doctor = [{"role": "system", "content": MedicalDialogue(brief_prompts=brief).doctor_prompt()},
              {"role": "user", "content": patient_turns[0]}]
    patient = [{"role": "system", "content": patient_system_prompt(case, brief)}, {"role": "user", "content": GREETING},
               {"role": "assistant", "content": patient_turns[0]}]
    answers = iter(patient_turns[1:])
    for turn in doctor_turns:
        doctor.append({"role": "assistant", "content": turn})
        if turn.startswith("<tool_call>"):
            test = json.loads(turn[len("<tool_call>"):-len("</tool_call>")])["arguments"]["test"]
            doctor.append({"role": "user", "content": tool_response(order_test_result(case, test))})
        elif not turn.startswith("Diagnosis:"):
            answer = next(answers)
            doctor.append({"role": "user", "content": answer})
            patient += [{"role": "user", "content": turn}, {"role": "assistant", "content": answer}]
    return [_render(doctor), _render(patient)]


def train_tokenizer(texts: Sequence[str], out_dir: str | Path, vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on `texts`, with the test tokenizer's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from inference_engine.testing import CHAT_TEMPLATE, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<tool_call>", "</tool_call>"])
    fast.chat_template = CHAT_TEMPLATE
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


async def replay(tokenizer, case: Case, doctor_turns: list[str], patient_turns: list[str],
                 index: int = 0, brief: bool = True) -> list[Sample]:
    """The consultation played through `generate_dialogue` by scripted engines: [doctor Sample, patient Sample]."""
    from examples.medical_multiagent.eval import eval_args
    from examples.medical_multiagent.generate import generate_dialogue
    from rollout.testing import FakeEngineClient

    queues = {DOCTOR: list(doctor_turns), PATIENT: list(patient_turns)}
    clients = {role: FakeEngineClient(role, script=lambda ids, q=queues[role]: q.pop(0), tokenizer=tokenizer,
                                      eos_id=tokenizer.eos_token_id) for role in (DOCTOR, PATIENT)}
    args = eval_args(clients, tokenizer, EnvConfig(env_max_turns=ENV_MAX_TURNS, env_max_total_tokens=CONTEXT,
                                                   env_kwargs={"brief_prompts": brief}))
    samples = await generate_dialogue(args, case_sample(case, index), {"max_new_tokens": 256})
    if any(s.status is not Status.COMPLETED for s in samples):
        raise RuntimeError(f"scripted replay of {case.case_id} did not complete: {[s.error for s in samples]}")
    return samples


def sft_examples(samples: Sequence[Sample]) -> list[tuple[list[int], list[int]]]:
    """(token ids, labels with -100 where no loss) of rollout Samples: the loss is on loss-mask-1 tokens only."""
    out = []
    for s in samples:
        start = s.prompt_length
        labels = [-100] * start + [t if m else -100 for t, m in zip(s.tokens[start:], s.loss_mask)]
        out.append((list(s.tokens), labels))
    return out


@contextlib.contextmanager
def deterministic_cuda(enabled: bool = True):
    """Deterministic CUDA training inside: torch's deterministic algorithms (sort-based instead of atomic
    accumulation where torch has one; a warning names any op that has none) and a fixed cuBLAS workspace. The
    workspace size is read when cuBLAS first runs in the process: set here before the first CUDA matmul (warm_start
    is the first CUDA work of experiment.py), else the environment must already carry it."""
    if not enabled:
        yield
        return
    set_here = "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
        if set_here:  # not inherited by the processes started later (Ray's workers, the engines)
            del os.environ["CUBLAS_WORKSPACE_CONFIG"]


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 of a model folder's safetensors files (in name order): equal exactly when the weights are."""
    digest = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()


def sft(model_dir: str | Path, examples: list[tuple[list[int], list[int]]], *, steps: int, lr: float,
        batch_size: int, seed: int, log_every: int = 100, name: str = "sft", device: str = "cpu",
        deterministic: bool = True) -> list[float]:
    """Train the HF model in `model_dir` in place on the examples (AdamW, cosine to lr/10); the losses per step.

    The examples are padded once into tensors on the device and every step's batch (drawn up front) is gathered from
    them, cut to its longest sequence; the losses are read back once per log_every steps, so a GPU runs the steps
    without waiting on the host. On CUDA the forward runs under bf16 autocast; on CPU in float32 as it always did
    (the same batches and arithmetic as the per-step padding this replaced: the same losses to the last digit).
    deterministic (CUDA): eager attention (no fused attention backward) and `deterministic_cuda`, so that a warm start
    repeated on another machine of the same GPU model and software gives the same weights, and the experiment's arms
    can be trained in separate sessions from one warm start (`warm_start.json` records the weights' sha256)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    k = min(batch_size, len(examples))
    picks = [rng.sample(range(len(examples)), k) for _ in range(steps)]  # the rows rng.sample(examples, k) drew
    lengths = [len(ids) for ids, _ in examples]
    pad = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    all_ids = torch.full((len(examples), max(lengths)), pad, dtype=torch.long)  # [N, L]
    all_labels = torch.full_like(all_ids, -100)  # [N, L]
    for i, (seq, lab) in enumerate(examples):
        all_ids[i, :len(seq)] = torch.tensor(seq)
        all_labels[i, :len(lab)] = torch.tensor(lab)
    all_mask = (torch.arange(all_ids.shape[1]) < torch.tensor(lengths)[:, None]).long()  # [N, L]
    all_ids, all_labels, all_mask = all_ids.to(device), all_labels.to(device), all_mask.to(device)
    rows = torch.tensor(picks, dtype=torch.long).reshape(steps, k).to(device)  # [steps, B]
    cuda = torch.device(device).type == "cuda"
    attention = {"attn_implementation": "eager"} if deterministic and cuda else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **attention).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / max(steps, 1))).item()))
    model.train()
    losses, pending = [], []
    with deterministic_cuda(deterministic and cuda):
        for step in range(steps):
            batch, width = rows[step], max(lengths[i] for i in picks[step])
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=all_ids[batch, :width], attention_mask=all_mask[batch, :width],
                             labels=all_labels[batch, :width]).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            pending.append(loss.detach())
            if (step + 1) % log_every == 0 or step + 1 == steps:
                losses += torch.stack(pending).tolist()  # one device sync per log line
                pending.clear()
                print(f"{name} step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.4f}",
                      flush=True)
    model.cpu().save_pretrained(model_dir, safe_serialization=True)
    return losses


def warm_start(out_dir: str | Path, *, conditions: str | Sequence[str] = "cpu", n_dialogues: int = 1500,
               n_train: int = 2000, n_test: int = 200, steps: int = 400, patient_steps: int | None = 300,
               lr: float = 3e-3, batch_size: int = 16, patient_batch_size: int | None = 8, hidden_size: int = 128,
               layers: int = 2,
               vocab_size: int = 2048, seed: int = 0, case_seed: int = 0, brief: bool = True,
               opening: str = "typical", device: str = "cpu", deterministic: bool = True) -> dict[str, Path]:
    """Write data, tokenizer and the SFT doctor and patient under `out_dir`; their paths by name."""
    from inference_engine.testing import make_tiny_model

    out = Path(out_dir)
    conds = resolve_conditions(conditions)
    start = time.perf_counter()
    train_cases = subset_cases(max(n_train, n_dialogues), "train", conds, case_seed, opening)
    test_cases = subset_cases(n_test, "test", conds, case_seed, opening)
    write_rows(out / "data" / "train.jsonl", train_cases[:n_train])
    write_rows(out / "data" / "test.jsonl", test_cases)
    rng = random.Random(f"kiln-medical-scripted:{seed}")
    scripts = [(case, *scripted_doctor(case, rng, conds)) for case in train_cases[:n_dialogues]]
    texts = [t for case, d, p in scripts for t in corpus_texts(case, d, p, brief)]
    tokenizer = train_tokenizer(texts, out / "tokenizer", vocab_size)

    async def replay_all() -> list[list[Sample]]:
        return [await replay(tokenizer, case, d, p, i, brief) for i, (case, d, p) in enumerate(scripts)]

    episodes = asyncio.run(replay_all())
    by_role = {role: [s for e in episodes for s in e if s.metadata["role"] == role] for role in (DOCTOR, PATIENT)}
    lengths = {role: max(len(s.tokens) for s in samples) for role, samples in by_role.items()}
    print(f"{len(scripts)} scripted consultations in {time.perf_counter() - start:.1f}s; vocab {len(tokenizer)}; "
          f"longest doctor {lengths[DOCTOR]} tokens, patient {lengths[PATIENT]}", flush=True)
    paths = {"tokenizer": out / "tokenizer", "train": out / "data" / "train.jsonl", "test": out / "data" / "test.jsonl"}
    stats = {"conditions": list(conds), "brief_prompts": brief, "opening": opening, "n_dialogues": len(scripts),
             "vocab": len(tokenizer),
             "max_tokens": lengths,
             "scripted_accuracy": sum(d[-1] == f"Diagnosis: {c.condition}" for c, d, _ in scripts) / len(scripts)}
    for k, role in enumerate((DOCTOR, PATIENT)):
        model_dir = make_tiny_model(out / f"sft-{role}", "qwen3", seed=seed + k, tokenizer_dir=out / "tokenizer",
                                    hidden_size=hidden_size, num_layers=layers, intermediate_size=4 * hidden_size,
                                    init_std=0.02, max_position_embeddings=CONTEXT)
        role_steps = steps if role == DOCTOR or patient_steps is None else patient_steps
        role_batch = batch_size if role == DOCTOR or patient_batch_size is None else patient_batch_size
        losses = sft(model_dir, sft_examples(by_role[role]), steps=role_steps, lr=lr, batch_size=role_batch,
                     seed=seed + k, name=f"sft {role}", device=device, deterministic=deterministic)
        stats[f"{role}_final_loss"] = sum(losses[-20:]) / max(len(losses[-20:]), 1)
        stats[f"{role}_sha256"] = weights_sha256(model_dir)
        paths[role] = model_dir
    stats["device"] = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    stats["deterministic"] = deterministic
    stats["seconds"] = time.perf_counter() - start
    (out / "warm_start.json").write_text(json.dumps(stats, indent=1))
    print(f"warm start done in {stats['seconds']:.0f}s: {json.dumps(stats)}", flush=True)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder for data/, tokenizer/, sft-doctor/, sft-patient/")
    parser.add_argument("--conditions", default="cpu", help="'cpu' (14 conditions), 'all', or comma-separated names")
    parser.add_argument("--n-dialogues", type=int, default=1500, help="scripted consultations for SFT")
    parser.add_argument("--n-train", type=int, default=2000, help="train cases written to data/train.jsonl")
    parser.add_argument("--n-test", type=int, default=200, help="held-out cases written to data/test.jsonl")
    parser.add_argument("--steps", type=int, default=400, help="SFT steps of the doctor")
    parser.add_argument("--patient-steps", type=int, default=300, help="SFT steps of the patient")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per SFT step of the doctor")
    parser.add_argument("--patient-batch-size", type=int, default=8, help="sequences per SFT step of the patient")
    parser.add_argument("--hidden-size", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scripted doctor, model init and SFT order")
    parser.add_argument("--device", default="cpu", help="device of the SFT (cpu, cuda)")
    parser.add_argument("--opening", default="typical", choices=OPENINGS,
                        help="the patient's chief complaint: 'typical' (the condition's most frequent symptom) or "
                             "'shared' (the case's symptom most conditions share: the questions matter)")
    parser.add_argument("--full-prompts", action="store_true",
                        help="the full system prompts (tool schema, patient rules) instead of the brief ones; "
                             "RL and eval then need env_kwargs brief_prompts false")
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                        help="CUDA SFT with deterministic algorithms and eager attention: the same weights on another "
                             "machine of the same GPU model and software (default on; CPU is deterministic anyway)")
    ns = parser.parse_args(argv)
    for name in ("n_dialogues", "steps", "batch_size", "hidden_size", "layers"):
        if getattr(ns, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        resolve_conditions(ns.conditions)
    except ValueError as e:
        parser.error(str(e))
    warm_start(ns.out_dir, conditions=ns.conditions, n_dialogues=ns.n_dialogues, n_train=ns.n_train,
               n_test=ns.n_test, steps=ns.steps, patient_steps=ns.patient_steps, lr=ns.lr, batch_size=ns.batch_size,
               patient_batch_size=ns.patient_batch_size,
               hidden_size=ns.hidden_size, layers=ns.layers, vocab_size=ns.vocab_size, seed=ns.seed,
               brief=not ns.full_prompts, opening=ns.opening, device=ns.device, deterministic=ns.deterministic)


if __name__ == "__main__":
    main()

"""MTMedDialog (DoctorAgent-RL) consultations: multi-turn doctor-patient dialogues with a final diagnosis.

The format is that of DoctorAgent-RL's evaluation set `data/MTMedDialog_test.json` (arXiv 2505.19630,
github.com/JarvisUSTC/DoctorAgent-RL, as its inference scripts read it): a JSON array of records, or JSON
lines with one record each:

    {
      "self_report": "I've had a cough for two weeks ...",       # the patient's opening (required)
      "dialogue": [                                               # the reference consultation (required)
        {"doctor_question": "Do you have a fever?",               #   a string or a list of strings
         "patient_response": "No fever."},                        #   a string or a list of strings
        ...],
      "diagnosis": "acute bronchitis",                            # the reference diagnosis (required)
      "recommendation": "rest, fluids ...",                       # optional
      "enhanced_description": "a fuller account of the patient",  # optional (the patient simulator's script)
      "category": "respiratory"                                   # optional
    }

`load_mtmed(path)` returns the good records and the bad ones as (index, reason); a bad record is skipped,
never fatal. `to_case` makes a `Case` of a record (free-text findings: the self-report is the chief
complaint, each patient response a finding, the enhanced description the background; no examination
or test results), so the doctor env, the LLM patient and the rewards work on it unchanged (a diagnosis
that names a table condition gets its synonyms); `make_data --mtmed FILE` writes such cases as prompt
rows, split by the hash of their id. `dialogue_messages` is the reference consultation as the doctor's
chat (for SFT).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from examples.medical_multiagent.cases import Case, Finding, condition_for

logger = logging.getLogger(__name__)

DOCTOR, PATIENT = "doctor", "patient"


@dataclass(frozen=True)
class MTMedDialogue:
    """One record: the opening, the turns as (role, text) in order, the labels."""

    index: int
    self_report: str
    turns: tuple[tuple[str, str], ...]
    diagnosis: str
    recommendation: str = ""
    description: str = ""
    category: str = ""


def _texts(value: Any, field: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise ValueError(f"{field} must be a non-empty string or list of non-empty strings, got {value!r:.60}")
    return [v.strip() for v in items]


def parse_record(index: int, row: Any) -> MTMedDialogue:
    """A record as `MTMedDialogue`; ValueError naming what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    for key in ("self_report", "diagnosis"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"{key!r} must be a non-empty string")
    dialogue = row.get("dialogue")
    if not isinstance(dialogue, list) or not dialogue:
        raise ValueError("'dialogue' must be a non-empty list of turns")
    turns: list[tuple[str, str]] = []
    for k, turn in enumerate(dialogue):
        if not isinstance(turn, dict):
            raise ValueError(f"dialogue turn {k} is not an object")
        turns += [(DOCTOR, q) for q in _texts(turn.get("doctor_question"), f"dialogue turn {k} doctor_question")]
        turns += [(PATIENT, r) for r in _texts(turn.get("patient_response"), f"dialogue turn {k} patient_response")]
    optional = {key: row.get(key) or "" for key in ("recommendation", "enhanced_description", "category")}
    bad = [key for key, value in optional.items() if not isinstance(value, str)]
    if bad:
        raise ValueError(f"{bad} must be strings")
    return MTMedDialogue(index, row["self_report"].strip(), tuple(turns), row["diagnosis"].strip(),
                         optional["recommendation"].strip(), optional["enhanced_description"].strip(),
                         optional["category"].strip())


def load_mtmed(path: str | Path, limit: int | None = None) -> tuple[list[MTMedDialogue], list[tuple[int, str]]]:
    """(good records, [(index, reason)] of the skipped ones) of a JSON array or JSON-lines file.

    A file that is not there or not JSON at all raises; a bad record (or a JSON line that does not parse) is
    skipped with its index and reason, logged as a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MTMedDialog file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    rows: list[tuple[int, Any]] = []
    skipped: list[tuple[int, str]] = []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not a JSON array: {e}") from None
        rows = list(enumerate(data))
    else:
        for i, line in enumerate(line for line in text.splitlines() if line.strip()):
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                skipped.append((i, f"not JSON: {e.msg}"))
    records = []
    for i, row in rows:
        if limit is not None and len(records) >= limit:
            break
        try:
            records.append(parse_record(i, row))
        except ValueError as e:
            skipped.append((i, str(e)))
    skipped.sort()
    for i, why in skipped:
        logger.warning("%s: record %d skipped: %s", path, i, why)
    return records, skipped


def to_case(record: MTMedDialogue, prefix: str = "mtmed") -> Case:
    """The record as a Case: the self-report is the chief complaint, each patient response a finding."""
    ours = condition_for(record.diagnosis)
    names = tuple(dict.fromkeys([record.diagnosis, *(ours.names if ours else ())]))
    chief = Finding("self_report", record.self_report)
    findings = [chief] + [Finding(f"response_{k}", text) for k, (role, text) in enumerate(record.turns)
                          if role == PATIENT]
    history = (record.description,) if record.description else ()
    return Case(f"{prefix}-{record.index:07d}", ours.name if ours else record.diagnosis, names, 0, "unknown", chief,
                tuple(findings), "", history, (), {}, (), source="mtmed")


def dialogue_messages(record: MTMedDialogue) -> list[dict[str, str]]:
    """The reference consultation from the doctor's side: user = patient, assistant = doctor, ending with
    'Diagnosis: <diagnosis>' (consecutive turns of one role are joined by a newline)."""
    messages = [{"role": "user", "content": record.self_report}]
    for role, text in record.turns:
        chat_role = "assistant" if role == DOCTOR else "user"
        if messages[-1]["role"] == chat_role:
            messages[-1] = {"role": chat_role, "content": messages[-1]["content"] + "\n" + text}
        else:
            messages.append({"role": chat_role, "content": text})
    final = f"Diagnosis: {record.diagnosis}"
    if messages[-1]["role"] == "assistant":
        messages[-1] = {"role": "assistant", "content": messages[-1]["content"] + "\n" + final}
    else:
        messages.append({"role": "assistant", "content": final})
    return messages

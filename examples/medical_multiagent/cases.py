"""Patient cases: the condition table, a seeded synthetic case generator, a fixed train/test split, DDXPlus loading."""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import random
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from examples.medical_multiagent.conditions import CONDITIONS, CONDITIONS_LIST, Condition
from examples.medical_multiagent.lexicon import SYMPTOM_MATCHER, SYMPTOMS, TESTS, normalize, with_implied

__all__ = ["CONDITIONS", "Case", "Finding", "condition_for", "generate_case", "generate_cases", "iter_cases",
           "load_ddxplus", "split_of"]

TEST_FRACTION = 0.1
_FEMALE_ONLY = ("period", "menopaus", "contraceptive pill", "iud", "pregnan")


@dataclass(frozen=True)
class Finding:
    """Something the patient has and can tell: a symptom key (or DDXPlus evidence code) and its wording."""

    key: str
    text: str


@dataclass(frozen=True)
class Case:
    """One patient: who they are, what they have, what examination and tests would show, the true diagnosis."""

    case_id: str
    condition: str
    diagnosis_names: tuple[str, ...]  # every accepted name of the true diagnosis
    age: int
    sex: str  # "female" | "male"
    chief_complaint: Finding
    symptoms: tuple[Finding, ...]  # includes the chief complaint
    onset: str
    history: tuple[str, ...]
    exam: tuple[str, ...]
    tests: dict[str, str] = field(default_factory=dict)  # canonical test name -> result; absent = not available
    distractors: tuple[str, ...] = ()
    source: str = "synthetic"

    @property
    def split(self) -> str:
        return split_of(self.case_id)

    def symptom_keys(self) -> set[str]:
        """Lexicon symptoms the patient has (with the broader ones they imply), from keys and wording."""
        keys = {f.key for f in self.symptoms if f.key in SYMPTOMS}
        for f in self.symptoms:
            keys.update(SYMPTOM_MATCHER.keys(f.text))
        return with_implied(keys)

    def to_dict(self) -> dict:
        return {"case_id": self.case_id, "condition": self.condition, "diagnosis_names": list(self.diagnosis_names),
                "age": self.age, "sex": self.sex, "chief_complaint": self.chief_complaint.key,
                "symptoms": [[f.key, f.text] for f in self.symptoms], "onset": self.onset,
                "history": list(self.history), "exam": list(self.exam), "tests": dict(self.tests),
                "distractors": list(self.distractors), "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        """Rebuild a Case from `to_dict()` (as stored in a Sample's label)."""
        findings = tuple(Finding(k, t) for k, t in d["symptoms"])
        chief = next((f for f in findings if f.key == d["chief_complaint"]), findings[0])
        return cls(d["case_id"], d["condition"], tuple(d["diagnosis_names"]), int(d["age"]), d["sex"], chief,
                   findings, d["onset"], tuple(d["history"]), tuple(d["exam"]), dict(d["tests"]),
                   tuple(d["distractors"]), d.get("source", "synthetic"))


def split_of(case_id: str, test_fraction: float = TEST_FRACTION) -> str:
    """'test' for a fixed `test_fraction` of case ids (by a hash of the id), else 'train'."""
    if not 0 <= test_fraction <= 1:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    bucket = int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "big") / 2**64
    return "test" if bucket < test_fraction else "train"


def _duration(hours: int) -> str:
    if hours < 24:
        return f"{hours} hour{'s' * (hours != 1)}"
    if hours < 14 * 24:
        days = round(hours / 24)
        return f"{days} day{'s' * (days != 1)}"
    if hours < 9 * 7 * 24:
        return f"{round(hours / (7 * 24))} weeks"
    return f"{round(hours / (30 * 24))} months"


def _sample_by_frequency(rng: random.Random, items: list[tuple[str, float]], at_least: int) -> list[str]:
    chosen = [name for name, freq in items if rng.random() < freq]
    for name, _ in sorted(items, key=lambda x: -x[1]):
        if len(chosen) >= at_least:
            break
        if name not in chosen:
            chosen.append(name)
    return chosen


def generate_case(index: int, seed: int = 0, condition: str | None = None) -> Case:
    """The synthetic case number `index` of generator `seed` (independent of how many are generated)."""
    rng = random.Random(f"kiln-medical:{seed}:{index}")
    if condition is not None and condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; known: {sorted(CONDITIONS)}")
    cond: Condition = CONDITIONS[condition] if condition else rng.choice(CONDITIONS_LIST)
    sex = "female" if rng.random() < cond.female else "male"
    age = rng.randint(*cond.age)
    keys = _sample_by_frequency(rng, list(cond.symptoms.items()), at_least=min(2, len(cond.symptoms)))
    keys.sort(key=lambda k: -cond.symptoms[k])
    symptoms = tuple(Finding(k, SYMPTOMS[k].lay) for k in keys)
    history_items = [(h, f) for h, f in cond.history
                     if sex == "female" or not any(w in h.lower() for w in _FEMALE_ONLY)]
    history = tuple(_sample_by_frequency(rng, history_items, at_least=0))
    exam = tuple(_sample_by_frequency(rng, list(cond.exam), at_least=1))
    tests = {name: t.normal for name, t in TESTS.items()}
    if sex == "male" or not 12 <= age <= 55:
        tests.pop("pregnancy test")
    if sex == "male":
        tests.pop("pelvic ultrasound")
    for name, result in cond.tests.items():
        tests[name] = rng.choice(result) if isinstance(result, tuple) else result
    onset = f"It began {cond.onset}, about {_duration(rng.randint(*cond.onset_hours))} ago."
    return Case(f"syn-{seed}-{index:06d}", cond.name, cond.names, age, sex, symptoms[0], symptoms, onset, history,
                exam, tests, cond.distractors)


def iter_cases(seed: int = 0, split: str | None = None) -> Iterator[Case]:
    """Synthetic cases of generator `seed` in index order, optionally only those of one split."""
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    index = 0
    while True:
        case = generate_case(index, seed)
        index += 1
        if split is None or case.split == split:
            yield case


def generate_cases(n: int, seed: int = 0, split: str | None = None) -> list[Case]:
    """The first `n` synthetic cases of generator `seed` (of one split if given)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    it = iter_cases(seed, split)
    return [next(it) for _ in range(n)]


def condition_for(name: str) -> Condition | None:
    """The table's condition with this name or synonym (case-insensitive), or None."""
    norm = normalize(name)
    for cond in CONDITIONS_LIST:
        if norm in (normalize(n) for n in cond.names):
            return cond
    return None

# ------------------------------------------------------------------------------------------------ DDXPlus


def _read_csv_text(folder: Path, split: str) -> str:
    csv_path = folder / f"release_{split}_patients.csv"
    if csv_path.exists():
        return csv_path.read_text(encoding="utf-8")
    zip_path = folder / f"release_{split}_patients.zip"
    if zip_path.exists():
        with zipfile.ZipFile(zip_path) as zf:
            member = next((n for n in zf.namelist() if n.endswith(".csv")), None)
            if member is None:
                raise ValueError(f"{zip_path} holds no .csv file")
            return zf.read(member).decode("utf-8")
    raise FileNotFoundError(f"no release_{split}_patients.csv (or .zip) in {folder}; DDXPlus splits are "
                            "'train', 'validate' and 'test'")


def _evidence_text(code: str, values: list[str], evidences: dict) -> str:
    info = evidences.get(code)
    if info is None:
        raise ValueError(f"evidence {code!r} is not in release_evidences.json")
    question = info.get("question_en") or info.get("question") or code
    meanings = info.get("value_meaning") or {}
    shown = [(meanings.get(v, {}) or {}).get("en", v) if isinstance(meanings.get(v), dict) else str(v)
             for v in values]
    return f"{question} {', '.join(shown)}".strip() if shown else question


def _parse_evidences(raw: str, row_no: int) -> list[tuple[str, list[str]]]:
    try:
        items = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ValueError(f"row {row_no}: EVIDENCES is not a list literal: {raw[:80]!r}") from None
    grouped: dict[str, list[str]] = {}
    for item in items:
        code, _, value = str(item).partition("_@_")
        grouped.setdefault(code, [])
        if value:
            grouped[code].append(value)
    return list(grouped.items())


def load_ddxplus(folder: str | Path, split: str = "test", limit: int | None = None) -> list[Case]:
    """DDXPlus patients (release_<split>_patients.csv + release_evidences.json + release_conditions.json) as Cases.

    Non-antecedent evidences become symptoms (worded by their English question and value), antecedents
    history; DDXPlus has no examination or test results, so every test is "not available".
    """
    folder = Path(folder)
    try:
        evidences = json.loads((folder / "release_evidences.json").read_text(encoding="utf-8"))
        conditions = json.loads((folder / "release_conditions.json").read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"DDXPlus folder {folder} lacks {Path(e.filename).name}") from None
    reader = csv.DictReader(io.StringIO(_read_csv_text(folder, split)))
    required = {"PATHOLOGY", "EVIDENCES", "INITIAL_EVIDENCE", "AGE", "SEX"}
    missing = required - set(reader.fieldnames or [])
    if missing:
        raise ValueError(f"release_{split}_patients.csv lacks columns {sorted(missing)}")
    cases = []
    for row_no, row in enumerate(reader):
        if limit is not None and len(cases) >= limit:
            break
        pathology = row["PATHOLOGY"]
        info = conditions.get(pathology) or next(
            (c for c in conditions.values() if pathology in (c.get("cond-name-eng"), c.get("condition_name"))), {})
        names = [pathology, info.get("cond-name-eng"), info.get("condition_name")]
        ours = next((c for c in map(condition_for, filter(None, names)) if c is not None), None)
        all_names = tuple(dict.fromkeys(n for n in [*names, *(ours.names if ours else ())] if n))
        symptoms, history = [], []
        for code, values in _parse_evidences(row["EVIDENCES"], row_no):
            text = _evidence_text(code, values, evidences)
            (history if evidences[code].get("is_antecedent") else symptoms).append(Finding(code, text))
        initial = row["INITIAL_EVIDENCE"]
        chief = next((f for f in symptoms if f.key == initial), None) or Finding(
            initial, _evidence_text(initial, [], evidences))
        if chief not in symptoms:
            symptoms.insert(0, chief)
        distractors: tuple[str, ...] = ()
        if row.get("DIFFERENTIAL_DIAGNOSIS"):
            ddx = ast.literal_eval(row["DIFFERENTIAL_DIAGNOSIS"])
            distractors = tuple(str(d[0]) for d in ddx if str(d[0]) != pathology)[:3]
        sex = {"M": "male", "F": "female"}.get(row["SEX"].strip().upper())
        if sex is None:
            raise ValueError(f"row {row_no}: SEX must be 'M' or 'F', got {row['SEX']!r}")
        cases.append(Case(f"ddxplus-{split}-{row_no:07d}", ours.name if ours else all_names[0], all_names,
                          int(row["AGE"]), sex, chief, tuple(symptoms), "", tuple(f.text for f in history), (),
                          {}, distractors, source="ddxplus"))
    return cases

"""Write the medical example's prompt data: train.jsonl and test.jsonl of cases (synthetic, or DDXPlus).

    python -m examples.medical_multiagent.make_data data/medical --n-train 2000 --n-test 200
    python -m examples.medical_multiagent.make_data data/ddxplus --ddxplus /path/to/ddxplus --n-train 5000 --n-test 500
    python -m examples.medical_multiagent.make_data data/mtmed --mtmed MTMedDialog_test.json --n-train 5000 --n-test 500

Each row: {"prompt": the patient's opening line, "label": the case (`Case.to_dict()`), "metadata": {case_id,
condition, split, source}}; read it with --input-key prompt --label-key label --metadata-key metadata.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from examples.medical_multiagent.cases import Case, generate_cases, load_ddxplus
from examples.medical_multiagent.patient import RuleBasedPatient


def case_row(case: Case) -> dict:
    """The prompt-data row of one case."""
    return {"prompt": RuleBasedPatient(case).opening(), "label": case.to_dict(),
            "metadata": {"case_id": case.case_id, "condition": case.condition, "split": case.split,
                         "source": case.source}}


def write_rows(path: str | Path, cases: Iterable[Case]) -> int:
    """Write the cases' rows as JSON lines to `path`; the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for case in cases:
            f.write(json.dumps(case_row(case), ensure_ascii=False) + "\n")
            n += 1
    return n


def make_data(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0,
              ddxplus: str | Path | None = None, mtmed: str | Path | None = None) -> dict[str, list[Case]]:
    """Write train.jsonl and test.jsonl under `out_dir` (synthetic cases of generator `seed`, DDXPlus, or an
    MTMedDialog file split by the hash of each case id; its bad records are skipped and logged)."""
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train}, {n_test}")
    if ddxplus is not None and mtmed is not None:
        raise ValueError("give ddxplus or mtmed, not both")
    if mtmed is not None:
        from examples.medical_multiagent.mtmed import load_mtmed, to_case

        cases = [to_case(r) for r in load_mtmed(mtmed)[0]]
        splits = {"train": [c for c in cases if c.split == "train"][:n_train],
                  "test": [c for c in cases if c.split == "test"][:n_test]}
    elif ddxplus is not None:
        splits = {"train": load_ddxplus(ddxplus, "train", limit=n_train),
                  "test": load_ddxplus(ddxplus, "test", limit=n_test)}
    else:
        splits = {"train": generate_cases(n_train, seed, split="train"),
                  "test": generate_cases(n_test, seed, split="test")}
    for split, cases in splits.items():
        write_rows(Path(out_dir) / f"{split}.jsonl", cases)
    return splits


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder for train.jsonl and test.jsonl")
    parser.add_argument("--n-train", type=int, default=2000, help="training cases")
    parser.add_argument("--n-test", type=int, default=200, help="test cases (a disjoint, fixed split)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic case generator seed")
    parser.add_argument("--ddxplus", default=None, help="DDXPlus folder (release_*_patients.csv/.zip + json files)")
    parser.add_argument("--mtmed", default=None, help="MTMedDialog / DoctorAgent-RL file (JSON array or JSON lines)")
    ns = parser.parse_args(argv)
    if ns.ddxplus and ns.mtmed:
        parser.error("give --ddxplus or --mtmed, not both")
    splits = make_data(ns.out_dir, ns.n_train, ns.n_test, ns.seed, ns.ddxplus, ns.mtmed)
    for split, cases in splits.items():
        conditions = Counter(c.condition for c in cases)
        print(f"{split}: {len(cases)} cases, {len(conditions)} conditions -> {Path(ns.out_dir) / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()

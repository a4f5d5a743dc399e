"""Write the quickstart arithmetic task as JSON lines: train.jsonl, test.jsonl (prompt, label) and sft.jsonl (messages).

Problems are "What is a + b?" (and optionally "a - b" with a >= b) for operands 0..max_operand;
the answer is the bare number, which the model should follow with its EOS token. Train
and test hold disjoint operand pairs; `--num-problems N` keeps a seeded random N of them (for operands in the
hundreds, where all pairs would be a million rows). Run: python -m examples.quickstart.make_data [OUT_DIR] (default
runs/quickstart/data, under the git-ignored runs/).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}
DEFAULT_OUT = "runs/quickstart/data"   # relative to the repository root, where the quickstart runs


def make_problems(max_operand: int = 9, ops: tuple[str, ...] = ("+",)) -> list[dict[str, str]]:
    """Every problem of the task: {"prompt": "What is a op b?", "label": "answer"}."""
    if max_operand < 1:
        raise ValueError(f"max_operand = {max_operand}: expected >= 1")
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        raise ValueError(f"ops {list(ops)}: expected a non-empty subset of {list(OPS)}")
    problems = []
    for op in ops:
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                if op == "-" and a < b:
                    continue  # answers stay non-negative
                problems.append({"prompt": f"What is {a} {op} {b}?", "label": str(OPS[op](a, b))})
    return problems


def write_dataset(out_dir: str | Path, *, max_operand: int = 9, ops: tuple[str, ...] = ("+",),
                  test_fraction: float = 0.2, train_repeat: int = 1, seed: int = 0,
                  num_problems: int | None = None) -> dict[str, Path]:
    """Split the problems into train/test (disjoint), write them and an SFT set; the paths by split name.

    `num_problems`: keep only that many (the first of the seeded shuffle); None keeps every problem."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction = {test_fraction}: expected a value in (0, 1)")
    if train_repeat < 1:
        raise ValueError(f"train_repeat = {train_repeat}: expected >= 1")
    problems = make_problems(max_operand, ops)
    if num_problems is not None and not 2 <= num_problems <= len(problems):
        raise ValueError(f"num_problems = {num_problems}: expected 2..{len(problems)} (the task has {len(problems)})")
    random.Random(seed).shuffle(problems)
    if num_problems is not None:
        problems = problems[:num_problems]
    n_test = max(1, round(len(problems) * test_fraction))
    test, train = problems[:n_test], problems[n_test:]
    sft = [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["label"]}]}
           for p in train]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in (("train", train * train_repeat), ("test", test), ("sft", sft)):
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def main() -> None:
    """Command line: write the dataset and print where."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=DEFAULT_OUT, help=f"folder to write (default {DEFAULT_OUT})")
    parser.add_argument("--max-operand", type=int, default=9, help="largest operand (default 9: single digits)")
    parser.add_argument("--ops", nargs="+", default=["+"], choices=sorted(OPS), help="operations (default +)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of problems held out")
    parser.add_argument("--train-repeat", type=int, default=1, help="copies of the train problems per epoch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    parser.add_argument("--num-problems", type=int, default=None,
                        help="keep a seeded random N of the problems, then split (default: all of them)")
    a = parser.parse_args()
    try:
        paths = write_dataset(a.out_dir, max_operand=a.max_operand, ops=tuple(a.ops), test_fraction=a.test_fraction,
                              train_repeat=a.train_repeat, seed=a.seed, num_problems=a.num_problems)
    except ValueError as e:
        parser.error(str(e))
    for name, path in paths.items():
        print(f"{name}: {path} ({sum(1 for _ in path.open())} rows)")


if __name__ == "__main__":
    main()

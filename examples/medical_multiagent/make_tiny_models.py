"""Write two tiny random models (doctor, patient) with one tokenizer, for the CPU run of the medical example.

    python -m examples.medical_multiagent.make_tiny_models models   # -> models/tiny-doctor, models/tiny-patient

They are random (they will not learn medicine in minutes); they exercise the whole loop. Their context is
4096 tokens because the doctor's system prompt (with the order_test tool) alone is ~700 tiny-BPE tokens.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from inference_engine.testing import make_tiny_model, make_tokenizer

CONTEXT = 4096


def make_tiny_models(out_dir: str | Path, family: str = "qwen3") -> dict[str, Path]:
    """{"doctor": folder, "patient": folder}: two differently seeded tiny models sharing one tokenizer."""
    out_dir = Path(out_dir)
    tokenizer_dir = out_dir / "tokenizer"
    make_tokenizer(tokenizer_dir)
    return {role: make_tiny_model(out_dir / f"tiny-{role}", family, seed=seed, tokenizer_dir=tokenizer_dir,
                                  max_position_embeddings=CONTEXT)
            for seed, role in enumerate(("doctor", "patient"))}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder for tiny-doctor/ and tiny-patient/")
    parser.add_argument("--family", default="qwen3", choices=("llama", "qwen2", "qwen3"), help="model family")
    ns = parser.parse_args(argv)
    for role, path in make_tiny_models(ns.out_dir, ns.family).items():
        print(f"{role}: {path}")


if __name__ == "__main__":
    main()

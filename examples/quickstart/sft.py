"""Quickstart warm-up: make a tiny random model and teach it the answer format by a short supervised phase.

The model is `inference_engine.testing.make_tiny_model` (Qwen3 family, a local BPE tokenizer that
splits numbers into digits, so that an answer is spelled digit by digit);
the supervised phase is plain torch on sft.jsonl (chat-formatted "What is a + b?" -> "c"), with
the loss on the answer tokens and the closing <|im_end|> only. It is kept short on purpose: the
model learns to answer with one number and stop, but is right only some of the time, so that
GRPO has something to improve. Run: python -m examples.quickstart.sft --data D/sft.jsonl --out M
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch


def encode_examples(tokenizer, rows: list[dict]) -> list[tuple[list[int], int]]:
    """(token ids of prompt + answer + EOS, number of prompt tokens) per chat example."""
    out = []
    for row in rows:
        messages = row["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
        out.append((prompt_ids + answer_ids + [tokenizer.eos_token_id], len(prompt_ids)))
    return out


def sft(model_dir: str | Path, data: str | Path, *, steps: int, lr: float, batch_size: int, seed: int) -> float:
    """Train the HF model in `model_dir` in place on the chat examples of `data`; the last step's loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines() if line.strip()]
    examples = encode_examples(tokenizer, rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = rng.sample(examples, min(batch_size, len(examples)))
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)  # [B, L]
        labels = torch.full((len(batch), width), -100, dtype=torch.long)  # [B, L], -100 = no loss
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (seq, prompt_len) in enumerate(batch):
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, prompt_len:len(seq)] = torch.tensor(seq[prompt_len:])
            mask[i, :len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"sft step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    return float(loss.item())


def main() -> None:
    """Command line: make the tiny model, then warm it up."""
    from inference_engine.testing import make_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/quickstart/data/sft.jsonl",
                        help="sft.jsonl written by examples.quickstart.make_data (default %(default)s)")
    parser.add_argument("--out", default="runs/quickstart/sft_model",
                        help="folder of the HF model to write (default %(default)s)")
    parser.add_argument("--steps", type=int, default=260, help="supervised steps")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step")
    parser.add_argument("--hidden-size", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--seed", type=int, default=0, help="seed of model init and example order")
    a = parser.parse_args()
    make_tiny_model(a.out, "qwen3", seed=a.seed, hidden_size=a.hidden_size, num_layers=a.layers,
                    intermediate_size=4 * a.hidden_size, init_std=0.02, split_digits=True)
    sft(a.out, a.data, steps=a.steps, lr=a.lr, batch_size=a.batch_size, seed=a.seed)
    print(f"model: {a.out}")


if __name__ == "__main__":
    main()

"""Quickstart warm-up: make a tiny random model and teach it the answer format by a short supervised phase.

The model is `inference_engine.testing.make_tiny_model` (Qwen3 family, a local BPE tokenizer that
splits numbers into digits, so that an answer is spelled digit by digit);
the supervised phase is plain torch on sft.jsonl (chat-formatted "What is a + b?" -> "c"), with
the loss on the answer tokens and the closing <|im_end|> only. It is kept short on purpose: the
model learns to answer with one number and stop, but is right only some of the time, so that
GRPO has something to improve. Run: python -m examples.quickstart.sft --data D/sft.jsonl --out M

On a GPU (`--device cuda`, the GPU quickstart of scripts/quickstart_gpu.sh) the same loop trains a larger model
from scratch, in bf16 autocast (`--bf16`; fp32 weights and AdamW), with a linear warm-up (`--warmup-steps`), and
can stop early once a probe of held-back examples reaches `--target-accuracy` (exact answers by greedy decoding,
computed as teacher-forced argmax over the answer and EOS, which is the same thing), so that GRPO starts from a
model that answers some but not most problems whatever the card's speed. The defaults are the CPU quickstart's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
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


def batch_tensors(batch: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, labels (-100 = no loss: prompt and padding) and attention mask, each [B, L]."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)  # [B, L]
    labels = torch.full((len(batch), width), -100, dtype=torch.long)  # [B, L], -100 = no loss
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (seq, prompt_len) in enumerate(batch):
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, prompt_len:len(seq)] = torch.tensor(seq[prompt_len:])
        mask[i, :len(seq)] = 1
    return ids, labels, mask


def exact_accuracy(model, examples: list[tuple[list[int], int]], pad: int, *, batch_size: int = 256,
                   autocast=contextlib.nullcontext) -> float:
    """Share of examples whose answer and EOS are each the argmax given the tokens before them, i.e. that greedy
    decoding answers exactly (and then stops)."""
    device = next(model.parameters()).device
    right = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            ids, labels, mask = (t.to(device) for t in batch_tensors(examples[start:start + batch_size], pad))
            with autocast():
                logits = model(input_ids=ids, attention_mask=mask).logits  # [B, L, V]
            predicted = logits[:, :-1].argmax(-1)  # [B, L-1], position t predicts token t+1
            targets = labels[:, 1:]  # [B, L-1]
            scored = targets != -100
            right += int(((predicted == targets) | ~scored).all(-1).sum())
    model.train(was_training)
    return right / max(1, len(examples))


def sft(model_dir: str | Path, data: str | Path, *, steps: int, lr: float, batch_size: int, seed: int,
        device: str = "cpu", bf16: bool = False, warmup_steps: int = 0, target_accuracy: float | None = None,
        check_every: int = 50, probe_size: int = 512, time_limit: float | None = None) -> float:
    """Train the HF model in `model_dir` in place on the chat examples of `data`; the last step's loss.

    device / bf16: where to train, and in bf16 autocast (weights and AdamW stay fp32). warmup_steps: the learning
    rate rises linearly over that many steps (0: constant). target_accuracy: hold `probe_size` examples back and
    stop once their greedy exact accuracy reaches it, checked every `check_every` steps (None: run every step).
    time_limit: stop after that many seconds of training (the model is saved either way; None: no limit)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if device != "cpu":
        model.to(device)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines() if line.strip()]
    examples = encode_examples(tokenizer, rows)
    probe: list[tuple[list[int], int]] = []
    if target_accuracy is not None:
        if not 0 < probe_size < len(examples):
            raise ValueError(f"probe_size = {probe_size}: expected 1..{len(examples) - 1} (the data has "
                             f"{len(examples)} examples)")
        held = set(random.Random(seed + 1).sample(range(len(examples)), probe_size))
        probe = [ex for i, ex in enumerate(examples) if i in held]
        examples = [ex for i, ex in enumerate(examples) if i not in held]
    fused = {"fused": True} if device.startswith("cuda") else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, **fused)
    pad = tokenizer.pad_token_id
    autocast = ((lambda: torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)) if bf16
                else contextlib.nullcontext)
    model.train()
    loss = torch.tensor(float("nan"))
    started = time.monotonic()
    for step in range(steps):
        batch = rng.sample(examples, min(batch_size, len(examples)))
        ids, labels, mask = batch_tensors(batch, pad)
        if device != "cpu":
            ids, labels, mask = (t.to(device, non_blocking=True) for t in (ids, labels, mask))
        if warmup_steps > 0:
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup_steps)
        with autocast():
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"sft step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
        if probe and ((step + 1) % check_every == 0 or step + 1 == steps):
            accuracy = exact_accuracy(model, probe, pad, autocast=autocast)
            print(f"sft step {step + 1}/{steps}: greedy exact accuracy {accuracy:.3f} on {len(probe)} held-back "
                  f"examples (stop at {target_accuracy})", flush=True)
            if accuracy >= target_accuracy:
                break
        if time_limit is not None and time.monotonic() - started > time_limit:
            print(f"sft: stopped after step {step + 1} at --time-limit {time_limit:g} s (loss {loss.item():.4f})",
                  flush=True)
            break
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
    parser.add_argument("--steps", type=int, default=260, help="supervised steps (at most, with --target-accuracy)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step")
    parser.add_argument("--hidden-size", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (head size = width / heads)")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    parser.add_argument("--seed", type=int, default=0, help="seed of model init and example order")
    parser.add_argument("--device", default="cpu", help="where to train: cpu (default), cuda, cuda:N")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights and AdamW); for GPUs")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up (default 0: none)")
    parser.add_argument("--target-accuracy", type=float, default=None,
                        help="stop once held-back examples are answered exactly this often by greedy decoding "
                             "(default: run every step)")
    parser.add_argument("--check-every", type=int, default=50, help="steps between --target-accuracy checks")
    parser.add_argument("--probe-size", type=int, default=512, help="examples held back for --target-accuracy")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="stop training after this many seconds and save the model (default: no limit)")
    a = parser.parse_args()
    if a.device != "cpu" and not a.device.startswith("cuda"):
        parser.error(f"--device {a.device}: expected cpu, cuda or cuda:N")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {a.device}: torch sees no CUDA device here")
    if a.hidden_size % a.heads or a.heads % a.kv_heads:
        parser.error(f"--hidden-size {a.hidden_size} --heads {a.heads} --kv-heads {a.kv_heads}: the width must "
                     f"divide by the heads and the heads by the key/value heads")
    if a.target_accuracy is not None and not 0 < a.target_accuracy <= 1:
        parser.error(f"--target-accuracy {a.target_accuracy}: expected a value in (0, 1]")
    if a.warmup_steps < 0 or a.check_every < 1:
        parser.error("--warmup-steps must be >= 0 and --check-every >= 1")
    make_tiny_model(a.out, "qwen3", seed=a.seed, hidden_size=a.hidden_size, num_layers=a.layers,
                    num_heads=a.heads, num_kv_heads=a.kv_heads, intermediate_size=4 * a.hidden_size, init_std=0.02,
                    split_digits=True)
    sft(a.out, a.data, steps=a.steps, lr=a.lr, batch_size=a.batch_size, seed=a.seed, device=a.device, bf16=a.bf16,
        warmup_steps=a.warmup_steps, target_accuracy=a.target_accuracy, check_every=a.check_every,
        probe_size=a.probe_size, time_limit=a.time_limit)
    print(f"model: {a.out}")

if __name__ == "__main__":
    main()

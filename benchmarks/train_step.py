"""Trainer step throughput: tokens/s and peak memory of TrainerActor.train_step on one rank.

    python benchmarks/train_step.py --shape tiny            # CPU: the test-suite's tiny Qwen3
    python benchmarks/train_step.py --shape qwen3-0.6b      # GPU: a random model of Qwen3-0.6B's shape

The model is random (built locally, nothing downloaded); only its shape matters for speed.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
}


def make_model(shape: str, out_dir: Path) -> Path:
    """A random Qwen3 HF folder of the given shape (tokenizer from inference_engine.testing)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from inference_engine.testing import make_tokenizer

    make_tokenizer(out_dir)
    cfg = Qwen3Config(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--response-len", type=int, default=384)
    parser.add_argument("--max-tokens-per-gpu", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    args = parser.parse_args()

    from rollout.sample import Sample
    from trainer.actor import TrainerActor
    from trainer.config import TrainerConfig
    from trainer.testing import free_port

    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(args.shape, Path(tmp) / args.shape)
        vocab = SHAPES[args.shape]["vocab_size"]
        cfg = TrainerConfig(hf_checkpoint=str(path), lr=1e-6, global_batch_size=args.samples,
                            max_tokens_per_gpu=args.max_tokens_per_gpu)
        actor = TrainerActor(cfg, 0, 1, "127.0.0.1", free_port())
        actor.init()
        g = torch.Generator().manual_seed(0)
        n = args.prompt_len + args.response_len
        samples = [Sample(index=i, group_index=i // 4, tokens=torch.randint(0, vocab, (n,), generator=g).tolist(),
                          response_length=args.response_len, loss_mask=[1] * args.response_len,
                          reward=float(i % 2)) for i in range(args.samples)]
        actor.train_step(samples)  # warm-up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            metrics = actor.train_step(samples)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        tokens = args.steps * args.samples * n
        offload_s = time.perf_counter()
        moved = actor.offload()
        actor.onload()
        offload_s = time.perf_counter() - offload_s
        result = {
            "shape": args.shape,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "samples": args.samples, "seq_len": n, "steps": args.steps,
            # one step = old-policy forward + forward/backward + optimizer step
            "tokens_per_s": round(tokens / elapsed, 1),
            "step_s": round(elapsed / args.steps, 3),
            "peak_memory_gib": round((torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                                      else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30, 3),
            "offload_bytes": moved, "offload_onload_s": round(offload_s, 3),
            "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
        }
        print(json.dumps(result))
        actor.shutdown()


if __name__ == "__main__":
    main()

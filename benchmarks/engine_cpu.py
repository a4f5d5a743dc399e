"""Decode throughput on CPU: Kiln's engine vs HF transformers `generate`, same model, same prompts, same run.

    PYTHONPATH=. python benchmarks/engine_cpu.py [--model-path P] [--batch 8] [--prompt-len 32] [--new-tokens 64]

Without --model-path a random Qwen3-style model (hidden 256, 4 layers) is written to a temp folder.
Both sides generate greedily with ignore_eos, so they produce the same number of tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from inference_engine.testing import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="kiln_bench_") as tmp:
        path = args.model_path or str(make_tiny_model(tmp, "qwen3", hidden_size=args.hidden_size,
                                                      num_layers=args.layers, num_heads=4, num_kv_heads=2,
                                                      intermediate_size=4 * args.hidden_size))
        run(path, args)


def run(path: str, args: argparse.Namespace) -> None:
    """Time HF generate, then the engine, on the same prompts."""
    from transformers import AutoModelForCausalLM

    from inference_engine import Engine

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 400, (args.prompt_len,), generator=gen).tolist() for _ in range(args.batch)]
    total = args.batch * args.new_tokens

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    hf.generate(ids[:1], max_new_tokens=2, do_sample=False)  # warm-up
    start = time.perf_counter()
    hf_out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                         min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    hf_s = time.perf_counter() - start
    assert hf_out.shape[1] - args.prompt_len == args.new_tokens

    sp = {"temperature": 0, "max_new_tokens": args.new_tokens, "ignore_eos": True}
    with Engine(model_path=path, max_total_tokens=8192, disable_radix_cache=True) as engine:
        engine.generate(input_ids=prompts[0], sampling_params={**sp, "max_new_tokens": 2})  # warm-up
        start = time.perf_counter()
        outs = engine.generate(input_ids=prompts, sampling_params=sp)
        kiln_s = time.perf_counter() - start
    assert sum(o["meta_info"]["completion_tokens"] for o in outs) == total

    print(f"model {path} | batch {args.batch} x prompt {args.prompt_len} -> {args.new_tokens} new tokens, "
          f"{args.threads} thread(s)")
    print(f"HF generate : {total / hf_s:8.1f} tok/s ({hf_s:.2f} s)")
    print(f"Kiln engine : {total / kiln_s:8.1f} tok/s ({kiln_s:.2f} s)")


if __name__ == "__main__":
    main()

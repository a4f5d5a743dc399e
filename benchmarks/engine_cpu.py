"""Engine figures on CPU: decode throughput against HF transformers, or prefix sharing under GRPO traffic.

    python -m benchmarks.engine_cpu [--model-path P] [--batch 8] [--prompt-len 32] [--new-tokens 64]
    python -m benchmarks.engine_cpu --grpo [--prompts 16] [--n 8] [--prompt-len 256] [--page-size 16]

Without --model-path a random Qwen3-style model (hidden 256, 4 layers) is written to a temp folder.
Default mode: HF `generate` and the engine on the same prompts, greedy with ignore_eos (same token counts).
--grpo: each prompt sent n times as separate concurrent requests (what a GRPO rollout does), once with
`disable_prefix_sharing` and once without, in the same run; prints the cache hit rate, the prefill
tokens computed and the time of each, and checks that both runs produced the same tokens.
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
    parser.add_argument("--grpo", action="store_true", help="measure prefix sharing under GRPO-shaped traffic")
    parser.add_argument("--prompts", type=int, default=16, help="--grpo: distinct prompts")
    parser.add_argument("--n", type=int, default=8, help="--grpo: requests per prompt")
    parser.add_argument("--page-size", type=int, default=1, help="--grpo: the engine's page_size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from inference_engine.testing import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="kiln_bench_") as tmp:
        path = args.model_path or str(make_tiny_model(tmp, "qwen3", hidden_size=args.hidden_size,
                                                      num_layers=args.layers, num_heads=4, num_kv_heads=2,
                                                      intermediate_size=4 * args.hidden_size))
        (run_grpo if args.grpo else run)(path, args)


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


def run_grpo(path: str, args: argparse.Namespace) -> None:
    """The same GRPO-shaped traffic with prefix sharing off, then on; one line of figures each."""
    import asyncio

    from inference_engine import Engine

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 400, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)]
    requests = [(p, {"temperature": 1.0, "seed": 1000 * i + j, "max_new_tokens": args.new_tokens,
                     "ignore_eos": True}) for i, p in enumerate(prompts) for j in range(args.n)]

    async def send(engine: Engine) -> list[dict]:
        return await asyncio.gather(*[engine.async_generate(input_ids=p, sampling_params=sp) for p, sp in requests])

    print(f"model {path} | {args.prompts} prompts x n={args.n} separate requests, prompt {args.prompt_len} -> "
          f"{args.new_tokens} new tokens, page_size {args.page_size}, {args.threads} thread(s)")
    outputs = []
    for sharing in (False, True):
        with Engine(model_path=path, max_total_tokens=65536, page_size=args.page_size,
                    disable_prefix_sharing=not sharing) as engine:
            engine.generate(input_ids=prompts[0][:8], sampling_params={"max_new_tokens": 2})  # warm-up
            engine.flush_cache()
            before = engine.metrics()
            start = time.perf_counter()
            outs = asyncio.run(send(engine))
            seconds = time.perf_counter() - start
            after = engine.metrics()
        prompt = after["prompt_tokens_total"] - before["prompt_tokens_total"]
        cached = after["cached_tokens_total"] - before["cached_tokens_total"]
        prefill = after["prefill_tokens_total"] - before["prefill_tokens_total"]
        generated = sum(o["meta_info"]["completion_tokens"] for o in outs)
        print(f"prefix sharing {'on ' if sharing else 'off'}: cache hit rate {cached / prompt:6.1%} | prefill tokens "
              f"computed {prefill:6d} of {prompt} | {seconds:6.2f} s, {generated / seconds:7.1f} generated tok/s")
        outputs.append([o["output_ids"] for o in outs])
    print(f"same outputs with and without sharing: {outputs[0] == outputs[1]}")


if __name__ == "__main__":
    main()

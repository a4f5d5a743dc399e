"""TRL's GRPOTrainer on rl_step's shape and workload: seconds per optimizer step (the single-GPU RL peer).

    python -m benchmarks.trl_grpo --shape qwen3-0.6b --out /tmp/trl_grpo.json     # GPU, workload W1

Same random-weight bf16 model folder and prompts as benchmarks/rl_step.py (exactly --prompt-len tokens each), GRPO
with num_generations = --samples, responses of exactly --response-len tokens (generation_kwargs min_new_tokens = max
completion length), one optimizer step per --prompts x --samples completions (per-device batch x gradient
accumulation), the parity reward of rl_step, TRL's HF-generate rollout (no vLLM), bf16, one GPU, TRL's defaults
otherwise (beta 0: no reference model). One exception for memory: --generation-batch-size completions are generated
at a time (default 128; all 512 at once would need ~75 GiB of KV cache for 1280-token sequences of the 0.6B shape),
so a step holds 512 / 128 = 4 generate calls, all before the optimizer step. Seconds per step are the time between
optimizer steps (TrainerCallback.on_step_end; the first from on_train_begin), printed as each step ends.
tokens/s/GPU = (prompt + response tokens of the step) / step seconds, as in rl_step.

Needs `trl` (and accelerate, datasets): without it the script says so and exits 0 (writing {"skipped": ...} to --out).
On the GPU machine it is carried as a wheel: `PEERS=1 ../shared/device/prepare-wheels.sh` before the call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path


def parity_reward(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
    """rl_step's reward (share of odd token ids of the completion); by text length if TRL passes no ids."""
    if completion_ids is not None:
        return [sum(t % 2 for t in ids) / max(len(ids), 1) for ids in completion_ids]
    return [float(len(c)) / 1e4 for c in completions]


def parse_args(argv=None):
    from benchmarks.rl_step import add_workload_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(ap, steps=1)
    ap.add_argument("--micro-batch", type=int, default=8, help="per_device_train_batch_size (completions)")
    ap.add_argument("--generation-batch-size", type=int, default=128)
    ap.add_argument("--model-dir", help="the model folder (rl_step's --model-dir can be shared); default: temp")
    ap.add_argument("--out", help="write the result JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shape, args.prompts, args.samples, args.prompt_len, args.response_len = "tiny", 2, 2, 16, 8
        args.warmup, args.steps, args.micro_batch, args.generation_batch_size = 1, 1, 2, 4
    return args


def write(out: str | None, result: dict) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        import trl
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        reason = (f"TRL is not installed ({e}); install trl (CPU: pip install trl) or carry it to the GPU machine "
                  f"with `PEERS=1 ../shared/device/prepare-wheels.sh`")
        print(f"trl_grpo: skipped: {reason}", flush=True)
        result = {"skipped": reason}
        write(args.out, result)
        return result
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from benchmarks.rl_step import build_model, write_prompts

    on_gpu = torch.cuda.is_available() and not args.smoke
    work = Path(tempfile.mkdtemp(prefix=f"kiln_trl_{args.shape}_"))
    model_dir = Path(args.model_dir) if args.model_dir else work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    params = build_model(args.shape, model_dir)
    data = work / "prompts.jsonl"
    total = args.warmup + args.steps
    write_prompts(model_dir, data, args.prompts * total, args.prompt_len)
    dataset = Dataset.from_list([{"prompt": json.loads(line)["prompt"]} for line in data.read_text().splitlines()])
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    completions = args.prompts * args.samples
    if completions % args.micro_batch or completions % args.generation_batch_size:
        raise SystemExit(f"{completions} completions per step must be a multiple of --micro-batch "
                         f"{args.micro_batch} and --generation-batch-size {args.generation_batch_size}")
    wanted = dict(output_dir=str(work / "out"), per_device_train_batch_size=args.micro_batch,
                  gradient_accumulation_steps=completions // args.micro_batch,
                  generation_batch_size=args.generation_batch_size, num_generations=args.samples,
                  max_completion_length=args.response_len, max_prompt_length=None,
                  generation_kwargs={"min_new_tokens": args.response_len}, temperature=1.0, bf16=on_gpu,
                  use_cpu=not on_gpu, learning_rate=1e-6, max_steps=total, logging_steps=1, report_to="none",
                  save_strategy="no", beta=0.0, use_vllm=False, seed=0, shuffle_dataset=False, disable_tqdm=True)
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    config = GRPOConfig(**{k: v for k, v in wanted.items() if k in names})
    ignored = sorted(set(wanted) - names)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.last = 0.0

        def on_train_begin(self, *a, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, *a, **kw):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now
            peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
            print(json.dumps({"trl_step": len(self.times), "step_s": round(self.times[-1], 3),
                              "peak_gib": None if peak is None else round(peak, 2)}), flush=True)

    timer = StepTimer()
    print(f"trl_grpo: trl {trl.__version__}, {args.shape} ({params / 1e9:.3f} B params), {args.prompts} x "
          f"{args.samples} completions, {args.prompt_len} + {args.response_len} tokens, micro-batch "
          f"{args.micro_batch}, generation batch {args.generation_batch_size}, {args.warmup} warm-up + {args.steps} "
          f"steps, {'GPU bf16' if on_gpu else 'CPU fp32'}; config fields not in this TRL: {ignored}", flush=True)
    trainer = GRPOTrainer(model=model, reward_funcs=[parity_reward], args=config, train_dataset=dataset,
                          processing_class=tok, callbacks=[timer])
    trainer.train()
    tokens = completions * (args.prompt_len + args.response_len)
    measured = timer.times[args.warmup:] or timer.times
    step_s = sum(measured) / len(measured)
    result = {"trl": trl.__version__, "shape": args.shape, "params": params, "gpus": 1,
              "device": torch.cuda.get_device_name() if on_gpu else "cpu",
              "workload": {"prompts": args.prompts, "samples_per_prompt": args.samples, "prompt_len": args.prompt_len,
                           "response_len": args.response_len, "micro_batch": args.micro_batch,
                           "generation_batch_size": args.generation_batch_size, "warmup": args.warmup,
                           "steps": args.steps},
              "config_ignored": ignored, "steps_s": timer.times, "step_s": step_s,
              "tokens_per_s_per_gpu": tokens / step_s,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None}
    print(f"| TRL GRPOTrainer {args.shape} | step {step_s:.1f} s | {tokens / step_s:.0f} tokens/s/GPU | "
          f"steps {[round(t, 1) for t in timer.times]} |", flush=True)
    write(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

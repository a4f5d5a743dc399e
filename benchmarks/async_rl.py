"""Fully asynchronous vs synchronous RL on one CPU workload with long-tailed response lengths (issue #19).

    nice -n 10 python -m benchmarks.async_rl --out /tmp/async_rl.json        # CPU, both modes, a few minutes
    python -m benchmarks.async_rl --gpu --shape qwen3-0.6b ...                 # 2 GPUs: scripts/async_rl_gpu.sh

Both runs are the real driver (`Driver(resolve(flags))`, what train.py runs), disaggregated (one trainer bundle,
one engine bundle, HTTP rollout client), on the tiny random Qwen3 of benchmarks/rl_step.py, GRPO with TIS, the
same seed, prompts and steps. The workload's response lengths are long-tailed: sample i generates exactly
`long_tail_length(i)` tokens (ignore_eos; seeded by the sample index, so both modes draw the same lengths): with
probability --p-long it is --long-len tokens, otherwise uniform in [--short-len / 2, --short-len]. The reward is
benchmarks.rl_step's parity reward (share of odd token ids in the response), which a random model learns.

- sync: `--async-mode off`: rollout the whole batch (waiting for its longest sample), train, push.
- fully: `--async-mode fully --max-staleness K`: the engine generates continuously; each step takes the next
  ready groups within K versions; pushes land mid-generation (docs/async.md).

Reported side by side: samples/s and tokens/s (trained samples and their response tokens over the wall seconds
of the steps after --warmup, by the driver's timing/step_s: in fully async mode a step is the time between two
consumed batches), the number of groups the fully async run dropped past the bound (a dropped group is
generated work not trained, and it is mostly the long tail: compare tokens/s too), generated samples/s (fully:
trained samples minus the finished groups the stream already held when measuring began, generated during the
warm-up, plus those it holds at the end), the final reward (mean
rollout reward of the last --final-steps steps), the mean reward
over all steps, and the lag metrics. One process runs both, one after the other, so they share the machine's state.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHORT_LEN, LONG_LEN, P_LONG = 16, 384, 0.05   # the defaults of --short-len, --long-len, --p-long


def long_tail_length(index: int) -> int:
    """The response length of sample `index` (seeded by it): LONG_LEN with probability P_LONG, else short."""
    short, long, p_long = (int(os.environ.get("KILN_ASYNC_BENCH_SHORT", SHORT_LEN)),
                           int(os.environ.get("KILN_ASYNC_BENCH_LONG", LONG_LEN)),
                           float(os.environ.get("KILN_ASYNC_BENCH_P_LONG", P_LONG)))
    rng = random.Random(index * 7919 + 17)
    return long if rng.random() < p_long else rng.randint(max(1, short // 2), short)


async def long_tail_generate(args: Any, sample: Any, sampling_params: dict) -> Any:
    """The default generate function with max_new_tokens = long_tail_length(sample.index) (ignore_eos is on)."""
    from rollout.generate import generate

    params = dict(sampling_params)
    params["max_new_tokens"] = min(params["max_new_tokens"], long_tail_length(sample.index))
    return await generate(args, sample, params)


def driver_flags(args: argparse.Namespace, model_dir: Path, data: Path, out_dir: Path, mode: str) -> dict:
    flags = {"hf-checkpoint": str(model_dir), "prompt-data": str(data), "rollout-batch-size": args.prompts,
             "n-samples-per-prompt": args.samples, "rollout-max-response-len": args.long_len,
             "rollout-ignore-eos": True, "custom-generate-function-path": "benchmarks.async_rl:long_tail_generate",
             "custom-rm-path": "benchmarks.rl_step:parity_reward", "num-rollout": args.steps,
             "global-batch-size": args.prompts * args.samples, "advantage-estimator": "grpo", "lr": args.lr,
             "colocate": False, "use-tis": True, "progress": False, "seed": args.seed,
             "rollout-concurrency": args.concurrency, "health-check-interval": 60.0,
             "metrics-file": str(out_dir / f"metrics_{mode}.jsonl")}
    if mode == "fully":
        flags.update({"async-mode": "fully", "max-staleness": args.max_staleness})
    if args.gpu:   # one GPU for the trainer, one for the engine
        from benchmarks.rl_step import GPU_FLAGS

        flags.update({**GPU_FLAGS, "context-length": args.prompt_len + args.long_len})
    return flags


def run_mode(args: argparse.Namespace, model_dir: Path, data: Path, work: Path, mode: str) -> dict:
    """One run of the driver in `mode`; its figures."""
    from orchestrator.driver import Driver, resolve

    driver = Driver(resolve(driver_flags(args, model_dir, data, work, mode)))
    try:
        start = time.perf_counter()
        driver.setup()
        setup_s = time.perf_counter() - start
        start = time.perf_counter()
        history = driver.run()
        run_s = time.perf_counter() - start
    finally:
        driver.shutdown()
    measured = history[args.warmup:]   # the first steps carry start-up costs (first requests, first train step)
    seconds = sum(h["timing/step_s"] for h in measured)
    samples = sum(h.get("train/num_samples", 0) for h in measured)
    tokens = sum(h.get("rollout/response_len_mean", 0) * h.get("rollout/num_samples", 0) for h in measured)
    # fully async: the stream may hold finished groups when measuring starts (generated during the warm-up); the
    # conservative figure counts only the samples the measured steps generated themselves: minus the backlog growth
    backlog = [h.get("rollout/ready_groups", 0) * args.samples for h in history]
    own = samples - (backlog[args.warmup - 1] - backlog[-1] if args.warmup else -backlog[-1])
    rewards = [h["rollout/reward_mean"] for h in history]
    tail = rewards[-args.final_steps:]
    lags = [h.get("rollout/weight_version_lag_max", 0) for h in history]
    return {"mode": mode, "steps": len(history), "setup_s": setup_s, "run_s": run_s, "measured_s": seconds,
            "samples": samples, "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
            "backlog_samples_at_start": backlog[args.warmup - 1] if args.warmup else 0,
            "samples_per_s_without_backlog": own / seconds,
            "final_reward": sum(tail) / len(tail), "mean_reward": sum(rewards) / len(rewards), "rewards": rewards,
            "lag_max": max(lags), "lag_mean": sum(h.get("rollout/weight_version_lag_mean", 0) for h in history)
            / len(history), "stale_dropped_groups": sum(h.get("rollout/stale_dropped_groups", 0) for h in history),
            "step_s": [h.get("timing/step_s", 0.0) for h in history]}


def table(result: dict) -> str:
    rows = result["runs"]
    lines = [f"async_rl on {result['machine']}: {result['workload']}",
             "| mode | steps | samples/s | generated samples/s | tokens/s | final reward | mean reward | max lag "
             "| mean lag | stale drops |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['steps']} | {r['samples_per_s']:.2f} | "
                     f"{r['samples_per_s_without_backlog']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['final_reward']:.3f} | {r['mean_reward']:.3f} | {r['lag_max']:.0f} | {r['lag_mean']:.2f} | "
                     f"{r['stale_dropped_groups']:.0f} |")
    lines.append(f"speed-up (fully / sync): samples/s {result['speedup']:.2f}x, generated samples/s "
                 f"{result['speedup_without_backlog']:.2f}x, tokens/s {result['token_speedup']:.2f}x")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of samples/s and tokens/s")
    ap.add_argument("--short-len", type=int, default=SHORT_LEN)
    ap.add_argument("--long-len", type=int, default=LONG_LEN)
    ap.add_argument("--p-long", type=float, default=P_LONG)
    ap.add_argument("--max-staleness", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=64, help="--rollout-concurrency")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--final-steps", type=int, default=3, help="the final reward averages these last steps")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--modes", nargs="+", default=["sync", "fully"], choices=["sync", "fully"])
    ap.add_argument("--gpu", action="store_true", help="run on GPUs (2: trainer and engine); default: CPU only")
    ap.add_argument("--shape", default="tiny", help="model shape of benchmarks.rl_step (tiny, qwen3-0.6b, ...)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not args.gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""   # a CPU benchmark, also where a GPU is
    os.environ.update({"KILN_ASYNC_BENCH_SHORT": str(args.short_len), "KILN_ASYNC_BENCH_LONG": str(args.long_len),
                       "KILN_ASYNC_BENCH_P_LONG": str(args.p_long)})   # read by long_tail_length in the actors
    from benchmarks.rl_step import build_model, write_prompts
    from kiln_common.logs import setup_logging

    setup_logging()
    work = Path(tempfile.mkdtemp(prefix="kiln_async_rl_"))
    model_dir = work / "model"
    model_dir.mkdir()
    build_model(args.shape, model_dir)
    data = work / "prompts.jsonl"
    write_prompts(model_dir, data, args.prompts * (args.steps + 2 * args.max_staleness + 4), args.prompt_len)
    runs = [run_mode(args, model_dir, data, work, mode) for mode in args.modes]
    by_mode = {r["mode"]: r for r in runs}
    both = {"sync", "fully"} <= set(by_mode)
    speedup = by_mode["fully"]["samples_per_s"] / by_mode["sync"]["samples_per_s"] if both else float("nan")
    token_speedup = by_mode["fully"]["tokens_per_s"] / by_mode["sync"]["tokens_per_s"] if both else float("nan")
    own_speedup = (by_mode["fully"]["samples_per_s_without_backlog"] / by_mode["sync"]["samples_per_s"]
                   if both else float("nan"))
    lengths = [long_tail_length(i) for i in range(args.prompts * args.samples * args.steps)]
    from benchmarks.rl_step import device_name

    machine = f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})"
    result = {"machine": f"{device_name(True)} x2, {machine}" if args.gpu else machine, "shape": args.shape,
              "workload": f"{args.prompts} prompts x {args.samples} samples, {args.steps} steps, response length "
                          f"{args.long_len} with p={args.p_long} else <= {args.short_len} (mean "
                          f"{sum(lengths) / len(lengths):.1f}), max staleness {args.max_staleness}, "
                          f"{args.warmup} warm-up steps",
              "args": vars(args), "runs": runs, "speedup": speedup,
              "token_speedup": token_speedup, "speedup_without_backlog": own_speedup}
    print(table(result), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

"""Top-k / top-p / min-p truncation on a GPU: the old full sort vs the sort-free bisection kernel, side by side.

    python3 -m benchmarks.sampling                      # GPU only; torch + triton
    python3 -m benchmarks.sampling --batches 1,64 --reps 31 --configs 4096x8,2048x4

Rows of float32 probabilities softmax(randn(B, V) * 3) with V = 151936 (Qwen3's vocabulary), top_k = 50,
top_p = 0.9, min_p = 0 on every row. Columns (median over --reps samples of event_ms, each a mean of 10 calls):
  - sort filter: the sampler's filter before the kernel (sort, cumsum, scatter back);
  - truncate: ops.truncate, one kernel that finds each row's threshold and writes the filtered rows;
  - threshold: the kernel without the write (ops.truncation_threshold), and that plus a torch masked_fill;
  - + race: each filter followed by the seeded draw (ops.seeded_race), as the sampler runs them.
Then the kernel under each (BLOCK, num_warps) of --configs, and at one batch size other parameter mixes
(top-p only, top-k only, min-p only, nothing truncated). Before timing, the kernel's thresholds and filtered
rows are checked to equal the torch reference's (tie-inclusive) exactly, on these rows and on tie-heavy ones;
rows where the old sort kept another set (ties at the cut, its float32 cumsum) are counted. Exits 1 on a
mismatch.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from benchmarks.engine_throughput import event_ms

VOCAB = 151936


def sort_filter(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """The sampler's filter before the kernel: sorted ranks, ties broken by the sort."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    drop = rank >= top_k[:, None]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= mass_before >= top_p[:, None]
    drop |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
    drop[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def median_ms(fn, reps: int) -> float:
    """Median over reps samples of event_ms(fn) (each the mean of 10 calls after a warm-up)."""
    return statistics.median(event_ms(fn, 10) for _ in range(reps))


def batch(rows: int, seed: int, top_k: int = 50, top_p: float = 0.9, min_p: float = 0.0, ties: bool = False):
    """(probs [rows, VOCAB] float32 on CUDA, top_k, top_p, min_p [rows])."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(rows, VOCAB, device="cuda", generator=g) * 3
    if ties:
        logits = (logits * 2).round()  # a few dozen distinct values per row
    probs = torch.softmax(logits, dim=-1)
    full = dict(device="cuda")
    return (probs, torch.full((rows,), top_k, dtype=torch.int64, **full), torch.full((rows,), top_p, **full),
            torch.full((rows,), min_p, **full))


def check(args) -> bool:
    """Whether the kernel equals the reference on every row; prints, per batch, where the old sort kept another set."""
    from inference_engine import ops
    from inference_engine.ops import reference

    ok = True
    cases = [(bs, {}) for bs in args.batches] + [(64, dict(ties=True)), (64, dict(ties=True, top_k=VOCAB)),
                                                  (16, dict(top_k=VOCAB, top_p=1.0, min_p=0.05))]
    for bs, kw in cases:
        probs, top_k, top_p, min_p = batch(bs, 1000 + bs, **kw)
        thr = ops.truncation_threshold(probs, top_k, top_p, min_p)
        ref = reference.truncation_threshold(probs, top_k, top_p, min_p)
        out = ops.truncate(probs, top_k, top_p, min_p)
        same = torch.equal(thr, ref) and torch.equal(out, reference.truncate(probs, top_k, top_p, min_p))
        kept = (out > 0).sum(dim=-1)
        differ = int(((sort_filter(probs, top_k, top_p, min_p) > 0) != (out > 0)).any(dim=-1).sum())
        print(f"check B={bs} {kw or ''}: kernel == reference {same}; kept per row {int(kept.min())}.."
              f"{int(kept.max())}; rows where the old sort kept another set (ties, float32 cumsum) {differ}")
        ok &= same
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--reps", type=int, default=15, help="samples per median")
    ap.add_argument("--configs", default="4096x8,4096x16,2048x8,2048x4,1024x4",
                    help="(BLOCK)x(num_warps) of the kernel to time; the first columns use the default")
    ap.add_argument("--mix-batch", type=int, default=64, help="batch size of the parameter-mix table")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if not torch.cuda.is_available():
        sys.exit("benchmarks.sampling needs a CUDA device")

    from inference_engine import ops
    from inference_engine.ops import triton_ops

    print(f"# {torch.cuda.get_device_name()}, V = {VOCAB}, float32 probs, median of {args.reps}, default kernel "
          f"config (BLOCK, warps) = {triton_ops.TRUNCATION_CONFIG}\n")
    ok = check(args)
    print()

    print("| B | sort filter ms | truncate ms | speed-up | threshold ms | threshold + masked_fill ms "
          "| sort + race ms | truncate + race ms |")
    print("|---|---|---|---|---|---|---|---|")
    for bs in args.batches:
        probs, top_k, top_p, min_p = batch(bs, bs)
        seeds, offsets = torch.arange(bs, device="cuda"), torch.zeros(bs, dtype=torch.int64, device="cuda")

        def masked():
            thr = ops.truncation_threshold(probs, top_k, top_p, min_p)
            return probs.masked_fill(probs < thr[:, None], 0.0)

        old = median_ms(lambda: sort_filter(probs, top_k, top_p, min_p), args.reps)
        new = median_ms(lambda: ops.truncate(probs, top_k, top_p, min_p), args.reps)
        thr = median_ms(lambda: ops.truncation_threshold(probs, top_k, top_p, min_p), args.reps)
        thr_mask = median_ms(masked, args.reps)
        old_race = median_ms(lambda: ops.seeded_race(sort_filter(probs, top_k, top_p, min_p), seeds, offsets),
                             args.reps)
        new_race = median_ms(lambda: ops.seeded_race(ops.truncate(probs, top_k, top_p, min_p), seeds, offsets),
                             args.reps)
        print(f"| {bs} | {old:.3f} | {new:.3f} | {old / new:.1f}x | {thr:.3f} | {thr_mask:.3f} | {old_race:.3f} "
              f"| {new_race:.3f} |", flush=True)

    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    print("\ntruncate ms by kernel config (BLOCK x num_warps)\n")
    print("| B | " + " | ".join(f"{b}x{w}" for b, w in configs) + " |")
    print("|---|" + "---|" * len(configs))
    for bs in args.batches:
        probs, top_k, top_p, min_p = batch(bs, bs)
        cells = [median_ms(lambda c=c: triton_ops.truncation_threshold(probs, top_k, top_p, min_p, write=True,
                                                                         config=c), args.reps) for c in configs]
        print(f"| {bs} | " + " | ".join(f"{ms:.3f}" for ms in cells) + " |", flush=True)

    bs = args.mix_batch
    print(f"\nparameter mixes at B = {bs}\n")
    print("| top_k, top_p, min_p | kept per row | sort filter ms | truncate ms | speed-up |")
    print("|---|---|---|---|---|")
    for kw in (dict(top_k=50, top_p=0.9), dict(top_k=VOCAB, top_p=0.9), dict(top_k=VOCAB, top_p=0.99),
               dict(top_k=50, top_p=1.0), dict(top_k=VOCAB, top_p=1.0, min_p=0.05),
               dict(top_k=VOCAB, top_p=1.0)):
        probs, top_k, top_p, min_p = batch(bs, 7, **kw)
        kept = (ops.truncate(probs, top_k, top_p, min_p) > 0).sum(dim=-1).float().median()
        old = median_ms(lambda: sort_filter(probs, top_k, top_p, min_p), args.reps)
        new = median_ms(lambda: ops.truncate(probs, top_k, top_p, min_p), args.reps)
        label = f"{kw.get('top_k')}, {kw.get('top_p')}, {kw.get('min_p', 0.0)}"
        print(f"| {label} | {int(kept)} | {old:.3f} | {new:.3f} | {old / new:.1f}x |", flush=True)
    if not ok:
        sys.exit("the truncation kernel disagrees with the reference (see the checks above)")


if __name__ == "__main__":
    main()

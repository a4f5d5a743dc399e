"""Trainer memory per phase and step speed with the replicated, sharded and offloaded optimizers.

    python -m benchmarks.trainer_memory --shape tiny                     # CPU smoke run (bytes, no device stats)
    python -m benchmarks.trainer_memory --shape qwen3-8b --optimizers offload --recompute full --steps 2
    python -m benchmarks.trainer_memory --shape qwen3-0.6b --optimizers replicated,sharded,offload
    python -m benchmarks.trainer_memory --shape qwen3-0.6b --optimizers replicated,sharded --dp 2   # 2 GPUs

For each optimizer (`replicated`: PolicyOptimizer, fp32 master + main grad per parameter and AdamW
state, all on the device; `sharded`: ShardedOptimizer, here at DP=1 so the same bytes through the flat
buffer; `offload`: ShardedOptimizer with its masters and moments in pinned host memory) the Qwen3
model of `--shape` is built with random bf16 weights on the device (nothing written or read) and
trained for `--steps` steps through the trainer's own pieces: packed micro-batches of random tokens
(75% response), `bridge.final_hidden_states`, `chunked_logprobs` of the response tokens, backward,
`optimizer.step()`. Reported per optimizer (one JSON row each):
- device memory (GiB): allocated after building the model and after building the optimizer, and the
  peak of each phase of the last step (forward + backward over all micro-batches, optimizer step);
- the optimizer's own bytes (states on device / on host, gradient buffer) and the process's host RSS;
- step seconds and tokens/s over the steps after the first (the first warms up kernels and allocator).
An optimizer that runs out of device memory gets a row with the error. With `--dp N` the N ranks
(one GPU each, spawned here) train their own samples of the same size and the optimizers reduce over
all of them; rank 0's rows are printed (sharded vs replicated step time = the cost of sharding).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.train_step import SHAPES, random_init, sample_lengths, write_config

GIB = 2**30
OPTIMIZERS = ("replicated", "sharded", "offload")


def host_rss_gib() -> float:
    """Resident set size of this process (GiB), from /proc (pinned host memory included)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 2**20, 2)
    return float("nan")


class Phases:
    """Peak and end-of-phase allocated device memory per named phase (nothing on CPU)."""

    def __init__(self, device: torch.device):
        self.on_gpu = device.type == "cuda"
        self.rows: dict[str, dict[str, float]] = {}

    def start(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def end(self, name: str) -> None:
        if self.on_gpu:
            torch.cuda.synchronize()
            self.rows[name] = {"peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
                               "allocated_gib": round(torch.cuda.memory_allocated() / GIB, 2)}


def run(kind: str, args, spec, cfg_path: Path, samples: list[dict], device: torch.device) -> dict:
    """Build model + optimizer `kind`, train `args.steps` steps; the memory and speed row."""
    from trainer import attention, bridge
    from trainer.actor import flatten_parameters
    from trainer.batching import pack_micro_batches
    from trainer.config import TrainerConfig
    from trainer.logprobs import chunked_logprobs
    from trainer.optimizer import PolicyOptimizer, ShardedOptimizer
    from kiln_common.tensors import to_device

    phases = Phases(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = TrainerConfig(hf_checkpoint=str(cfg_path), lr=1e-6, recompute=args.recompute,
                        use_distributed_optimizer=kind != "replicated", optimizer_cpu_offload=kind == "offload")
    phases.start()
    tconfig = bridge.build_transformer_config(spec, params_dtype=dtype, recompute=args.recompute)
    model = bridge.build_gpt_model(spec, tconfig)
    random_init(model)
    flatten_parameters(model, device)
    model.train()
    phases.end("build")
    phases.start()
    world = torch.distributed.get_world_size()
    groups = dict(dp_group=torch.distributed.group.WORLD if world > 1 else None, tp_group=None, tp_rank=0)
    optimizer = (PolicyOptimizer(model, cfg, **groups) if kind == "replicated" else
                 ShardedOptimizer(model, cfg, cpu_offload=kind == "offload", **groups))
    phases.end("optimizer_init")
    batches = pack_micro_batches(list(range(len(samples))), [s["tokens"] for s in samples],
                                 [s["response_length"] for s in samples], args.tokens, packed=True)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        phases.start()
        for mb in batches:
            toks, pos = to_device(mb.tokens, device), to_device(mb.position_ids(), device)
            where, targets = to_device(mb.response_positions(), device), to_device(mb.response_targets(), device)
            hidden = bridge.final_hidden_states(model, toks, pos, attention.packed_seq_params(mb.lengths, device))
            hidden = hidden.reshape(-1, hidden.shape[-1])[where]
            logp, _ = chunked_logprobs(hidden, bridge.output_weight(model), targets, vocab_start=0,
                                       vocab_size=spec.vocab_size, with_entropy=False,
                                       chunk_tokens=cfg.logprob_chunk_tokens)
            (-logp.sum() / len(where)).backward()
        phases.end("forward_backward")
        phases.start()
        optimizer.step()
        optimizer.zero_grad()
        phases.end("optimizer_step")
        times.append(time.perf_counter() - start)
    tokens = sum(len(s["tokens"]) for s in samples)
    timed = times[1:] or times
    step_s = sum(timed) / len(timed)
    params = sum(p.numel() for p in model.parameters())
    row = {"optimizer": kind, "shape": args.shape, "params_b": round(params / 1e9, 3),
           "tokens_per_step": tokens, "micro_batches": len(batches), "recompute": args.recompute,
           "step_s": round(step_s, 3), "tokens_per_s": round(tokens / step_s, 1), "phases": phases.rows,
           "peak_gib": max((r["peak_gib"] for r in phases.rows.values()), default=None),
           "host_rss_gib": host_rss_gib(),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    if isinstance(optimizer, ShardedOptimizer):
        row.update({k + "_gib": round(v / GIB, 2) for k, v in optimizer.memory_bytes().items()})
    else:
        row.update(optimizer_states_gib=round(12 * params / GIB, 2), optimizer_states_on_host_gib=0.0,
                   grad_buffer_gib=round(4 * params / GIB, 2))
    del optimizer, model
    return row


def bench_rank(rank: int, world: int, port: int, args) -> list[dict]:
    """One rank of the benchmark (DP = world): every optimizer of --optimizers in turn; rank 0's rows."""
    from megatron.core import parallel_state

    from trainer import bridge, megatron_compat

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    torch.distributed.init_process_group("nccl" if on_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    megatron_compat.apply()
    parallel_state.initialize_model_parallel(1, 1)
    megatron_compat.model_parallel_manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_config(args.shape, Path(tmp))
        spec = bridge.load_spec(path)
        lengths = sample_lengths(args.tokens * args.micro_batches, args.min_len, args.max_len)
        g = torch.Generator().manual_seed(1 + rank)  # each rank its own samples, the same token count
        samples = [{"tokens": torch.randint(0, spec.vocab_size, (n,), generator=g).tolist(),
                    "response_length": max(1, (3 * n) // 4)} for n in lengths]
        for kind in args.optimizers.split(","):
            try:
                row = run(kind, args, spec, path, samples, device)
            except torch.OutOfMemoryError as e:
                row = {"optimizer": kind, "shape": args.shape, "error": f"out of memory: {str(e).splitlines()[0]}"}
            if on_gpu:
                torch.cuda.empty_cache()
            row["dp"] = world
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return rows


def main() -> None:
    from kiln_common.net import free_port
    from trainer.testing import run_ranks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--optimizers", default="replicated,sharded,offload",
                    help=f"comma-separated, of {', '.join(OPTIMIZERS)}")
    ap.add_argument("--dp", type=int, default=1, help="data-parallel ranks (one GPU each), spawned here")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch")
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--min-len", type=int, default=512)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--recompute", choices=("none", "selective", "full"), default="full")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    if any(k not in OPTIMIZERS for k in args.optimizers.split(",")):
        ap.error(f"--optimizers {args.optimizers}: each must be one of {', '.join(OPTIMIZERS)}")
    if args.dp < 1 or (torch.cuda.is_available() and args.dp > torch.cuda.device_count()):
        ap.error(f"--dp {args.dp}: needs 1 <= dp <= {torch.cuda.device_count()} (the GPUs here)")
    if not torch.cuda.is_available():
        args.min_len, args.max_len, args.tokens = 8, 64, 256
    if args.dp == 1:
        rows = bench_rank(0, 1, free_port(), args)
    else:
        rows = run_ranks(bench_rank, args.dp, args)[0]
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Trainer step throughput: tokens/s, MFU and peak memory, Kiln's GPU path against megatron's local spec.

    python benchmarks/train_step.py --shape tiny                          # CPU smoke run
    python benchmarks/train_step.py --shape qwen3-0.6b --tokens 16384     # GPU
    python benchmarks/train_step.py --shape qwen3-8b --tokens 16384 --recompute full --no-optimizer --no-local
    python benchmarks/train_step.py --shape qwen3-0.6b --no-local --profile-steps 1 --out /tmp/prof  # + profile

Both variants train on the same rollout of variable-length sequences (random tokens, 75% of each
sequence is response). A step is forward + backward over every micro-batch + the optimizer step:
- kiln: packed micro-batches (one row, varlen flash attention), log-probs of the response tokens
  only through the chunked fused output layer, bf16 parameters with fp32 main grads / master
  weights / AdamW (PolicyOptimizer);
- local: megatron's local layer spec (attention materialises the score matrix), one padded row per
  sequence, full-vocabulary logits softmaxed in fp32, fp32 parameters under bf16 autocast + AdamW
  (the trainer before this change).
MFU = counted model FLOPs (`step_flops`: dense matmuls, causal attention, logits of the response
tokens; recomputation not counted) per second over the bf16 matmul rate measured in the same run. On GPU
each run also reports CUDA-event times per phase of one step (forward, log-probs forward, backward,
optimizer) and, with --profile-steps, a torch.profiler summary (kernel time by class and name, GPU idle
time, host syncs). The models are random and built in place (no weights are written or read); only
their shapes matter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936),
}


def write_config(shape: str, out_dir: Path) -> Path:
    """An HF folder holding only the config of a Qwen3 model of `shape` (weights are made in place)."""
    from transformers import Qwen3Config

    Qwen3Config(**SHAPES[shape], max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
                tie_word_embeddings=shape != "qwen3-8b").save_pretrained(out_dir)
    return out_dir


def sample_lengths(total: int, min_len: int, max_len: int, seed: int = 0) -> list[int]:
    """Random sequence lengths in [min_len, max_len] adding up to about `total` tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) + min_len <= total:
        lengths.append(min(int(torch.randint(min_len, max_len + 1, (), generator=g)), total - sum(lengths)))
    return lengths


def step_flops(spec, lengths: list[int], response_lengths: list[int]) -> float:
    """Model FLOPs of forward + backward: dense matmuls, causal attention, logits of the response tokens."""
    h, f, d = spec.hidden_size, spec.ffn_hidden_size, spec.head_dim
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    per_token = 6 * spec.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * f)
    attention = 6 * spec.num_layers * sum(n * n for n in lengths) * d * spec.num_heads  # 3 x 2 matmuls x L^2/2
    return per_token * sum(lengths) + attention + 6 * h * spec.vocab_size * sum(response_lengths)


def bf16_matmul_rate(device: torch.device) -> float:
    """Measured bf16 matmul FLOP/s (8192^3) on this device."""
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


class PhaseTimer:
    """CUDA-event spans per named phase of a step, summed over its occurrences."""

    def __init__(self):
        self.spans: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.spans.setdefault(name, []).append((start, end))

    def milliseconds(self) -> dict[str, float]:
        """Total milliseconds per phase."""
        torch.cuda.synchronize()
        return {name: round(sum(s.elapsed_time(e) for s, e in spans), 1) for name, spans in self.spans.items()}


KERNEL_CLASSES = (  # (class, substrings of the kernel name), first match wins
    ("attention", ("flash", "fmha")),
    ("matmul", ("gemm", "nvjet", "cutlass", "cublas", "sm90_xmma", "wgmma")),
    ("kiln triton", ("_qk_norm_rope", "_swiglu", "_softmax_stats", "_logit_grads")),  # trainer's own kernels
    ("triton", ("triton",)),
    ("optimizer", ("adam", "multi_tensor")),
    ("reduce", ("reduce", "norm")),
    ("copy/cat/index", ("copy", "cat", "index", "gather", "scatter", "fill")),
    ("elementwise", ("elementwise",)),
)


def kernel_class(name: str) -> str:
    """Coarse class of a CUDA kernel by its name."""
    low = name.lower()
    return next((cls for cls, keys in KERNEL_CLASSES if any(k in low for k in keys)), "other")


def profile_steps(step, steps: int, out_dir: Path, tag: str) -> dict:
    """Run `steps` steps under torch.profiler; kernel time by class and name, GPU idle time and host syncs."""
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    trace_path = out_dir / f"trace_{tag}.json"
    prof.export_chrome_trace(str(trace_path))
    events = json.loads(trace_path.read_text())["traceEvents"]
    trace_path.unlink()
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    busy, end, gaps = 0.0, kernels[0]["ts"], []
    for e in kernels:  # union of kernel intervals; idle stretches between them
        if e["ts"] > end:
            gaps.append(e["ts"] - end)
        busy += max(0.0, e["ts"] + e["dur"] - max(e["ts"], end))
        end = max(end, e["ts"] + e["dur"])
    by_name: dict[str, list[float]] = {}
    by_class: dict[str, float] = {}
    for e in kernels:
        by_name.setdefault(e["name"], [0, 0.0])
        by_name[e["name"]][0] += 1
        by_name[e["name"]][1] += e["dur"]
        by_class[kernel_class(e["name"])] = by_class.get(kernel_class(e["name"]), 0.0) + e["dur"]
    syncs = {}
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cpu_op") and e["name"] in (
                "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "aten::item",
                "aten::_local_scalar_dense", "aten::nonzero", "cudaStreamWaitEvent"):
            syncs.setdefault(e["name"], [0, 0.0])
            syncs[e["name"]][0] += 1
            syncs[e["name"]][1] += e.get("dur", 0.0)
    lines = [f"# {tag}: {steps} profiled steps, {len(kernels)} kernels, GPU span {span / 1e3 / steps:.1f} ms/step, "
             f"busy {busy / 1e3 / steps:.1f} ms/step, idle {(span - busy) / 1e3 / steps:.1f} ms/step in "
             f"{len(gaps)} gaps ({sum(g for g in gaps if g > 100) / 1e3 / steps:.1f} ms/step in gaps > 100 us)",
             "## kernel time by class (ms/step, share of busy)"]
    lines += [f"{cls:16s} {t / 1e3 / steps:9.2f} {t / busy:6.1%}" for cls, t in
              sorted(by_class.items(), key=lambda kv: -kv[1])]
    lines.append("## host syncs and copies (count/step, ms/step on the host)")
    lines += [f"{name:28s} {n / steps:7.1f} {t / 1e3 / steps:9.2f}" for name, (n, t) in sorted(syncs.items())]
    lines.append("## top kernels (ms/step, count/step, class, name)")
    for name, (n, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:40]:
        lines.append(f"{t / 1e3 / steps:9.2f} {n / steps:7.0f}  {kernel_class(name):14s} {name[:150]}")
    table = "\n".join(lines)
    (out_dir / f"profile_{tag}.txt").write_text(table + "\n\n" + prof.key_averages().table(
        sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=90))
    print(table, flush=True)
    return {"gpu_busy_ms": round(busy / 1e3 / steps, 1), "gpu_idle_ms": round((span - busy) / 1e3 / steps, 1)}


def random_init(model, std: float = 0.02) -> None:
    """Fill the model's parameters in place (norms 1, the rest normal(0, std))."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, std)


def run_variant(variant: str, args, spec, cfg, samples, device) -> dict:
    """Time `args.steps` steps of `variant` (kiln / local) after one warm-up; tokens/s, peak memory."""
    from megatron.core.models.gpt import gpt_layer_specs

    from trainer import actor, attention, bridge
    from trainer.batching import pack_micro_batches
    from trainer.logprobs import chunked_logprobs, vocab_parallel_logprobs
    from trainer.optimizer import PolicyOptimizer

    kiln = variant == "kiln"
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if kiln and on_gpu else torch.float32
    tconfig = bridge.build_transformer_config(spec, params_dtype=dtype, recompute=args.recompute if kiln else "none")
    layer_spec = None if kiln else gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm,
                                                                            normalization="RMSNorm")
    model = bridge.build_gpt_model(spec, tconfig, layer_spec=layer_spec)
    random_init(model)
    model.train()
    group = None
    optimizer = None if args.no_optimizer else PolicyOptimizer(model, cfg, dp_group=group, tp_group=group,
                                                               tp_rank=0)
    tokens = [s["tokens"] for s in samples]
    responses = [s["response_length"] for s in samples]
    batches = pack_micro_batches(list(range(len(samples))), tokens, responses, args.tokens, packed=kiln)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and not kiln else contextlib.nullcontext()
    vocab = spec.vocab_size
    # the trainer's own way of sending a micro-batch's inputs: sync-free pinned copies; `.to` in older trainers
    to_device = getattr(actor, "to_device", lambda t, dev: t.to(dev))

    def step(phase=lambda name: contextlib.nullcontext()) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for mb in batches:
            toks, pos = to_device(mb.tokens, device), to_device(mb.position_ids(), device)
            where, targets = to_device(mb.response_positions(), device), to_device(mb.response_targets(), device)
            if kiln:
                with phase("forward"):
                    packed = attention.packed_seq_params(mb.lengths, device)
                    hidden = bridge.final_hidden_states(model, toks, pos, packed)  # [T, 1, H]
                    hidden = hidden.reshape(-1, hidden.shape[-1])[where]
                with phase("logprobs forward"):
                    logp, _ = chunked_logprobs(hidden, bridge.output_weight(model), targets, vocab_start=0,
                                               vocab_size=vocab, with_entropy=True,
                                               chunk_tokens=cfg.logprob_chunk_tokens)
            else:
                with phase("forward"), amp:
                    logits = model(toks, pos, None)  # [rows, width, V]
                with phase("logprobs forward"):
                    rows = logits.reshape(-1, logits.shape[-1])[where]
                    logp, _ = vocab_parallel_logprobs(rows, targets, vocab_start=0, vocab_size=vocab,
                                                      with_entropy=True)
            loss = -logp.sum() / len(where)
            with phase("backward"):
                loss.backward()
            total += loss.detach()
        with phase("optimizer"):
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad()
            else:
                model.zero_grad(set_to_none=True)
        return total

    step()  # warm-up (kernel selection, allocator)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
    phases = {}
    if on_gpu:  # one more step with CUDA events around its phases (summed over micro-batches)
        timer = PhaseTimer()
        step(timer)
        phases = {"phase_ms": timer.milliseconds()}
    profile = profile_steps(step, args.profile_steps, Path(args.out), variant) if args.profile_steps and on_gpu else {}
    del model, optimizer
    if on_gpu:
        torch.cuda.empty_cache()
    return {"variant": variant, "micro_batches": len(batches), "step_s": round(elapsed, 4), "peak_gib": round(peak, 2),
            "padded_tokens": sum(b.padded_tokens for b in batches), **phases, **profile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch (padded for local)")
    parser.add_argument("--micro-batches", type=int, default=2, help="rollout size in micro-batches of --tokens")
    parser.add_argument("--min-len", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    parser.add_argument("--no-optimizer", action="store_true", help="forward + backward only (model too big)")
    parser.add_argument("--no-local", action="store_true", help="skip megatron's local-spec baseline")
    parser.add_argument("--local-tokens", type=int, default=4096, help="micro-batch budget of the local baseline")
    parser.add_argument("--profile-steps", type=int, default=0, help="GPU: steps under torch.profiler after timing")
    parser.add_argument("--out", default=".", help="folder for profiler traces and kernel tables")
    args = parser.parse_args()

    from megatron.core import parallel_state

    from trainer import bridge, megatron_compat
    from trainer.config import TrainerConfig
    from kiln_common.net import free_port

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        args.min_len, args.max_len, args.tokens, args.local_tokens = 8, 64, 256, 256
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    megatron_compat.apply()
    parallel_state.initialize_model_parallel(1, 1)
    megatron_compat.model_parallel_manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_config(args.shape, Path(tmp))
        spec = bridge.load_spec(path)
        cfg = TrainerConfig(hf_checkpoint=str(path), lr=1e-6)
        lengths = sample_lengths(args.tokens * args.micro_batches, args.min_len, args.max_len)
        g = torch.Generator().manual_seed(1)
        samples = [{"tokens": torch.randint(0, spec.vocab_size, (n,), generator=g).tolist(),
                    "response_length": max(1, (3 * n) // 4)} for n in lengths]
        flops = step_flops(spec, lengths, [s["response_length"] for s in samples])
        rate = bf16_matmul_rate(device) if device.type == "cuda" else float("nan")
        rows = []
        for variant in ("kiln",) + (() if args.no_local else ("local",)):
            budget = args.tokens if variant == "kiln" else args.local_tokens
            run_args = argparse.Namespace(**{**vars(args), "tokens": budget})
            try:
                row = run_variant(variant, run_args, spec, cfg, samples, device)
            except torch.OutOfMemoryError as e:
                row = {"variant": variant, "error": f"out of memory: {str(e).splitlines()[0]}"}
                torch.cuda.empty_cache()
            if "step_s" in row:
                row["tokens_per_s"] = round(sum(lengths) / row["step_s"], 1)
                row["mfu"] = round(flops / row["step_s"] / rate, 4) if rate == rate else None
            row.update(shape=args.shape, tokens_per_micro_batch=budget, sequences=len(lengths),
                       total_tokens=sum(lengths), recompute=args.recompute if variant == "kiln" else "none",
                       optimizer=not args.no_optimizer,
                       device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       bf16_matmul_tflops=round(rate / 1e12, 1) if rate == rate else None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

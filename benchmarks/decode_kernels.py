"""Where a decode step's device time goes, kernel by kernel, on a real model shape; and GEMV candidates side by side.

Builds the engine's model of a named shape (`engine_throughput.SHAPES`) with random weights directly on
the GPU (no checkpoint), a KV pool, the flashinfer backend and the decode graphs; then per batch size:
  - the graph replay's device time (CUDA events) and its kernels (torch.profiler over replays), grouped
    per layer position and per class, each against its bytes over the measured copy bandwidth;
  - LM head + greedy sampling after the graph (eager, today's path) and inside it;
  - every linear of the model (36 layers' own weights, as in the graph) through cuBLAS (F.linear) and
    through the triton GEMV under a few block configurations.

    python -m benchmarks.decode_kernels --shape qwen3-8b --batches 1,8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.engine_throughput import SHAPES, copy_bandwidth, event_ms, graphed

CONTEXT = 160  # tokens of context per request (the throughput benchmark's 128 prompt + mean of 64 decode steps)
GEMV_CONFIGS = {1: [(1, 8, 512, 4), (1, 4, 512, 4), (1, 8, 256, 4), (1, 16, 256, 4), (1, 8, 1024, 8),
                    (1, 4, 1024, 4), (1, 2, 1024, 4), (1, 16, 512, 8), (1, 32, 128, 4), (1, 2, 2048, 4),
                    (1, 1, 2048, 4)],
                8: [(8, 8, 64, 4), (8, 4, 128, 4), (8, 16, 64, 8), (8, 8, 128, 8), (8, 2, 256, 4)]}


def build(shape: str, max_bs: int, device: torch.device):
    """(model, kv_pool, backend, graph runner) of the shape with random bf16 weights."""
    from inference_engine.attention import get_backend_class
    from inference_engine.cuda_graph import CudaGraphRunner
    from inference_engine.kv_cache import KVPool
    from inference_engine.models import CausalLM
    from kiln_common.model_spec import ModelSpec

    spec = ModelSpec.from_hf_config(dict(SHAPES[shape]))
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalLM(spec)
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.bfloat16)
        if "norm" in name:
            p.data.fill_(1.0)
        else:
            p.data.normal_(0, 0.02)
    pages_per_req = -(-(CONTEXT + 64) // 16)
    pool = KVPool((max_bs * pages_per_req + 2) * 16, 16, spec.num_layers, spec.num_kv_heads, spec.head_dim,
                  torch.bfloat16, device)
    attn = get_backend_class("flashinfer")(spec.num_heads, spec.num_kv_heads, spec.head_dim, device, page_size=16,
                                           dtype=torch.bfloat16)
    graphs = CudaGraphRunner(model, attn, pool, max_bs, pages_per_req * 16, device)
    return spec, model, pool, attn, graphs, pages_per_req


def decode_batch(bs: int, pages_per_req: int, pool, attn, vocab: int, device: torch.device):
    """A decode ForwardBatch of bs requests with CONTEXT tokens each, on their own pages."""
    from inference_engine.forward_batch import ForwardBatch

    lens = torch.full((bs,), CONTEXT, dtype=torch.int64)
    starts = (1 + torch.arange(bs) * pages_per_req) * 16  # first slot of each request (page 0 is padding)
    kv_indices = torch.cat([s + torch.arange(CONTEXT) for s in starts.tolist()])
    kv_indptr = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    return ForwardBatch(
        input_ids=torch.randint(0, vocab, (bs,), device=device), positions=(lens - 1).to(device),
        out_cache_loc=(starts + CONTEXT - 1).to(device), qo_indptr=torch.arange(bs + 1, device=device),
        kv_indptr=kv_indptr.to(device), kv_indices=kv_indices.to(device), seq_lens=lens.to(device),
        seq_lens_cpu=lens, extend_lens=[1] * bs, kv_pool=pool, attn_backend=attn)


def kernel_trace(fn, path: Path) -> list[tuple[str, float]]:
    """(kernel name, device us) of every kernel fn() runs, in launch order, from a torch.profiler trace."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("cat") == "kernel"]
    events.sort(key=lambda e: e["ts"])
    return [(e["name"], float(e["dur"])) for e in events]


def short(name: str) -> str:
    name = re.sub(r"<.*", "", name.replace("void ", ""))
    return name[:60]


def layer_table(kernels: list[tuple[str, float]], layers: int, replays: int) -> tuple[list, dict]:
    """Per-position mean us of the kernels of one decoder layer (positions found from the qk-norm-RoPE kernel)."""
    marks = [i for i, (n, _) in enumerate(kernels) if "qk_norm_rope" in n]
    if len(marks) < layers * replays or len(marks) < 3:
        return [], {}
    period = marks[1] - marks[0]
    positions: dict[int, list] = defaultdict(list)
    for m in marks:
        start = m - 2  # the layer starts two kernels before the RoPE kernel: input norm, qkv GEMV
        for j in range(period):
            if 0 <= start + j < len(kernels):
                positions[j].append(kernels[start + j])
    rows = [(j, short(v[0][0]), sum(d for _, d in v) / len(v), len(v)) for j, v in sorted(positions.items())]
    return rows, {"period": period}


def profile_graph(bs, graphs, fb, bw, spec, weight_bytes, out: Path, tag: str) -> dict:
    """Graph replay time and its kernels by layer position; returns the summary row."""
    graphs.replay(fb)  # sets the static buffers and the plan
    size = next(s for s in graphs.batch_sizes if s >= bs)
    g = graphs.graphs[size]
    replay_ms = event_ms(g.replay, 20)
    traces = Path(tempfile.mkdtemp(prefix="kiln_traces_"))  # not in $OUT: only a few files come back
    kernels = kernel_trace(lambda: [g.replay() for _ in range(3)], traces / f"trace_{tag}_bs{bs}.json")
    if not kernels:  # this profiler does not see inside graphs: name the kernels of eager forwards instead
        static = graphs.batches[size]
        kernels = kernel_trace(lambda: [graphs.model(static) for _ in range(3)], traces / f"eager_{tag}_bs{bs}.json")
        print("  (kernels of eager forwards: the profiler saw none inside the graph)")
    busy = sum(d for _, d in kernels) / 3 / 1e3
    rows, info = layer_table(kernels, spec.num_layers, 3)
    kv_bytes = bs * CONTEXT * 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 2
    ideal = (weight_bytes + kv_bytes) / bw * 1e3
    print(f"\n== {tag} batch {bs}: graph replay {replay_ms:.3f} ms, kernels busy {busy:.3f} ms "
          f"({len(kernels) / 3:.0f} kernels), roofline of the layers+head {ideal:.3f} ms ({ideal / replay_ms:.0%})")
    per_layer = 0.0
    for j, name, us, n in rows:
        per_layer += us
        print(f"  pos {j:2d} {name:60s} {us:8.2f} us  x{n}")
    if rows:
        print(f"  one layer {per_layer:.1f} us, x {spec.num_layers} = {per_layer * spec.num_layers / 1e3:.3f} ms")
    totals: dict[str, float] = defaultdict(float)
    for name, d in kernels:
        totals[short(name)] += d / 3
    for name, d in sorted(totals.items(), key=lambda x: -x[1])[:15]:
        print(f"  total {name:60s} {d / 1e3:8.3f} ms")
    return {"replay_ms": replay_ms, "busy_ms": busy, "kernels": len(kernels) / 3, "roofline_ms": ideal}


def linear_candidates(model, spec, bw: float, rows: int, results: dict) -> None:
    """Each linear class over all layers' weights, cuBLAS vs triton GEMV configs, in CUDA graphs."""
    from inference_engine import ops
    from inference_engine.ops import triton_ops

    layers = model.model.layers
    head = model.lm_head.weight if model.lm_head is not None else model.model.embed_tokens.weight
    classes = {
        "qkv": [(l.self_attn.qkv_proj.weight, spec.hidden_size) for l in layers],
        "o": [(l.self_attn.o_proj.weight, spec.num_heads * spec.head_dim) for l in layers],
        "gate_up": [(l.mlp.gate_up_proj.weight, spec.hidden_size) for l in layers],
        "down": [(l.mlp.down_proj.weight, spec.intermediate_size) for l in layers],
        "lm_head": [(head, spec.hidden_size)],
    }
    for cls, weights in classes.items():
        xs = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for _, k in weights]
        nbytes = sum(w.numel() * w.element_size() for w, _ in weights)
        ideal = nbytes / bw * 1e3
        ref = [F.linear(x, w) for x, (w, _) in zip(xs, weights)]
        cands = {"cublas": lambda: [F.linear(x, w) for x, (w, _) in zip(xs, weights)]}
        for cfg in GEMV_CONFIGS.get(rows, []):
            cands["triton " + "x".join(map(str, cfg))] = (
                lambda cfg=cfg: [triton_ops.linear(x, w, config=cfg) for x, (w, _) in zip(xs, weights)])
        line = []
        for name, fn in cands.items():
            try:
                err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(fn(), ref))
                ms = event_ms(graphed(fn).replay, 10)
            except Exception as exc:  # a config triton cannot build is reported, not fatal
                line.append(f"{name}: failed {type(exc).__name__}")
                continue
            results[f"{cls} M={rows} {name}"] = ms
            line.append(f"{name}: {ms:.3f} ms ({ideal / ms:.0%}, err {err:.1e})")
        print(f"  {cls:8s} M={rows} [{nbytes / 1e9:.2f} GB, ideal {ideal:.3f} ms] " + "; ".join(line))
    downs = classes["down"]
    gus = [torch.randn(rows, 2 * k, device="cuda", dtype=torch.bfloat16) for _, k in downs]
    nbytes = sum(w.numel() * w.element_size() for w, _ in downs)
    cands = {"silu kernel + cublas": lambda: [F.linear(ops.silu_and_mul(x), w) for x, (w, _) in zip(gus, downs)],
             "silu kernel + gemv": lambda: [triton_ops.linear(ops.silu_and_mul(x), w) for x, (w, _) in zip(gus, downs)],
             "gemv with silu fused": lambda: [triton_ops.linear(x, w, silu_mul=True) for x, (w, _) in zip(gus, downs)]}
    line = []
    for name, fn in cands.items():
        ms = event_ms(graphed(fn).replay, 10)
        results[f"down+silu M={rows} {name}"] = ms
        line.append(f"{name}: {ms:.3f} ms ({nbytes / bw * 1e3 / ms:.0%})")
    print(f"  down+silu M={rows} " + "; ".join(line))


def head_and_sampling(model, graphs, bs: int, results: dict, tag: str) -> None:
    """LM head + greedy pick inside the decode graph (now) vs a forward-only graph with both run eagerly after it."""
    from inference_engine.sampler import SamplingBatch, sample

    size = next(s for s in graphs.batch_sizes if s >= bs)
    dev = torch.device("cuda")
    sb = SamplingBatch(temperatures=torch.ones(bs, device=dev), greedy=torch.ones(bs, dtype=torch.bool, device=dev),
                       top_k=torch.full((bs,), model.spec.vocab_size, device=dev), top_p=torch.ones(bs, device=dev),
                       min_p=torch.zeros(bs, device=dev), repetition_penalty=None, frequency_penalty=None,
                       presence_penalty=None, seen_mask=None, output_counts=None,
                       seeds=torch.arange(bs, device=dev), offsets=torch.zeros(bs, dtype=torch.int64, device=dev),
                       top_logprobs_num=0, all_greedy=True, truncates=False)
    fb_static = graphs.batches[size]
    forward_only = graphed(lambda: model(fb_static))
    hidden = graphs.outputs[size].hidden[:bs]

    def eager_head():
        forward_only.replay()
        return sample(model.logits(hidden), sb)

    results[f"{tag} bs{bs} graph: forward + head + greedy"] = event_ms(graphs.graphs[size].replay)
    results[f"{tag} bs{bs} graph: forward only"] = event_ms(forward_only.replay)
    results[f"{tag} bs{bs} forward graph + eager head/greedy (old)"] = event_ms(eager_head)
    temp = SamplingBatch(**{**sb.__dict__, "greedy": torch.zeros(bs, dtype=torch.bool, device=dev),
                            "temperatures": torch.full((bs,), 0.7, device=dev), "all_greedy": False,
                            "top_k": torch.full((bs,), 50, device=dev), "top_p": torch.full((bs,), 0.9, device=dev),
                            "truncates": True})
    logits = graphs.outputs[size].logits[:bs]
    results[f"{tag} bs{bs} sampler T=0.7 top-k/p (eager)"] = event_ms(lambda: sample(logits, temp))
    plain = SamplingBatch(**{**temp.__dict__, "truncates": False})
    results[f"{tag} bs{bs} sampler T=0.7 (eager)"] = event_ms(lambda: sample(logits, plain))
    for key in [k for k in results if k.startswith(f"{tag} bs{bs} ")]:
        print(f"  {key}: {results[key]:.3f} ms")


def race_candidates(vocab: int, results: dict) -> None:
    """Seeded [B, V] probability draws: one generator per row (the old sampler) vs the counter-based race kernel."""
    from inference_engine import ops

    for bs in (1, 64):
        probs = torch.softmax(torch.randn(bs, vocab, device="cuda"), dim=-1)
        gens = [torch.Generator(device="cuda").manual_seed(i) for i in range(bs)]
        seeds, offsets = torch.arange(bs, device="cuda"), torch.zeros(bs, dtype=torch.int64, device="cuda")

        def per_row():
            noise = torch.empty_like(probs)
            for row, gen in enumerate(gens):
                noise[row].exponential_(generator=gen)
            return (probs / noise).argmax(dim=-1)

        results[f"race bs{bs} per-row generators (eager)"] = event_ms(per_row, 10)
        results[f"race bs{bs} seeded_race kernel (eager)"] = event_ms(lambda: ops.seeded_race(probs, seeds, offsets))
        for key in [k for k in results if k.startswith(f"race bs{bs} ")]:
            print(f"  {key}: {results[key]:.3f} ms")


def guarded(what: str, fn) -> None:
    """fn(); a failure is printed and the next measurement runs."""
    try:
        fn()
    except Exception:  # one failed measurement must not lose the rest of the device call
        print(f"!! {what} failed:\n{traceback.format_exc()}", flush=True)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--linear-rows", default="1,8")
    ap.add_argument("--max-bs", type=int, default=8)
    args = ap.parse_args()

    from inference_engine import ops

    out = Path(os.environ.get("OUT", tempfile.mkdtemp(prefix="kiln_kernels_")))
    dev = torch.device("cuda")
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    start = time.perf_counter()
    spec, model, pool, attn, graphs, ppr = build(args.shape, args.max_bs, dev)
    params = dict(model.named_parameters())
    weight_bytes = sum(p.numel() * p.element_size() for n, p in params.items() if n != "model.embed_tokens.weight"
                       or spec.tie_word_embeddings)
    print(f"built {args.shape} in {time.perf_counter() - start:.1f} s, {weight_bytes / 1e9:.2f} GB read per step "
          f"(layers + head), ideal {weight_bytes / bw * 1e3:.3f} ms", flush=True)
    results: dict = {}
    batches = [int(b) for b in args.batches.split(",") if b]
    for tag, max_rows in (("cublas", 0), ("triton-gemv", ops.GEMV_MAX_ROWS)):
        ops.GEMV_MAX_ROWS = max_rows  # 0: every linear through cuBLAS, norms and SiLU-and-mul as their own kernels
        guarded(f"{tag} capture", graphs.capture)  # recapture with this linear path
        for bs in batches:
            fb = decode_batch(bs, ppr, pool, attn, spec.vocab_size, dev)
            guarded(f"{tag} profile batch {bs}",
                    lambda: results.__setitem__(f"{tag} bs{bs}", profile_graph(bs, graphs, fb, bw, spec, weight_bytes,
                                                                                out, tag)))
            guarded(f"{tag} head batch {bs}", lambda: head_and_sampling(model, graphs, bs, results, tag))
    print("\n== linears, all layers' weights, in CUDA graphs (fraction of copy-bandwidth time)", flush=True)
    for rows in [int(r) for r in args.linear_rows.split(",") if r]:
        guarded(f"linears M={rows}", lambda: linear_candidates(model, spec, bw, rows, results))
    guarded("race", lambda: race_candidates(spec.vocab_size, results))
    (out / "decode_kernels.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

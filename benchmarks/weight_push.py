"""Colocated weight-sync throughput into the real inference Engine, running in its own process.

The trainer's weights are random bf16 tensors in one flat device buffer (as a contiguous parameter
buffer holds them), HF-named views of it; the receiver is an `inference_engine.Engine` built from a
local HF folder of the same shape (config, tokenizer, a zero-filled sparse safetensors file: no hub).
Five paths are timed side by side, taking turns push by push, end to end (pause, every bucket
loaded into the engine's fused parameters, radix-cache flush, version, continue), each after a
checksum-verified warm-up push:

  old              every bucket flattened into fresh buffers, fresh handles, opened by the engine per bucket
  packed           `push_weights`: buckets packed into two persistent staging buffers shared once (two copies)
  in-place-3-calls `push_weights(resident=[buffer])`'s wire with pause and continue as calls of their own, the
                   trainer's buffer shared and opened anew for every push (`keep_resident_open=False`)
  in-place-reopen  the same in one call per engine (pause and continue ride along with the load): the RL loop's
                   push when the trainer offloads between steps (its buffer moves, so it is opened anew)
  in-place         the same with the buffer kept open on the engine between pushes (`keep_resident_open=True`):
                   a repeated push opens nothing and the engine reuses its views and copy list; one copy per byte

With `--rollout-dtype bf16,fp8` the same runs against an FP8 engine (`--rollout-dtype fp8`: e4m3 linears with
128x128 block scales) follow, paths `packed`, `in-place` (both quantise in the engine while loading: it reads the
trainer's bf16 and writes e4m3 + scales) and `sender-quant` (the sender quantises before the wire and the engine
copies e4m3 + scales: half the bytes through staging); the `vs bf16` column is the push time over the bf16
engine's `in-place` push (issue #22's target: <= 2x).

A second table splits each path's milliseconds into the sender's phases (`PushStats.phases`) and the
engine's own for its last load call (`Engine.metrics()["weight_update_phases_s"]`).

Copy bandwidth: the model's bytes over the time of one `dst.copy_(src)` of a buffer of that size on
the same device, measured in the same run; a push moves the same bytes, so GB/s over it is the ratio.
A third table times the copy alone, in this process, from the model's tensors (views of one buffer)
into separate tensors: one `torch._foreach_copy_`, a `copy_` per tensor, and `copy_tensors` (what the
engine's loader runs: large tensors one by one, the rest in one multi-tensor copy).

    python benchmarks/weight_push.py                      # GPU: Qwen3-0.6B and Qwen3-8B shapes, bf16
    python benchmarks/weight_push.py --device cpu --smoke # CPU: small shapes over shared memory
    python benchmarks/weight_push.py --models qwen3-8b --rollout-dtype bf16,fp8   # GPU: bf16 vs FP8 engine
    OMP_NUM_THREADS=1 python benchmarks/weight_push.py --device cpu --models tiny,tiny-deep,medium --repeats 20
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# run as a script, this file would shadow the weight_sync package
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from benchmarks.processes import RemoteWeightEndpoint
from weight_sync import WeightSender, WeightSyncConfig, bucket_named_tensors, push_weights, share_bucket
from weight_sync.buckets import copy_tensors, tensor_bytes
from inference_engine.engine import Engine
from weight_sync.fp8 import Fp8Layout

PATHS = ("old", "packed", "in-place-3-calls", "in-place-reopen", "in-place")
FP8_PATHS = ("packed", "in-place", "sender-quant")
# keep_resident_open per path
KEEP_OPEN = {"packed": True, "in-place-3-calls": False, "in-place-reopen": False, "in-place": True,
             "sender-quant": True}
PHASES = ("pause", "pack", "wait", "resume", "other", "total")   # the sender's (weight_sync.push.PHASES, less verify)
ENGINE_PHASES = ("open", "queue", "load", "flush", "close", "total")   # Engine.metrics()["weight_update_phases_s"]


@dataclass(frozen=True)
class Qwen3Shape:
    """The sizes of a Qwen3 dense model that determine its tensors."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool


SHAPES = {
    "qwen3-0.6b": Qwen3Shape("Qwen3-0.6B", 1024, 28, 16, 8, 128, 3072, 151936, True),
    "qwen3-8b": Qwen3Shape("Qwen3-8B", 4096, 36, 32, 8, 128, 12288, 151936, False),
    "tiny": Qwen3Shape("tiny", 64, 2, 4, 2, 16, 128, 512, True),
    "small": Qwen3Shape("small", 256, 4, 8, 4, 32, 768, 8192, False),
    "medium": Qwen3Shape("medium", 1024, 8, 16, 8, 64, 3072, 32768, False),
    "tiny-deep": Qwen3Shape("tiny-deep", 64, 28, 4, 2, 16, 128, 512, True),   # Qwen3-0.6B's 310 tensors, tiny ones
}


def hf_tensor_shapes(s: Qwen3Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(hf_name, shape) of every tensor of a Qwen3 checkpoint of these sizes."""
    out = [("model.embed_tokens.weight", (s.vocab, s.hidden))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (s.hidden,)),
                (p + "self_attn.q_proj.weight", (s.heads * s.head_dim, s.hidden)),
                (p + "self_attn.k_proj.weight", (s.kv_heads * s.head_dim, s.hidden)),
                (p + "self_attn.v_proj.weight", (s.kv_heads * s.head_dim, s.hidden)),
                (p + "self_attn.o_proj.weight", (s.hidden, s.heads * s.head_dim)),
                (p + "self_attn.q_norm.weight", (s.head_dim,)),
                (p + "self_attn.k_norm.weight", (s.head_dim,)),
                (p + "post_attention_layernorm.weight", (s.hidden,)),
                (p + "mlp.gate_proj.weight", (s.intermediate, s.hidden)),
                (p + "mlp.up_proj.weight", (s.intermediate, s.hidden)),
                (p + "mlp.down_proj.weight", (s.hidden, s.intermediate))]
    out.append(("model.norm.weight", (s.hidden,)))
    if not s.tied:
        out.append(("lm_head.weight", (s.vocab, s.hidden)))
    return out


def write_model_folder(s: Qwen3Shape, out_dir: Path, dtype: torch.dtype) -> Path:
    """HF folder of this shape: config.json, a locally trained tokenizer, zero weights in a sparse safetensors file."""
    from inference_engine.testing import make_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out_dir)
    config = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": s.vocab,
              "hidden_size": s.hidden, "intermediate_size": s.intermediate, "num_hidden_layers": s.layers,
              "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim,
              "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 4096,
              "tie_word_embeddings": s.tied, "torch_dtype": str(dtype).removeprefix("torch.")}
    (out_dir / "config.json").write_text(json.dumps(config))
    code = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in hf_tensor_shapes(s):
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(out_dir / "model.safetensors", "wb") as f:   # the data are a hole: zeros, nothing written
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return out_dir


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_seconds(fn, device: str, repeats: int) -> float:
    """Median wall time of fn() (device work included), after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int, repeats: int = 5) -> float:
    """GB/s of one device-to-device `copy_` of an `nbytes` buffer: nbytes over its median time."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), device, repeats)
    del src, dst
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return nbytes / 1e9 / seconds


def tensor_copy_seconds(shape: Qwen3Shape, dtype: torch.dtype, device: str, repeats: int = 5) -> dict[str, float]:
    """Median seconds to copy the model's tensors (views of one buffer) into separate tensors, three ways."""
    _, named = trainer_weights(shape, dtype, device)
    srcs = [t for _, t in named]
    dsts = [torch.empty_like(t) for t in srcs]
    out = {"foreach": _median_seconds(lambda: torch._foreach_copy_(dsts, srcs), device, repeats),
           "per-tensor": _median_seconds(lambda: [d.copy_(s) for d, s in zip(dsts, srcs)], device, repeats),
           "copy_tensors": _median_seconds(lambda: copy_tensors(dsts, srcs), device, repeats)}
    del named, srcs, dsts
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def trainer_weights(shape: Qwen3Shape, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, list]:
    """One flat buffer of random weights and (hf_name, view of it) for every tensor of the shape."""
    shapes = hf_tensor_shapes(shape)
    flat = torch.empty(sum(torch.Size(s).numel() for _, s in shapes), dtype=dtype, device=device)
    flat.normal_(0, 0.02)
    named, offset = [], 0
    for name, s in shapes:
        n = torch.Size(s).numel()
        named.append((name, flat[offset:offset + n].view(s)))
        offset += n
    return flat, named


@contextlib.contextmanager
def three_calls(engine, phases: dict[str, float]):
    """Pause the engine, run the body's load calls, continue (also after a failure); then total and the rest.

    The protocol before pause and continue rode along with the loads; `phases` gets pause, resume, total
    and other (total less the named phases), the body fills pack and wait.
    """
    start = time.perf_counter()
    engine.pause_generation("pause")
    phases["pause"] = time.perf_counter() - start
    try:
        yield
    finally:
        resumed = time.perf_counter()
        engine.continue_generation()
        phases["resume"] = time.perf_counter() - resumed
    phases["total"] = time.perf_counter() - start
    phases["other"] = phases["total"] - sum(phases[k] for k in ("pause", "pack", "wait", "resume"))


def push_old(named: list, engine, bucket_bytes: int, version: int) -> dict[str, float]:
    """Last version's push: each bucket flattened into fresh buffers, shared by fresh handles; its phases (seconds)."""
    phases = dict.fromkeys(PHASES, 0.0)
    buckets = 0
    with three_calls(engine, phases):
        for bucket in bucket_named_tensors(iter(named), bucket_bytes):
            packed = time.perf_counter()
            shared = share_bucket(bucket)
            sent = time.perf_counter()
            engine.update_weights_from_tensor(shared, version)
            phases["pack"] += sent - packed
            phases["call"] = time.perf_counter() - sent
            phases["wait"] += phases["call"]
            del shared
            if torch.cuda.is_available():
                torch.cuda.ipc_collect()
            buckets += 1
    return {**phases, "buckets": buckets, "calls": buckets + 2}


def push_unfused(named: list, engine, sender: WeightSender, bucket_bytes: int, version: int,
                 resident: list[torch.Tensor]) -> dict[str, float]:
    """The in-place push as it went before pause and continue rode along with the load: three calls; its phases."""
    phases = dict.fromkeys(PHASES, 0.0)
    with three_calls(engine, phases):
        sent = sender.send_update(bucket_named_tensors(iter(named), bucket_bytes), [engine], version, resident)
        phases["pack"], phases["wait"] = sent.pack_s, sent.wait_s
    return {**phases, "buckets": sent.buckets, "calls": sent.messages + 2, "call": sent.message_s[-1]}


def verify(engine, named: list, layout: Fp8Layout | None = None) -> None:
    """The engine holds exactly `named` (FP8 engines: its quantisation under `layout`), checksums on both sides."""
    from weight_sync import compare_checksums
    from weight_sync.checksum import TensorChecksum, checksums

    reported = {k: TensorChecksum.from_dict(v) for k, v in engine.weight_checksums().items()}
    compare_checksums(checksums(named if layout is None else layout.quantize_bucket(named)), reported)


def push_once(path: str, named: list, engine, sender: WeightSender | None, bucket_bytes: int, version: int,
              resident: list[torch.Tensor]) -> dict[str, float]:
    """One push along `path`: the sender's phases (seconds), buckets, calls per engine (pause and continue
    included) and `call`, the round trip of the last load call."""
    if path == "old":
        return push_old(named, engine, bucket_bytes, version)
    if path == "in-place-3-calls":
        return push_unfused(named, engine, sender, bucket_bytes, version, resident)
    stats = push_weights(bucket_named_tensors(iter(named), bucket_bytes), [engine], sender, version, resident=resident)
    return {**stats.phases, "buckets": stats.buckets, "calls": stats.messages, "call": stats.message_seconds[-1]}


def bench_model(shape: Qwen3Shape, device: str, dtype: torch.dtype, bucket_bytes: int, repeats: int,
                work_dir: Path, rollout_dtype: str = "bf16") -> list[dict]:
    """Median seconds (and phases) of each path's push of this model shape, each after a verified warm-up push."""
    model_dir = work_dir / shape.name
    if not (model_dir / "config.json").exists():
        write_model_folder(shape, model_dir, dtype)
    layout = Fp8Layout() if rollout_dtype == "fp8" else None
    paths = FP8_PATHS if layout is not None else PATHS
    factory = functools.partial(Engine, model_path=str(model_dir), device=device, dtype=str(dtype).removeprefix(
        "torch."), max_total_tokens=4096, context_length=2048, disable_cuda_graph=True,
        weight_dtype="fp8" if layout is not None else "auto")
    engine = RemoteWeightEndpoint(factory, name="engine")
    rows = []
    try:
        flat, named = trainer_weights(shape, dtype, device)
        total = sum(tensor_bytes(t) for _, t in named)
        senders = {path: WeightSender(WeightSyncConfig(
            transport="colocated", bucket_bytes=bucket_bytes, keep_resident_open=KEEP_OPEN[path], fp8=layout,
            fp8_quantize_on="sender" if path == "sender-quant" else "engine")) for path in paths if path != "old"}
        pushes: dict[str, list[dict]] = {path: [] for path in paths}
        engine_phases: dict[str, list[dict]] = {path: [] for path in paths}
        version = 0
        for i in range(repeats + 1):   # the paths take turns, so a machine's drift touches each alike
            for path in paths:
                version += 1
                flat.add_(1e-3)   # a training step: every weight changes
                _sync(device)
                resident = [flat] if path.startswith("in-place") else []
                pushes[path].append(push_once(path, named, engine, senders.get(path), bucket_bytes, version, resident))
                engine_phases[path].append(engine.metrics()["weight_update_phases_s"])
                if i == 0:
                    verify(engine, named, layout)
        for sender in senders.values():
            sender.close()
        for path in paths:
            seconds = statistics.median(p["total"] for p in pushes[path][1:])
            rows.append({"model": shape.name, "rollout": rollout_dtype, "path": path, "tensors": len(named),
                         "gb": total / 1e9,
                         "buckets": pushes[path][-1]["buckets"], "calls": pushes[path][-1]["calls"],
                         "seconds": seconds, "gb_per_s": total / 1e9 / seconds,
                         "phases": _medians(pushes[path][1:], (*PHASES, "call")),
                         "engine": _medians(engine_phases[path][1:], ENGINE_PHASES)})
        del flat, named
    finally:
        engine.close()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def _medians(dicts: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    """Median of each key over the dicts (a missing key counts 0)."""
    return {k: statistics.median(d.get(k, 0.0) for d in dicts) for k in keys}


def print_phases(rows: list[dict]) -> None:
    """Where each path's milliseconds go: the sender's phases, and the engine's own for its last load call."""
    print("\nms per push, medians. Sender: pause | pack | wait (load calls) | resume | other | total. Engine, its "
          "last load call: open (handles, views) | queue (hand-off to the scheduler thread) | load | flush | close "
          "| in-call total; transport = that call's round trip at the sender minus the engine's in-call total.")
    print("| model shape | path | calls | pause | pack | wait | resume | other | total | open | queue | load | flush "
          "| close | engine call | transport |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        p, e = r["phases"], r["engine"]
        ms = [p[k] * 1e3 for k in ("pause", "pack", "wait", "resume", "other", "total")]
        ms += [e[k] * 1e3 for k in ("open", "queue", "load", "flush", "close", "total")]
        ms.append((p["call"] - e["total"]) * 1e3)
        print(f"| {r['model']} [{r['rollout']}] | {r['path']} | {r['calls']} | " + " | ".join(f"{v:.3f}" for v in ms)
              + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="qwen3-0.6b,qwen3-8b", help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--smoke", action="store_true", help="tiny and small shapes (CPU code-path check)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rollout-dtype", default="bf16", help="comma list of the engines' weights: bf16 (the "
                        "trainer's dtype), fp8 (EngineConfig.weight_dtype 'fp8'), side by side per model shape")
    args = parser.parse_args()
    names = ["tiny", "small"] if args.smoke else args.models.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown model shapes {unknown}; expected some of {sorted(SHAPES)}")
    rollout_dtypes = args.rollout_dtype.split(",")
    if not set(rollout_dtypes) <= {"bf16", "fp8"}:
        parser.error(f"--rollout-dtype {args.rollout_dtype!r}: expected a comma list of bf16, fp8")
    dtype = getattr(torch, args.dtype)
    bucket_bytes = args.bucket_mb << 20
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device {where}, {args.dtype}, bucket {args.bucket_mb} MiB, receiver: Engine in its own process over "
          f"{'CUDA IPC' if args.device.startswith('cuda') else 'shared memory'}; median of {args.repeats} pushes")
    print("| model shape | engine weights | path | tensors | GB | buckets | seconds | GB/s | copy GB/s "
          "| of copy bandwidth | vs bf16 in-place |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows, copies = [], {}
    with tempfile.TemporaryDirectory(prefix="kiln_weight_push_") as tmp:
        for name in names:
            shape = SHAPES[name]
            nbytes = sum(torch.Size(s).numel() for _, s in hf_tensor_shapes(shape)) * dtype.itemsize
            copy_gbps = copy_bandwidth(args.device, nbytes)
            copies[shape.name] = (nbytes / 1e9 / copy_gbps, tensor_copy_seconds(shape, dtype, args.device))
            base = None
            for rollout in rollout_dtypes:
                for r in bench_model(shape, args.device, dtype, bucket_bytes, args.repeats, Path(tmp), rollout):
                    if rollout == "bf16" and r["path"] == "in-place":
                        base = r["seconds"]
                    ratio = f"{r['seconds'] / base:.2f}x" if base else "-"
                    print(f"| {r['model']} | {rollout} | {r['path']} | {r['tensors']} | {r['gb']:.3f} | "
                          f"{r['buckets']} | {r['seconds']:.4f} | {r['gb_per_s']:.1f} | {copy_gbps:.0f} | "
                          f"{r['gb_per_s'] / copy_gbps:.0%} | {ratio} |", flush=True)
                    rows.append(r)
    print_phases(rows)
    print("\nThe copy alone (ms, medians, this process): the model's tensors into separate tensors; one buffer-sized "
          "copy_ for reference.")
    print("| model shape | one copy_ | foreach | per-tensor copy_ | copy_tensors |")
    print("| --- | --- | --- | --- | --- |")
    for model, (one, ways) in copies.items():
        print(f"| {model} | {one * 1e3:.3f} | " + " | ".join(f"{ways[k] * 1e3:.3f}" for k in
                                                          ("foreach", "per-tensor", "copy_tensors")) + " |")


if __name__ == "__main__":
    main()

"""Colocated weight-sync throughput: push Qwen3-shaped weights from a trainer process into an engine process.

GPU: CUDA IPC handles of each bucket; CPU: shared memory (a smoke run with tiny sizes). The engine
is a separate process holding its own copy of every tensor (`TensorDictEngine`); the push is timed
end to end (flatten into the bucket, share, engine copies into its parameters, version and cache),
and set against the device copy bandwidth measured in the same run. One push per model runs with
checksum verification first, so the figures are of a push known to be correct.

    python benchmarks/weight_push.py                      # GPU: Qwen3-0.6B and Qwen3-8B shapes, bf16
    python benchmarks/weight_push.py --device cpu --smoke # CPU: tiny shapes, checks the code path
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])   # run as a script, this file would shadow the weight_sync package

import torch

from benchmarks.processes import RemoteWeightEndpoint, make_tensor_receiver
from weight_sync import WeightSender, WeightSyncConfig, push_weights
from weight_sync.buckets import bucket_named_tensors, tensor_bytes


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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int, repeats: int = 5) -> float:
    """GB/s of one device-to-device copy (bytes copied per second; a copy reads and writes each byte)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return nbytes / 1e9 / statistics.median(times)


def bench_model(shape: Qwen3Shape, device: str, dtype: torch.dtype, bucket_bytes: int, repeats: int) -> dict:
    """Median seconds and GB/s of a colocated push of this model shape, after a verified warm-up push."""
    shapes = hf_tensor_shapes(shape)
    weights = [(name, torch.randn(s, dtype=dtype, device=device)) for name, s in shapes]   # the trainer's tensors
    total = sum(tensor_bytes(t) for _, t in weights)
    engine = RemoteWeightEndpoint(make_tensor_receiver, shapes, str(dtype).removeprefix("torch."), device,
                                  name="engine")
    try:
        checked = WeightSender(WeightSyncConfig(transport="colocated", bucket_bytes=bucket_bytes, check_weight_update=True))
        push_weights(bucket_named_tensors(iter(weights), bucket_bytes), [engine], checked)   # warm-up, verified
        sender = WeightSender(WeightSyncConfig(transport="colocated", bucket_bytes=bucket_bytes))
        times = []
        for _ in range(repeats):
            _sync(device)
            stats = push_weights(bucket_named_tensors(iter(weights), bucket_bytes), [engine], sender)
            times.append(stats.seconds)
        sender.close()
        checked.close()
    finally:
        engine.close()
    seconds = statistics.median(times)
    return {"model": shape.name, "tensors": len(weights), "gb": total / 1e9, "buckets": stats.buckets,
            "seconds": seconds, "gb_per_s": total / 1e9 / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="qwen3-0.6b,qwen3-8b", help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU code-path check)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    names = ["tiny", "small"] if args.smoke else args.models.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown model shapes {unknown}; expected some of {sorted(SHAPES)}")
    dtype = getattr(torch, args.dtype)
    bucket_bytes = args.bucket_mb << 20
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    copy_gbps = copy_bandwidth(args.device, (64 << 20) if args.smoke else (2 << 30))
    print(f"device {where}, {args.dtype}, bucket {args.bucket_mb} MiB, transport colocated "
          f"({'CUDA IPC' if args.device.startswith('cuda') else 'shared memory'}); "
          f"device copy bandwidth {copy_gbps:.1f} GB/s")
    print(f"{'model':<12} {'tensors':>7} {'GB':>7} {'buckets':>7} {'seconds':>8} {'GB/s':>7} {'of copy bw':>10}")
    for name in names:
        r = bench_model(SHAPES[name], args.device, dtype, bucket_bytes, args.repeats)
        print(f"{r['model']:<12} {r['tensors']:>7} {r['gb']:>7.3f} {r['buckets']:>7} {r['seconds']:>8.3f} "
              f"{r['gb_per_s']:>7.1f} {r['gb_per_s'] / copy_gbps:>10.0%}")


if __name__ == "__main__":
    main()

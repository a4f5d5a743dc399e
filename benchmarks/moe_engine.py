"""Qwen3-MoE engine on one GPU: decode tokens/s at batch 1 / 64 / 256 against the roofline of the bytes a step reads,
the fused MoE layer alone, and offline throughput, on the Qwen3-30B-A3B shape with random bf16 weights.

    python -m benchmarks.moe_engine                 # from the repo root; --layers 24 on an 80 GB card
    python -m benchmarks.moe_engine --rollout-dtype bf16,fp8 --offline ''   # bf16 and FP8 experts side by side
    python -m benchmarks.moe_engine --smoke         # a tiny shape on the CPU: checks the script, measures nothing

The weights are drawn on the device (normal, std 0.02; norms 1); nothing is downloaded or written but config.json
and a small tokenizer. The shape is Qwen3-30B-A3B's config.json (48 layers, 128 experts, top 8, expert width 768);
`--layers` keeps fewer layers (the row says so) for a card that cannot hold 61 GB of weights plus a KV pool.

Decode tokens/s at batch B: two runs of B fresh prompts with 1 and 1 + K new tokens, the difference being K decode
steps (as benchmarks/engine_throughput.py). The roofline is B / (bytes read per step / copy bandwidth), the bytes
being the attention and router weights, the LM head, the weights of the experts the step's tokens were routed to
(counted per layer from the engine's own routed-experts record of those steps), and the KV read; the bandwidth is
a device-to-device copy measured in the same run.

`--rollout-dtype bf16,fp8` builds one engine per weight dtype in turn on the same random weights (FP8: every linear
and both expert stacks e4m3 with `--fp8-block-size` block scales, quantised on the device from the same bf16 draw),
tags each engine's rows, adds the FP8 layer to the layer-alone rows, and ends with fp8 / bf16 ratios of the decode
(and offline) rows; the roofline of an FP8 row counts its e4m3 bytes and scales.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

QWEN3_30B_A3B = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=2048,
                     intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                     decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936, max_position_embeddings=40960,
                     rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                     hidden_act="silu", use_sliding_window=False)
SMOKE = dict(QWEN3_30B_A3B, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, vocab_size=512,
             max_position_embeddings=2048)


def write_model(cfg: dict, folder: Path) -> None:
    """config.json and a tokenizer (no weights: `random_weights` fills them on the device)."""
    from inference_engine.testing import make_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder, vocab_size=min(cfg["vocab_size"], 512))
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))


def random_weights() -> None:
    """Make ModelRunner fill its parameters with random values on its device instead of reading a checkpoint (an FP8
    weight: the same draw in the model dtype, quantised into it and its `<name>_scale_inv`)."""
    from inference_engine.model_runner import ModelRunner
    from weight_sync.fp8 import FP8_DTYPE, SCALE_SUFFIX, quantize_weight

    def fill(self, model_path: str) -> None:
        gen = torch.Generator(device=self.device).manual_seed(0)
        params = dict(self.model.named_parameters())
        for name, p in params.items():
            if "norm" in name:
                p.data.fill_(1.0)
            elif p.dtype == FP8_DTYPE:
                w = torch.empty(p.shape, dtype=self.dtype, device=self.device).normal_(0.0, 0.02, generator=gen)
                q, scale = quantize_weight(w, self.config.fp8_block_size)
                p.data.copy_(q)
                params[name + SCALE_SUFFIX].data.copy_(scale)
            elif not name.endswith(SCALE_SUFFIX):
                p.data.normal_(0.0, 0.02, generator=gen)

    ModelRunner._load_checkpoint = fill


def step_bytes(engine, distinct_experts: float, batch: int, context: float) -> dict[str, float]:
    """Bytes one decode step reads: everything but the experts and the embedding table (only gathered from), the
    experts that were used (distinct_experts summed over layers), the KV of `batch` contexts of `context` tokens."""
    spec = engine.spec
    params = dict(engine.runner.model.named_parameters())
    expert_bytes = sum(p.numel() * p.element_size() for n, p in params.items() if ".experts." in n)
    per_expert = expert_bytes / (spec.num_experts * spec.num_moe_layers)
    dense = sum(p.numel() * p.element_size() for n, p in params.items()
                if ".experts." not in n and n != "model.embed_tokens.weight")
    kv = batch * context * 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 2
    return {"dense": dense, "experts": distinct_experts * per_expert, "kv": kv,
            "total": dense + distinct_experts * per_expert + kv}


def distinct_experts_per_step(outs: list[dict], prompt_len: int, steps: int) -> float:
    """Distinct experts summed over layers, averaged over the decode steps of a batch's requests (from their
    routed-experts record: row prompt_len + s is the token decode step s forwarded)."""
    from kiln_common import routed_experts

    routes = np.stack([routed_experts.decode(o["meta_info"]["routed_experts"]) for o in outs])  # [B, rows, L, k]
    counts = []
    for s in range(steps):
        step = routes[:, prompt_len + s]  # [B, L, k]
        counts.append(sum(len(np.unique(step[:, layer])) for layer in range(step.shape[1])))
    return float(np.mean(counts))


def moe_layer_rows(spec, batches: list[int], bandwidth: float, report, fp8_block: int = 0) -> None:
    """One MoE layer alone in a CUDA graph, per batch: the router GEMV + route kernel, + align, and the whole layer
    (router, route, align, the grouped GEMMs, top-k sum) per tile config; GB/s of the weights it must read.
    fp8_block > 0: the same layer with FP8 experts too (the engine's tile choice), and its GB/s of e4m3 bytes."""
    from benchmarks.engine_throughput import event_ms, graphed
    from inference_engine import ops
    from inference_engine.kernels import fused_moe as kernels
    from inference_engine.models.moe import SparseMoE

    with torch.device("cuda"):
        layer = SparseMoE(spec, 0, None).to(torch.bfloat16)
    for p in layer.parameters():
        p.data.normal_(0.0, 0.02)
    gate, w13, w2 = layer.gate.weight, layer.experts.gate_up_proj, layer.experts.down_proj
    k, experts = spec.num_experts_per_tok, spec.num_experts
    per_expert = 3 * spec.hidden_size * spec.moe_intermediate_size * 2
    fp8_layer = None
    if fp8_block:
        with torch.device("cuda"):
            fp8_layer = SparseMoE(spec, 0, None).to(torch.bfloat16)
        fp8_layer.load_state_dict(layer.state_dict())
        fp8_layer.experts.make_fp8(fp8_block)  # the same weights, quantised
        fp8_per_expert = sum(p[0].numel() * p.element_size() for p in fp8_layer.experts.parameters())
    configs = {"small": kernels.SMALL, "large": kernels.LARGE, "small bn16": (16, 16, 256, 4, 4),
               "small bn64": (16, 64, 128, 4, 4), "small bk256": (16, 32, 256, 4, 3), "mid": (32, 64, 64, 4, 3)}
    for bs in batches:
        x = torch.randn(bs, spec.hidden_size, device="cuda", dtype=torch.bfloat16)

        def routed(x=x):
            return kernels.route(ops.linear(x, gate), k, spec.norm_topk_prob, x.dtype)

        used = len(torch.unique(routed()[1]))
        need = used * per_expert + gate.numel() * 2
        route_ms = event_ms(graphed(routed).replay, 200)
        align_ms = event_ms(graphed(lambda: kernels.align(routed()[1], experts, 16)).replay, 200)
        times = {"engine layer": event_ms(graphed(lambda x=x: layer(x)).replay, 100)}
        for name, cfg in configs.items():
            times[name] = event_ms(graphed(lambda cfg=cfg: kernels.fused_moe(x, w13, w2, *routed(), config=cfg)
                                           ).replay, 100)
        if bs == 1:  # the engine's one-token path (no align) against the aligned one, same config
            times["small aligned"] = event_ms(graphed(lambda: kernels.fused_moe(
                x, w13, w2, *routed(), config=kernels.SMALL, pair_blocks=False)).replay, 100)
        best = min(times, key=times.get)
        report(f"MoE layer batch {bs} ({used} experts, {need / 1e6:.0f} MB), graph",
               f"router + route {route_ms * 1e3:.0f} us, + align {align_ms * 1e3:.0f} us; whole layer "
               + ", ".join(f"{n} {t * 1e3:.0f} us" for n, t in times.items())
               + f"; engine layer {need / times['engine layer'] / 1e6:.0f} GB/s = "
               f"{need / times['engine layer'] / 1e-3 / bandwidth:.0%} of copy bandwidth, best {best}")
        if fp8_layer is not None:
            fp8_ms = event_ms(graphed(lambda x=x: fp8_layer(x)).replay, 100)
            fp8_need = used * fp8_per_expert + gate.numel() * 2
            report(f"MoE layer batch {bs}, fp8 experts ({fp8_need / 1e6:.0f} MB), graph",
                   f"engine layer {fp8_ms * 1e3:.0f} us ({times['engine layer'] / fp8_ms:.2f}x the bf16 layer), "
                   f"{fp8_need / fp8_ms / 1e6:.0f} GB/s = {fp8_need / fp8_ms / 1e-3 / bandwidth:.0%} of copy "
                   "bandwidth")


def engine_rows(args, spec, folder: Path, cuda: bool, bandwidth: float, rollout: str, report) -> dict[str, float]:
    """Start an engine with `rollout` weights (bf16 or fp8) on the random model; report its model, decode and offline
    rows; {row: tok/s}."""
    from benchmarks.engine_throughput import prompts, timed_generate
    from inference_engine import Engine

    rates: dict[str, float] = {}
    start = time.perf_counter()
    engine = Engine(model_path=str(folder), device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32",
                    attention_backend=args.backend if cuda else "torch", page_size=args.page_size,
                    context_length=4096 if cuda else 1024, max_running_requests=256,
                    chunked_prefill_size=8192 if cuda else 256,
                    max_total_tokens=None if cuda else 8192, weight_dtype="fp8" if rollout == "fp8" else "auto",
                    fp8_block_size=args.fp8_block_size)
    weights = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    shape = ("tiny smoke shape" if not cuda else "Qwen3-30B-A3B" if spec.num_layers == 48
             else f"Qwen3-30B-A3B with {spec.num_layers} of its 48 layers")
    dtype = ("bf16" if cuda else "fp32") + (f", fp8 weights ({args.fp8_block_size}^2 blocks)"
                                            if rollout == "fp8" else "")
    report("model", f"{shape}, random {dtype}, {weights / 1e9:.1f} GB of weights; engine start "
                    f"{time.perf_counter() - start:.0f} s, KV pool {engine.runner.kv_pool.capacity} tokens, graphs "
                    f"{'on' if engine.runner.graph_runner is not None else 'off'}")
    vocab, plen, k = spec.vocab_size, args.prompt_len, args.decode_steps
    for bs in [int(b) for b in args.decode_batches.split(",") if b]:
        timed_generate(engine, prompts(bs, plen, vocab, seed=250 + bs), 2)  # warm-up of this shape
        # both runs read their routed experts at the finish (the difference is the k decode steps alone)
        t1 = timed_generate(engine, prompts(bs, plen, vocab, seed=300 + bs), 1, return_routed_experts=True)
        ids = prompts(bs, plen, vocab, seed=400 + bs)
        sp = {"temperature": 0, "max_new_tokens": 1 + k, "ignore_eos": True, "return_routed_experts": True}
        start = time.perf_counter()
        outs = engine.generate(input_ids=ids, sampling_params=sp)
        t2 = time.perf_counter() - start
        outs = outs if isinstance(outs, list) else [outs]
        distinct = distinct_experts_per_step(outs, plen, k)
        read = step_bytes(engine, distinct, bs, plen + k / 2)
        rate = bs * k / (t2 - t1)
        rates[f"decode batch {bs}"] = rate
        roofline = bs * bandwidth / read["total"]
        report(f"decode batch {bs} ({plen} in)",
               f"{rate:.0f} tok/s, {1e3 * (t2 - t1) / k:.2f} ms/step, {rate / roofline:.0%} of roofline "
               f"({roofline:.0f} tok/s: {read['total'] / 1e9:.2f} GB/step = dense {read['dense'] / 1e9:.2f} + "
               f"{distinct / spec.num_moe_layers:.1f} experts/layer {read['experts'] / 1e9:.2f} + KV "
               f"{read['kv'] / 1e9:.2f})")
    if args.offline:
        n, n_in, n_out = (int(x) for x in args.offline.split("x"))
        elapsed = timed_generate(engine, prompts(n, n_in, vocab, seed=500), n_out)
        rates[f"offline {n} x ({n_in} in, {n_out} out)"] = n * n_out / elapsed
        report(f"offline {n} x ({n_in} in, {n_out} out)", f"{n * n_out / elapsed:.0f} output tok/s, "
                                                          f"{n * (n_in + n_out) / elapsed:.0f} total tok/s, "
                                                          f"{elapsed:.1f} s")
    engine.shutdown()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=0,
                    help="keep this many decoder layers (0: all 48 on a card of 100 GiB or more, else 24)")
    ap.add_argument("--decode-batches", default="1,64,256")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--offline", default="512x512x256", help="N x input_len x output_len ('' skips)")
    ap.add_argument("--layer-batches", default="1,64,256", help="batches of the MoE-layer-alone rows ('' skips)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--backend", default="flashinfer", choices=["flashinfer", "triton", "torch"])
    ap.add_argument("--rollout-dtype", default="bf16",
                    help="comma list of engine weight dtypes, each an engine in turn: bf16, fp8 (EngineConfig."
                         "weight_dtype 'fp8': linears and experts e4m3); with both, fp8 / bf16 ratios follow")
    ap.add_argument("--fp8-block-size", type=int, default=128, help="the FP8 weights' block (32 with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU, few steps: checks the script")
    ap.add_argument("--out", default="", help="also write the rows as JSON here")
    args = ap.parse_args()

    from benchmarks.engine_throughput import copy_bandwidth
    from kiln_common.model_spec import ModelSpec

    rows: list[tuple[str, str]] = []

    def report(name: str, value: str) -> None:
        rows.append((name, value))
        print(f"{name}: {value}", flush=True)

    rollout_dtypes = args.rollout_dtype.split(",")
    if not set(rollout_dtypes) <= {"bf16", "fp8"}:
        ap.error(f"--rollout-dtype {args.rollout_dtype!r}: expected a comma list of bf16, fp8")
    cfg = dict(SMOKE if args.smoke else QWEN3_30B_A3B)
    if args.smoke:
        args.decode_batches, args.decode_steps, args.prompt_len, args.offline = "1,4", 4, 16, "8x16x8"
        args.fp8_block_size = 32
    cuda = not args.smoke
    if cuda:
        props = torch.cuda.get_device_properties(0)
        report("device", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")
        bandwidth = copy_bandwidth()
        report("copy bandwidth", f"{bandwidth / 1e12:.2f} TB/s")
        layers = args.layers or (48 if props.total_memory >= 100 * 2**30 else 24)  # 61 GB of weights: H200 only
        cfg["num_hidden_layers"] = layers
        if args.layer_batches:
            moe_layer_rows(ModelSpec.from_hf_config(cfg), [int(b) for b in args.layer_batches.split(",")],
                           bandwidth, report, args.fp8_block_size if "fp8" in rollout_dtypes else 0)
            torch.cuda.empty_cache()
    else:
        bandwidth = float("nan")
    spec = ModelSpec.from_hf_config(cfg)
    folder = Path(tempfile.mkdtemp(prefix="kiln_moe_"))
    write_model(cfg, folder)
    random_weights()
    rates: dict[str, dict[str, float]] = {}
    for rollout in rollout_dtypes:
        tag = f" [{rollout}]" if len(rollout_dtypes) > 1 else ""
        rates[rollout] = engine_rows(args, spec, folder, cuda, bandwidth, rollout,
                                     lambda name, value, tag=tag: report(name + tag, value))
    if len(rollout_dtypes) == 2:
        for row, bf16 in rates["bf16"].items():
            report(f"{row} fp8 / bf16", f"{rates['fp8'][row] / bf16:.2f}x")
    print("\n| measure | result |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(rows), indent=1))


if __name__ == "__main__":
    main()

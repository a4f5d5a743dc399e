"""Engine throughput on a GPU: decode tokens/s vs the bandwidth roofline, offline and GRPO-shaped traffic, HF generate.

Builds a random-weight model of a real architecture's shape (configs below copy the public
config.json values; nothing is downloaded) as a local HF folder, then prints one table:

    python -m benchmarks.engine_throughput --shape qwen3-0.6b --backend flashinfer   # from the repo root

Decode tokens/s at batch B: two runs of B fresh prompts, with 1 and 1 + K new tokens; the
difference is K decode steps. `--overlap both` measures the engine's rows with overlap scheduling
off, then on, on the same engine (the scheduler's switch is flipped between runs). The roofline is
B / ((weight bytes + KV bytes read per step) / copy bandwidth), the bandwidth measured in the same
run (a device-to-device copy, read + write).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

SHAPES = {
    "qwen3-0.6b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False, hidden_act="silu"),
    "qwen3-8b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, hidden_act="silu"),
    "llama-3.1-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                         hidden_act="silu", rope_scaling={"factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 8192,
                                                          "rope_type": "llama3"}),
}


def build_model(shape: str, out_dir: Path):
    """Random bf16 HF model of the named shape saved to out_dir (with a small local tokenizer); returns the HF model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from inference_engine.testing import make_tokenizer

    values = dict(SHAPES[shape])
    cfg = AutoConfig.for_model(values.pop("model_type"), **values)
    cfg.initializer_range = 0.02
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    make_tokenizer(out_dir)
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    return model


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (read + write) over a 2 GiB buffer."""
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 10 * 2 * src.numel() * src.element_size() / (time.perf_counter() - start)


def event_ms(fn, iters: int = 20) -> float:
    """Mean device milliseconds of fn() over iters calls (after one warm-up)."""
    fn()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(iters):
        fn()
    ev[1].record()
    torch.cuda.synchronize()
    return ev[0].elapsed_time(ev[1]) / iters


def graphed(fn) -> torch.cuda.CUDAGraph:
    """fn captured as a CUDA graph (after a warm-up on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def lm_head_greedy_ms(vocab: int, hidden: int, replays: int = 200) -> dict[str, float]:
    """Device ms of the batch-1 LM head + greedy pick in a CUDA graph: split (GEMV, argmax, logsumexp) and fused."""
    from inference_engine import ops

    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    paths = {"split": lambda: ops.greedy(ops.linear(x, w, out_dtype=torch.float32)),
             "fused": lambda: ops.linear_greedy(x, w)}
    times: dict[str, list[float]] = defaultdict(list)
    for name in [*paths, *paths]:  # twice each, alternating
        times[name].append(event_ms(graphed(paths[name]).replay, replays))
    return {name: min(t) for name, t in times.items()}


def greedy_pick_ms(vocab: int, batches: list[int], replays: int = 100) -> dict[int, dict[str, float]]:
    """Device ms of the greedy pick (argmax and its log-prob) over float32 logits [B, vocab] in a CUDA graph, per B:
    torch's argmax + logsumexp (reference.greedy) and the one-pass triton kernel (ops.greedy on CUDA)."""
    from inference_engine.ops import reference, triton_ops

    out = {}
    for bs in batches:
        logits = torch.randn(bs, vocab, device="cuda") * 4
        paths = {"torch": lambda: reference.greedy(logits), "one pass": lambda: triton_ops.greedy(logits)}
        times: dict[str, list[float]] = defaultdict(list)
        for name in [*paths, *paths]:  # twice each, alternating
            times[name].append(event_ms(graphed(paths[name]).replay, replays))
        out[bs] = {name: min(t) for name, t in times.items()}
    return out


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def timed_generate(engine, ids, max_new_tokens: int, return_logprob: bool = False, **sampling) -> float:
    sp = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True, **sampling}
    start = time.perf_counter()
    engine.generate(input_ids=ids, sampling_params=sp, return_logprob=return_logprob)
    return time.perf_counter() - start


def hf_generate(model, ids: list[list[int]], new_tokens: int) -> float:
    """Output tokens/s of HF generate (greedy, exactly new_tokens each, one batch)."""
    x = torch.tensor(ids, device="cuda")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(x[:, :8], attention_mask=torch.ones_like(x[:, :8]), max_new_tokens=2, do_sample=False,
                   pad_token_id=0)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(x, attention_mask=torch.ones_like(x), **kw)
    torch.cuda.synchronize()
    return len(ids) * new_tokens / (time.perf_counter() - start)


def set_overlap(engine, on: bool) -> None:
    """Switch overlap scheduling between runs (on the scheduler thread, nothing in flight); empty the cache."""
    engine._call(lambda: setattr(engine.scheduler, "overlap", on))
    engine.flush_cache()  # the next runs reuse prompts of the previous mode: no cache hits from those


def reconfigure(engine, mode: str, use_pdl: bool) -> None:
    """Switch the flashinfer backend's decode kernel (EngineConfig.decode_attention) and programmatic dependent
    launch (ops.pdl.ENABLED) between runs; recapture the graphs."""
    from inference_engine.ops import pdl

    max_bs = dataclasses.replace(engine.config, decode_attention=mode).triton_decode_max_bs  # validated as at start

    def switch() -> None:  # on the scheduler thread, nothing in flight
        pdl.ENABLED = use_pdl
        engine.runner.attn_backend.triton_decode_max_bs = max_bs
        engine.runner.capture_cuda_graphs()

    engine._call(switch)
    engine.flush_cache()


def profile_decode(engine, batch_sizes: list[int], vocab: int, steps: int, out_dir: Path, stem: str,
                   prompt_len: int = 128, n: int = 1, after: int = 2) -> None:
    """Where a decode step's time goes: host spans of the scheduler's parts, and device kernels, per batch size.

    B requests decode in the background (B / n prompts, each sent n times: GRPO-shaped, their prompt shared in the
    radix cache, when n > 1); once all of them have more than `after` output tokens, `steps` scheduler steps run
    on the scheduler thread under torch.profiler (CPU + CUDA), with wall-clock timers around the
    scheduler's parts. Then the graph of that size is replayed alone (device time per replay, CUDA
    events) and the model forward runs eagerly once under the profiler to name its kernels.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    import inference_engine.scheduler.scheduler as sched_mod

    sched, runner = engine.scheduler, engine.runner
    spans: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            with record_function(name):
                out = fn(*a, **kw)
            spans[name] += time.perf_counter() - start
            return out
        return wrapper

    targets = [(sched.admission, "next_batch"), (sched.batches, "forward_batch"), (sched.batches, "sampling_batch"),
               (sched, "_resolve"), (runner, "forward"), (runner, "logits"),
               (runner.attn_backend, "init_graph_metadata"), (runner.attn_backend, "init_forward_metadata"),
               (sched_mod, "sample")]
    if runner.graph_runner is not None:
        targets.append((runner.graph_runner, "replay"))
    for bs in batch_sizes:
        worker = threading.Thread(target=timed_generate, args=(engine, prompts(bs // n, prompt_len, vocab,
                                                                               seed=700 + bs), after + 3000),
                                  kwargs={"n": n} if n > 1 else {})
        worker.start()
        while not engine._call(lambda: len(sched.running) == bs and all(len(r.output_ids) > after
                                                                        for r in sched.running)):
            time.sleep(0.01)

        def run_profile():
            originals = [(obj, name, getattr(obj, name)) for obj, name in targets]
            for obj, name, fn in originals:
                setattr(obj, name, timed(name, fn))
            spans.clear()
            for _ in range(3):  # warm
                sched.step()
            spans.clear()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                start = time.perf_counter()
                for _ in range(steps):
                    sched.step()
                torch.cuda.synchronize()
                wall = time.perf_counter() - start
            for obj, name, fn in originals:
                setattr(obj, name, fn)
            result = {"wall_ms_per_step": 1e3 * wall / steps,
                      "spans_ms_per_step": {k: 1e3 * v / steps for k, v in sorted(spans.items(), key=lambda x: -x[1])}}
            gr = runner.graph_runner
            if gr is not None:
                size = next(s for s in gr.batch_sizes if s >= bs)
                result["graph_replay_ms"] = event_ms(gr.graphs[size].replay)
                out = gr.outputs[size]  # engines before the LM head moved into the graph (BASE runs) keep hidden only
                hidden = (out.hidden if hasattr(out, "hidden") else out)[:bs]
                result["logits_ms"] = event_ms(lambda: runner.logits(hidden))
                sb = sched.batches.sampling_batch(list(sched.running))
                old_sampler_args = (sched.shared_generator,) if hasattr(sched, "shared_generator") else ()
                logits = runner.logits(hidden)
                result["sample_ms"] = event_ms(lambda: sched_mod.sample(logits, sb, *old_sampler_args))
                with profile(activities=[ProfilerActivity.CUDA]) as eager_prof:
                    runner.model(gr.batches[size])
                    torch.cuda.synchronize()
                result["eager_kernels"] = eager_prof.key_averages().table(sort_by="self_device_time_total",
                                                                          row_limit=30)
                result["eager_kernel_count"] = sum(e.count for e in eager_prof.key_averages()
                                                   if e.device_type.name == "CUDA")
            result["step_cuda"] = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25)
            result["step_cpu"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
            return result

        res = engine._call(run_profile)
        engine.abort(abort_all=True)
        worker.join()
        (out_dir / f"{stem}_bs{bs}.txt").write_text(res.pop("step_cuda") + "\n\n" + res.pop("step_cpu") + "\n\n"
                                                     + res.get("eager_kernels", ""))
        print(f"== profile batch {bs}: {res.pop('eager_kernels', '')}")
        print(json.dumps(res, indent=1), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    ap.add_argument("--backend", choices=["flashinfer", "triton", "torch"], default="flashinfer")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--decode-batches", default="1,8,64,256")
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--offline", default="512x1024x512", help="N x input_len x output_len ('' skips)")
    ap.add_argument("--grpo", default="64x8x512x256", help="prompts x n x input_len x output_len ('' skips)")
    ap.add_argument("--grpo-logprobs", action="store_true",
                    help="the GRPO row returns each output token's log-prob, as the RL rollout asks")
    ap.add_argument("--overlap", choices=["on", "off", "both"], default="both",
                    help="overlap scheduling for the Kiln-vs-HF and decode rows (both: off, then on)")
    ap.add_argument("--offline-overlap", choices=["on", "off", "both"], default="on",
                    help="overlap scheduling for the offline and GRPO rows")
    ap.add_argument("--hf-batches", default="1,64")
    ap.add_argument("--hf-tokens", type=int, default=64, help="prompt 128 tokens, this many generated")
    ap.add_argument("--decode-attention", default="auto",
                    help="with --backend flashinfer, the decode kernel(s), comma-separated: flashinfer, triton, auto "
                         "(EngineConfig.decode_attention); the Kiln and decode rows are measured for each on the same "
                         "engine, its graphs recaptured between them; the later rows run with the last one")
    ap.add_argument("--pdl", default="on",
                    help="programmatic dependent launch of the triton kernels (ops/pdl.py), comma-separated on / off: "
                         "the Kiln and decode rows are measured for each, after every --decode-attention mode, on "
                         "the same engine, its graphs recaptured between them")
    ap.add_argument("--lm-head", action="store_true",
                    help="first time the batch-1 LM head + greedy pick of the shape in a CUDA graph, split vs fused "
                         "(ops.linear_greedy), on random weights")
    ap.add_argument("--greedy-pick", default="", help="first time the greedy pick over float32 logits [B, vocab] "
                                                          "for these B (e.g. 8,64,256): torch vs one pass")
    ap.add_argument("--disable-cuda-graph", action="store_true")
    ap.add_argument("--gemv-max-rows", type=int, default=None,
                    help="linears of at most this many rows use the triton GEMV (default: ops.GEMV_MAX_ROWS; 0 = "
                         "cuBLAS only, the path before the GEMV, for a side-by-side run)")
    ap.add_argument("--model-dir", default="", help="the random model's HF folder: built there if empty, else reused "
                                                    "(engine rows only; several runs share one build)")
    ap.add_argument("--profile", default="", help="batch sizes to profile after the decode rows (e.g. 1,256)")
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--profile-prompt-len", type=int, default=128, help="prompt tokens of the profiled requests")
    ap.add_argument("--profile-n", type=int, default=1, help="the profiled batch is B / n prompts sent n times each "
                                                             "(GRPO-shaped: shared prompts, --shared-prefix-decode)")
    ap.add_argument("--profile-after", type=int, default=2, help="profile once every request has more output tokens "
                                                                 "than this (longer contexts, e.g. 512 for W1's mean)")
    ap.add_argument("--rollout-dtype", default="bf16",
                    help="comma list of the engine's linear weights, each measured in turn on the same model: bf16, "
                         "fp8 (EngineConfig.weight_dtype 'fp8', e4m3 with 128x128 block scales), fp8-tuned (fp8 with "
                         "--fp8-kernel-configs); fp8 / bf16, fp8-tuned / bf16 and fp8-tuned / fp8 ratios of every "
                         "decode and offline row follow")
    ap.add_argument("--fp8-kernel-configs", default=None,
                    help="the tuned FP8 kernels (benchmarks/fp8_linear.py --write-configs) of the fp8-tuned engine")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="comma list of KV caches, each measured in turn (after --rollout-dtype, for each of its "
                         "values): auto (the model dtype), fp8_e4m3 (EngineConfig.kv_cache_dtype, e4m3 with per-head "
                         "scales); with both, the KV pool sizes and fp8 KV / auto KV ratios of every decode and "
                         "offline row follow")
    ap.add_argument("--decode-tensor-cores", default="auto", choices=["auto", "on", "off"],
                    help="flashinfer's decode on its tensor-core kernels (EngineConfig.decode_tensor_cores; auto: on "
                         "for an e4m3 KV cache)")
    ap.add_argument("--shared-prefix-decode", default="off", choices=["on", "off"],
                    help="decode requests that share a cached prefix read it once per chunk (EngineConfig."
                         "shared_prefix_decode): the GRPO row's n samples of a prompt; run twice to compare")
    ap.add_argument("--mismatch", default="", help="N x output_len: N rollouts of 128-token prompts sampled by the "
                                                   "first engine (T = 1), scored teacher-forced by each engine; "
                                                   "reports the fp8-vs-bf16 (weights) and fp8-vs-auto (KV cache) "
                                                   "log-prob gaps ('' skips)")
    ap.add_argument("--profile-name", default="profile", help="the profile's tables go to $OUT/<name>_bs<B>.txt")
    args = ap.parse_args()
    rollout_dtypes = args.rollout_dtype.split(",")
    if not set(rollout_dtypes) <= {"bf16", "fp8", "fp8-tuned"}:
        ap.error(f"--rollout-dtype {args.rollout_dtype!r}: expected a comma list of bf16, fp8, fp8-tuned")
    if ("fp8-tuned" in rollout_dtypes) != bool(args.fp8_kernel_configs):
        ap.error("--rollout-dtype fp8-tuned and --fp8-kernel-configs go together")
    kv_dtypes = args.kv_cache_dtype.split(",")
    if not set(kv_dtypes) <= {"auto", "fp8_e4m3"}:
        ap.error(f"--kv-cache-dtype {args.kv_cache_dtype!r}: expected a comma list of auto, fp8_e4m3")
    engines = [(rollout, kv) for rollout in rollout_dtypes for kv in kv_dtypes]  # one engine each, in this order

    from inference_engine import Engine, ops
    from inference_engine.config import DECODE_ATTENTION
    from inference_engine.kv_cache import kv_bytes_per_token
    from inference_engine.ops import pdl

    unknown = [mode for mode in args.decode_attention.split(",") if mode not in DECODE_ATTENTION]
    if unknown:
        ap.error(f"--decode-attention {unknown} unknown; expected a comma-separated list of {DECODE_ATTENTION}")

    if args.gemv_max_rows is not None:
        ops.GEMV_MAX_ROWS = args.gemv_max_rows
    if not set(args.pdl.split(",")) <= {"on", "off"}:
        ap.error(f"--pdl {args.pdl!r}: expected a comma-separated list of on / off")
    pdl_modes = [m == "on" for m in args.pdl.split(",")]
    pdl.ENABLED = pdl_modes[0]

    rows: list[tuple[str, str]] = []

    def report(name: str, value: str) -> None:
        rows.append((name, value))
        print(f"{name}: {value}", flush=True)

    props = torch.cuda.get_device_properties(0)
    report("device", f"{props.name}, torch {torch.__version__}")
    bw = copy_bandwidth()
    report("copy bandwidth", f"{bw / 1e12:.2f} TB/s")
    if args.lm_head:
        ms = lm_head_greedy_ms(SHAPES[args.shape]["vocab_size"], SHAPES[args.shape]["hidden_size"])
        report("LM head + greedy pick, batch 1, graph", f"split {ms['split']:.3f} ms, fused {ms['fused']:.3f} ms")
        torch.cuda.empty_cache()  # the KV pool is sized from free memory
    if args.greedy_pick:
        batches = [int(b) for b in args.greedy_pick.split(",")]
        for bs, ms in greedy_pick_ms(SHAPES[args.shape]["vocab_size"], batches).items():
            report(f"greedy pick, batch {bs}, graph", f"torch {ms['torch']:.3f} ms, one pass {ms['one pass']:.3f} ms "
                                                      f"({ms['torch'] / ms['one pass']:.1f}x)")
        torch.cuda.empty_cache()
    folder = Path(args.model_dir or tempfile.mkdtemp(prefix=f"kiln_{args.shape}_"))
    hf_batches = [int(b) for b in args.hf_batches.split(",") if b]
    decode_modes = args.decode_attention.split(",")
    vocab = SHAPES[args.shape]["vocab_size"]
    hf_rates = {}
    if (folder / "config.json").exists():  # a model an earlier run built: the engine rows only
        saved = json.loads((folder / "config.json").read_text())
        wanted = {k: SHAPES[args.shape][k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
        if {k: saved.get(k) for k in wanted} != wanted or hf_batches:
            raise SystemExit(f"--model-dir {folder} holds {({k: saved.get(k) for k in wanted})}, expected {wanted} "
                             f"for {args.shape}, and is reused without HF baselines (pass --hf-batches=)")
        report("model", f"{args.shape} random bf16 from {folder}")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        hf = build_model(args.shape, folder)
        report("model", f"{args.shape} random bf16, {sum(p.numel() for p in hf.parameters()) / 1e9:.2f} B params "
                        f"(built in {time.perf_counter() - start:.0f} s)")
        for bs in hf_batches:
            hf_rates[bs] = hf_generate(hf, prompts(bs, 128, vocab, seed=bs), args.hf_tokens)
            report(f"HF generate batch {bs} (128 in, {args.hf_tokens} out)", f"{hf_rates[bs]:.0f} tok/s")
        del hf
        torch.cuda.empty_cache()

    sequences: list[list[int]] = []  # --mismatch: the rollouts every engine scores teacher-forced
    logprobs: dict[tuple[str, str], torch.Tensor] = {}

    def variant_tag(rollout: str, kv: str) -> str:
        """' [fp8]', ' [fp8_e4m3 KV]', ' [bf16, fp8_e4m3 KV]' or '': what tells this engine's rows apart."""
        parts = ([rollout] if len(rollout_dtypes) > 1 else []) + ([f"{kv} KV"] if len(kv_dtypes) > 1 else [])
        return f" [{', '.join(parts)}]" if parts else ""

    def engine_rows(rollout: str, kv: str) -> dict[str, float]:
        """The engine's rows with `rollout` weights (bf16 or fp8) and a `kv` cache (auto or fp8_e4m3); {row: tok/s} of
        its decode and offline rows."""
        results: dict[str, float] = {}

        def tagged_report(name: str, value: str) -> None:
            report(name + variant_tag(rollout, kv), value)

        start = time.perf_counter()
        engine = Engine(model_path=str(folder), device="cuda", dtype="bfloat16", attention_backend=args.backend,
                        page_size=args.page_size, context_length=4096, max_running_requests=256,
                        chunked_prefill_size=8192, disable_cuda_graph=args.disable_cuda_graph,
                        decode_attention=decode_modes[0], weight_dtype="fp8" if rollout.startswith("fp8") else "auto",
                        fp8_kernel_configs=args.fp8_kernel_configs if rollout == "fp8-tuned" else None,
                        kv_cache_dtype=kv, decode_tensor_cores=args.decode_tensor_cores,
                        shared_prefix_decode=args.shared_prefix_decode == "on")
        tagged_report("engine start", f"{time.perf_counter() - start:.1f} s ({args.backend}, "
                                      f"decode attention {decode_modes[0]}, tensor cores "
                                      f"{'on' if engine.config.use_decode_tensor_cores else 'off'}, "
                                      f"shared-prefix decode {args.shared_prefix_decode}, "
                               f"GEMV up to {ops.GEMV_MAX_ROWS} rows, "
                               f"PDL {'on' if pdl.enabled(torch.device('cuda')) else 'off'}, "
                               f"page {args.page_size}, "
                               f"KV pool {engine.runner.kv_pool.capacity} tokens, "
                               f"graphs {'off' if engine.runner.graph_runner is None else 'on'})")
        spec = engine.spec
        params = dict(engine.runner.model.named_parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
        if not spec.tie_word_embeddings:  # the embedding table is only gathered from, not read whole
            weight_bytes -= params["model.embed_tokens.weight"].numel() * 2
        if rollout.startswith("fp8"):  # the block scales are read too (counted above), nothing else new
            tagged_report("FP8 weights", f"{weight_bytes / 1e9:.2f} GB read per step (bf16: "
                                         f"{sum(p.numel() for p in params.values()) * 2 / 1e9:.2f} GB of parameters)")
        pool = engine.runner.kv_pool
        kv_per_token = kv_bytes_per_token(spec.num_layers, spec.num_kv_heads, spec.head_dim, pool.dtype)
        results["KV pool tokens"] = pool.capacity
        tagged_report("KV pool", f"{pool.capacity} tokens in {pool.bytes / 2**30:.1f} GiB ({pool.dtype}, "
                                 f"{kv_per_token} bytes a token; mem_fraction_static 0.85 of free memory)")

        def modes(choice: str) -> list[bool]:
            return {"on": [True], "off": [False], "both": [False, True]}[choice]

        current = (decode_modes[0], pdl_modes[0])
        variants = [(mode, use_pdl) for mode in decode_modes for use_pdl in pdl_modes]
        for mode, use_pdl, overlap in [(*variant, overlap) for variant in variants for overlap in modes(args.overlap)]:
            if (mode, use_pdl) != current:
                reconfigure(engine, mode, use_pdl)
                current = (mode, use_pdl)
            set_overlap(engine, overlap)
            mode_tag = f"decode attention {mode}, " if len(decode_modes) > 1 else ""
            pdl_tag = ("PDL on, " if use_pdl else "PDL off, ") if len(pdl_modes) > 1 else ""
            tag = f" [{mode_tag}{pdl_tag}overlap {'on' if overlap else 'off'}]"
            for bs in [int(b) for b in args.hf_batches.split(",") if b]:
                timed_generate(engine, prompts(bs, 128, vocab, seed=100 + bs), 2)  # warm-up of this shape
                rate = bs * args.hf_tokens / timed_generate(engine, prompts(bs, 128, vocab, seed=200 + bs),
                                                            args.hf_tokens)
                tagged_report(f"Kiln batch {bs} (128 in, {args.hf_tokens} out){tag}",
                       f"{rate:.0f} tok/s = {rate / hf_rates[bs]:.1f}x HF")
            k = args.decode_steps
            for bs in [int(b) for b in args.decode_batches.split(",") if b]:
                timed_generate(engine, prompts(bs, 128, vocab, seed=250 + bs), 2)  # warm-up (first prefill of a shape)
                t1 = timed_generate(engine, prompts(bs, 128, vocab, seed=300 + bs), 1)
                t2 = timed_generate(engine, prompts(bs, 128, vocab, seed=400 + bs), 1 + k)
                rate = bs * k / (t2 - t1)
                results[f"decode batch {bs}{tag}"] = rate
                step_bytes = weight_bytes + bs * (128 + k / 2) * kv_per_token
                roofline = bs * bw / step_bytes
                tagged_report(f"decode batch {bs}{tag}", f"{rate:.0f} tok/s, {1e3 * (t2 - t1) / k:.2f} ms/step, "
                                                  f"{rate / roofline:.0%} of roofline ({roofline:.0f} tok/s)")
                graphs = engine.runner.graph_runner
                size = next((s for s in graphs.batch_sizes if s >= bs), None) if graphs is not None else None
                if size is not None:  # the step's device time alone: its graph replayed back to back on the last inputs
                    ms = engine._call(lambda: event_ms(graphs.graphs[size].replay, 200))
                    engine.flush_cache()  # the replays rewrote the last step's KV slot: cached prefixes may hold it
                    tagged_report(f"decode batch {bs} graph replay{tag}",
                                  f"{ms:.3f} ms, {1e3 * step_bytes / bw / ms:.0%} of roofline")

        if args.profile:  # after the decode rows, before the long offline run
            out_dir = Path(os.environ.get("OUT", tempfile.mkdtemp(prefix="kiln_profile_")))
            profile_decode(engine, [int(b) for b in args.profile.split(",")], vocab, args.profile_steps, out_dir,
                           args.profile_name, args.profile_prompt_len, args.profile_n, args.profile_after)

        for overlap in modes(args.offline_overlap):
            set_overlap(engine, overlap)
            tag = f" [overlap {'on' if overlap else 'off'}]"
            if args.offline:
                n, n_in, n_out = (int(x) for x in args.offline.split("x"))
                elapsed = timed_generate(engine, prompts(n, n_in, vocab, seed=500), n_out)
                results[f"offline {n} x ({n_in} in, {n_out} out){tag}"] = n * n_out / elapsed
                tagged_report(f"offline {n} x ({n_in} in, {n_out} out){tag}",
                       f"{n * n_out / elapsed:.0f} output tok/s, {n * (n_in + n_out) / elapsed:.0f} total tok/s, "
                       f"{elapsed:.1f} s")
            if args.grpo:
                g, n_samples, g_in, g_out = (int(x) for x in args.grpo.split("x"))
                before = engine.metrics()
                elapsed = timed_generate(engine, prompts(g, g_in, vocab, seed=600), g_out, n=n_samples, temperature=1.0,
                                         return_logprob=args.grpo_logprobs)
                after = engine.metrics()
                prompt = after["prompt_tokens_total"] - before["prompt_tokens_total"]
                cached = after["cached_tokens_total"] - before["cached_tokens_total"]
                lp_tag = ", log-probs returned" if args.grpo_logprobs else ""
                tagged_report(f"GRPO {g} prompts x n={n_samples} ({g_in} in, {g_out} out, T=1{lp_tag}){tag}",
                       f"{g * n_samples * g_out / elapsed:.0f} output tok/s, radix cache hit rate "
                       f"{cached / max(prompt, 1):.1%}, {elapsed:.1f} s")
        if args.mismatch:
            n, n_out = (int(x) for x in args.mismatch.split("x"))
            if not sequences:  # the first engine (bf16 first in --rollout-dtype) samples the rollouts, T = 1
                outs = engine.generate(input_ids=prompts(n, 128, vocab, seed=700), sampling_params={
                    "max_new_tokens": n_out, "temperature": 1.0, "ignore_eos": True, "seed": 7})
                sequences.extend(p + o["output_ids"] for p, o in zip(prompts(n, 128, vocab, seed=700), outs))
            engine.flush_cache()  # every position's log-prob computed, none taken from the cache
            outs = engine.generate(input_ids=sequences, sampling_params={"max_new_tokens": 1, "temperature": 1.0,
                                                                         "return_prompt_logprobs": True},
                                   return_logprob=True)
            logprobs[rollout, kv] = torch.tensor([[lp for lp, _, _ in o["meta_info"]["input_token_logprobs"][128:]]
                                                  for o in outs], dtype=torch.float64)  # [n, n_out] response tokens
        engine.shutdown()
        del engine
        torch.cuda.empty_cache()
        return results

    rates = {variant: engine_rows(*variant) for variant in engines}
    # ((measured, baseline), label): fp8 weights vs bf16 with each KV cache, fp8 KV vs auto with each weight dtype
    pairs = ([(((fp8, kv), (base, kv)), f"{fp8} / {base}{f' [{kv} KV]' if len(kv_dtypes) > 1 else ''}")
              for kv in kv_dtypes for fp8, base in (("fp8", "bf16"), ("fp8-tuned", "bf16"), ("fp8-tuned", "fp8"))] +
             [(((rollout, "fp8_e4m3"), (rollout, "auto")), f"fp8 KV / auto KV"
               f"{f' [{rollout}]' if len(rollout_dtypes) > 1 else ''}") for rollout in rollout_dtypes])
    for (measured, baseline), label in pairs:
        if measured in rates and baseline in rates:
            for name, rate in rates[measured].items():
                if rates[baseline].get(name):
                    unit = "tokens" if name == "KV pool tokens" else "tok/s"
                    report(f"{label}, {name}", f"{rate / rates[baseline][name]:.2f}x {unit}")
        if measured in logprobs and baseline in logprobs:
            diff = logprobs[measured] - logprobs[baseline]  # per response token: log p_measured - log p_baseline
            # the k3 estimate is KL(baseline || measured) where the baseline sampled the tokens (the first engine)
            kl = (f"KL(baseline || measured) k3 estimate {(torch.expm1(diff) - diff).mean():.5f}, "
                  if baseline == engines[0] else "")
            report(f"log-prob mismatch, {label.replace(' / ', ' vs ')} engine, teacher-forced ({args.mismatch}, "
                   f"T = 1 rollouts of the {engines[0][0]} weights, {engines[0][1]} KV engine)",
                   f"mean |diff| {diff.abs().mean():.4f}, max |diff| {diff.abs().max():.3f}, "
                   f"mean diff {diff.mean():+.4f}, {kl}p99 |diff| {diff.abs().flatten().quantile(0.99):.3f}")

    print("\n| measure | result |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()

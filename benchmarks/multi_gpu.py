"""Multi-GPU checks and figures (issue 8): engine TP=2, trainer TP=2, NCCL weight push, two engines behind the router,
and a 3-step disaggregated GRPO run through Ray.

    python -m benchmarks.multi_gpu prepare --work W        # model folders and data (GPU: a Qwen3-0.6B-shaped model)
    python -m benchmarks.multi_gpu weight-push --work W    # NCCL all-reduce/broadcast bandwidth, 0.6B / 8B pushes
    python -m benchmarks.multi_gpu engine-tp --work W      # TP=2 vs TP=1 outputs, decode tokens/s
    python -m benchmarks.multi_gpu trainer-tp --work W     # TP=2 and PP=2 vs TP=1 log-probs, step time
    python -m benchmarks.multi_gpu router --work W         # GRPO traffic over 2 engines: balance, cache hit rates
    python -m benchmarks.multi_gpu grpo --work W           # train.py's driver under Ray, --no-colocate, 3 steps

`--cpu` runs the same code on CPU with tiny models (gloo instead of NCCL, fp32, two processes).
Every command prints `| item | measure | result |` rows and exits 1 if one of its checks failed;
`scripts/multi_gpu_check.sh` runs them all in one device call. NVLink multicast stays off in
this process and every process it starts (NVLS_ENV below, also passed to Ray's workers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import faulthandler
import gc
import math
import multiprocessing
import os
import random
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NVLS_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NVLS_ENV)  # before torch / NCCL start, inherited by every child process

import torch  # noqa: E402

from benchmarks.processes import RemoteWeightEndpoint, make_tensor_receiver  # noqa: E402
from trainer.testing import run_ranks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("prepare", "weight-push", "engine-tp", "trainer-tp", "router", "grpo")
# a Qwen3 config small enough for CPU pushes, large enough for several buckets
SMALL_QWEN3 = dict(model_type="qwen3", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=32, vocab_size=8192,
                   tie_word_embeddings=False)


@dataclass(frozen=True)
class Setup:
    """Where a run's models live, and whether it runs on 2 GPUs (NCCL, bf16, real shapes) or CPU (gloo, fp32, tiny)."""

    work: Path
    cpu: bool

    def __post_init__(self):
        if not self.cpu and torch.cuda.device_count() < 2:
            raise ValueError(f"the GPU run needs 2 CUDA devices, this machine has {torch.cuda.device_count()}; "
                             "pass --cpu for the CPU variant")

    @property
    def device(self) -> str:
        return "cpu" if self.cpu else "cuda"

    @property
    def dtype(self) -> str:
        return "float32" if self.cpu else "bfloat16"

    @property
    def model(self) -> Path:
        """The model of the engine, trainer and router items."""
        return self.work / ("tiny-qwen3" if self.cpu else "qwen3-0.6b")

    @property
    def rl_model(self) -> Path:
        """The small model of the end-to-end GRPO run."""
        return self.work / "rl-qwen3"

    @property
    def data(self) -> Path:
        return self.work / "data"

    def engine_kwargs(self) -> dict[str, Any]:
        """Engine options of the engine and router items."""
        if self.cpu:
            return {"device": "cpu", "dtype": "float32", "page_size": 4, "max_total_tokens": 8192}
        return {"device": "cuda", "dtype": "bfloat16", "page_size": 16, "attention_backend": "flashinfer",
                "context_length": 4096, "max_total_tokens": 262144, "cuda_graph_max_bs": 64,
                "chunked_prefill_size": 8192}

    def check_ready(self) -> None:
        """Raise naming the missing folder if `prepare` has not run for this work folder."""
        for path in (self.model, self.rl_model, self.data / "train.jsonl"):
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist; run `python -m benchmarks.multi_gpu prepare "
                                        f"--work {self.work}{' --cpu' if self.cpu else ''}` first")


class Report:
    """Table rows `| item | measure | result |` as they come, and the checks that failed."""

    def __init__(self, item: str):
        self.item = item
        self.failed: list[str] = []
        self.rows: list[tuple[str, str]] = []

    def row(self, measure: str, result: str) -> None:
        self.rows.append((measure, result))
        print(f"| {self.item} | {measure} | {result} |", flush=True)

    def check(self, ok: bool, measure: str, result: str) -> None:
        """A row that is also a pass/fail check."""
        self.row(measure, f"{result} ({'ok' if ok else 'FAILED'})")
        if not ok:
            self.failed.append(measure)


@contextlib.contextmanager
def phase(item: str, what: str):
    """One flushed line as a phase starts and one as it ends, so a run stopped by its time limit shows where it was."""
    print(f"{item}: {what} ...", flush=True)
    start = time.perf_counter()
    yield
    print(f"{item}: {what} done in {time.perf_counter() - start:.1f} s", flush=True)


def arm_stall_dump(seconds: float) -> None:
    """After `seconds`, print every thread's stack of this process, and have its child processes print theirs.

    The engine's tp workers and the push receivers print on SIGUSR1; this process's dump comes from
    faulthandler's own thread, so it appears even while a thread holds the GIL in a blocking call.
    This process ignores SIGUSR1, and a child spawned from it inherits that until it installs its stack
    printer: a child still starting up when the dump comes is not killed by the signal's default action.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    faulthandler.dump_traceback_later(seconds, exit=False)

    def signal_children() -> None:
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGUSR1)

    timer = threading.Timer(seconds, signal_children)
    timer.daemon = True
    timer.start()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def _vocab_size(model: Path) -> int:
    import json

    return int(json.loads((model / "config.json").read_text())["vocab_size"])


# ---------------------------------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------------------------------

def prepare(setup: Setup, report: Report) -> None:
    """Write the model folders and the prompt data every other command uses."""
    from examples.quickstart.make_data import write_dataset
    from inference_engine.testing import make_tiny_model

    setup.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if setup.cpu:
        make_tiny_model(setup.model, "qwen3")
    else:
        from benchmarks.engine_throughput import build_model

        build_model("qwen3-0.6b", setup.model)  # on cuda:0; freed when this process ends
    report.row("model", f"{setup.model.name}: {_param_count(setup.model) / 1e6:.1f} M params, {setup.dtype} "
                        f"({time.perf_counter() - start:.1f} s to build)")
    rl_size = {} if setup.cpu else {"hidden_size": 256, "num_layers": 4, "intermediate_size": 768}
    make_tiny_model(setup.rl_model, "qwen3", **rl_size)
    report.row("GRPO model", f"random Qwen3, {_param_count(setup.rl_model) / 1e6:.2f} M params")
    write_dataset(setup.data)
    report.row("GRPO data", f"quickstart arithmetic prompts in {setup.data}")


def _param_count(model: Path) -> int:
    return sum(math.prod(shape) for _, shape in folder_shapes(model))


# ---------------------------------------------------------------------------------------------------------------------
# weight push (disaggregated: trainer side on cuda:0, engine side on cuda:1)
# ---------------------------------------------------------------------------------------------------------------------

RECEIVER_TIMEOUT_S = 120.0  # a push receiver must start, and answer each call, within this


def collective_rank(rank: int, world: int, port: int, nbytes: int, iters: int, cpu: bool) -> dict[str, float]:
    """All-reduce and broadcast bus bandwidth (GB/s) of `nbytes` over `world` ranks, and a correctness check."""
    import torch.distributed as dist

    if not cpu:
        torch.cuda.set_device(rank)
    device = torch.device("cpu") if cpu else torch.device("cuda", rank)
    dist.init_process_group("gloo" if cpu else "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=None if cpu else device)
    try:
        probe = torch.full((1 << 20,), float(rank + 1), device=device)
        dist.all_reduce(probe)
        correct = bool((probe == world * (world + 1) / 2).all())  # 1 + 2 + ... + world
        x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)  # [nbytes / 4]
        out = {"correct": correct}
        for name, op, bus_factor in (("allreduce", lambda: dist.all_reduce(x), 2 * (world - 1) / world),
                                     ("broadcast", lambda: dist.broadcast(x, src=0), 1.0)):
            for _ in range(2):
                op()
            _sync()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(iters):
                op()
            _sync()
            seconds = (time.perf_counter() - start) / iters
            out[f"{name}_busbw"] = nbytes / seconds / 1e9 * bus_factor
        return out
    finally:
        dist.destroy_process_group()


def make_engine(model: str, engine_kwargs: dict[str, Any]):
    """An inference Engine (it is its own weight-sync endpoint), built in the receiver process."""
    from inference_engine import Engine

    return Engine(model_path=model, **engine_kwargs)


def folder_shapes(model: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(hf_name, shape) of every tensor in an HF folder's safetensors."""
    from safetensors import safe_open

    out = []
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out += [(name, tuple(st.get_slice(name).get_shape())) for name in st.keys()]
    return out


def config_shapes(values: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(hf_name, shape) of every parameter of a transformers model of this config (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(values)
    cfg = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]  # tied weights listed once


def bench_push(weights: list[tuple[str, torch.Tensor]], endpoint: Any, setup: Setup, bucket_bytes: int,
               repeats: int) -> dict[str, Any]:
    """One verified distributed push (checksums on), then `repeats` timed ones; median seconds and GB/s."""
    from weight_sync import WeightSender, WeightSyncConfig, bucket_named_tensors, push_weights

    config = WeightSyncConfig(transport="distributed", bucket_bytes=bucket_bytes,
                              backend="gloo" if setup.cpu else "nccl", check_weight_update=True, timeout_s=120)
    sender = WeightSender(config)
    start = time.perf_counter()
    sender.connect([endpoint])
    connect_s = time.perf_counter() - start
    try:
        verified = push_weights(bucket_named_tensors(iter(weights), bucket_bytes), [endpoint], sender, 1)
        sender.config = dataclasses.replace(config, check_weight_update=False)  # the timed pushes skip the checksums
        times = []
        for version in range(2, repeats + 2):
            stats = push_weights(bucket_named_tensors(iter(weights), bucket_bytes), [endpoint], sender, version)
            times.append(stats.seconds)
    finally:
        sender.close([endpoint])
    seconds = statistics.median(times)
    return {"tensors": stats.tensors, "gb": stats.bytes / 1e9, "buckets": stats.buckets, "seconds": seconds,
            "gb_per_s": stats.bytes / 1e9 / seconds, "verified_version": verified.weight_version,
            "final_version": endpoint.weight_version, "connect_s": connect_s}


def weight_push(setup: Setup, report: Report) -> None:
    """Bus bandwidth of NCCL collectives, then pushes from this process (GPU 0) into receivers on GPU 1."""
    nbytes, iters = ((64 << 20), 3) if setup.cpu else ((1 << 30), 10)
    with phase("weight-push", "collective bandwidth, 2 ranks"):
        coll = run_ranks(collective_rank, 2, nbytes, iters, setup.cpu, timeout_s=120)[0]
    backend = "gloo" if setup.cpu else "NCCL"
    report.check(coll["correct"], f"{backend} all-reduce sum, 2 ranks", "1 + 2 = 3 on every element")
    report.row(f"{backend} all-reduce bus bandwidth ({nbytes >> 20} MiB, 2 ranks)",
               f"{coll['allreduce_busbw']:.1f} GB/s")
    report.row(f"{backend} broadcast bandwidth ({nbytes >> 20} MiB, 2 ranks)", f"{coll['broadcast_busbw']:.1f} GB/s")

    dtype = torch.float32 if setup.cpu else torch.bfloat16
    device = "cpu" if setup.cpu else "cuda:0"  # the trainer side; receivers see GPU 1 as their cuda:0
    receiver_device = "cpu" if setup.cpu else "cuda"
    engine_shapes = folder_shapes(setup.model)
    big_name = "small-qwen3" if setup.cpu else "qwen3-8b"
    big_shapes = config_shapes(SMALL_QWEN3 if setup.cpu else _engine_throughput_shapes()["qwen3-8b"])
    engine_kwargs = {**setup.engine_kwargs(), "disable_cuda_graph": True, "max_total_tokens": 16384}
    cases = [  # (label, shapes, receiver factory, its args)
        (f"{setup.model.name} -> Engine", engine_shapes, make_engine, (str(setup.model), engine_kwargs)),
        (f"{setup.model.name} -> tensors", engine_shapes, make_tensor_receiver,
         (engine_shapes, setup.dtype, receiver_device)),
        (f"{big_name} -> tensors", big_shapes, make_tensor_receiver, (big_shapes, setup.dtype, receiver_device)),
    ]
    bucket_bytes = (1 << 20) if setup.cpu else (512 << 20)
    repeats = 2 if setup.cpu else 3
    for label, shapes, factory, args in cases:
        try:
            _push_case(label, shapes, factory, args, setup, report, coll, dtype, device, bucket_bytes, repeats)
        except Exception as e:  # noqa: BLE001 - reported; the next case still runs
            report.check(False, f"push {label}", f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
        if not setup.cpu:
            torch.cuda.empty_cache()


def _push_case(label: str, shapes, factory, args, setup: Setup, report: Report, coll: dict, dtype, device: str,
               bucket_bytes: int, repeats: int) -> None:
    """Push random weights of these shapes into a receiver built by factory(*args) on GPU 1; rows and checks."""
    torch.manual_seed(0)
    with phase("weight-push", f"{label}: random weights on {device}"):
        weights = [(name, 0.02 * torch.randn(shape, dtype=dtype, device=device)) for name, shape in shapes]
    start = time.perf_counter()
    with phase("weight-push", f"{label}: receiver start"):
        endpoint = RemoteWeightEndpoint(factory, *args, gpu=None if setup.cpu else 1, name=f"receiver {label}",
                                        timeout_s=RECEIVER_TIMEOUT_S)
    start_s = time.perf_counter() - start
    try:
        with phase("weight-push", f"{label}: connect, 1 checked + {repeats} timed pushes, disconnect"):
            r = bench_push(weights, endpoint, setup, bucket_bytes, repeats)
        if factory is make_engine:  # the engine generates from the pushed weights
            with phase("weight-push", f"{label}: generate"):
                out = endpoint.generate(input_ids=[1, 2, 3, 4], sampling_params={
                    "temperature": 0, "max_new_tokens": 4, "ignore_eos": True})
            generated = len(out["output_ids"]) == 4 and out["meta_info"]["weight_version"] == r["final_version"]
            report.check(generated, f"push {label}: engine generates after the pushes",
                         f"4 tokens at weight_version {out['meta_info']['weight_version']}")
    finally:
        with phase("weight-push", f"{label}: receiver close"):
            endpoint.close()
    report.check(r["verified_version"] == 1 and r["final_version"] == 1 + repeats,
                 f"push {label}: checksums verified, versions", f"v1 verified, v{r['final_version']} after "
                 f"{repeats} more (receiver start {start_s:.1f} s, group connect {r['connect_s']:.2f} s)")
    report.row(f"push {label}: {r['tensors']} tensors, {r['gb']:.2f} GB, {r['buckets']} buckets of "
               f"{bucket_bytes >> 20} MiB", f"{r['seconds']:.3f} s, {r['gb_per_s']:.1f} GB/s = "
               f"{r['gb_per_s'] / coll['broadcast_busbw']:.0%} of broadcast, "
               f"{r['gb_per_s'] / coll['allreduce_busbw']:.0%} of all-reduce bus bandwidth (median of {repeats})")


def _engine_throughput_shapes() -> dict[str, dict[str, Any]]:
    from benchmarks.engine_throughput import SHAPES

    return SHAPES


# ---------------------------------------------------------------------------------------------------------------------
# engine TP=2 vs TP=1
# ---------------------------------------------------------------------------------------------------------------------

def _decode_rate(engine, batch: int, steps: int, vocab: int, prompt_len: int) -> float:
    """Decode tokens/s at `batch`: (time of 1 + steps new tokens) - (time of 1 new token), fresh prompts each."""
    def timed(ids, new):
        start = time.perf_counter()
        engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": new, "ignore_eos": True})
        return time.perf_counter() - start

    timed(_prompts(batch, prompt_len, vocab, seed=900 + batch), 2)  # warm-up of this batch size
    t1 = timed(_prompts(batch, prompt_len, vocab, seed=1000 + batch), 1)
    t2 = timed(_prompts(batch, prompt_len, vocab, seed=2000 + batch), 1 + steps)
    return batch * steps / (t2 - t1)


def _engine_run(setup: Setup, tp: int, prompts: list[list[int]], new_tokens: int, batches: list[int],
                steps: int, cuda_graph: bool = True, done=None) -> dict[str, Any]:
    """Greedy outputs, teacher-forced prompt log-probs and decode tokens/s of one engine (no batches: greedy only).

    done(run), if given, is called with the results before the engine shuts down, so a shutdown that
    hangs past the step's limit loses no figure.
    """
    from inference_engine import Engine

    label = f"TP={tp}" + ("" if cuda_graph else " eager")
    vocab = _vocab_size(setup.model)
    start = time.perf_counter()
    with phase("engine-tp", f"{label} engine start"):
        engine = Engine(model_path=str(setup.model), tp_size=tp, disable_cuda_graph=not cuda_graph,
                        **setup.engine_kwargs())
    start_s = time.perf_counter() - start
    try:
        with phase("engine-tp", f"{label} greedy, {len(prompts)} prompts x {new_tokens} tokens"):
            greedy = engine.generate(input_ids=prompts, return_logprob=True, sampling_params={
                "temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True})
        run = {"start_s": start_s, "ids": [o["output_ids"] for o in greedy],
               "out_lp": [[lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] for o in greedy]}
        if not batches:
            return run
        with phase("engine-tp", f"{label} teacher-forced prompt log-probs"):
            scored = engine.generate(input_ids=prompts, return_logprob=True,  # the same tokens for both engines
                                     sampling_params={"temperature": 0, "max_new_tokens": 1,
                                                      "return_prompt_logprobs": True})
        run["prompt_lp"] = [[lp for lp, _, _ in o["meta_info"]["input_token_logprobs"][1:]] for o in scored]
        run["rates"] = {}
        for b in batches:
            with phase("engine-tp", f"{label} decode rate at batch {b}"):
                run["rates"][b] = _decode_rate(engine, b, steps, vocab, 128 if not setup.cpu else 16)
        if done is not None:
            done(run)
        return run
    finally:
        with phase("engine-tp", f"{label} shutdown"):
            engine.shutdown()
        del engine
        gc.collect()  # the next engine gets this one's KV pool and graphs back
        if not setup.cpu:
            torch.cuda.empty_cache()


def _greedy_agreement(one: dict, two: dict) -> tuple[int, int, float]:
    """(tokens identical before each prompt's first divergence, all tokens, max |log-prob diff| over those)."""
    same, total, out_diff = 0, 0, 0.0
    for ids1, ids2, lp1, lp2 in zip(one["ids"], two["ids"], one["out_lp"], two["out_lp"]):
        agree = next((i for i, (a, b) in enumerate(zip(ids1, ids2)) if a != b), len(ids1))
        same, total = same + agree, total + len(ids1)
        if agree:  # the log-probs of tokens both generated from the same context
            out_diff = max(out_diff, max(abs(a - b) for a, b in zip(lp1[:agree], lp2[:agree])))
    return same, total, out_diff


def engine_tp(setup: Setup, report: Report) -> None:
    """TP=2 without CUDA graphs, TP=1, then TP=2 with graphs: outputs and log-probs against TP=1, decode tokens/s."""
    vocab = _vocab_size(setup.model)
    prompts = _prompts(8, 64 if not setup.cpu else 12, vocab, seed=7)
    new_tokens = 32 if not setup.cpu else 8
    batches, steps = ([1, 64], 64) if not setup.cpu else ([1, 4], 8)
    tol = 1e-4 if setup.cpu else 0.1  # fp32 on CPU; bf16 with another reduction order on GPU
    eager = _engine_run(setup, 2, prompts, new_tokens, [], steps, cuda_graph=False)  # NCCL path without graphs
    runs: dict[int, dict[str, Any]] = {}

    def greedy_check(label: str, other: dict[str, Any]) -> None:
        same, total, out_diff = _greedy_agreement(runs[1], other)
        greedy_ok = same == total if setup.cpu else out_diff < tol
        report.check(greedy_ok, f"{label} vs TP=1 greedy tokens ({len(prompts)} prompts x {new_tokens})",
                     f"{same}/{total} identical before the first divergence, log-prob max |diff| there {out_diff:.2e}")

    def finished(tp: int, run: dict[str, Any]) -> None:  # reported while the engine is still up
        runs[tp] = run
        rates = ", ".join(f"batch {b}: {r:.0f} tok/s" for b, r in run["rates"].items())
        report.row(f"TP={tp} decode ({steps} steps, {setup.dtype})", f"{rates} (engine start {run['start_s']:.1f} s)")
        if tp == 1:
            greedy_check("TP=2 without CUDA graphs", eager)
            return
        prompt_diff = max(abs(a - b) for x, y in zip(runs[1]["prompt_lp"], run["prompt_lp"]) for a, b in zip(x, y))
        n_prompt = sum(len(x) for x in runs[1]["prompt_lp"])
        report.check(prompt_diff < tol, f"TP=2 vs TP=1 prompt log-probs ({n_prompt} tokens, teacher-forced)",
                     f"max |diff| {prompt_diff:.2e} (tolerance {tol:g})")
        greedy_check("TP=2", run)

    for tp in (1, 2):
        _engine_run(setup, tp, prompts, new_tokens, batches, steps, done=lambda run, tp=tp: finished(tp, run))


# ---------------------------------------------------------------------------------------------------------------------
# trainer TP=2 and PP=2 vs TP=1
# ---------------------------------------------------------------------------------------------------------------------

def _rl_samples(n: int, prompt_len: int, response_len: int, vocab: int) -> list:
    from kiln_common.sample import Sample

    g = torch.Generator().manual_seed(0)
    length = prompt_len + response_len
    return [Sample(index=i, group_index=i // 4, tokens=torch.randint(0, vocab, (length,), generator=g).tolist(),
                   response_length=response_len, loss_mask=[1] * response_len, reward=float(i % 2))
            for i in range(n)]


def trainer_rank(rank: int, world: int, port: int, model: str, samples: list, steps: int, cpu: bool,
                 layouts: list[tuple[int, int]], micro_batches: int) -> list[dict]:
    """One rank of a TrainerActor per (TP, PP) layout, in turn: log-probs before training, then timed train steps."""
    import torch.distributed as dist

    from trainer.actor import TrainerActor
    from trainer.config import TrainerConfig

    if cpu:
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo" if cpu else "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # one group for every layout (the actors do not own it)
    tokens = sum(len(s.tokens) for s in samples)
    out = []
    try:
        for tp, pp in layouts:
            cfg = TrainerConfig(hf_checkpoint=model, tensor_parallel_size=tp, pipeline_parallel_size=pp, lr=1e-5,
                                global_batch_size=len(samples), max_tokens_per_gpu=tokens // micro_batches,
                                clip_grad=1.0)
            actor = TrainerActor(cfg, rank, world, "127.0.0.1", port)
            actor.init()
            try:
                logp = [t.tolist() for t in actor.compute_log_probs(samples)]
                actor.train_step(samples)  # warm-up
                _sync()
                if not cpu:
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                for _ in range(steps):
                    metrics = actor.train_step(samples)
                _sync()
                step_s = (time.perf_counter() - start) / steps
                peak = torch.cuda.max_memory_allocated() / 2**30 if not cpu else 0.0
                out.append({"logp": logp, "step_s": step_s, "peak_gib": peak, "loss": metrics["loss"],
                            "grad_norm": metrics["grad_norm"]})
            finally:
                actor.shutdown()
                del actor
                if not cpu:
                    torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()
    return out


def trainer_tp(setup: Setup, report: Report) -> None:
    """Response log-probs of TP=2 and of PP=2 against TP=1 on the same samples (before any update), and step times."""
    vocab = _vocab_size(setup.model)
    n, prompt_len, response_len, steps = (4, 8, 8, 1) if setup.cpu else (16, 256, 256, 3)
    micro_batches = 4  # equal-sized (samples of one length), so pipeline stages overlap after the first
    samples = _rl_samples(n, prompt_len, response_len, vocab)
    tol = 1e-4 if setup.cpu else 0.1
    tokens = n * (prompt_len + response_len)
    names = {(1, 1): "TP=1", (2, 1): "TP=2", (1, 2): "PP=2"}
    runs = {}
    for world, layouts in ((1, [(1, 1)]), (2, [(2, 1), (1, 2)])):  # TP=2 and PP=2 share one spawn of 2 ranks
        ranks = run_ranks(trainer_rank, world, str(setup.model), samples, steps, setup.cpu, layouts, micro_batches,
                          timeout_s=300)
        for i, layout in enumerate(layouts):
            name = names[layout]
            runs[name] = r = {**ranks[0][i], "peak_gib": max(x[i]["peak_gib"] for x in ranks)}
            if name != "TP=1":
                diffs = [abs(a - b) for x, y in zip(runs["TP=1"]["logp"], r["logp"]) for a, b in zip(x, y)]
                report.check(len(diffs) == n * response_len and max(diffs) < tol,
                             f"{name} vs TP=1 response log-probs ({len(diffs)} tokens)",
                             f"max |diff| {max(diffs):.2e}, mean {statistics.fmean(diffs):.2e} (tolerance {tol:g})")
            report.row(f"{name} train step ({n} samples x {prompt_len + response_len} tokens, {micro_batches} "
                       f"micro-batches, {setup.dtype})",
                       f"{r['step_s']:.3f} s = {tokens / r['step_s']:.0f} tok/s"
                       + (f" = {runs['TP=1']['step_s'] / r['step_s']:.2f}x TP=1" if name != "TP=1" else "")
                       + (f", peak {r['peak_gib']:.1f} GiB (max over ranks)" if not setup.cpu else "")
                       + f", loss {r['loss']:.4f}")


# ---------------------------------------------------------------------------------------------------------------------
# two engines behind the router
# ---------------------------------------------------------------------------------------------------------------------

IN_FLIGHT = 256  # requests in flight over both engines (the figures of 2026-11 were measured so;
# RolloutConfig.rollout_concurrency is per engine since 2026-12-06, which would allow 512 here)


def start_ray(setup: Setup) -> None:
    """A local Ray (2 GPUs, or 2 CPUs) whose workers get NVLS_ENV, the repo on PYTHONPATH and no token auth."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    env_vars = {**NVLS_ENV, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if setup.cpu:
        env_vars["OMP_NUM_THREADS"] = "1"
    ray.init(num_cpus=2 if setup.cpu else 8, num_gpus=0 if setup.cpu else 2, include_dashboard=False,
             runtime_env={"env_vars": env_vars}, log_to_driver=not setup.cpu)


async def grpo_traffic(router, prompts: list[list[int]], n: int, new_tokens: int, seed: int) -> float:
    """n samples of every prompt, one request each with session `group-{g}` (as the default generate function), at
    most IN_FLIGHT at once; seconds until all finished."""
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one(g: int, j: int):
        params = {"max_new_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True, "seed": seed + g * n + j}
        async with slots:
            return await router.generate(prompts[g], params, return_logprob=True, session_id=f"group-{g}")

    start = time.perf_counter()
    outs = await asyncio.gather(*(one(g, j) for g in range(len(prompts)) for j in range(n)))
    elapsed = time.perf_counter() - start
    bad = [o for o in outs if len(o["output_ids"]) != new_tokens]
    if bad:
        raise RuntimeError(f"{len(bad)} responses do not have {new_tokens} tokens: {bad[0]['meta_info']}")
    return elapsed


def router_item(setup: Setup, report: Report) -> None:
    """GRPO-shaped traffic over one engine, then over two behind the router: balance, cache hits, throughput.

    The engines are the driver's `EngineActor`s under Ray, one GPU each, reached through Ray calls
    (`--rollout-client ray`), as `RolloutManagerActor` reaches them.
    """
    import ray

    from inference_engine.config import EngineConfig
    from orchestrator.actors import EngineActor
    from rollout.client import LocalEngineClient
    from rollout.router import Router

    vocab = _vocab_size(setup.model)
    groups, n, prompt_len, new_tokens = (4, 4, 16, 4) if setup.cpu else (32, 8, 512, 128)
    page = setup.engine_kwargs()["page_size"]
    start_ray(setup)
    try:
        config = EngineConfig(model_path=str(setup.model), **setup.engine_kwargs())
        engine_cls = ray.remote(EngineActor).options(num_cpus=1, num_gpus=0 if setup.cpu else 1, max_concurrency=1000)
        start = time.perf_counter()
        handles = [engine_cls.remote(config, False) for _ in range(2)]
        try:
            ray.get([h.health.remote() for h in handles])
            report.row("2 EngineActors (Ray, one GPU each)", f"ready after {time.perf_counter() - start:.1f} s")
            clients = [LocalEngineClient(h, name=f"engine-{i}") for i, h in enumerate(handles)]

            async def scenario():
                warm = Router(clients, page_size=page)
                await grpo_traffic(warm, _prompts(4, prompt_len, vocab, seed=1), 2, 4, seed=0)  # both engines
                await warm.flush_cache()
                single = Router(clients[:1], page_size=page)
                one_s = await grpo_traffic(single, _prompts(groups, prompt_len, vocab, seed=2), n, new_tokens, seed=10)
                await single.flush_cache()
                pair = Router(clients, page_size=page)
                two_s = await grpo_traffic(pair, _prompts(groups, prompt_len, vocab, seed=3), n, new_tokens, seed=20)
                return single.take_stats(), one_s, pair.take_stats(), two_s

            single_stats, one_s, stats, two_s = asyncio.run(scenario())
        finally:
            ray.get([h.shutdown.remote() for h in handles], timeout=60)
            for h in handles:
                ray.kill(h)
    finally:
        ray.shutdown()
    requests = groups * n
    out_tokens = requests * new_tokens
    shares = [s.requests / requests for s in stats]
    report.check(sum(s.requests for s in stats) == requests and min(shares) >= 0.4,
                 f"GRPO {groups} prompts x n={n} ({prompt_len} in, {new_tokens} out, T=1, {IN_FLIGHT} in flight): "
                 "requests per engine", " / ".join(f"{s.requests} ({share:.0%})" for s, share in zip(stats, shares)))
    for i, s in enumerate(stats):
        report.row(f"engine {i} radix cache hit rate", f"{s.cached_tokens / max(s.prompt_tokens, 1):.1%} "
                                                       f"({s.cached_tokens} of {s.prompt_tokens} prompt tokens)")
    s0 = single_stats[0]
    report.row("1 engine, same traffic", f"{out_tokens / one_s:.0f} output tok/s, {one_s:.2f} s, cache hit rate "
                                          f"{s0.cached_tokens / max(s0.prompt_tokens, 1):.1%}")
    report.row("2 engines behind the router", f"{out_tokens / two_s:.0f} output tok/s, {two_s:.2f} s "
                                              f"= {one_s / two_s:.2f}x one engine")


# ---------------------------------------------------------------------------------------------------------------------
# 3-step GRPO, disaggregated, through Ray
# ---------------------------------------------------------------------------------------------------------------------

def grpo_argv(setup: Setup, metrics_file: Path) -> list[str]:
    """train.py's flags of the end-to-end run: 1 trainer GPU + 1 engine GPU (--no-colocate), 3 steps, checked pushes.

    The rollout manager reaches the engine through Ray calls: HTTP serving needs uvicorn and fastapi,
    which the GPU image lacks (and which are not among the carried wheels).
    """
    prompts, n, new_tokens = (4, 4, 4) if setup.cpu else (8, 8, 16)
    return ["--hf-checkpoint", str(setup.rl_model), "--prompt-data", str(setup.data / "train.jsonl"),
            "--apply-chat-template", "--rollout-batch-size", str(prompts), "--n-samples-per-prompt", str(n),
            "--rollout-max-response-len", str(new_tokens), "--num-rollout", "3", "--global-batch-size",
            str(prompts * n), "--lr", "1e-4", "--no-colocate", "--actor-num-gpus-per-node", "1",
            "--rollout-num-engines", "1", "--rollout-client", "ray",
            "--custom-rm-path", "examples.quickstart.reward:arithmetic_reward", "--check-weight-update",
            "--metrics-file", str(metrics_file), "--no-progress", "--dtype", setup.dtype, "--max-total-tokens", "32768"]


def _env_probe() -> dict[str, str | None]:
    """The NVLink-multicast variables as a Ray worker process sees them."""
    return {k: os.environ.get(k) for k in NVLS_ENV}


def grpo(setup: Setup, report: Report) -> None:
    """train.py's driver under a local Ray with 2 GPUs: trainer on one, engine on the other, 3 steps."""
    import ray

    from orchestrator.driver import Driver, parse_args

    start_ray(setup)
    try:
        seen = ray.get(ray.remote(_env_probe).options(num_cpus=0).remote())
        report.check(seen == NVLS_ENV, "NVLink multicast off in Ray workers", str(seen))
        metrics_file = setup.work / "grpo_metrics.jsonl"
        metrics_file.unlink(missing_ok=True)
        argv = grpo_argv(setup, metrics_file)
        print("train.py " + " ".join(argv), flush=True)
        driver = Driver(parse_args(argv))
        start = time.perf_counter()
        try:
            driver.setup()
            setup_s = time.perf_counter() - start
            history = driver.run()
            version = ray.get(driver.engines["default"][0].weight_version.remote())
        finally:
            driver.shutdown()
    finally:
        ray.shutdown()
    report.row("set-up (placement, trainer, engine, weight-sync group)", f"{setup_s:.1f} s")
    for h in history:
        report.row(f"step {h['step']}", f"reward {h.get('rollout/reward_mean', float('nan')):.3f}, "
                                        f"rollout {h.get('timing/rollout_wait_s', 0):.2f} s, "
                                        f"train {h.get('timing/train_s', 0):.2f} s, "
                                        f"push {h.get('timing/push_s', 0):.2f} s "
                                        f"({h.get('push/gb_per_s', 0):.2f} GB/s, checksums verified), "
                                        f"engine v{h.get('weight_version/engine')}")
    versions = [h.get("weight_version/engine") for h in history]
    report.check(version == 3 and versions == [1, 2, 3], "engine weight_version after 3 steps",
                 f"{version} (per step {versions})")


# ---------------------------------------------------------------------------------------------------------------------

RUNNERS = {"prepare": prepare, "weight-push": weight_push, "engine-tp": engine_tp, "trainer-tp": trainer_tp,
           "router": router_item, "grpo": grpo}


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 if all its checks passed, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--work", required=True, type=Path, help="folder for models, data and metrics")
    parser.add_argument("--cpu", action="store_true", help="tiny models on CPU over gloo (checks the code path)")
    args = parser.parse_args(argv)
    stall_s = os.environ.get("KILN_STALL_DUMP_S")  # set by scripts/multi_gpu_check.sh a little before its time limit
    if stall_s:
        arm_stall_dump(float(stall_s))
    setup = Setup(args.work, args.cpu)
    if args.command != "prepare":
        setup.check_ready()
    report = Report(args.command)
    RUNNERS[args.command](setup, report)
    if report.failed:
        print(f"{args.command}: FAILED checks: {report.failed}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

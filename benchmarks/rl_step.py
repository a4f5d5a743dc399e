"""One RL step of the real driver, phase by phase: seconds, peak memory, KV pool, tokens/s/GPU (issue #17 step 1).

    python -m benchmarks.rl_step --shape qwen3-0.6b --out /tmp/rl_step.json      # GPU, workload W1
    python -m benchmarks.rl_step --smoke --out /tmp/rl_step_smoke.json            # CPU, tiny model, < 1 min

The run is `orchestrator.driver.Driver` built by `resolve(flags)` (what train.py runs), colocated on one device,
GRPO, `--warmup` steps then `--steps` measured ones. The model is a random-weight bf16 HF folder of a public
shape (built here, no download; a small local BPE tokenizer since the weights are random; the vocabulary is the
shape's), the prompts are a JSONL whose rows tokenize to exactly `--prompt-len` tokens, and the responses have
exactly `--response-len` tokens (`--rollout-ignore-eos`). Workload W1: 64 prompts x 8 samples, 256-token prompts,
1024-token responses, one optimizer step per rollout over micro-batches packed to `--max-tokens-per-gpu`.

Per step, the driver's own timing metrics: rollout (rollout_wait_s), engine health check, onload (engine releases
memory + trainer onloads), train (train_s: old log-prob recompute by the trainer + forward/backward + optimizer;
no reference model, KL is off), weight push, offload (trainer offloads + engine resumes memory), other = step_s -
their sum. Peak memory per phase: torch.cuda.max_memory_allocated on the engine and trainer actors (read and reset
at each phase boundary by thin wrappers around the driver's own methods; its code path is unchanged; the engine's
KV pool is CUDA virtual memory outside torch's allocator, so it is not in the engine's figure) and the device's
used memory sampled by nvidia-smi in this process (everything, the KV pool included). The engine's KV pool (tokens)
and its peak usage during the rollout. tokens/s/GPU = (prompt + response tokens of the step's samples) / step
seconds / GPUs (verl's perf/throughput).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

QWEN3 = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=128, vocab_size=151936,
             max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
             attention_bias=False, hidden_act="silu", num_key_value_heads=8)
SHAPES = {  # public configs (Qwen/Qwen3-*/config.json); qwen3-0.6b as in benchmarks/engine_throughput.py
    "qwen3-1.7b": dict(QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
    "qwen3-4b": dict(QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
    # the smoke model: vocabulary larger than the local tokenizer's (as with the public shapes)
    "tiny": dict(QWEN3, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=128, vocab_size=1024, max_position_embeddings=2048),  # flashinfer:
    # head_dim 64, 128 or 256 only
}
PHASES = (("rollout", "timing/rollout_wait_s"), ("engine_check", "timing/engine_check_s"),
          ("onload", "timing/onload_s"), ("train", "timing/train_s"), ("push", "timing/push_s"),
          ("offload", "timing/offload_s"))
MEMORY_PHASES = ("rollout", "onload", "train", "push", "offload")  # probe phases (onload includes the health check)
GPU_FLAGS = {"dtype": "bfloat16", "attention-backend": "flashinfer", "page-size": 16, "chunked-prefill-size": 8192}


def all_shapes() -> dict[str, dict]:
    from benchmarks.engine_throughput import SHAPES as ENGINE_SHAPES

    return {"qwen3-0.6b": ENGINE_SHAPES["qwen3-0.6b"], "qwen3-8b": ENGINE_SHAPES["qwen3-8b"], **SHAPES}


def build_model(shape: str, out_dir: Path) -> int:
    """A random HF folder of `shape` (bf16, tiny: fp32) with a local tokenizer; returns the parameter count. A folder
    already holding the shape is reused. With a GPU the weights are initialised on it, in a child process (seconds
    instead of minutes on the CPU for the larger shapes), so that this process holds no device memory."""
    import torch

    values = dict(all_shapes()[shape])
    if (out_dir / "config.json").exists():
        saved = json.loads((out_dir / "config.json").read_text())
        keys = ("hidden_size", "num_hidden_layers", "vocab_size")
        if all(saved.get(k) == values[k] for k in keys):
            return int(saved.get("kiln_num_params", 0))
        raise SystemExit(f"--model-dir {out_dir} holds another shape ({[saved.get(k) for k in keys]}), not {shape}")
    if shape != "tiny" and torch.cuda.is_available():
        code = f"from benchmarks.rl_step import _build_model; print(_build_model({shape!r}, {str(out_dir)!r}, 'cuda'))"
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the {shape} model on the GPU failed:\n{done.stderr[-3000:]}")
        return int(done.stdout.split()[-1])
    return _build_model(shape, out_dir, "cpu")


def _build_model(shape: str, out_dir: Path | str, device: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from inference_engine.testing import make_tokenizer

    values = dict(all_shapes()[shape])
    cfg = AutoConfig.for_model(values.pop("model_type"), **values)
    cfg.initializer_range = 0.02
    torch.manual_seed(0)
    dtype = torch.float32 if shape == "tiny" else torch.bfloat16
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    model.config.kiln_num_params = params
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    make_tokenizer(out_dir)
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    return params


def write_prompts(model_dir: Path, path: Path, rows: int, length: int, seed: int = 0) -> None:
    """`rows` JSONL prompts of random single-token words, each exactly `length` tokens (checked)."""
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)

    def n_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    words = sorted({t[1:] for t in tok.get_vocab() if t.startswith("\u0120") and t[1:].isalpha()})
    words = [w for w in words if n_tokens(" " + w) == 1]
    firsts = [w for w in words if n_tokens(w) == 1]
    if not words or not firsts:
        raise RuntimeError("the tokenizer has no single-token words to build prompts from")
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(rows):
            text = rng.choice(firsts) + "".join(" " + rng.choice(words) for _ in range(length - 1))
            got = n_tokens(text)
            if got != length:
                raise RuntimeError(f"prompt {i} has {got} tokens, expected {length}")
            f.write(json.dumps({"prompt": text, "label": ""}) + "\n")


def parity_reward(args, sample) -> float:
    """A reward with variance within a group (so GRPO advantages are not zero): the share of odd token ids."""
    tokens = sample.response_tokens
    return sum(t % 2 for t in tokens) / max(len(tokens), 1)


# ---- measurement inside the actors (run there by ActorHandle.__ray_call__) ----------------------------------------

def _cuda_peak(actor) -> int | None:
    """Peak bytes allocated by torch in this actor's process since the last call; resets the peak."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return int(peak)


def _kv_pool_tokens(actor) -> int | None:
    try:
        return int(actor.engine.runner.kv_pool.capacity)
    except AttributeError:
        return None


class DeviceSampler(threading.Thread):
    """Used device memory (NVML or nvidia-smi, the host's GPUs summed) sampled every `interval` s, kept as the max per
    (step, phase) of the probe; and the engines' KV usage (engine metrics) during rollouts."""

    def __init__(self, probe: Probe, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.probe, self.interval = probe, interval
        self.smi = shutil.which("nvidia-smi")
        self.nvml, self.handles = None, []
        try:  # nvidia-ml-py (carried to the GPU machine): cheaper than starting nvidia-smi 10 times a second
            import pynvml

            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.nvml = pynvml
        except Exception:  # noqa: BLE001 - no NVML: nvidia-smi, or nothing on a CPU machine
            pass
        self.stop = threading.Event()
        self.peaks: dict[tuple[int, str], int] = {}
        self.kv_usage: dict[int, float] = {}

    def used_bytes(self) -> int | None:
        if not self.smi:
            return None
        try:
            if self.nvml is not None:
                return sum(int(self.nvml.nvmlDeviceGetMemoryInfo(h).used) for h in self.handles)
            out = subprocess.run([self.smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            return sum(int(v) for v in out.split()) * 2**20
        except Exception:  # noqa: BLE001 - a sample missed
            return None

    def run(self) -> None:
        import ray

        last_kv = 0.0
        while not self.stop.wait(self.interval):
            step, phase = self.probe.step_of_phase(), self.probe.phase
            used = self.used_bytes()
            if used is not None:
                key = (step, phase)
                self.peaks[key] = max(self.peaks.get(key, 0), used)
            if phase == "rollout" and time.monotonic() - last_kv > 0.5:
                last_kv = time.monotonic()
                try:
                    for h in self.probe.engine_handles():
                        usage = ray.get(h.metrics.remote(), timeout=5)["kv_cache_usage"]
                        self.kv_usage[step] = max(self.kv_usage.get(step, 0.0), float(usage))
                except Exception:  # noqa: BLE001 - a sample missed; the rollout goes on
                    pass


class Probe:
    """Phase boundaries of the driver's step, from thin wrappers around its own methods: at each boundary the
    actors' torch peak memory of the phase that ends is read (and reset)."""

    def __init__(self, driver) -> None:
        self.driver = driver
        self.phase = "setup"
        self.step = 0                      # steps whose rollout has been received
        self.t_phase = time.perf_counter()
        self.memory: dict[int, dict[str, dict[str, int | None]]] = {}
        self.spans: dict[int, dict[str, float]] = {}
        self.batches: dict[int, dict[str, float]] = {}
        self.kv_pool: dict[int, int | None] = {}
        self.engine_idle: dict[int, float] = {}   # seconds the engines waited with nothing to step on, per rollout
        self.cache_hit: dict[int, float | None] = {}   # the rollout's radix cache hit rate (cached / prompt tokens)
        self.shared_prefix: dict[int, float | None] = {}   # its decode request-steps read through a shared prefix
        self._at_launch: dict[str, float] = {}

    def engine_handles(self) -> list:
        return [h for hs in self.driver.engines.values() for h in hs]

    def trainer_handles(self) -> list:
        return [a for g in self.driver.trainers.values() for a in g.actors]

    def step_of_phase(self) -> int:
        return self.step + 1 if self.phase == "rollout" else self.step  # a rollout belongs to the step it feeds

    TOTALS = ("idle_seconds_total", "prompt_tokens_total", "cached_tokens_total",
              "shared_prefix_decode_requests_total", "shared_prefix_grouped_requests_total")

    def _engine_totals(self) -> dict[str, float]:
        """The engines' counters of TOTALS, summed (Engine.metrics)."""
        import ray

        metrics = ray.get([h.metrics.remote() for h in self.engine_handles()])
        return {key: sum(m.get(key, 0) for m in metrics) for key in self.TOTALS}

    def _rollout_counters(self, step: int) -> None:
        """What the engines counted over the rollout feeding `step`: idle seconds, cache hits, shared prefixes."""
        now = self._engine_totals()
        d = {key: now[key] - self._at_launch.get(key, 0) for key in self.TOTALS}
        self.engine_idle[step] = d["idle_seconds_total"]
        self.cache_hit[step] = d["cached_tokens_total"] / d["prompt_tokens_total"] if d["prompt_tokens_total"] else None
        requests = d["shared_prefix_decode_requests_total"]
        self.shared_prefix[step] = d["shared_prefix_grouped_requests_total"] / requests if requests else None

    def _peaks(self, handles: list) -> int | None:
        import ray

        values = [v for v in ray.get([h.__ray_call__.remote(_cuda_peak) for h in handles]) if v is not None]
        return max(values) if values else None

    def enter(self, phase: str) -> None:
        """End the current phase (its seconds and peaks) and start `phase`."""
        step, now = self.step_of_phase(), time.perf_counter()
        if phase == "onload":   # the rollout just ended: the step it fed is now the current one
            self.step += 1
        self.spans.setdefault(step, {})[self.phase] = now - self.t_phase
        self.memory.setdefault(step, {})[self.phase] = {"engine": self._peaks(self.engine_handles()),
                                                        "trainer": self._peaks(self.trainer_handles())}
        self.phase, self.t_phase = phase, time.perf_counter()

    def instrument(self) -> None:
        import ray

        d = self.driver
        launch, wait, train, push = d._launch_rollout, d._wait_rollout, d._train, d._push_weights

        def launch_rollout(step):
            self.enter("rollout")
            self._at_launch = self._engine_totals()
            return launch(step)

        def wait_rollout(pending, step):
            batch = wait(pending, step)
            self._rollout_counters(self.step + 1)
            samples = batch.samples
            self.batches[self.step + 1] = {
                "samples": len(samples), "prompt_tokens": sum(s.prompt_length for s in samples),
                "response_tokens": sum(s.response_length for s in samples),
                "response_len_min": min((s.response_length for s in samples), default=0),
                "response_len_max": max((s.response_length for s in samples), default=0)}
            pools = ray.get([h.__ray_call__.remote(_kv_pool_tokens) for h in self.engine_handles()])
            self.kv_pool[self.step + 1] = sum(p for p in pools if p) or None
            self.enter("onload")
            return batch

        def train_(batch, policies=None):
            self.enter("train")
            out = train(batch, policies)
            self.enter("push")
            return out

        def push_weights(version, policies=None):
            out = push(version, policies)
            self.enter("offload")
            return out

        d._launch_rollout, d._wait_rollout = launch_rollout, wait_rollout
        d._train, d._push_weights = train_, push_weights


# ---- the run ------------------------------------------------------------------------------------------------------

def driver_flags(args, model_dir: Path, data: Path, out_dir: Path, on_gpu: bool) -> dict:
    flags = {"hf-checkpoint": str(model_dir), "prompt-data": str(data), "rollout-batch-size": args.prompts,
             "n-samples-per-prompt": args.samples, "rollout-max-response-len": args.response_len,
             "rollout-ignore-eos": True, "rollout-shuffle": False, "custom-rm-path": "benchmarks.rl_step:parity_reward",
             "num-rollout": args.warmup + args.steps, "global-batch-size": args.prompts * args.samples,
             "max-tokens-per-gpu": args.max_tokens_per_gpu, "advantage-estimator": "grpo", "lr": 1e-6,
             "context-length": args.prompt_len + args.response_len, "progress": False,
             "metrics-file": str(Path(args.out).with_suffix(".metrics.jsonl") if args.out
                                 else out_dir / "metrics.jsonl")}   # the driver's per-step lines, as they come
    if on_gpu:
        flags.update(GPU_FLAGS)
    if importlib.util.find_spec("uvicorn") is None:   # the GPU machine carries no HTTP server: Ray-call the engines
        flags["rollout-client"] = "ray"
    for item in args.set:
        key, _, value = item.partition("=")
        flags[key.lstrip("-")] = yaml_value(value)
    return flags


def yaml_value(text: str):
    import yaml

    return yaml.safe_load(text) if text else True


def summarize(history: list[dict], probe: Probe, sampler: DeviceSampler, gpus: int, warmup: int) -> list[dict]:
    rows = []
    for h in history:
        step = h["step"]
        phases = {name: float(h.get(key, 0.0)) for name, key in PHASES}
        step_s = float(h["timing/step_s"])
        phases["other"] = step_s - sum(phases.values())
        batch = probe.batches.get(step, {})
        tokens = batch.get("prompt_tokens", 0) + batch.get("response_tokens", 0)
        gb = 2.0**30
        memory = {}
        for phase in MEMORY_PHASES:
            m = probe.memory.get(step, {}).get(phase, {})
            smi = sampler.peaks.get((step, phase))
            memory[phase] = {"engine_gb": None if m.get("engine") is None else m["engine"] / gb,
                             "trainer_gb": None if m.get("trainer") is None else m["trainer"] / gb,
                             "device_used_gb": None if smi is None else smi / gb}
        rows.append({"step": step, "warmup": step <= warmup, "step_s": step_s, "phases_s": phases,
                     "probe_spans_s": probe.spans.get(step, {}), **batch, "tokens": tokens,
                     "tokens_per_s_per_gpu": tokens / step_s / gpus if step_s > 0 else 0.0,
                     "peak_memory": memory, "kv_pool_tokens": probe.kv_pool.get(step),
                     "kv_usage_peak": sampler.kv_usage.get(step), "reward_mean": h.get("rollout/reward_mean"),
                     "train_loss": h.get("train/loss"), "grad_norm": h.get("train/grad_norm"),
                     "train_split_s": train_split(h), "rollout_engine_idle_s": probe.engine_idle.get(step),
                     "rollout_cache_hit_rate": probe.cache_hit.get(step),
                     "rollout_shared_prefix_share": probe.shared_prefix.get(step)})
    return rows


TRAIN_SPLIT = (("passes", "old/ref log-prob passes + advantages"), ("fwd_bwd", "forward/backward"),
               ("optimizer", "optimizer step"))


def train_split(h: dict) -> dict:
    """The train phase's parts (the trainer's own timings, slowest rank): {part: s}, or {} without them."""
    if "train/time_update_s" not in h:
        return {}
    return {"passes": h["train/time_passes_s"], "fwd_bwd": h["train/time_update_s"] - h["train/time_optimizer_s"],
            "optimizer": h["train/time_optimizer_s"]}


def mean_row(rows: list[dict]) -> dict:
    measured = [r for r in rows if not r["warmup"]] or rows
    n = len(measured)
    out = {"steps": [r["step"] for r in measured], "step_s": sum(r["step_s"] for r in measured) / n,
           "phases_s": {k: sum(r["phases_s"][k] for r in measured) / n for k in measured[0]["phases_s"]},
           "tokens_per_s_per_gpu": sum(r["tokens_per_s_per_gpu"] for r in measured) / n,
           "train_split_s": {k: sum(r["train_split_s"][k] for r in measured) / n
                             for k in measured[0].get("train_split_s", {})}}
    for key in ("rollout_engine_idle_s", "rollout_cache_hit_rate", "rollout_shared_prefix_share"):
        values = [r[key] for r in measured if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    peaks = {}
    for phase in MEMORY_PHASES:
        peaks[phase] = {}
        for who in ("engine_gb", "trainer_gb", "device_used_gb"):
            values = [r["peak_memory"][phase][who] for r in measured if r["peak_memory"][phase][who] is not None]
            peaks[phase][who] = max(values) if values else None
    out["peak_memory"] = peaks
    return out


def table(result: dict) -> str:
    rows, mean = result["steps"], result["mean"]
    head = [f"step {r['step']}{' (warm-up)' if r['warmup'] else ''}" for r in rows] + ["mean (measured)"]
    lines = ["| phase | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(head)]

    def fmt(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    for name in [p for p, _ in PHASES] + ["other"]:
        label = "train (fwd/bwd + optimizer, + old logp pass if taken)" if name == "train" else name
        lines.append(f"| {label} s | " + " | ".join(fmt(r["phases_s"][name]) for r in rows)
                     + f" | {fmt(mean['phases_s'][name])} |")
        if name == "rollout":
            lines.append("| - of which the engines idle (no request to step on) s | " + " | ".join(
                fmt(r.get("rollout_engine_idle_s")) for r in rows) + f" | {fmt(mean.get('rollout_engine_idle_s'))} |")
            for key, what in (("rollout_cache_hit_rate", "radix cache hit rate (cached / prompt tokens)"),
                              ("rollout_shared_prefix_share", "decode requests reading a shared prefix once")):
                if mean.get(key) is not None:
                    lines.append(f"| - {what} | " + " | ".join(fmt(r.get(key), ".1%") for r in rows)
                                 + f" | {fmt(mean.get(key), '.1%')} |")
        if name == "train" and mean.get("train_split_s"):
            for part, what in TRAIN_SPLIT:
                lines.append(f"| - of which {what} s | " + " | ".join(
                    fmt(r["train_split_s"].get(part)) for r in rows) + f" | {fmt(mean['train_split_s'][part])} |")
    lines.append("| **step s** | " + " | ".join(fmt(r["step_s"]) for r in rows) + f" | **{fmt(mean['step_s'])}** |")
    lines.append("| **tokens/s/GPU** | " + " | ".join(fmt(r["tokens_per_s_per_gpu"], ".0f") for r in rows)
                 + f" | **{fmt(mean['tokens_per_s_per_gpu'], '.0f')}** |")
    for phase in MEMORY_PHASES:
        cells = []
        for r in rows + [mean]:
            m = r["peak_memory"][phase]
            cells.append(f"{fmt(m['engine_gb'], '.1f')} / {fmt(m['trainer_gb'], '.1f')} / "
                         f"{fmt(m['device_used_gb'], '.1f')}")
        lines.append(f"| peak GiB {phase} (engine / trainer / device) | " + " | ".join(cells) + " |")
    lines.append("| KV pool tokens (peak usage) | " + " | ".join(
        f"{r['kv_pool_tokens'] or '-'} ({fmt(r['kv_usage_peak'], '.0%')})" for r in rows) + " | |")
    lines.append("| tokens (prompt + response) | " + " | ".join(
        f"{r.get('prompt_tokens', 0)} + {r.get('response_tokens', 0)}" for r in rows) + " | |")
    return "\n".join(lines)


def add_workload_args(ap: argparse.ArgumentParser, steps: int) -> None:
    """The workload flags rl_step and its TRL peer share (shape, W1's sizes, warm-up and measured steps)."""
    ap.add_argument("--shape", default="qwen3-0.6b",
                    choices=["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "tiny"])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 prompts x 2 samples, 8 tokens, 2 steps")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--response-len", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=steps)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(ap, steps=3)
    ap.add_argument("--max-tokens-per-gpu", type=int, default=16384, help="the trainer's micro-batch token budget")
    ap.add_argument("--model-dir", help="build the model here (or reuse one built before); default: a temp folder")
    ap.add_argument("--set", action="append", default=[], metavar="FLAG=VALUE",
                    help="any further train.py flag (YAML value), e.g. --set mem-fraction-static=0.7")
    ap.add_argument("--out", help="write the result JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shape, args.prompts, args.samples, args.prompt_len, args.response_len = "tiny", 2, 2, 16, 8
        args.warmup, args.steps = 1, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.smoke:  # CPU even where a GPU is: Ray then finds none, so the driver places everything on CPU bundles
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from kiln_common.logs import setup_logging
    from orchestrator.driver import Driver, resolve

    setup_logging()
    work = Path(tempfile.mkdtemp(prefix=f"kiln_rl_step_{args.shape}_"))
    model_dir = Path(args.model_dir) if args.model_dir else work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    params = build_model(args.shape, model_dir)
    build_s = time.perf_counter() - t0
    data = work / "prompts.jsonl"
    write_prompts(model_dir, data, args.prompts * (args.warmup + args.steps), args.prompt_len)
    on_gpu = shutil.which("nvidia-smi") is not None and not args.smoke
    flags = driver_flags(args, model_dir, data, work, on_gpu)
    print(f"rl_step: {args.shape} ({params / 1e9:.3f} B params, built in {build_s:.0f} s), "
          f"{args.prompts} x {args.samples} samples, {args.prompt_len} + {args.response_len} tokens, "
          f"{args.warmup} warm-up + {args.steps} steps, {'GPU' if on_gpu else 'CPU'}", flush=True)
    config = resolve(flags)
    gpus = config.run.actor_num_nodes * config.run.actor_num_gpus_per_node  # colocated: engines share these
    driver = Driver(config)
    probe = Probe(driver)
    sampler = DeviceSampler(probe)
    sampler.start()
    try:
        t0 = time.perf_counter()
        driver.setup()
        setup_s = time.perf_counter() - t0
        probe.instrument()
        history = driver.run()
        probe.enter("done")
    finally:
        sampler.stop.set()
        sampler.join(timeout=10)
        driver.shutdown()
    steps = summarize(history, probe, sampler, gpus, args.warmup)
    result = {"shape": args.shape, "params": params, "device": device_name(on_gpu), "gpus": gpus,
              "workload": {"prompts": args.prompts, "samples_per_prompt": args.samples,
                           "prompt_len": args.prompt_len, "response_len": args.response_len,
                           "max_tokens_per_gpu": args.max_tokens_per_gpu, "warmup": args.warmup,
                           "steps": args.steps},
              "flags": flags, "build_s": build_s, "setup_s": setup_s,
              "train_s_contains": "forward/backward of every packed micro-batch + optimizer step, and the old "
                                  "log-prob pass unless the old log-probs come from the update's forward "
                                  f"(old_logprobs_from_update={flags.get('old-logprobs-from-update', True)}); no "
                                  "reference model (KL off)",
              "steps": steps, "mean": mean_row(steps)}
    print(table(result), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if not args.model_dir:
        shutil.rmtree(work, ignore_errors=True)
    return result


def device_name(on_gpu: bool) -> str:
    if not on_gpu:
        return "cpu"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "gpu"


if __name__ == "__main__":
    main(sys.argv[1:])

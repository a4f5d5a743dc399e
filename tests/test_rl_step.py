"""benchmarks/rl_step.py --smoke: the real driver on CPU (tiny model, 2 prompts x 2 samples, 8 tokens, 2 steps)
reports every phase of every step and a positive tokens/s/GPU (no timing asserts). CPU suite; ~20 s on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "engine_check", "onload", "train", "push", "offload", "other")


def test_rl_step_smoke_reports_every_phase(tmp_path):
    out = tmp_path / "rl_step.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # a Ray of its own
    env.update(OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.rl_step", "--smoke", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["shape"] == "tiny" and result["gpus"] == 1
    steps = result["steps"]
    assert [s["step"] for s in steps] == [1, 2] and [s["warmup"] for s in steps] == [True, False]
    for s in steps:
        assert set(s["phases_s"]) == set(PHASES)
        assert all(s["phases_s"][p] >= 0 for p in PHASES if p != "other")
        assert s["step_s"] > 0 and s["tokens_per_s_per_gpu"] > 0
        assert s["samples"] == 4 and s["prompt_tokens"] == 4 * 16
        assert s["response_len_min"] == s["response_len_max"] == 8   # ignore_eos: every response is full length
        assert s["tokens"] == 4 * (16 + 8)
        assert set(s["peak_memory"]) == {"rollout", "onload", "train", "push", "offload"}
        assert s["kv_pool_tokens"] > 0
        assert 0 <= s["rollout_engine_idle_s"] <= s["phases_s"]["rollout"]   # the engine's gaps within the rollout
    mean = result["mean"]
    assert mean["steps"] == [2] and set(mean["phases_s"]) == set(PHASES) and mean["tokens_per_s_per_gpu"] > 0
    assert "| **tokens/s/GPU** |" in proc.stdout


@pytest.mark.gpu
def test_two_colocated_gpu_steps_keep_weights_memory_and_logprobs(tmp_path):
    """Issue #17's GPU check, through the real driver (benchmarks/rl_step.py): colocated on one GPU with every GPU
    feature on (bf16, flashinfer, CUDA graphs, CUDA-IPC push, trainer offload / engine memory release, the engine's
    weights released too and refilled by each push), 1 warm-up + 2 steps. Every push is checksum-verified
    (--check-weight-update: a mismatch fails the run); the first step is on-policy (ppo_kl 0); the engine-vs-trainer
    log-prob gap on the rollout tokens stays under a stated bf16 bound; the device's peak memory in the rollout phase
    does not grow from one measured step to the next."""
    out = tmp_path / "rl_step.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.rl_step", "--shape", "tiny", "--prompts", "16",
                           "--samples", "4", "--prompt-len", "64", "--response-len", "128", "--warmup", "1",
                           "--steps", "2", "--set", "check-weight-update=true", "--set", "release-engine-weights=true",
                           "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["flags"]["attention-backend"] == "flashinfer" and result["flags"]["check-weight-update"] is True
    metrics = [json.loads(line) for line in out.with_suffix(".metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert abs(metrics[0]["train/ppo_kl"]) < 1e-6   # old log-probs recomputed by the same weights: on-policy
    for m in metrics:
        assert m["train/train_rollout_logp_absdiff"] < 0.1   # bf16 engine vs bf16 trainer, same weights
    used = [s["peak_memory"]["rollout"]["device_used_gb"] for s in result["steps"] if not s["warmup"]]
    assert len(used) == 2 and None not in used
    assert used[1] <= used[0] * 1.03, used   # no growth over the steps (the KV pool is sized once)

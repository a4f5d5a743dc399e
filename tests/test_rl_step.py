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
    mean = result["mean"]
    assert mean["steps"] == [2] and set(mean["phases_s"]) == set(PHASES) and mean["tokens_per_s_per_gpu"] > 0
    assert "| **tokens/s/GPU** |" in proc.stdout

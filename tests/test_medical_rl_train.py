"""Doctor and patient co-trained through the RL driver on CPU: two tiny policies, two steps, local Ray."""

from __future__ import annotations

import json
import math

import pytest

from examples.medical_multiagent.make_data import make_data
from inference_engine.testing import make_tiny_model
from orchestrator.driver import Driver, resolve

ray = pytest.importorskip("ray")


def test_two_policies_co_train_and_advance(local_ray, tmp_path, tokenizer_dir):
    # the doctor's system prompt alone is ~700 tokens of the tiny BPE: give the models a 4096-token context
    doctor = make_tiny_model(tmp_path / "doctor", "qwen3", seed=0, tokenizer_dir=tokenizer_dir,
                             max_position_embeddings=4096)
    patient = make_tiny_model(tmp_path / "patient", "llama", seed=1, tokenizer_dir=tokenizer_dir,
                              max_position_embeddings=4096)
    make_data(tmp_path / "data", n_train=4, n_test=0)
    metrics_file = tmp_path / "metrics.jsonl"
    driver = Driver(resolve({
        "policies": [f"doctor={doctor}", f"patient={patient}"], "prompt-data": str(tmp_path / "data/train.jsonl"),
        "metadata-key": "metadata", "rollout-client": "ray", "progress": False, "health-check-interval": 60.0,
        "custom-generate-function-path": "examples.medical_multiagent.generate:generate_dialogue",
        "rollout-batch-size": 2, "n-samples-per-prompt": 2, "rollout-max-response-len": 6, "num-rollout": 2,
        "global-batch-size": 4, "lr": 1e-3, "metrics-file": str(metrics_file), "env-max-turns": 2}))
    try:
        driver.setup()
        history = driver.run()
        assert [h["step"] for h in history] == [1, 2]
        for h in history:
            assert h["rollout/failed_samples"] == 0 and h["rollout/num_samples"] == 8  # 4 episodes x 2 roles
            for policy in ("doctor", "patient"):
                assert h[f"train/{policy}/num_samples"] == 4
                assert math.isfinite(h[f"rollout/{policy}/reward_mean"])
            # the episode metrics (envs.generate.env_metrics) and --env-max-turns (2 doctor turns, default 8)
            assert h["rollout/env_episodes"] == 4 and 0 <= h["rollout/env_cache_hit_rate"] <= 1
            assert 1 <= h["rollout/doctor/turns_mean"] <= 2 and h["rollout/patient/num_samples"] == 4
        assert history[-1]["weight_version/doctor/engine"] == history[-1]["weight_version/patient/engine"] == 2
        for policy in ("doctor", "patient"):
            assert ray.get(driver.engines[policy][0].weight_version.remote()) == 2
        logged = [json.loads(line) for line in metrics_file.read_text().splitlines()]
        assert [line["step"] for line in logged] == [1, 2] and "rollout/patient/reward_mean" in logged[-1]
        # the patient's reward is faithfulness + answered (at most 1.5), the doctor's at most 1.4
        assert -1.0 <= logged[-1]["rollout/patient/reward_mean"] <= 1.5
    finally:
        driver.shutdown()

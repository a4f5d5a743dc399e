"""A 2-step train.py run of a tiny Qwen3-MoE policy with routing replay (CPU, local Ray): the engines record their
experts, the trainer replays them, and the pushed weights (experts included) reach the engine."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from examples.quickstart.make_data import write_dataset
from orchestrator.driver import Driver, resolve

ray = pytest.importorskip("ray")


def test_two_steps_with_routing_replay(local_ray, qwen3_moe_model, tmp_path):
    write_dataset(tmp_path / "data")
    vals = {"hf-checkpoint": str(qwen3_moe_model), "prompt-data": str(tmp_path / "data" / "train.jsonl"),
            "apply-chat-template": True, "rollout-batch-size": 2, "n-samples-per-prompt": 4,
            "rollout-max-response-len": 4, "custom-rm-path": "test_driver:token_reward", "num-rollout": 2,
            "global-batch-size": 8, "lr": 1e-3, "progress": False, "metrics-file": str(tmp_path / "metrics.jsonl"),
            "use-routing-replay": True}
    driver = Driver(resolve(vals))
    try:
        driver.setup()
        driver.run()
        lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines] == [1, 2]
        for line in lines:
            assert line["train/num_samples"] == 8 and line["train/num_failed"] == 0
            # every sample came with its engine's experts: replayed rows of every MoE layer, twice (old log-probs
            # and the training pass); engine and trainer hold the same fp32 weights, so they agree
            assert line["train/routing_replayed_slots"] > 0
            assert line["train/routing_disagreement"] < 0.01
            assert line["train/train_rollout_logp_absdiff"] < 1e-4
        engine = dict(ray.get(driver.engines["default"][0].named_hf_tensors.remote()))
        folder = driver.trainers["default"].export_hf(tmp_path / "export")
        trained = {}
        for f in sorted(folder.glob("*.safetensors")):
            trained.update(load_file(f))
        initial = load_file(qwen3_moe_model / "model.safetensors")
        assert set(trained) == set(initial)
        expert = "model.layers.0.mlp.experts.0.down_proj.weight"
        assert not torch.equal(trained["model.layers.0.mlp.gate.weight"], initial["model.layers.0.mlp.gate.weight"])
        for name, t in trained.items():  # the push delivered every tensor, router and experts included
            assert torch.equal(engine[name], t), name
        assert expert in engine
    finally:
        driver.shutdown()

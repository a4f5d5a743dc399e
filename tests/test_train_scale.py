"""train.py's driver on CPU with the trainer-at-scale flags (issue 20): a colocated run with the sharded, offloaded
optimizer and balanced micro-batches trains, offloads / onloads around the rollouts and pushes the trained weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from examples.quickstart.make_data import write_dataset
from orchestrator.driver import Driver, resolve

ray = pytest.importorskip("ray")


def test_colocated_run_with_sharded_offloaded_optimizer_and_balanced_batches(local_ray, tiny_models, tmp_path):
    model = tiny_models["qwen3"]
    write_dataset(tmp_path)
    vals = {"hf-checkpoint": str(model), "prompt-data": str(tmp_path / "train.jsonl"), "apply-chat-template": True,
            "rollout-batch-size": 2, "n-samples-per-prompt": 4, "rollout-max-response-len": 4,
            "custom-rm-path": "test_driver:token_reward", "num-rollout": 2, "global-batch-size": 8, "lr": 1e-3,
            "progress": False, "metrics-file": str(tmp_path / "metrics.jsonl"), "health-check-interval": 60.0,
            "use-distributed-optimizer": True, "optimizer-cpu-offload": True, "balance-data": True,
            "max-tokens-per-gpu": 64}
    driver = Driver(resolve(vals))
    try:
        driver.setup()
        history = driver.run()
        assert [h["step"] for h in history] == [1, 2]
        lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert all(line["train/num_samples"] == 8 and line["train/grad_norm"] > 0 for line in lines)
        assert all(1.0 <= line["train/dp_imbalance_after"] and 1.0 <= line["train/mb_imbalance_after"]
                   <= line["train/mb_imbalance_before"] for line in lines)
        engine = dict(ray.get(driver.engines["default"][0].named_hf_tensors.remote()))
        folder = driver.trainers["default"].export_hf(tmp_path / "export")
        trainer = {}
        for f in sorted(folder.glob("*.safetensors")):
            trainer.update(load_file(f))
        initial = load_file(model / "model.safetensors")
        assert any(not torch.equal(engine[n], t) for n, t in initial.items())  # training moved the weights
        for name, t in trainer.items():
            assert torch.equal(engine[name], t), name  # the pushed weights are the trained ones
    finally:
        driver.shutdown()

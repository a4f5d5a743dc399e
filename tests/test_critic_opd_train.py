"""PPO with a critic and on-policy distillation through the whole driver (train.py's path), on CPU with a local Ray."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.cli import ConfigError
from orchestrator.driver import resolve
from test_train import data_dir, run, values  # noqa: F401 - fixtures and helpers of the driver tests

ray = pytest.importorskip("ray")


def _lines(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_gae_run_trains_the_critic(local_ray, qwen3_model, data_dir, tmp_path):  # noqa: F811
    driver, history = run(values(qwen3_model, data_dir, tmp_path, **{
        "advantage-estimator": "gae", "lambd": 0.95, "critic-lr": 5e-3, "save": str(tmp_path / "ckpt")}))
    driver.shutdown()
    lines = _lines(tmp_path)
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert line["train/value_loss"] > 0 and line["train/critic_grad_norm"] > 0
        assert line["train/num_samples"] == 8 and torch.isfinite(torch.tensor(line["train/loss"]))
    assert lines[0]["train/values_mean"] == 0.0 and lines[1]["train/values_mean"] != 0.0  # the critic learned
    state = torch.load(tmp_path / "ckpt" / "iter_0000002" / "policy_default" / "rank_00000.pt", weights_only=False)
    head = state["critic"]["value_head.weight"]
    assert head.abs().max() > 0   # zero-initialised, then trained


def test_opd_run_scores_with_a_served_teacher(local_ray, tiny_models, data_dir, tmp_path):  # noqa: F811
    driver, history = run(values(tiny_models["qwen3"], data_dir, tmp_path, **{
        "use-opd": True, "opd-teacher-load": str(tiny_models["llama"]), "opd-kl-coef": 0.5}))
    try:
        assert driver.teacher is not None and not isinstance(driver.teacher, str)
    finally:
        driver.shutdown()
    lines = _lines(tmp_path)
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert line["opd/teacher_failed"] == 0 and line["train/num_failed"] == 0
        assert line["train/opd_reverse_kl"] != 0.0 and line["train/opd_teacher_logp_mean"] < 0
        assert line["train/num_samples"] == 8


def test_opd_teacher_flags_are_checked_before_ray(qwen3_model, data_dir, tmp_path):  # noqa: F811
    base = values(qwen3_model, data_dir, tmp_path, **{"use-opd": True})
    with pytest.raises(ConfigError, match="needs one teacher"):
        resolve(base)
    with pytest.raises(ConfigError, match="needs one teacher"):
        resolve({**base, "opd-teacher-url": "http://127.0.0.1:1", "opd-teacher-load": str(qwen3_model)})
    with pytest.raises(ConfigError, match="--opd-teacher-url is the teacher"):
        resolve(values(qwen3_model, data_dir, tmp_path, **{"opd-teacher-url": "http://127.0.0.1:1"}))
    assert resolve({**base, "opd-teacher-url": "http://127.0.0.1:1"}).run.opd_teacher_url == "http://127.0.0.1:1"

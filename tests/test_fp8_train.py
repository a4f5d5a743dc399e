"""FP8 rollout end to end on CPU: train.py's driver with --rollout-dtype fp8 pushes every step into FP8 engines
(checksums over the e4m3 weights and scales), reports the mismatch and trains with TIS and MIS on."""

import json

import ray
import torch

from test_train import data_dir, run, trainer_tensors, values  # noqa: F401 - fixtures
from weight_sync import compare_checksums
from weight_sync.checksum import TensorChecksum, checksums
from weight_sync.fp8 import Fp8Layout


def test_fp8_rollout_run_pushes_quantised_weights_and_reports_the_mismatch(local_ray, qwen3_model,  # noqa: F811
                                                                            data_dir, tmp_path):  # noqa: F811
    driver, history = run(values(qwen3_model, data_dir, tmp_path, **{
        "rollout-dtype": "fp8", "fp8-block-size": 32, "check-weight-update": True}))
    try:
        assert [h["step"] for h in history] == [1, 2]
        assert driver.cfg.trainer.loss.use_tis and driver.cfg.trainer.loss.use_mis
        lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        for line in lines:
            assert line["train/train_rollout_kl"] >= 0 and line["train/train_rollout_logp_absdiff"] > 0
            assert "train/tis_clipfrac" in line and "train/mis_reject_frac" in line
        # the engine holds the trainer's last weights, quantised: its checksums (exact bits of the e4m3 weights and
        # their scales; float8 tensors do not survive Ray's pickling) against the quantised export
        reported = {k: TensorChecksum.from_dict(v) for k, v in
                    ray.get(driver.engines["default"][0].weight_checksums.remote()).items()}
        trainer = sorted(trainer_tensors(driver, tmp_path / "export").items())
        held = Fp8Layout(32).quantize_bucket(trainer)
        compare_checksums(checksums(held), reported)
        assert set(reported) == {name for name, _ in held}
        assert sum(t.dtype == torch.float8_e4m3fn for _, t in held) == 7 * 2  # q, k, v, o, gate, up, down; 2 layers
    finally:
        driver.shutdown()

"""End-to-end runs of the RL driver through a local Ray (CPU, 2 CPUs): weights, resume, failures, policies, jobs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from examples.quickstart.make_data import write_dataset
from orchestrator.driver import Driver, resolve
from kiln_common.net import free_port

ray = pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[1]
# wall-clock figures, and the engine-vs-trainer log-prob gap (engine batching changes the last float bits)
# metrics that depend on timing, not on the run's state: speeds, which requests shared a prefill (cache hit rate),
# and the engine's float rounding under different batch compositions (rollout log-probs)
UNSTABLE = ("timing/", "train/time_", "rollout/time_s", "rollout/tokens_per_s", "push/gb_per_s",
            "train/train_rollout_logp_absdiff", "train/train_rollout_kl", "rollout/cache_hit_rate",
            "rollout/engine_slow_probes", "rollout/engine_request_timeouts", "rollout/engine/")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    write_dataset(out)
    return out


def values(model, data_dir, tmp_path, **extra):
    """Flags of a small colocated run: 2 prompts x 4 samples, 4 new tokens, a reward with variance."""
    return {"hf-checkpoint": str(model), "prompt-data": str(data_dir / "train.jsonl"), "apply-chat-template": True,
            "rollout-batch-size": 2, "n-samples-per-prompt": 4, "rollout-max-response-len": 4,
            "custom-rm-path": "test_driver:token_reward", "num-rollout": 2, "global-batch-size": 8, "lr": 1e-3,
            "progress": False, "rollout-shuffle": True, "metrics-file": str(tmp_path / "metrics.jsonl"),
            "health-check-interval": 60.0, **extra}


def run(vals) -> tuple[Driver, list[dict]]:
    """Set up and run a driver; the caller shuts it down."""
    driver = Driver(resolve(vals))
    try:
        driver.setup()
        return driver, driver.run()
    except BaseException:
        driver.shutdown()
        raise


def engine_tensors(driver, policy="default") -> dict[str, torch.Tensor]:
    return dict(ray.get(driver.engines[policy][0].named_hf_tensors.remote()))  # (hf_name, CPU copy) pairs


def trainer_tensors(driver, out_dir, policy="default") -> dict[str, torch.Tensor]:
    folder = driver.trainers[policy].export_hf(out_dir)
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def assert_same_weights(engine: dict, trainer: dict):
    assert engine and set(trainer) <= set(engine)
    for name, t in trainer.items():
        assert torch.equal(engine[name], t), name


def test_colocated_two_steps_push_the_trained_weights(local_ray, qwen3_model, data_dir, tmp_path):
    # --context-length reaches the prompt data as its limit (every quickstart prompt fits in 255 tokens)
    driver, history = run(values(qwen3_model, data_dir, tmp_path, **{"context-length": 256,
                                                                     "release-engine-weights": True}))
    try:
        assert [h["step"] for h in history] == [1, 2]
        lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines] == [1, 2]
        assert all(0 <= line["rollout/reward_mean"] <= 1 and line["rollout/num_samples"] == 8 for line in lines)
        assert all(line["train/num_samples"] == 8 and line["train/grad_norm"] > 0 for line in lines)
        assert ray.get(driver.engines["default"][0].weight_version.remote()) == 2
        engine_metrics = ray.get(driver.engines["default"][0].metrics.remote())
        # --release-engine-weights: the engine's weights left the device at both steps, refilled by the push
        assert engine_metrics["weights_discarded_releases_total"] == 2
        assert engine_metrics["weights_kept_releases_total"] == 0
        assert lines[-1]["weight_version/engine"] == 2
        # the engine's steps of each rollout: counted in the engine, logged per step (their sum: all it stepped
        # since the run began, warm-up excluded)
        assert all(line["rollout/engine/steps"] > 0 and line["rollout/engine/step_ms"] > 0 for line in lines)
        assert all(1 <= line["rollout/engine/requests_per_step"] <= 8 and line["rollout/engine/busy_frac"] > 0
                   for line in lines)
        assert sum(line["rollout/engine/steps"] for line in lines) <= engine_metrics["steps_total"]
        engine = engine_tensors(driver)
        initial = load_file(qwen3_model / "model.safetensors")
        assert any(not torch.equal(engine[n], t) for n, t in initial.items())  # training moved the weights
        assert_same_weights(engine, trainer_tensors(driver, tmp_path / "export"))
    finally:
        driver.shutdown()


def test_eval_sets_tensorboard_and_periodic_hf_export(local_ray, qwen3_model, data_dir, tmp_path):
    """--eval-config with two sets logs both, --use-tensorboard logs the same keys as metrics.jsonl, and
    --save-hf-interval 1 exports iter_ folders that transformers loads, the last one equal to the trainer."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    rows = [json.loads(line) for line in (data_dir / "test.jsonl").read_text().splitlines()[:2]]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"q": r["prompt"], "ans": r["label"]}) + "\n" for r in rows))
    (tmp_path / "evals.yaml").write_text(
        "eval:\n  - {name: a, path: a.jsonl, n_samples_per_prompt: 2, temperature: 1.0, max_response_len: 3}\n"
        "  - {name: b, path: b.jsonl, input_key: q, label_key: ans, rm_type: exact_match}\n")
    driver, _ = run(values(qwen3_model, data_dir, tmp_path, **{
        "eval-config": str(tmp_path / "evals.yaml"), "eval-interval": 1, "use-tensorboard": True,
        "save-hf": str(tmp_path / "hf"), "save-hf-interval": 1}))
    try:
        lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines] == [0, 1, 2]   # step 0: the eval before training
        for line in lines:
            assert 0 <= line["eval/a/reward_mean"] <= 1 and line["eval/a/num_samples"] == 4
            assert line["eval/b/reward_mean"] in (0.0, 0.5, 1.0) and line["eval/b/num_samples"] == 2
            assert "eval/reward_mean" not in line   # no --eval-prompt-data: no set 'default'
        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        numeric = {k for line in lines for k, v in line.items() if k != "step" and isinstance(v, (int, float))}
        assert set(events.Tags()["scalars"]) == numeric
        for key in ("eval/a/reward_mean", "rollout/reward_mean", "train/loss"):
            assert [(e.step, e.value) for e in events.Scalars(key)] == \
                [(line["step"], pytest.approx(line[key])) for line in lines if key in line]
        folders = sorted((tmp_path / "hf" / "default").iterdir())
        assert [f.name for f in folders] == ["iter_0000001", "iter_0000002"]   # no temporary folder left
        model = AutoModelForCausalLM.from_pretrained(folders[-1], torch_dtype=torch.float32)
        trainer = trainer_tensors(driver, tmp_path / "export")
        state = model.state_dict()
        for name, t in trainer.items():
            assert torch.equal(state[name].to(t.dtype), t), name
        first = AutoModelForCausalLM.from_pretrained(folders[0], torch_dtype=torch.float32).state_dict()
        assert any(not torch.equal(first[n], state[n]) for n in trainer)   # step 2 trained on
    finally:
        driver.shutdown()


def test_resume_continues_bit_identically(local_ray, qwen3_model, data_dir, tmp_path):
    full, history = run(values(qwen3_model, data_dir, tmp_path / "full", **{"num-rollout": 3}))
    try:
        expected_weights = trainer_tensors(full, tmp_path / "full_export")
    finally:
        full.shutdown()
    save = tmp_path / "ckpt"
    first, _ = run(values(qwen3_model, data_dir, tmp_path / "a", save=str(save)))
    first.shutdown()
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"
    resumed, rest = run(values(qwen3_model, data_dir, tmp_path / "b", load=str(save), **{"num-rollout": 3}))
    try:
        assert [h["step"] for h in rest] == [3]
        stable = {k: v for k, v in history[2].items() if not k.startswith(UNSTABLE)}
        again = {k: v for k, v in rest[0].items() if not k.startswith(UNSTABLE)}
        assert again == stable
        assert ray.get(resumed.engines["default"][0].weight_version.remote()) == 3
        got = trainer_tensors(resumed, tmp_path / "resumed_export")
        assert set(got) == set(expected_weights)
        assert all(torch.equal(got[n], expected_weights[n]) for n in got)
    finally:
        resumed.shutdown()


def test_failures_are_counted_and_the_run_finishes(local_ray, qwen3_model, data_dir, tmp_path, caplog):
    rows = (data_dir / "train.jsonl").read_text().splitlines()
    bad = tmp_path / "train.jsonl"
    bad.write_text("\n".join(rows[:3] + ['{"prompt": 5, "label": "x"}', "{not json"] + rows[3:]) + "\n")
    vals = values(qwen3_model, data_dir, tmp_path, **{
        "prompt-data": str(bad), "rollout-shuffle": False, "rollout-batch-size": 4,
        "custom-generate-function-path": "test_driver:flaky_generate", "custom-rm-path": "test_driver:slow_reward",
        "reward-timeout": 1.0, "max-oversampling-rounds": 1})
    caplog.set_level("INFO", logger="kiln.driver")
    driver, history = run(vals)
    driver.shutdown()
    assert [h["step"] for h in history] == [1, 2]
    failed = sum(h["rollout/failed_samples"] for h in history)
    assert failed > 0 and sum(h["rollout/dropped_groups_failed"] for h in history) > 0
    assert history[-1]["rollout/skipped_rows"] == 2
    text = caplog.text
    assert "flaky generate refuses sample" in text and "bad rows 2" in text
    assert all(h["train/num_samples"] == h["rollout/num_samples"] for h in history)


@pytest.mark.parametrize("client, placement", [("ray", {}), ("http", {}),
                                               ("ray", {"colocate": False, "cpus-per-device": 0.5})],
                         ids=["ray-colocated", "http-colocated", "ray-disaggregated"])
def test_a_killed_engine_is_restarted_and_the_run_loses_no_sample(local_ray, qwen3_model, data_dir, tmp_path,
                                                                   caplog, client, placement):
    # two engines, so the rollout goes on; engine 1 is killed in the middle of the second rollout (test_driver's
    # engine_killing_generate); load spread by outstanding requests, so both engines get work. Colocated, and
    # disaggregated (the weights go over a gloo update group, rebuilt for the new engine)
    caplog.set_level("INFO", logger="kiln.driver")
    driver, history = run(values(qwen3_model, data_dir, tmp_path, **placement, **{
        "num-rollout": 3, "rollout-num-engines": 2, "rollout-client": client, "router-balance-threshold": 0,
        "custom-generate-function-path": "test_driver:engine_killing_generate"}))
    try:
        assert [h["step"] for h in history] == [1, 2, 3]
        assert [h["engine_restarts"] for h in history] == [0, 1, 1]
        for h in history:  # no sample lost: every one of the 2 x 4 completed, none failed
            assert h["rollout/num_samples"] + h["rollout/failed_samples"] == 2 * 4
            assert h["rollout/failed_samples"] == 0 and h["train/num_samples"] == 8
            # the engines' pace: the restarted engine (another start time) counts from zero, never a negative step
            assert h["rollout/engine/steps"] > 0 and h["rollout/engine/requests_per_step"] >= 1
        name = driver.engine_name("default", 1)
        restarted = ray.get_actor(name)
        assert restarted._actor_id == driver.engines["default"][1]._actor_id
        assert ray.get(restarted.weight_version.remote()) == 3
        assert ray.get(driver.engines["default"][0].weight_version.remote()) == 3
        trainer = trainer_tensors(driver, tmp_path / "export")
        for i in (0, 1):
            assert_same_weights(dict(ray.get(driver.engines["default"][i].named_hf_tensors.remote())), trainer)
        text = caplog.text
        assert f"step 2: engine {name} failed (the actor died (ActorDiedError" in text
        assert f"step 2: engine {name} is back in rotation at weight version 2 (checksums verified)" in text
        assert "| engine restarts 1" in text
    finally:
        driver.shutdown()


@pytest.mark.parametrize("share_devices", [False, True])
def test_two_policies_each_get_their_weights(local_ray, tiny_models, data_dir, tmp_path, share_devices):
    vals = values(tiny_models["qwen3"], data_dir, tmp_path, **{
        "policies": [f"speaker={tiny_models['qwen3']}", f"listener={tiny_models['llama']}"],
        "custom-generate-function-path": "test_driver:two_policy_generate", "rollout-client": "ray",
        "policies-share-devices": share_devices, "release-engine-weights": True})
    del vals["hf-checkpoint"]
    driver, history = run(vals)
    try:
        # shared: both policies' trainer and engine on the one device, trained in turn; else a device each
        assert len(driver._plan.bundles) == (1 if share_devices else 2)
        assert driver._turns == ([["speaker"], ["listener"]] if share_devices else [["speaker", "listener"]])
        last = history[-1]
        assert last["weight_version/speaker/engine"] == 2 and last["weight_version/listener/engine"] == 2
        assert last["train/speaker/num_samples"] == 8 and last["train/listener/num_samples"] == 8
        assert last["rollout/engine/speaker/steps"] > 0 and last["rollout/engine/listener/steps"] > 0
        for policy in ("speaker", "listener"):
            assert ray.get(driver.engines[policy][0].weight_version.remote()) == 2
            assert_same_weights(engine_tensors(driver, policy), trainer_tensors(driver, tmp_path / policy, policy))
    finally:
        driver.shutdown()


def test_a_frozen_policy_is_served_but_never_trained(local_ray, tiny_models, data_dir, tmp_path, caplog):
    """--frozen-policies listener: the listener's engine serves its checkpoint at weight version 0, no trainer, no
    push, no checkpoint files; its samples are counted, not trained. Saved with the policies sharing one device,
    resumed on a device each."""
    listener_folder = tiny_models["llama"]
    vals = values(tiny_models["qwen3"], data_dir, tmp_path / "a", **{
        "policies": [f"speaker={tiny_models['qwen3']}", f"listener={listener_folder}"],
        "frozen-policies": ["listener"], "custom-generate-function-path": "test_driver:two_policy_generate",
        "rollout-client": "ray", "policies-share-devices": True, "save": str(tmp_path / "ckpt"),
        "release-engine-weights": True})
    del vals["hf-checkpoint"]
    checkpoint_weights = load_file(listener_folder / "model.safetensors")

    def check(driver, history, version):
        assert set(driver.trainers) == {"speaker"} and driver._plan.policies["listener"].trainers == ()
        last = history[-1]
        assert last["weight_version/speaker/engine"] == version and last["weight_version/listener/engine"] == 0
        assert last["train/speaker/num_samples"] == 8 and not any(k.startswith("train/listener/") for k in last)
        assert last["rollout/listener/frozen_samples"] == 8 and "rollout/listener/reward_mean" in last
        assert ray.get(driver.engines["speaker"][0].weight_version.remote()) == version
        assert ray.get(driver.engines["listener"][0].weight_version.remote()) == 0
        if driver.cfg.run.policies_share_devices:   # beside the speaker's trainer: its weights went to host memory
            released = ray.get(driver.engines["listener"][0].metrics.remote())
            assert released["weights_kept_releases_total"] == 2 and released["weights_discarded_releases_total"] == 0
        trained = trainer_tensors(driver, tmp_path / f"export{version}", "speaker")
        assert_same_weights(engine_tensors(driver, "speaker"), trained)
        assert_same_weights(engine_tensors(driver, "listener"), checkpoint_weights)

    with caplog.at_level("WARNING", logger="kiln.driver"):
        driver, history = run(vals)
    try:
        # one device: the speaker's trainer and engine and the listener's engine, a third of it each
        assert len(driver._plan.bundles) == 1 and driver._turns == [["speaker"]]
        check(driver, history, 2)
        assert "no samples for policy" not in caplog.text
    finally:
        driver.shutdown()
    saved = tmp_path / "ckpt" / "iter_0000002"
    assert (saved / "policy_speaker").is_dir() and not (saved / "policy_listener").exists()
    assert json.loads((saved / "driver.json").read_text())["frozen_policies"] == ["listener"]
    resumed, rest = run({**vals, "load": str(tmp_path / "ckpt"), "num-rollout": 3, "policies-share-devices": False,
                         "metrics-file": str(tmp_path / "b" / "metrics.jsonl")})
    try:
        assert [h["step"] for h in rest] == [3]
        assert [s.num_cpus for s in resumed._plan.policies["listener"].engines] == [1.0]   # a device of its own
        check(resumed, rest, 3)
    finally:
        resumed.shutdown()


def test_async_disaggregated_run_trains_one_step_stale(local_ray, qwen3_model, data_dir, tmp_path):
    driver, history = run(values(qwen3_model, data_dir, tmp_path, **{
        "async-rollout": True, "colocate": False, "num-rollout": 3, "check-weight-update": True}))
    try:
        assert [h["step"] for h in history] == [1, 2, 3]
        # rollout k+1 is launched before step k trains, so its samples are at most one version stale; whether a
        # sample is generated before or after the push of step k depends on timing, so only the bound is fixed
        lags = [h["rollout/weight_version_lag"] for h in history]
        assert lags[0] == 0 and all(lag in (0, 1) for lag in lags[1:]), lags
        assert all("train/tis_clipfrac" in h for h in history)
        assert ray.get(driver.engines["default"][0].weight_version.remote()) == 3
        assert_same_weights(engine_tensors(driver), trainer_tensors(driver, tmp_path / "export"))
    finally:
        driver.shutdown()


def test_tensor_parallel_engine_receives_the_weights_on_every_rank(local_ray, qwen3_model, data_dir, tmp_path):
    # disaggregated: the weights go over the gloo update group, which both tp ranks of the engine join
    driver, history = run(values(qwen3_model, data_dir, tmp_path, **{
        "tp-size": 2, "colocate": False, "cpus-per-device": 0.5, "num-rollout": 1, "check-weight-update": True,
        "rollout-client": "ray"}))
    try:
        assert [h["step"] for h in history] == [1] and history[0]["rollout/num_samples"] == 8
        info = ray.get(driver.engines["default"][0].get_model_info.remote())
        assert info["tp_size"] == 2 and info["weight_version"] == 1
        assert_same_weights(engine_tensors(driver), trainer_tensors(driver, tmp_path / "export"))
    finally:
        driver.shutdown()


def test_ray_job_submit_runs_a_step(qwen3_model, data_dir, tmp_path):
    if ray.is_initialized():
        ray.shutdown()
    ray_bin = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    port, dash = free_port(), free_port()
    # every port of its own, so another Ray on this machine (a user's, another test run's) cannot collide with it
    own_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    temp = Path("/tmp") / f"kiln_ray_{os.getpid()}"  # short: Ray's socket paths must stay under 107 chars
    # --block keeps the head in this process group, so it and only it is ended afterwards (no `ray stop`)
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--num-cpus", "2", f"--port={port}",
                             "--include-dashboard", "true", f"--dashboard-port={dash}", f"--temp-dir={temp}",
                             "--disable-usage-stats", *own_ports], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        args = ["--hf-checkpoint", str(qwen3_model), "--prompt-data", str(data_dir / "train.jsonl"),
                "--apply-chat-template", "--rollout-batch-size", "2", "--n-samples-per-prompt", "2",
                "--rollout-max-response-len", "2", "--num-rollout", "1", "--no-progress",
                "--custom-rm-path", "examples.quickstart.reward:arithmetic_reward",
                "--metrics-file", str(tmp_path / "metrics.jsonl")]
        runtime_env = json.dumps({"working_dir": str(REPO), "excludes": [".git", ".venv", ".whl", "runs", "outputs"],
                                  "env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}})
        _wait_for_dashboard(address, head)
        submit = [str(ray_bin), "job", "submit", f"--address={address}", "--runtime-env-json", runtime_env,
                  "--", sys.executable, "train.py", *args]
        deadline = time.monotonic() + 120
        while True:  # the job agent registers a little after the dashboard answers; a busy machine widens the gap
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in job.stdout + job.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()  # "Job 'raysubmit_...' succeeded"
        lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines] == [1] and lines[0]["weight_version/engine"] == 1
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_dashboard(address: str, head: subprocess.Popen, timeout: float = 120.0) -> None:
    """Block until the head's job API answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5):
                return
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head's dashboard at {address} did not come up "
                                   f"(head exit code {head.poll()})") from None
            time.sleep(1)

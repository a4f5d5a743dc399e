"""The driver's config resolution and placement (no Ray), plus the plugin functions the Ray tests load by import path.

Ray actors import these plugins as `test_driver:<fn>` (tests/ is put on their PYTHONPATH by
tests/test_train.py).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from envs.generate import EnvConfig
from orchestrator.cli import ConfigError
from orchestrator.driver import parse_args, resolve
from rollout.generate import generate as default_generate
from orchestrator.placement import plan_placement, shared_kv_fraction
from kiln_common.sample import Sample, Status

# ---- plugins used by tests/test_train.py (loaded inside Ray actors) ---------------------------------------------


def token_reward(args, sample: Sample) -> float:
    """A reward that varies between samples of a group (so GRPO advantages are non-zero): token-id parity share."""
    tokens = sample.response_tokens
    return sum(t % 2 for t in tokens) / max(len(tokens), 1)


async def flaky_generate(args, sample: Sample, sampling_params: dict) -> Sample:
    """The default generate function, except that every 5th sample raises."""
    if sample.index % 5 == 3:
        raise RuntimeError(f"flaky generate refuses sample {sample.index}")
    return await default_generate(args, sample, sampling_params)


async def slow_reward(args, sample: Sample) -> float:
    """token_reward, but samples of prompts whose label is '7' take longer than the reward timeout."""
    if str(sample.label) == "7":
        await asyncio.sleep(30)
    return token_reward(args, sample)


async def two_policy_generate(args, sample: Sample, sampling_params: dict) -> list[Sample]:
    """A 'speaker' answers the prompt, a 'listener' continues the speaker's answer: one Sample per policy."""
    speaker = await default_generate(args.__class__(args.clients["speaker"], args.tokenizer, args.config,
                                                    args.clients), sample, sampling_params)
    speaker.policy = "speaker"
    listener = Sample(index=sample.index, group_index=sample.group_index, prompt=sample.prompt,
                      tokens=list(speaker.tokens), label=sample.label, metadata=dict(sample.metadata),
                      policy="listener")
    response = await args.clients["listener"].generate(listener.tokens, sampling_params,
                                                       session_id=f"listener-{sample.group_index}")
    from rollout.generate import append_response
    append_response(listener, response)
    if listener.response_length == 0:
        listener.status = Status.FAILED
    return [speaker, listener]


KILL_AT_SAMPLE = 8  # the first sample of the second rollout (2 prompts x 4 samples each)
_kill = {}


async def engine_killing_generate(args, sample: Sample, sampling_params: dict) -> Sample:
    """The default generate function; in the second rollout, sample KILL_AT_SAMPLE first kills engine 1 of policy
    'default' (found by its actor name), checks that a client of the dead actor raises EngineUnavailableError, and
    only then lets that rollout's samples go on, so they meet a dead engine and the router must retry them."""
    import ray

    from rollout.client import EngineUnavailableError, LocalEngineClient

    killed = _kill.setdefault("event", asyncio.Event())
    if sample.index == KILL_AT_SAMPLE:
        names = [n for n in ray.util.list_named_actors() if n.startswith("kiln-engine-default-1-")]
        assert len(names) == 1, names
        handle = ray.get_actor(names[0])
        ray.kill(handle, no_restart=True)
        while True:  # ray.kill returns at once; the actor is gone a moment later
            try:
                await handle.health.remote()
            except ray.exceptions.RayActorError:
                break
            await asyncio.sleep(0.05)
        try:
            await LocalEngineClient(handle, name="killed").generate(sample.tokens, sampling_params)
        except EngineUnavailableError:
            pass
        else:
            raise AssertionError("a killed engine actor answered")
        killed.set()
    elif sample.index > KILL_AT_SAMPLE:
        await killed.wait()
    return await default_generate(args, sample, sampling_params)


# ---- config resolution --------------------------------------------------------------------------------------------


def _values(model, **extra):
    return {"hf-checkpoint": str(model), "prompt-data": "x.jsonl", **extra}


def test_trainer_temperature_follows_rollout_temperature(qwen3_model):
    cfg = resolve(_values(qwen3_model, **{"rollout-temperature": 0.7}))
    assert cfg.trainer.temperature == 0.7 and cfg.rollout.rollout_temperature == 0.7
    assert resolve(_values(qwen3_model, **{"rollout-temperature": 0.0})).trainer.temperature == 1.0
    with pytest.raises(ConfigError, match="--temperature 0.5 differs from --rollout-temperature 1.0"):
        resolve(_values(qwen3_model, temperature=0.5))


def test_seeds_policies_and_async(qwen3_model, tiny_models):
    cfg = resolve(_values(qwen3_model, seed=7))
    assert cfg.rollout.sampling_seed == 7 and cfg.policies == {"default": str(qwen3_model)}
    assert cfg.engine.model_path == str(qwen3_model) and cfg.trainer.hf_checkpoint == str(qwen3_model)
    two = resolve({"prompt-data": "x.jsonl", "policies": [f"a={tiny_models['qwen3']}", f"b={tiny_models['llama']}"]})
    assert two.policies == {"a": str(tiny_models["qwen3"]), "b": str(tiny_models["llama"])}
    assert two.trainer.hf_checkpoint == str(tiny_models["qwen3"])
    cfg = resolve(_values(qwen3_model, **{"async-rollout": True, "colocate": False}))
    assert cfg.trainer.loss.use_tis and cfg.run.async_rollout


@pytest.mark.parametrize("extra, message", [
    ({"policies": ["a=/nowhere"]}, "policy 'a': '/nowhere' is not a local HF model folder"),
    ({"policies": ["no-path"]}, "expected NAME=PATH"),
    ({"async-rollout": True}, "--async-rollout needs --no-colocate"),
    ({"async-rollout": True, "colocate": False, "use-tis": False}, "it needs TIS"),
    ({"model-path": "/m"}, "--model-path is set by the driver"),
    ({"eval-interval": 2}, "--eval-interval 2 needs --eval-prompt-data"),
    ({"debug-train-only": True}, "set --load-debug-rollout-data"),
    ({"rollout-client": "grpc"}, "rollout_client = 'grpc': expected 'http' or 'ray'"),
    ({"policies-share-devices": True, "colocate": False}, "--policies-share-devices needs --colocate"),
])
def test_inconsistent_configs_are_rejected(qwen3_model, extra, message):
    with pytest.raises((ConfigError, ValueError), match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(_values(qwen3_model, **extra))


def test_frozen_policies_must_be_served_policies_and_not_all(tiny_models):
    two = [f"a={tiny_models['qwen3']}", f"b={tiny_models['llama']}"]
    cfg = parse_args(["--policies", *two, "--frozen-policies", "b", "--prompt-data", "x.jsonl"])
    assert cfg.run.frozen_policies == ["b"] and cfg.run.trained_policies() == ["a"] and list(cfg.policies) == ["a", "b"]
    with pytest.raises(ConfigError, match=r"--frozen-policies names 'c', which is not one of --policies \(a, b\)"):
        resolve({"prompt-data": "x.jsonl", "policies": two, "frozen-policies": ["c"]})
    with pytest.raises(ConfigError, match=r"freezes every policy \(a, b\).*use --debug-rollout-only"):
        resolve({"prompt-data": "x.jsonl", "policies": two, "frozen-policies": ["b", "a"]})
    with pytest.raises(ConfigError, match=r"freezes every policy \(default\)"):
        resolve(_values(tiny_models["qwen3"], **{"frozen-policies": ["default"]}))


def test_a_bad_frozen_policy_exits_2_before_ray_starts(tiny_models, tmp_path, capsys, caplog):
    import ray

    from orchestrator.checkpoint import begin_checkpoint, finish_checkpoint
    from orchestrator.driver import main

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1 + 1?", "label": "2"}) + "\n")
    flags = ["--policies", f"a={tiny_models['qwen3']}", f"b={tiny_models['llama']}", "--prompt-data", str(data)]
    with pytest.raises(SystemExit) as e:
        main([*flags, "--frozen-policies", "x"])
    assert e.value.code == 2 and not ray.is_initialized()
    assert capsys.readouterr().err.strip() == ("train.py: error: --frozen-policies names 'x', which is not one of "
                                               "--policies (a, b)")
    # a checkpoint saved with other frozen policies: its trainer state does not match this run's trainers
    begin_checkpoint(tmp_path / "ckpt", 1)
    finish_checkpoint(tmp_path / "ckpt", 1, {}, None, {"next_step": 1, "policies": {}, "frozen_policies": []})
    with pytest.raises(SystemExit) as e:
        main([*flags, "--frozen-policies", "b", "--load", str(tmp_path / "ckpt")])
    assert e.value.code == 2 and not ray.is_initialized()
    assert "was saved with --frozen-policies none, this run has ['b']" in caplog.text


def test_yaml_config_sets_driver_flags(qwen3_model, tmp_path):
    from orchestrator.driver import parse_args

    path = tmp_path / "run.yaml"
    path.write_text(json.dumps({"hf_checkpoint": str(qwen3_model), "prompt_data": "x.jsonl", "num_rollout": 3,
                                "policies": [f"solo={qwen3_model}"], "rollout_temperature": 0.8}))
    cfg = parse_args(["--config", str(path), "--num-rollout", "5"])
    assert cfg.run.num_rollout == 5 and cfg.policies == {"solo": str(qwen3_model)} and cfg.trainer.temperature == 0.8


def test_env_flags_reach_the_env_config(qwen3_model):
    cfg = parse_args(["--hf-checkpoint", str(qwen3_model), "--prompt-data", "x.jsonl", "--env", "countdown",
                      "--env-kwargs", '{"start": 3}', "--env-max-turns", "3", "--env-step-timeout", "none"])
    assert cfg.env == EnvConfig(env="countdown", env_kwargs={"start": 3}, env_max_turns=3, env_step_timeout=None)
    assert cfg.flag_values()["env-max-turns"] == 3
    assert resolve(_values(qwen3_model)).env == EnvConfig()
    with pytest.raises(ConfigError, match=r"EnvConfig.env_max_turns = 0: expected an integer >= 1"):
        resolve(_values(qwen3_model, **{"env-max-turns": 0}))


# ---- placement ----------------------------------------------------------------------------------------------------


def test_colocated_placement_shares_each_device():
    plan = plan_placement(["a", "b"], num_trainers=2, num_engines=1, colocate=True, use_gpu=True, cpus_per_device=4)
    assert plan.bundles == ({"CPU": 4.0, "GPU": 1.0},) * 4
    a, b = plan.policies["a"], plan.policies["b"]
    assert [s.bundle for s in a.trainers] == [0, 1] and [s.bundle for s in a.engines] == [0]
    assert [s.bundle for s in b.trainers] == [2, 3] and [s.bundle for s in b.engines] == [2]
    assert a.trainers[0].num_gpus + a.engines[0].num_gpus == 1.0 and a.trainers[0].num_cpus == 2.0


def test_policies_that_share_devices_share_one_set_of_bundles():
    plan = plan_placement(["a", "b"], num_trainers=2, num_engines=1, colocate=True, use_gpu=True, cpus_per_device=4,
                          share_devices=True)
    assert plan.bundles == ({"CPU": 4.0, "GPU": 1.0},) * 2
    for p in ("a", "b"):
        slots = plan.policies[p]
        assert [s.bundle for s in slots.trainers] == [0, 1] and [s.bundle for s in slots.engines] == [0]
        # device 0: two trainers and two engines, a quarter each; device 1: the two trainers, a half each
        assert [(s.num_gpus, s.num_cpus) for s in slots.trainers + slots.engines] == [(0.25, 1.0), (0.5, 2.0),
                                                                                      (0.25, 1.0)]
    three = plan_placement(["a", "b", "c"], num_trainers=1, num_engines=1, colocate=True, use_gpu=True,
                           share_devices=True)
    gpus = [s.num_gpus for p in three.policies.values() for s in p.trainers + p.engines]
    assert gpus == [0.1666] * 6 and sum(gpus) <= 1.0   # Ray takes 1e-4 steps; rounded down so all six fit
    with pytest.raises(ValueError, match="one-device engines, but tp_size is 2"):
        plan_placement(["a", "b"], num_trainers=1, num_engines=1, colocate=True, use_gpu=True, engine_devices=2,
                       share_devices=True, train=False)   # rollout only: no trainer shares the device


@pytest.mark.parametrize("fraction, engines", [(0.85, 2), (0.9, 3), (0.5, 4), (1.0, 2)])
def test_engines_that_share_a_device_get_equal_kv_memory(fraction, engines):
    free, pools = 1.0, []
    for position in range(engines):   # each measures what the ones before it left free
        pools.append(free * shared_kv_fraction(fraction, engines, position))
        free -= pools[-1]
    assert pools == pytest.approx([fraction / engines] * engines)
    # a restart starts beside all the others, which hold their pools: it gets the same share
    restart = shared_kv_fraction(fraction, engines, engines - 1)
    assert (1 - (engines - 1) * fraction / engines) * restart == pytest.approx(fraction / engines)


def test_a_frozen_policy_takes_devices_for_its_engines_only():
    # colocated: b's engines alone on a device each, a's trainer i and engine i sharing device i
    plan = plan_placement(["a", "b"], num_trainers=2, num_engines=2, colocate=True, use_gpu=True, cpus_per_device=4,
                          frozen=["b"])
    assert plan.bundles == ({"CPU": 4.0, "GPU": 1.0},) * 4
    a, b = plan.policies["a"], plan.policies["b"]
    assert [(s.bundle, s.num_gpus) for s in a.trainers + a.engines] == [(0, 0.5), (1, 0.5), (0, 0.5), (1, 0.5)]
    assert b.trainers == () and [(s.bundle, s.num_gpus, s.num_cpus) for s in b.engines] == [(2, 1.0, 4.0),
                                                                                            (3, 1.0, 4.0)]
    # sharing devices (the medical GPU arm (a)): a's trainer and engine and b's engine, a third of the GPU each
    shared = plan_placement(["a", "b"], num_trainers=1, num_engines=1, colocate=True, use_gpu=True, frozen=["b"],
                            share_devices=True)
    slots = shared.policies["a"].trainers + shared.policies["a"].engines + shared.policies["b"].engines
    assert shared.bundles == ({"CPU": 1.0, "GPU": 1.0},) and shared.policies["b"].trainers == ()
    assert [s.num_gpus for s in slots] == [0.3333] * 3 and sum(s.num_gpus for s in slots) <= 1.0
    # disaggregated: b's engines' bundles (tp_size devices each), no trainer bundles
    apart = plan_placement(["a", "b"], num_trainers=2, num_engines=1, colocate=False, use_gpu=True, engine_devices=2,
                           frozen=["b"])
    assert apart.bundles == ({"CPU": 1.0, "GPU": 1.0},) * 2 + ({"CPU": 2.0, "GPU": 2.0},) * 2
    assert apart.policies["b"].trainers == () and [s.bundle for s in apart.policies["b"].engines] == [3]
    with pytest.raises(ValueError, match=r"frozen policies \['c'\] are not among the policies"):
        plan_placement(["a", "b"], num_trainers=1, num_engines=1, colocate=True, use_gpu=False, frozen=["c"])


def test_disaggregated_and_cpu_placement():
    plan = plan_placement(["p"], num_trainers=2, num_engines=2, colocate=False, use_gpu=False, cpus_per_device=1)
    assert plan.bundles == ({"CPU": 1.0},) * 4
    p = plan.policies["p"]
    assert [s.bundle for s in p.trainers] == [0, 1] and [s.bundle for s in p.engines] == [2, 3]
    assert all(s.num_cpus == 1.0 and s.num_gpus == 0.0 for s in p.trainers + p.engines)
    rollout_only = plan_placement(["p"], num_trainers=2, num_engines=1, colocate=True, use_gpu=False, train=False)
    assert len(rollout_only.bundles) == 1 and rollout_only.policies["p"].trainers == ()
    with pytest.raises(ValueError, match="num_engines=0"):
        plan_placement(["p"], num_trainers=1, num_engines=0, colocate=True, use_gpu=False)


def test_tensor_parallel_engines_take_tp_size_devices():
    plan = plan_placement(["p"], num_trainers=2, num_engines=2, colocate=False, use_gpu=True, cpus_per_device=2,
                          engine_devices=2)
    assert plan.bundles == ({"CPU": 2.0, "GPU": 1.0},) * 2 + ({"CPU": 4.0, "GPU": 2.0},) * 2
    engines = plan.policies["p"].engines
    assert [s.bundle for s in engines] == [2, 3] and all(s.num_gpus == 2.0 and s.num_cpus == 4.0 for s in engines)
    with pytest.raises(ValueError, match="colocated engines span one device, but tp_size is 2"):
        plan_placement(["p"], num_trainers=1, num_engines=1, colocate=True, use_gpu=True, engine_devices=2)

"""Several eval sets (--eval-config), the TensorBoard sink of the step metrics, and --save-hf-interval's flags
(CPU, no Ray; the end-to-end run is tests/test_train.py's test_eval_sets_tensorboard_and_periodic_hf_export)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from orchestrator.cli import ConfigError
from orchestrator.config import RunConfig
from orchestrator.driver import resolve
from orchestrator.metrics import MetricsLogger, eval_rewards, tensorboard_dir
from rollout.config import DataConfig, RolloutConfig
from rollout.data import PromptDataset
from rollout.eval_config import EvalConfigError, load_eval_config
from rollout.manager import RolloutManager
from rollout.testing import FakeEngineClient

MODULE = "test_eval_sets"


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_reward(args, sample):
    return 1.0


def answer_of(tok, ids):
    a, b = re.search(r"What is (\d+) \+ (\d+)\?", tok.decode(ids)).groups()
    return str(int(a) + int(b))


# ---- the YAML file ------------------------------------------------------------------------------------------

def test_eval_config_loads_sets_with_defaults_and_relative_paths(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x", "label": "1"}])
    (tmp_path / "evals.yaml").write_text(
        "eval:\n"
        "  - {name: a, path: a.jsonl}\n"
        "  - name: b\n    path: a.jsonl\n    n_samples_per_prompt: 3\n    temperature: 0.7\n    top_p: 0.9\n"
        "    max_response_len: 5\n    custom_rm_path: test_eval_sets:one_reward\n"
        "    input_key: q\n    label_key: ans\n")
    a, b = load_eval_config(tmp_path / "evals.yaml")
    assert (a.name, a.path, a.n_samples_per_prompt, a.temperature) == ("a", str(tmp_path / "a.jsonl"), None, None)
    assert a.metric_prefix() == "eval/a" and b.metric_prefix() == "eval/b"
    cfg = b.rollout_config(RolloutConfig(eval_max_response_len=9))
    assert cfg.n_samples_per_eval_prompt == 3 and cfg.custom_rm_path == "test_eval_sets:one_reward"
    assert b.sampling_params(cfg) == {"max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9, "top_k": -1}
    assert (b.data_config(DataConfig()).input_key, b.data_config(DataConfig()).label_key) == ("q", "ans")
    # a bare list at the top level works too
    (tmp_path / "list.yaml").write_text("- {name: a, path: a.jsonl}\n")
    assert [s.name for s in load_eval_config(tmp_path / "list.yaml")] == ["a"]


@pytest.mark.parametrize("body, message", [
    ("- {name: a, path: a.jsonl, temprature: 0.5}", "eval set 0: unknown key 'temprature'; did you mean temperature?"),
    ("- {name: a}", "eval set 0: missing key 'path'"),
    ("- {path: a.jsonl}", "eval set 0: missing key 'name'"),
    ("- {name: a, path: nowhere.jsonl}", "eval set 0 ('a'): key 'path' = 'nowhere.jsonl'"),
    ("- {name: a, path: a.jsonl, n_samples_per_prompt: 0}", "key 'n_samples_per_prompt' = 0: expected an integer"),
    ("- {name: a, path: a.jsonl, top_p: 1.5}", "key 'top_p' = 1.5: expected a value in (0, 1]"),
    ("- {name: a, path: a.jsonl, temperature: hot}", "key 'temperature' = 'hot': expected int or float"),
    ("- {name: a, path: a.jsonl, rm_type: fuzzy}", "key 'rm_type' = 'fuzzy': expected one of"),
    ("- {name: a, path: a.jsonl}\n- {name: a, path: a.jsonl}", "eval set 1: name 'a' is used twice"),
    ("- {name: 'a/b', path: a.jsonl}", "key 'name' = 'a/b': expected a word"),
    ("sets: []", "unknown key 'sets'; expected 'eval'"),
    ("eval: []", "expected a non-empty list of eval sets"),
    ("- [1, 2]", "eval set 0: expected a mapping"),
    ("- {name: a, path: a.jsonl, custom_rm_path: 'not a path'}", "custom_rm_path = 'not a path'"),
    ("- {name: a, path: a.jsonl, rm_type: format}", "rm_type = 'format' needs --format-reward-pattern"),
])
def test_bad_eval_config_is_one_line_naming_the_key(tmp_path, body, message):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x", "label": "1"}])
    path = tmp_path / "evals.yaml"
    path.write_text(body + "\n")
    with pytest.raises(EvalConfigError, match=re.escape(message)) as e:
        load_eval_config(path, RolloutConfig(), DataConfig())
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_resolve_checks_the_eval_config_before_ray(qwen3_model, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x", "label": "1"}])
    (tmp_path / "bad.yaml").write_text("- {name: a, path: a.jsonl, top_k: 0}\n")
    base = {"hf-checkpoint": str(qwen3_model), "prompt-data": "x.jsonl", "eval-interval": 1}
    with pytest.raises(ConfigError, match=r"bad.yaml: eval set 0 \('a'\): key 'top_k' = 0"):
        resolve({**base, "eval-config": str(tmp_path / "bad.yaml")})
    (tmp_path / "default.yaml").write_text("- {name: default, path: a.jsonl}\n")
    with pytest.raises(ConfigError, match="the set name 'default' is --eval-prompt-data's"):
        resolve({**base, "eval-config": str(tmp_path / "default.yaml"), "eval-prompt-data": str(tmp_path / "a.jsonl")})
    (tmp_path / "good.yaml").write_text("- {name: a, path: a.jsonl}\n")
    cfg = resolve({**base, "eval-config": str(tmp_path / "good.yaml")})   # --eval-interval needs no other eval data
    assert cfg.data.eval_config == str(tmp_path / "good.yaml")
    with pytest.raises(ConfigError, match="needs --eval-prompt-data or --eval-config"):
        resolve(base)


# ---- the manager evaluates every set --------------------------------------------------------------------------

async def test_every_eval_set_is_evaluated_with_its_settings(tok, tmp_path):
    rows = [{"prompt": f"What is {i} + 1?", "label": str(i + 1)} for i in range(3)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "b.jsonl", [{"q": r["prompt"], "ans": "wrong"} for r in rows[:2]])
    (tmp_path / "evals.yaml").write_text(
        "- {name: a, path: a.jsonl, n_samples_per_prompt: 2, temperature: 0.5, top_p: 0.8, max_response_len: 7}\n"
        "- {name: b, path: b.jsonl, input_key: q, label_key: ans, custom_rm_path: 'test_eval_sets:one_reward'}\n")
    config = RolloutConfig(progress=False, rm_type="exact_match", eval_max_response_len=11)
    data = DataConfig()
    sets = load_eval_config(tmp_path / "evals.yaml", config, data)
    right = FakeEngineClient(script=lambda ids: answer_of(tok, ids), tokenizer=tok, eos_id=tok.eos_token_id)
    manager = RolloutManager(config, None, [right], tok,
                             eval_data=PromptDataset(data, tok, [{"prompt": "What is 5 + 1?", "label": "7"}]),
                             eval_sets=[(s, PromptDataset(s.data_config(data), tok, s.path)) for s in sets])
    metrics = await manager.evaluate()
    # default: the run's settings and reward (exact match: 6 != 7), plain keys as before
    assert metrics["eval/reward_mean"] == 0.0 and metrics["eval/num_samples"] == 1
    # a: exact match is right on every sample; 3 prompts x 2 samples
    assert metrics["eval/a/reward_mean"] == 1.0 and metrics["eval/a/num_samples"] == 6
    # b: its own reward function (labels 'wrong' would score 0 with exact match) and row keys
    assert metrics["eval/b/reward_mean"] == 1.0 and metrics["eval/b/num_samples"] == 2
    params = [c["sampling_params"] for c in right.calls]
    assert sorted((p["max_new_tokens"], p["temperature"], p["top_p"]) for p in params) == \
        [(7, 0.5, 0.8)] * 6 + [(11, 0.0, 1.0)] * 3
    assert set(metrics) == {f"eval/{p}{m}" for p in ("", "a/", "b/")
                            for m in ("reward_mean", "num_samples", "failed_samples", "response_len_mean",
                                      "truncated_rate")}


# ---- TensorBoard ----------------------------------------------------------------------------------------------

def test_tensorboard_gets_the_step_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunConfig(metrics_file=str(tmp_path / "out" / "metrics.jsonl"), use_tensorboard=True)
    assert tensorboard_dir(run) == tmp_path / "out" / "tensorboard"
    assert tensorboard_dir(RunConfig(tensorboard_dir=str(tmp_path / "tb"))) == tmp_path / "tb"
    log = MetricsLogger(run, {"lr": 1e-3})
    steps = {1: {"rollout/reward_mean": 0.25, "eval/a/reward_mean": 0.5, "engine_restarts": 0},
             2: {"rollout/reward_mean": 0.75, "eval/a/reward_mean": 1.0, "engine_restarts": 1, "note": "text"}}
    for step, metrics in steps.items():
        log.log(step, metrics)
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {k for line in lines for k in line if k not in ("step", "note")}
    for key in ("rollout/reward_mean", "eval/a/reward_mean", "engine_restarts"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert got == [(step, pytest.approx(float(m[key]))) for step, m in steps.items()]


def test_eval_rewards_for_the_log_line():
    assert eval_rewards({"eval/reward_mean": 0.5, "eval/num_samples": 4}) == "0.500"
    assert eval_rewards({"eval/reward_mean": 0.5, "eval/a/reward_mean": 0.25}) == "default 0.500 a 0.250"
    assert eval_rewards({"rollout/reward_mean": 1.0}) == "-"


def test_save_hf_interval_needs_a_folder():
    with pytest.raises(ValueError, match="save_hf_interval = 2 needs --save-hf or --save"):
        RunConfig(save_hf_interval=2)
    with pytest.raises(ValueError, match="save_hf_interval = 0: expected an integer >= 1"):
        RunConfig(save_hf_interval=0, save_hf="/tmp/x")
    assert RunConfig(save_hf_interval=2, save="/tmp/ckpt").save_hf_interval == 2


def test_hf_exports_go_to_save_hf_else_save_hf(qwen3_model):
    from orchestrator.driver import Driver

    base = {"hf-checkpoint": str(qwen3_model), "prompt-data": "x.jsonl"}
    assert Driver(resolve({**base, "save": "/c"})).hf_dir() == Path("/c/hf")
    assert Driver(resolve({**base, "save": "/c", "save-hf": "/h", "save-hf-interval": 3})).hf_dir() == Path("/h")
    assert Driver(resolve(base)).hf_dir() is None

"""Fully asynchronous RL (docs/async.md): per-token weight versions, weight pushes mid-generation, the staleness
bound of --async-mode fully, partial rollout's off-policy tokens, and a fully-async run through the driver."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference_engine import Engine
from inference_engine.testing import make_tiny_model
from kiln_common.sample import Sample, Status
from rollout.config import DataConfig, RolloutConfig
from rollout.data import PromptDataset
from rollout.generate import append_response
from rollout.manager import RolloutManager
from rollout.staleness import mask_offpolicy_tokens, staleness, version_lag_metrics
from rollout.testing import FakeEngineClient

from test_train import assert_same_weights, data_dir, engine_tensors, run, trainer_tensors, values  # noqa: F401

PROMPT = "What is 3 + 4? The answer is"
NEW = 40


@pytest.fixture(scope="module")
def other_qwen3(tmp_path_factory, tokenizer_dir):
    return make_tiny_model(tmp_path_factory.mktemp("other_qwen3"), "qwen3", seed=42, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def teacher_forced(path: str, ids: list[int]) -> torch.Tensor:
    """float64 log-softmax of an HF model's logits over `ids` (row p predicts ids[p + 1]): [len(ids), vocab]."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits, dim=-1)


# ---- the engine: a push mid-generation --------------------------------------------------------------------------

def test_push_mid_generation_switches_versions_at_the_right_token(qwen3_model, other_qwen3, tok):
    sp = {"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True}
    prompt_ids = tok(PROMPT)["input_ids"]
    with Engine(model_path=str(qwen3_model), max_total_tokens=1024) as engine:
        result = {}
        thread = threading.Thread(target=lambda: result.update(out=engine.generate(
            input_ids=prompt_ids, sampling_params=sp, return_logprob=True)))
        thread.start()
        while engine.scheduler.stats.generated_tokens < 5:
            thread.join(0.002)
        engine.pause_generation()   # a control call: the step in flight is read first, none runs after it
        before = engine.scheduler.stats.generated_tokens
        assert engine.update_weights_from_tensor(load_file(other_qwen3 / "model.safetensors").items(), 1) == 1
        engine.continue_generation()
        thread.join()
        assert engine.scheduler.stats.weight_update_requeues == 1
    out = result["out"]
    ids, meta = out["output_ids"], out["meta_info"]
    assert 5 <= before < NEW and len(ids) == NEW
    # every token sampled before the push is version 0's, every one after it version 1's
    assert meta["output_token_weight_versions"] == [[0, before], [1, NEW - before]]
    assert meta["weight_version"] == 1
    # teacher-forced: the tokens before the push are the old weights' greedy choices, those after it the new
    # weights' (attending to prompt + output re-prefilled with the new weights), log-probs included
    seq = prompt_ids + ids
    rows = slice(len(prompt_ids) - 1, len(seq) - 1)   # the rows that predict the output tokens
    engine_lp = torch.tensor([lp for lp, _, _ in meta["output_token_logprobs"]], dtype=torch.float64)
    for path, tokens in ((qwen3_model, range(before)), (other_qwen3, range(before, NEW))):
        ref = teacher_forced(str(path), seq)[rows]   # [NEW, vocab]
        for k in tokens:
            assert int(ref[k].argmax()) == ids[k], (path, k)
            assert float(engine_lp[k]) == pytest.approx(float(ref[k, ids[k]]), abs=2e-4), (path, k)
    # the rollout side keeps the runs with the sample
    sample = append_response(Sample(tokens=list(prompt_ids)), out)
    assert sample.token_weight_versions == [[0, before], [1, NEW - before]]
    assert sample.token_versions() == [0] * before + [1] * (NEW - before)
    assert sample.oldest_weight_version() == 0 and sample.weight_version == 1


# ---- Sample and the staleness helpers ------------------------------------------------------------------------

def test_sample_versions_follow_segments_and_env_tokens():
    s = Sample(tokens=[1, 2], weight_version=3)
    s.append([5, 6], [-0.1, -0.2], loss_mask=1, weight_versions=[[3, 1], [4, 1]])
    s.append([7], loss_mask=0)   # a tool's text: no version
    s.append([8, 9], [-0.3, -0.4], loss_mask=1, weight_versions=4)
    s.validate()
    assert s.token_weight_versions == [[3, 1], [4, 1], [-1, 1], [4, 2]]
    assert s.token_versions() == [3, 4, -1, 4, 4] and s.oldest_weight_version() == 3
    assert staleness(s, 6) == 3
    assert version_lag_metrics([s], 6) == {
        "rollout/weight_version_lag": 3.0, "rollout/weight_version_lag_max": 3.0,
        "rollout/weight_version_lag_min": 2.0, "rollout/weight_version_lag_mean": pytest.approx((3 + 2 + 2 + 2) / 4),
        "rollout/mixed_version_samples": 1.0}
    assert mask_offpolicy_tokens(s) == 1 and s.loss_mask == [0, 1, 0, 1, 1]
    with pytest.raises(ValueError, match="cover 1 tokens, not 2"):
        s.append([1, 2], [0.0, 0.0], loss_mask=1, weight_versions=[[5, 1]])
    old = Sample.from_dict({**Sample(tokens=[1, 2, 3], response_length=2, loss_mask=[1, 0],
                                     rollout_logprobs=[-1.0, 0.0], weight_version=2).to_dict(),
                            "token_weight_versions": []})   # a sample saved before versions existed
    assert old.token_versions() == [2, -1]


# ---- partial rollout: versions kept across segments, off-policy tokens masked ----------------------------------

@pytest.mark.parametrize("mode", ["correct", "mask"])
async def test_partial_rollout_keeps_each_segments_versions(tok, mode):
    client = FakeEngineClient(token_delay=0.02, response_len=14, eos_id=tok.eos_token_id)
    cfg = RolloutConfig(rollout_batch_size=1, n_samples_per_prompt=2, rollout_deadline=0.2, partial_rollout=True,
                        offpolicy_tokens=mode, progress=False)
    data = PromptDataset(DataConfig(), tok, [{"prompt": "What is 1 + 1?", "label": "2"}])
    manager = RolloutManager(cfg, data, [client], tok)
    first = await manager.generate(0)
    assert first.samples == [] and first.metrics["rollout/returned_to_buffer"] == 1
    cut = [s.response_length for s in manager._buffer[0].samples]
    assert all(0 < n < 15 for n in cut)
    client.weight_version = 1   # the push between the steps
    manager.config = dataclasses.replace(cfg, rollout_deadline=None)   # this step runs the samples to the end
    second = await manager.generate(1)
    assert len(second.samples) == 2
    for s, n in zip(second.samples, cut):
        assert s.status == Status.COMPLETED and s.response_length == 15
        assert s.token_weight_versions == [[0, n], [1, 15 - n]] and s.weight_version == 1
        assert s.loss_mask == ([0] * n if mode == "mask" else [1] * n) + [1] * (15 - n)
    assert second.metrics["rollout/offpolicy_masked_tokens"] == (sum(cut) if mode == "mask" else 0)
    lag = version_lag_metrics(second.samples, 1)
    assert lag["rollout/weight_version_lag_max"] == 1 and lag["rollout/weight_version_lag_min"] == 0
    assert lag["rollout/weight_version_lag_mean"] == pytest.approx(sum(cut) / 30)


# ---- --async-mode fully: the stream and its staleness bound ----------------------------------------------------

@pytest.mark.parametrize("max_staleness", [0, 1, 2])
async def test_stream_never_hands_out_a_sample_past_the_bound(tok, max_staleness):
    """A long-tail workload (one prompt in four is 8x slower); the 'trainer' pushes a new version after each batch,
    mid-generation of the groups in flight. Every consumed sample's oldest token is within the bound."""
    def delay(ids):
        return 0.004 if sum(ids) % 4 else 0.03

    client = FakeEngineClient(token_delay=delay, response_len=12, eos_id=tok.eos_token_id)
    cfg = RolloutConfig(rollout_batch_size=2, n_samples_per_prompt=2, max_staleness=max_staleness, progress=False)
    rows = [{"prompt": f"What is {i} + 1?", "label": str(i + 1)} for i in range(64)]
    manager = RolloutManager(cfg, PromptDataset(DataConfig(), tok, rows), [client], tok)
    version, consumed, dropped, mixed = 0, 0, 0, 0
    try:
        for step in range(8):
            batch = await manager.next_batch(step, version)
            assert len(batch.samples) == 4
            for s in batch.samples:
                assert s.status == Status.COMPLETED and max(s.token_versions()) <= version
                assert version - min(s.token_versions()) <= max_staleness, (step, version, s.token_weight_versions)
                assert staleness(s, version) <= max_staleness
                mixed += len(s.token_weight_versions) > 1
            consumed += len(batch.samples)
            dropped += batch.metrics["rollout/stale_dropped_groups"]
            lag = version_lag_metrics(batch.samples, version)
            assert 0 <= lag["rollout/weight_version_lag_min"] <= lag["rollout/weight_version_lag_max"] <= max_staleness
            # generation never runs more than max_staleness batches ahead of the trainer
            assert manager._stream.launched <= (version + max_staleness + 1) * cfg.rollout_batch_size
            await asyncio.sleep(0.03)   # "training"
            version += 1
            client.weight_version = version   # the push: requests in flight go on under the new version
    finally:
        await manager.stop_stream()
    assert consumed == 32 and manager._stream is None
    assert dropped == 0   # the trainer waits for groups about to pass the bound instead of dropping them
    if max_staleness > 0:
        assert mixed > 0   # pushes landed mid-generation: samples of two versions were trained


async def test_stream_state_dict_keeps_prompts_in_flight(tok):
    client = FakeEngineClient(token_delay=0.01, response_len=8, eos_id=tok.eos_token_id)
    cfg = RolloutConfig(rollout_batch_size=2, n_samples_per_prompt=2, max_staleness=1, progress=False)
    rows = [{"prompt": f"What is {i} + 1?", "label": str(i + 1)} for i in range(16)]
    manager = RolloutManager(cfg, PromptDataset(DataConfig(), tok, rows), [client], tok)
    try:
        batch = await manager.next_batch(0, 0)
        state = manager.state_dict()
    finally:
        await manager.stop_stream()
    served = {s.label for s in batch.samples}
    pending = {g["prompt"]["label"] for g in state["buffer"]}
    assert len(served) == 2 and pending and not served & pending
    assert all(s["response_length"] == 0 for g in state["buffer"] for s in g["samples"])   # fresh on resume


async def test_a_group_past_the_bound_is_dropped_and_counted(tok):
    def delay(ids):   # "What is 0 + 1?" takes 0.6 s, the others 0.02 s
        return 0.05 if "What is 0 +" in tok.decode(ids) else 0.002

    client = FakeEngineClient(token_delay=delay, response_len=11, eos_id=tok.eos_token_id)
    cfg = RolloutConfig(rollout_batch_size=1, n_samples_per_prompt=1, max_staleness=1, progress=False)
    rows = [{"prompt": f"What is {i} + 1?", "label": str(i + 1)} for i in range(8)]
    manager = RolloutManager(cfg, PromptDataset(DataConfig(), tok, rows), [client], tok)
    try:
        first = await manager.next_batch(0, 0)   # the slow prompt 0 and the fast prompt 1 start at version 0
        assert [s.label for s in first.samples] == ["2"]
        await asyncio.sleep(0.2)   # the slow group's first tokens are sampled under version 0
        client.weight_version = 3   # three pushes later, while the slow group is generating
        while not any(g.prompt.label == "1" for g in manager._stream.ready):   # the bound lets nothing else start
            await asyncio.sleep(0.05)
        labels, dropped = [], 0
        for step in range(1, 4):
            batch = await manager.next_batch(step, 3)
            assert all(staleness(s, 3) <= 1 for s in batch.samples)
            labels += [s.label for s in batch.samples]
            dropped += batch.metrics["rollout/stale_dropped_groups"]
    finally:
        await manager.stop_stream()
    assert "1" not in labels and dropped == 1   # prompt 0's group: tokens of version 0, 3 versions old


# ---- configuration: what is supported where ---------------------------------------------------------------------

def test_async_modes_resolve_and_refuse(qwen3_model, tiny_models):
    from orchestrator.cli import ConfigError
    from orchestrator.driver import resolve

    base = {"hf-checkpoint": str(qwen3_model), "prompt-data": "x.jsonl"}
    cfg = resolve({**base, "async-mode": "fully", "max-staleness": 3, "colocate": False})
    assert cfg.run.async_mode == "fully" and not cfg.run.async_rollout and cfg.rollout.max_staleness == 3
    assert cfg.trainer.loss.use_tis and cfg.trainer.recompute_old_logprobs   # the decoupled objective
    assert resolve({**base, "async-rollout": True, "colocate": False}).run.async_mode == "one-step"
    partial = resolve({**base, "partial-rollout": True})   # colocated partial rollout: corrected by TIS
    assert partial.trainer.loss.use_tis and partial.rollout.offpolicy_tokens == "correct"
    masked = resolve({**base, "partial-rollout": True, "offpolicy-tokens": "mask", "use-tis": False})
    assert not masked.trainer.loss.use_tis
    two = [f"a={tiny_models['qwen3']}", f"b={tiny_models['llama']}"]
    for extra, message in (
            ({"async-mode": "fully"}, "--async-mode fully needs --no-colocate"),
            ({"async-mode": "fully", "colocate": False, "use-tis": False}, "needs TIS"),
            ({"partial-rollout": True, "use-tis": False}, "or set --offpolicy-tokens mask"),
            ({"async-mode": "fully", "async-rollout": True, "colocate": False}, "cannot be combined"),
            ({"async-mode": "fully", "colocate": False, "policies": two, "hf-checkpoint": ""}, "trains one policy"),
            ({"max-staleness": -1}, "max_staleness = -1"),
            ({"offpolicy-tokens": "drop"}, "offpolicy_tokens = 'drop'")):
        with pytest.raises((ConfigError, ValueError), match=message):
            resolve({**base, **extra})


# ---- a fully-async run through the driver (train.py's code path) -----------------------------------------------

def test_fully_async_run_trains_within_the_staleness_bound(local_ray, qwen3_model, data_dir, tmp_path):  # noqa: F811
    ray = pytest.importorskip("ray")
    debug = str(tmp_path / "rollout_{step}.pt")
    driver, history = run(values(qwen3_model, data_dir, tmp_path, **{
        "async-mode": "fully", "max-staleness": 1, "colocate": False, "num-rollout": 4,
        "rollout-max-response-len": 8, "check-weight-update": True, "save-debug-rollout-data": debug}))
    try:
        assert [h["step"] for h in history] == [1, 2, 3, 4]
        assert driver.cfg.trainer.loss.use_tis   # the decoupled objective: TIS against the engine's log-probs
        for step, h in enumerate(history):
            assert 0 <= h["rollout/weight_version_lag_min"] <= h["rollout/weight_version_lag_mean"] \
                <= h["rollout/weight_version_lag_max"] <= 1, h
            assert "train/tis_clipfrac" in h and h["rollout/num_samples"] == 8
            # every trained sample: step k trains at weight version k; no token is older than k - 1
            batch = RolloutManager.load_debug(debug.format(step=step))
            assert all(step - min(v for v in s.token_versions() if v >= 0) <= 1 for s in batch.samples)
            assert all(max(s.token_versions()) <= step for s in batch.samples)
        assert ray.get(driver.engines["default"][0].weight_version.remote()) == 4
        assert_same_weights(engine_tensors(driver), trainer_tensors(driver, tmp_path / "export"))
    finally:
        driver.shutdown()

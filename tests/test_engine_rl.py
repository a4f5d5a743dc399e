"""RL control surface: weight updates (tensor / disk), versions, HF-named export, pause / continue, release / resume."""

import gc
import threading
import weakref

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference_engine import Engine
from inference_engine.testing import make_tiny_model

SP = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
PROMPT = "What is 3 + 4? The answer is"


@pytest.fixture(scope="module")
def other_qwen3(tmp_path_factory, tokenizer_dir):
    return make_tiny_model(tmp_path_factory.mktemp("other_qwen3"), "qwen3", seed=42, tokenizer_dir=tokenizer_dir)


def hf_greedy(path, prompt, n=10):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_weight_updates_switch_models_and_report_versions(qwen3_model, other_qwen3):
    original, other = hf_greedy(qwen3_model, PROMPT), hf_greedy(other_qwen3, PROMPT)
    assert original != other
    with Engine(model_path=str(qwen3_model), max_total_tokens=1024) as engine:
        before = engine.generate(PROMPT, sampling_params=SP)
        assert before["output_ids"] == original and before["meta_info"]["weight_version"] == 0
        assert engine.update_weights_from_tensor(load_file(other_qwen3 / "model.safetensors").items(), 1) == 1
        after = engine.generate(PROMPT, sampling_params=SP)
        assert after["output_ids"] == other and after["meta_info"]["weight_version"] == 1
        assert after["meta_info"]["cached_tokens"] == 0  # the update flushed the cache
        assert engine.update_weights_from_disk(str(qwen3_model), weight_version=7) == 7
        back = engine.generate(PROMPT, sampling_params=SP)
        assert back["output_ids"] == original and engine.weight_version == 7


def test_bad_weight_updates_are_rejected_and_change_nothing(qwen3_model, tiny_models):
    with Engine(model_path=str(qwen3_model), max_total_tokens=1024) as engine:
        before = engine.generate(PROMPT, sampling_params=SP)["output_ids"]
        good = load_file(qwen3_model / "model.safetensors")
        with pytest.raises(ValueError, match="model.layers.9"):
            engine.update_weights_from_tensor([("model.norm.weight", good["model.norm.weight"] * 2),
                                               ("model.layers.9.mlp.up_proj.weight", torch.zeros(3))], 1)
        with pytest.raises(ValueError, match="does not match"):
            engine.update_weights_from_disk(str(tiny_models["llama"]), 1)
        with pytest.raises(TypeError, match="weight_version"):   # no default version: required, an int
            engine.update_weights_from_disk(str(qwen3_model))
        for version in (None, "2", 2.5, True):
            with pytest.raises(TypeError, match="weight_version must be an int"):
                engine.update_weights_from_tensor(list(good.items()), version)
        assert engine.weight_version == 0
        assert engine.generate(PROMPT, sampling_params=SP)["output_ids"] == before


def test_named_hf_tensors_equal_the_checkpoint(tiny_model):
    reference = load_file(tiny_model / "model.safetensors")
    with Engine(model_path=str(tiny_model), max_total_tokens=1024) as engine:
        exported = dict(engine.named_hf_tensors())
    assert set(exported) == set(reference) - {"lm_head.weight"} or set(exported) == set(reference)
    for name, tensor in exported.items():
        assert torch.equal(tensor, reference[name]), name


def test_pause_keeps_requests_and_continue_finishes_them(qwen3_model):
    with Engine(model_path=str(qwen3_model), max_total_tokens=1024) as engine:
        expected = engine.generate(PROMPT, sampling_params={**SP, "max_new_tokens": 40})
        engine.flush_cache()
        result = {}
        thread = threading.Thread(target=lambda: result.update(out=engine.generate(
            PROMPT, sampling_params={**SP, "max_new_tokens": 40})))
        thread.start()
        while engine.scheduler.stats.generated_tokens < expected["meta_info"]["completion_tokens"] + 5:
            thread.join(0.005)
        engine.pause_generation()
        frozen = engine.scheduler.stats.generated_tokens
        thread.join(0.2)
        assert thread.is_alive() and engine.scheduler.stats.generated_tokens == frozen
        engine.continue_generation()
        thread.join()
    assert result["out"]["output_ids"] == expected["output_ids"]


@pytest.mark.parametrize("weights", [False, True])
def test_release_and_resume_memory_leave_outputs_unchanged(qwen3_model, weights):
    with Engine(model_path=str(qwen3_model), max_total_tokens=1024) as engine:
        before = engine.generate(PROMPT, sampling_params=SP)
        pool_memory = weakref.ref(engine.runner.kv_pool._memory.tensor)  # every K/V view keeps it alive (`_base`)
        engine.release_memory(weights=weights)
        assert engine.runner.kv_pool.k_buffer == []
        gc.collect()
        assert pool_memory() is None  # nothing in the engine still holds the released pool
        engine.resume_memory()
        after = engine.generate(PROMPT, sampling_params=SP)
    assert after["output_ids"] == before["output_ids"]
    assert after["meta_info"]["cached_tokens"] == 0


def test_release_refuses_while_requests_run(qwen3_model):
    with Engine(model_path=str(qwen3_model), max_total_tokens=1024) as engine:
        engine.pause_generation()
        thread = threading.Thread(target=lambda: engine.generate(PROMPT, sampling_params=SP))
        thread.start()
        while not engine.scheduler.waiting:
            thread.join(0.005)
        with pytest.raises(RuntimeError, match="cannot release memory"):
            engine.release_memory()
        engine.continue_generation()
        thread.join()


def test_bfloat16_engine_tracks_float32(qwen3_model):
    with Engine(model_path=str(qwen3_model), dtype="bfloat16", max_total_tokens=1024) as bf16, \
            Engine(model_path=str(qwen3_model), max_total_tokens=1024) as fp32:
        a = bf16.generate(PROMPT, sampling_params={**SP, "max_new_tokens": 1}, return_logprob=True)
        b = fp32.generate(input_ids=AutoTokenizer.from_pretrained(qwen3_model)(PROMPT)["input_ids"],
                          sampling_params={**SP, "max_new_tokens": 1}, return_logprob=True)
    assert a["output_ids"] == b["output_ids"]
    assert abs(a["meta_info"]["output_token_logprobs"][0][0] - b["meta_info"]["output_token_logprobs"][0][0]) < 0.1

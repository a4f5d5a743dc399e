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
from kiln_common.errors import EngineNotServingError

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


def _same_address_buffers(monkeypatch) -> None:
    """A CPU stand-in for CUDA virtual memory (`vmm.Buffer` on a GPU): the buffer comes back at the same address after
    free / allocate, its contents lost (garbage written at free, zeros at allocate), so anything still pointing at
    memory from before a move, or reading it across a release, shows up in the outputs."""
    from inference_engine import vmm

    def free(self):
        self.tensor.fill_(0x5A)
        self._mapped, self.tensor = self.tensor, None

    def allocate(self):
        if self.tensor is None:
            mapped = getattr(self, "_mapped", None)
            self.tensor = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device) if mapped is None else mapped
            self.tensor.zero_()
        return self.tensor

    monkeypatch.setattr(vmm.Buffer, "stable", property(lambda self: True))
    monkeypatch.setattr(vmm.Buffer, "free", free)
    monkeypatch.setattr(vmm.Buffer, "allocate", allocate)


@pytest.mark.parametrize("stable", [False, True], ids=["new-addresses", "same-addresses"])
@pytest.mark.parametrize("case", ["qwen3", "qwen3_moe", "llama_fp8"])
def test_discarded_weights_are_refused_until_every_weight_is_pushed_again(request, tiny_models, case, stable,
                                                                         monkeypatch):
    """The RL loop's colocated hand-over: weights discarded (not copied to the host) at release, taken back empty,
    filled by a push; until every weight has been loaded the engine refuses requests and says which are missing.
    Dense, MoE (stacked experts) and FP8 (weights quantised at load, their scales refilled too); the weights' buffer
    at new addresses after each release (CPU, memory saver off) or at the same ones (CUDA virtual memory)."""
    if stable:
        _same_address_buffers(monkeypatch)
    path = request.getfixturevalue("qwen3_moe_model") if case == "qwen3_moe" else tiny_models[case.split("_")[0]]
    fp8 = {"weight_dtype": "fp8", "fp8_block_size": 16} if case.endswith("fp8") else {}
    with Engine(model_path=str(path), max_total_tokens=1024, **fp8) as engine:
        before = engine.generate(PROMPT, sampling_params=SP)
        weights = load_file(path / "model.safetensors")
        for _ in range(2):   # the second hand-over reuses the weights' buffer
            engine.release_memory(weights=True, keep_weights=False)
            missing = engine.health()["weights_missing"]   # with FP8: the scales too (filled with their weights)
            assert engine.health()["weights_released"] and missing >= len(weights)
            engine.resume_memory(kv_cache=False)   # weights back (zeros), the KV pool still released
            assert all(not p.view(torch.uint8).any() for p in engine.runner.model.parameters())   # zeroed
            with pytest.raises(EngineNotServingError, match="memory is released"):
                engine.generate(PROMPT, sampling_params=SP)
            names = sorted(weights)
            engine.update_weights_from_tensor([(n, weights[n]) for n in names[:3]], weight_version=1)
            engine.resume_memory()
            left = engine.health()["weights_missing"]
            assert 0 < left <= missing - 3
            with pytest.raises(EngineNotServingError, match=f"{left} weight\\(s\\) have not been loaded"):
                engine.generate(PROMPT, sampling_params=SP)
            engine.update_weights_from_tensor([(n, weights[n]) for n in names[3:]], weight_version=2)
            after = engine.generate(PROMPT, sampling_params=SP)
            assert after["output_ids"] == before["output_ids"] and after["meta_info"]["weight_version"] == 2
            assert engine.health()["weights_missing"] == 0


@pytest.mark.parametrize("stable", [False, True], ids=["new-addresses", "same-addresses"])
def test_weights_kept_at_release_come_back_from_host_memory(qwen3_model, stable, monkeypatch):
    if stable:
        _same_address_buffers(monkeypatch)
    with Engine(model_path=str(qwen3_model), max_total_tokens=1024) as engine:
        before = {n: t.clone() for n, t in engine.named_hf_tensors()}
        out = engine.generate(PROMPT, sampling_params=SP)
        for step in range(2):
            memory = engine.runner.param_store.buffer.tensor.untyped_storage() if step else None
            engine.release_memory(weights=True)
            assert all(p.numel() == 0 for p in engine.runner.model.parameters())   # no view of the freed memory
            if step and not stable:
                gc.collect()   # nothing in the engine (parameters, weight plan) holds the freed buffer: only `memory`
                assert torch._C._storage_Use_Count(memory._cdata) == 1
            engine.resume_memory()
            after = {n: t.clone() for n, t in engine.named_hf_tensors()}
            assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
            engine.update_weights_from_tensor(list(before.items()), weight_version=step + 1)   # the plan resolves views
            assert engine.generate(PROMPT, sampling_params=SP)["output_ids"] == out["output_ids"]


def test_idle_seconds_count_the_waits_with_nothing_to_step_on(qwen3_model):
    """Engine.metrics()["idle_seconds_total"]: time the loop waited with nothing runnable (here: paused with a request
    queued), which a rollout's wall time minus it turns into the engine's active time."""
    with Engine(model_path=str(qwen3_model), max_total_tokens=1024) as engine:
        engine.pause_generation()
        start = engine.metrics()["idle_seconds_total"]
        result = {}
        thread = threading.Thread(target=lambda: result.update(out=engine.generate(PROMPT, sampling_params=SP)))
        thread.start()
        thread.join(0.5)   # queued, not stepped: the engine waits (the wait in progress counted too)
        assert thread.is_alive() and engine.metrics()["idle_seconds_total"] - start >= 0.4
        engine.continue_generation()
        thread.join()
    assert len(result["out"]["output_ids"]) == SP["max_new_tokens"]


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

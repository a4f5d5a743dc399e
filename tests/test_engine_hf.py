"""Engine outputs against HF transformers: greedy tokens, output / prompt log-probs, prefix-cache reuse, bad input."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference_engine import Engine

PROMPTS = [
    "What is 3 + 4? The answer is",
    "the doctor",
    "Hello world, this is a much longer prompt about pain, fever, cough and a headache for two days",
    "water",
]


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@torch.no_grad()
def hf_logprobs(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[j+1] | ids[:j+1]) for every j, float32, [len(ids) - 1]."""
    logits = model(torch.tensor([ids])).logits[0].float() / temperature
    return torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("page_size", [1, 4])
def test_greedy_matches_hf_single_and_batched(tiny_model, page_size):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = hf_model(tiny_model)
    sp = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    refs = [hf_greedy(model, tok(p)["input_ids"], 12) for p in PROMPTS]
    with Engine(model_path=str(tiny_model), page_size=page_size, max_total_tokens=2048,
                chunked_prefill_size=16) as engine:
        single = engine.generate(PROMPTS[2], sampling_params=sp)
        batch = engine.generate(PROMPTS, sampling_params=sp)
    assert single["output_ids"] == refs[2]
    assert [o["output_ids"] for o in batch] == refs
    assert batch[0]["meta_info"]["finish_reason"]["type"] == "length"
    assert batch[0]["meta_info"]["completion_tokens"] == 12
    assert batch[0]["text"] == tok.decode(refs[0], skip_special_tokens=True)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_output_and_prompt_logprobs_match_hf(qwen3_model, temperature):
    tok = AutoTokenizer.from_pretrained(qwen3_model)
    model = hf_model(qwen3_model)
    ids = tok(PROMPTS[2])["input_ids"]
    sp = {"max_new_tokens": 10, "temperature": temperature, "top_k": 20, "seed": 3, "ignore_eos": True,
          "return_prompt_logprobs": True, "top_logprobs_num": 3}
    with Engine(model_path=str(qwen3_model), chunked_prefill_size=7, max_total_tokens=2048) as engine:
        out = engine.generate(input_ids=ids, sampling_params=sp, return_logprob=True)
    meta = out["meta_info"]
    full = ids + out["output_ids"]
    ref = hf_logprobs(model, full, temperature or 1.0)  # before top-k truncation, as documented
    got = torch.tensor([lp for lp, _, _ in meta["output_token_logprobs"]])
    assert [t for _, t, _ in meta["output_token_logprobs"]] == out["output_ids"]
    assert torch.allclose(got, ref[len(ids) - 1:], atol=1e-4, rtol=0)
    prompt_lp = meta["input_token_logprobs"]
    assert prompt_lp[0][0] is None and [t for _, t, _ in prompt_lp] == ids
    assert torch.allclose(torch.tensor([lp for lp, _, _ in prompt_lp[1:]]), ref[:len(ids) - 1], atol=1e-4, rtol=0)
    with torch.no_grad():
        last = torch.log_softmax(model(torch.tensor([full])).logits[0, len(ids) - 1] / (temperature or 1.0), -1)
    top_lp, top_ids = last.topk(3)
    assert [t for _, t, _ in meta["output_top_logprobs"][0]] == top_ids.tolist()
    assert torch.allclose(torch.tensor([lp for lp, _, _ in meta["output_top_logprobs"][0]]), top_lp, atol=1e-4)


@pytest.mark.parametrize("page_size", [1, 4])
def test_shared_prefix_is_reused_and_output_unchanged(qwen3_model, page_size):
    tok = AutoTokenizer.from_pretrained(qwen3_model)
    first = tok(PROMPTS[2])["input_ids"]
    second = first[:15] + tok(" and the patient said")["input_ids"]
    shared = 15 if first[15] != second[15] else None
    assert shared is not None
    sp = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    with Engine(model_path=str(qwen3_model), page_size=page_size, max_total_tokens=2048) as engine:
        engine.generate(input_ids=first, sampling_params=sp)
        cached = engine.generate(input_ids=second, sampling_params=sp)
        engine.flush_cache()
        uncached = engine.generate(input_ids=second, sampling_params=sp)
    assert cached["meta_info"]["cached_tokens"] == shared // page_size * page_size
    assert uncached["meta_info"]["cached_tokens"] == 0
    assert cached["output_ids"] == uncached["output_ids"] == hf_greedy(hf_model(qwen3_model), second, 8)


@pytest.fixture(scope="module")
def engine(qwen3_model):
    with Engine(model_path=str(qwen3_model), context_length=64, max_total_tokens=512) as eng:
        yield eng


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": "hi", "sampling_params": {"max_tokens": 3}}, "unknown sampling parameter"),
    ({"prompt": "hi", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({"prompt": "hi", "sampling_params": {"temperature": -0.5}}, "temperature"),
    ({"prompt": "hi", "sampling_params": {"top_p": 0.0}}, "top_p"),
    ({"prompt": "hi", "sampling_params": {"top_p": "high"}}, "top_p"),
    ({"prompt": ""}, "empty"),
    ({"input_ids": []}, "empty"),
    ({"input_ids": [1, 2, 10**6]}, "outside the vocabulary"),
    ({"input_ids": [-1]}, "outside the vocabulary"),
    ({"input_ids": [1, 5, -3, 10**6]}, "token id -3 is outside"),  # the first bad id is named
    ({"input_ids": [1, True]}, "list of ints"),
    ({"input_ids": [1, 2.0]}, "list of ints"),
    ({"input_ids": [[1, 2], [3, "4"]]}, "prompt 1: input_ids must be a list of ints"),
    ({"input_ids": list(range(1, 70))}, "context_length"),
    ({}, "exactly one of prompt"),
])
def test_bad_input_raises_clear_error_and_engine_keeps_serving(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(**kwargs)
    assert engine.generate("the doctor", sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] >= 1


def test_max_new_tokens_capped_by_context(engine):
    out = engine.generate(input_ids=list(range(1, 60)), sampling_params={"max_new_tokens": 50, "ignore_eos": True})
    assert out["meta_info"]["completion_tokens"] == 64 - 59
    assert out["meta_info"]["finish_reason"]["type"] == "length"


def test_unknown_engine_option_is_rejected(qwen3_model):
    with pytest.raises(ValueError, match="unknown Engine option"):
        Engine(model_path=str(qwen3_model), page_sise=4)
    with pytest.raises(ValueError, match="attention_backend"):
        Engine(model_path=str(qwen3_model), attention_backend="nope")


@pytest.mark.parametrize("overlap", [True, False])
def test_step_counters_count_the_batches(qwen3_model, overlap):
    """metrics(): steps_total, step_requests_total (their ratio the mean batch) and step_seconds_total. Four
    prompts prefilled in one step, then decoded together: k new tokens each take k steps of 4 requests, with the
    overlap schedule or without (its last launched step is read, never a step more)."""
    k = 5
    with Engine(model_path=str(qwen3_model), context_length=64, max_total_tokens=512,
                disable_overlap_schedule=not overlap) as eng:
        before = eng.metrics()
        outs = eng.generate(input_ids=[[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]],
                            sampling_params={"max_new_tokens": k, "ignore_eos": True, "temperature": 0})
        after = eng.metrics()
    assert all(len(o["output_ids"]) == k for o in outs)
    assert after["steps_total"] - before["steps_total"] == k
    assert after["step_requests_total"] - before["step_requests_total"] == 4 * k
    assert after["step_seconds_total"] > before["step_seconds_total"]

"""Continuous batching under load: concurrency, retraction, chunked prefill, n>1 forking, abort, stops, failures."""

import random

import pytest
from transformers import AutoTokenizer

from inference_engine import Engine


def mixed_requests(tokenizer_dir, count=64, seed=0):
    """count prompts of 3..40 tokens; half greedy, half seeded sampling; 4..24 new tokens."""
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = "the doctor said pain fever cough what is plus answer water day people".split()
    prompts, params = [], []
    for i in range(count):
        ids = tok(" ".join(rng.choice(words) for _ in range(rng.randint(2, 30))))["input_ids"][:40]
        prompts.append(ids)
        sp = {"max_new_tokens": rng.randint(4, 24), "ignore_eos": True}
        sp.update({"temperature": 0} if i % 2 else {"temperature": 0.9, "top_p": 0.9, "seed": i})
        params.append(sp)
    return prompts, params


@pytest.fixture(scope="module")
def single_outputs(qwen3_model, tokenizer_dir):
    prompts, params = mixed_requests(tokenizer_dir)
    with Engine(model_path=str(qwen3_model), max_total_tokens=4096, disable_radix_cache=True) as engine:
        return [engine.generate(input_ids=p, sampling_params=sp)["output_ids"] for p, sp in zip(prompts, params)]


@pytest.mark.parametrize("options", [
    {"max_total_tokens": 4096},
    {"max_total_tokens": 4096, "page_size": 4, "schedule_policy": "lpm", "chunked_prefill_size": 32},
])
async def test_64_concurrent_requests_match_single_runs(qwen3_model, tokenizer_dir, single_outputs, options):
    import asyncio

    prompts, params = mixed_requests(tokenizer_dir)
    with Engine(model_path=str(qwen3_model), **options) as engine:
        outs = await asyncio.gather(*[engine.async_generate(input_ids=p, sampling_params=sp)
                                      for p, sp in zip(prompts, params)])
    assert [o["output_ids"] for o in outs] == single_outputs


@pytest.mark.parametrize("page_size", [1, 4])
def test_small_kv_pool_forces_retraction_and_outputs_still_match(qwen3_model, tokenizer_dir, single_outputs,
                                                                  page_size):
    prompts, params = mixed_requests(tokenizer_dir)
    with Engine(model_path=str(qwen3_model), context_length=96, max_total_tokens=200, page_size=page_size,
                chunked_prefill_size=64) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        assert engine.scheduler.stats.num_retractions > 0
        engine.flush_cache()
        pool = engine.runner.kv_pool
        assert pool.available_size() == pool.capacity
    assert [o["output_ids"] for o in outs] == single_outputs


def test_n_samples_share_prefill_are_seed_reproducible_and_differ(qwen3_model):
    sp = {"n": 4, "seed": 7, "temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True}
    prompt = "What is 12 + 30? The answer is a number and the doctor"
    with Engine(model_path=str(qwen3_model), max_total_tokens=2048) as engine:
        first = engine.generate(prompt, sampling_params=sp)
        engine.flush_cache()
        second = engine.generate(prompt, sampling_params=sp)
        prompt_len = first[0]["meta_info"]["prompt_tokens"]
    assert len(first) == 4
    assert [o["output_ids"] for o in first] == [o["output_ids"] for o in second]
    assert len({tuple(o["output_ids"]) for o in first}) == 4
    assert all(o["meta_info"]["cached_tokens"] == prompt_len - 1 for o in first)  # prefilled once, then forked


def test_abort_frees_every_kv_slot(qwen3_model):
    import threading

    with Engine(model_path=str(qwen3_model), max_total_tokens=2048) as engine:
        results = {}
        thread = threading.Thread(target=lambda: results.update(out=engine.generate(
            ["the doctor", "what is", "pain fever"], sampling_params={"max_new_tokens": 100000, "ignore_eos": True},
            rid="job")))
        thread.start()
        while engine.scheduler.stats.generated_tokens < 10:
            thread.join(0.01)
        engine.abort("job-1")
        engine.abort(abort_all=True)
        thread.join()
        reasons = [o["meta_info"]["finish_reason"]["type"] for o in results["out"]]
        assert reasons == ["abort", "abort", "abort"]
        assert not engine.scheduler.running and not engine.scheduler.waiting
        engine.flush_cache()
        pool = engine.runner.kv_pool
        assert pool.available_size() == pool.capacity
        assert engine.runner.req_to_token.available() == engine.config.max_running_requests


def test_stop_strings_and_stop_tokens(qwen3_model):
    with Engine(model_path=str(qwen3_model), max_total_tokens=2048) as engine:
        base = engine.generate("the doctor said", sampling_params={"temperature": 0, "max_new_tokens": 16,
                                                                    "ignore_eos": True})
        text = base["text"]
        stop = text[len(text) // 2:len(text) // 2 + 3]
        assert stop.strip()
        out = engine.generate("the doctor said", sampling_params={"temperature": 0, "max_new_tokens": 16,
                                                                   "ignore_eos": True, "stop": [stop]})
        kept = engine.generate("the doctor said", sampling_params={"temperature": 0, "max_new_tokens": 16,
                                                                    "ignore_eos": True, "stop": stop,
                                                                    "no_stop_trim": True})
        stop_tok = base["output_ids"][5]
        by_token = engine.generate("the doctor said", sampling_params={"temperature": 0, "max_new_tokens": 16,
                                                                        "stop_token_ids": [stop_tok]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text[:text.find(stop)]
    assert kept["text"].endswith(stop) and text.startswith(kept["text"])
    first = base["output_ids"].index(stop_tok)
    assert by_token["output_ids"] == base["output_ids"][:first + 1]
    assert by_token["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}


def test_failure_inside_the_loop_ends_only_that_batch(qwen3_model, monkeypatch):
    with Engine(model_path=str(qwen3_model), max_total_tokens=2048) as engine:
        real_forward = engine.runner.forward
        calls = {"n": 0}

        def flaky_forward(fb):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected failure")
            return real_forward(fb)

        monkeypatch.setattr(engine.runner, "forward", flaky_forward)
        failed = engine.generate("the doctor", sampling_params={"max_new_tokens": 4})
        ok = engine.generate("the doctor", sampling_params={"max_new_tokens": 4, "ignore_eos": True})
        assert failed["meta_info"]["finish_reason"]["type"] == "abort"
        assert "injected failure" in failed["meta_info"]["error"]
        assert ok["meta_info"]["completion_tokens"] == 4
        engine.flush_cache()
        assert engine.runner.kv_pool.available_size() == engine.runner.kv_pool.capacity


async def test_streaming_yields_incremental_outputs(qwen3_model):
    with Engine(model_path=str(qwen3_model), max_total_tokens=2048) as engine:
        sp = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
        full = await engine.async_generate("the doctor", sampling_params=sp)
        chunks = [c async for c in await engine.async_generate("the doctor", sampling_params=sp, stream=True)]
    assert [len(c["output_ids"]) for c in chunks] == [1, 2, 3, 4, 5, 6]
    assert chunks[-1]["output_ids"] == full["output_ids"] and chunks[-1]["text"] == full["text"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert chunks[0]["meta_info"]["finish_reason"] is None

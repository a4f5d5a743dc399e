"""Overlap scheduling: outputs equal the step-by-step path token for token, and nothing leaks.

Every test runs the same traffic with `disable_overlap_schedule` False (the host launches step k+1
before reading step k's tokens) and True (each step read right after its launch), on CPU: the same
code path the GPU runs, with the late read made immediately.
"""

import asyncio
import random

import pytest

from inference_engine import Engine

MIXED = [  # (prompt, sampling params): greedy, seeded sampling with truncation, penalties, log-probs
    ([5, 17, 42, 99, 3, 7, 250, 11, 64], {"temperature": 0, "max_new_tokens": 9}),
    ([8, 8, 300], {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 3, "max_new_tokens": 12}),
    (list(range(1, 30)), {"temperature": 1.0, "min_p": 0.05, "seed": 11, "max_new_tokens": 7}),
    ([77] * 12, {"temperature": 0.7, "repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.4,
                 "seed": 5, "max_new_tokens": 10}),
    ([9, 10, 11], {"temperature": 0, "top_logprobs_num": 3, "max_new_tokens": 1}),
    ([400, 3, 3, 3, 12], {"temperature": 0, "repetition_penalty": 1.5, "max_new_tokens": 8}),
]


def _engine(model_path, overlap: bool, **options) -> Engine:
    options = {"max_total_tokens": 2048, "page_size": 4, **options}
    return Engine(model_path=str(model_path), disable_overlap_schedule=not overlap, **options)


def _both(model_path, run, **options):
    """run(engine) with overlap on and off: (on, off)."""
    results = []
    for overlap in (True, False):
        with _engine(model_path, overlap, **options) as engine:
            results.append(run(engine))
    return results


def _strip(outs: list[dict]) -> list[dict]:
    """What must match between the two paths: tokens, text, log-probs, finish reason and cache use."""
    keys = ("completion_tokens", "cached_tokens", "finish_reason", "output_token_logprobs", "output_top_logprobs")
    return [{"output_ids": o["output_ids"], "text": o["text"], **{k: o["meta_info"].get(k) for k in keys}}
            for o in outs]


def _assert_pool_whole(engine: Engine) -> None:
    engine.flush_cache()
    pool = engine.runner.kv_pool
    assert pool.available_size() == pool.capacity
    assert len(set(pool.free_page_ids().tolist())) == pool.num_pages - 1  # no page freed twice


def test_mixed_sampling_matches_and_overlaps(tiny_model):
    prompts, params = [p for p, _ in MIXED], [sp for _, sp in MIXED]

    def run(engine):
        outs = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
        again = engine.generate(input_ids=[p + [1, 2] for p in prompts], sampling_params=params, return_logprob=True)
        _assert_pool_whole(engine)
        return _strip(outs + again), engine.scheduler.stats.generated_tokens

    (on, on_tokens), (off, off_tokens) = _both(tiny_model, run)
    assert on == off
    assert on_tokens == off_tokens == sum(o["completion_tokens"] for o in on)  # dropped lookahead tokens uncounted
    assert any(o["cached_tokens"] for o in on[len(MIXED):])  # the second round reused the first one's prefixes


def test_one_step_late_read_uses_the_device_token(qwen3_model):
    """With overlap, step k+1 is launched before step k's tokens are read; its input comes from the device buffer."""
    with _engine(qwen3_model, True) as engine:
        sched = engine.scheduler
        lookahead_inputs = []
        forward_batch = sched.batches.forward_batch

        def spy(batch, sampling):
            lookahead_inputs.append(sum(1 for req, _ in batch if req.pending))
            return forward_batch(batch, sampling)

        sched.batches.forward_batch = spy
        out = engine.generate(input_ids=[3, 4, 5], sampling_params={"temperature": 0, "max_new_tokens": 6})
    assert len(out["output_ids"]) == 6
    # the prefill, then 5 decodes each fed by the still-unread token of the step before
    assert lookahead_inputs == [0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("page_size", [1, 4])
def test_stop_token_and_stop_string_drop_the_extra_step(qwen3_model, page_size):
    """A request that stops at step k was already scheduled for step k+1: that token and its KV are dropped."""
    prompt = [12, 40, 41, 7, 300, 2, 19]
    free = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    with _engine(qwen3_model, False) as engine:
        ref = engine.generate(input_ids=prompt, sampling_params=free)
    ids, text = ref["output_ids"], ref["text"]
    stop_token = ids[5]
    stop_string = text[len(text) // 2:len(text) // 2 + 3].strip() or text[-2:]
    cases = [{**free, "stop_token_ids": [stop_token]}, {**free, "stop": [stop_string]},
             {**free, "stop": [stop_string], "no_stop_trim": True}]

    def run(engine):
        outs = [engine.generate(input_ids=prompt, sampling_params=sp, return_logprob=True) for sp in cases]
        # the radix cache holds exactly what the step-by-step path cached: a follow-up reuses the same length
        tree_tokens = engine.scheduler.tree.total_size()
        follow = engine.generate(input_ids=prompt + outs[0]["output_ids"] + [5],
                                 sampling_params={"temperature": 0, "max_new_tokens": 2})
        _assert_pool_whole(engine)
        return _strip(outs + [follow]) + [tree_tokens]

    on, off = _both(qwen3_model, run, page_size=page_size)
    assert on == off
    assert on[0]["finish_reason"] == {"type": "stop", "matched": stop_token}
    assert on[0]["output_ids"] == ids[:ids.index(stop_token) + 1]
    assert on[1]["finish_reason"]["matched"] == stop_string and on[1]["completion_tokens"] < len(ids)


def test_n_samples_and_prefix_sharing_match(qwen3_model):
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 500) for _ in range(37)] for _ in range(3)]
    sp = {"n": 4, "seed": 7, "temperature": 1.0, "max_new_tokens": 9, "ignore_eos": True}

    async def traffic(engine):
        grouped = engine.generate(input_ids=prompts[0], sampling_params=sp, return_logprob=True)
        copies = await asyncio.gather(*[engine.async_generate(input_ids=prompts[1 + i % 2], sampling_params={
            **sp, "n": 1, "seed": i}) for i in range(8)])  # GRPO-style: copies sent as separate requests
        return _strip(grouped + list(copies)), engine.scheduler.stats.deferred_admissions

    def run(engine):
        result = asyncio.run(traffic(engine))
        _assert_pool_whole(engine)
        return result

    (on, on_deferred), (off, off_deferred) = _both(qwen3_model, run)
    assert [o["output_ids"] for o in on] == [o["output_ids"] for o in off]
    assert [o["output_token_logprobs"] for o in on] == [o["output_token_logprobs"] for o in off]
    assert sum(o["cached_tokens"] > 0 for o in on[4:]) >= 6  # later copies reused the running prefill
    assert on_deferred > 0 and off_deferred > 0


@pytest.mark.parametrize("page_size", [1, 4])
def test_forced_retraction_matches(qwen3_model, page_size):
    rng = random.Random(page_size)
    prompts = [[rng.randrange(10, 500) for _ in range(rng.randint(5, 40))] for _ in range(24)]
    params = [{"max_new_tokens": rng.randint(4, 20), "ignore_eos": True,
               **({"temperature": 0} if i % 2 else {"temperature": 0.9, "seed": i})} for i in range(24)]

    def run(engine):
        outs = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
        retractions = engine.scheduler.stats.num_retractions
        _assert_pool_whole(engine)
        logprobs = [lp for o in outs for lp, _, _ in o["meta_info"]["output_token_logprobs"]]
        return [o["output_ids"] for o in outs], logprobs, retractions

    on, off = _both(qwen3_model, run, context_length=96, max_total_tokens=200, page_size=page_size,
                    chunked_prefill_size=64)
    assert on[0] == off[0]
    assert on[1] == pytest.approx(off[1])
    assert on[2] > 0 and off[2] > 0


async def test_abort_mid_run_keeps_the_others_and_frees_everything(qwen3_model):
    prompts = [[3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14]]
    sp = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
    with _engine(qwen3_model, False) as engine:
        ref = engine.generate(input_ids=prompts, sampling_params=sp)
    with _engine(qwen3_model, True) as engine:
        streams = [await engine.async_generate(input_ids=p, sampling_params=sp, rid=f"r{i}", stream=True)
                   for i, p in enumerate(prompts)]
        seen = 0
        async for chunk in streams[1]:
            seen += 1
            if seen == 5:  # mid-run: the other two are decoding, a token of each possibly in flight
                engine.abort("r1")
        last = chunk
        finals = []
        for stream in (streams[0], streams[2]):
            async for chunk in stream:
                pass
            finals.append(chunk)
        _assert_pool_whole(engine)
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert 5 <= len(last["output_ids"]) < 40
    assert last["output_ids"] == ref[1]["output_ids"][:len(last["output_ids"])]
    assert [f["output_ids"] for f in finals] == [ref[0]["output_ids"], ref[2]["output_ids"]]


def test_streamed_chunks_match(qwen3_model):
    sp = {"temperature": 0.8, "seed": 1, "max_new_tokens": 8, "stop_token_ids": [], "ignore_eos": True}

    async def chunks(engine):
        return [c["output_ids"] async for c in await engine.async_generate(input_ids=[5, 6, 7], sampling_params=sp,
                                                                            stream=True)]

    on, off = _both(qwen3_model, lambda engine: asyncio.run(chunks(engine)))
    assert on == off
    assert [len(c) for c in on] == list(range(1, 9))


def test_same_pages_marks_decodes_that_keep_the_page_layout(qwen3_model):
    """The flag that lets a graph backend keep its attention plan: same requests as the step before, no page started."""
    with _engine(qwen3_model, True, page_size=4) as engine:
        sched = engine.scheduler
        flags = []
        forward_batch = sched.batches.forward_batch

        def spy(batch, sampling):
            fb, *rest = forward_batch(batch, sampling)
            flags.append(fb.same_pages)
            return (fb, *rest)

        sched.batches.forward_batch = spy
        engine.generate(input_ids=[3, 4, 5], sampling_params={"temperature": 0, "max_new_tokens": 8})
    # prefill (positions 0-2); decodes at positions 3 (first decode), 4 (starts page 2), 5, 6, 7, 8 (page 3), 9
    assert flags == [False, False, False, True, True, True, False, True]

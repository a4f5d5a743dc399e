"""GRPO-shaped traffic (one prompt sent n times as separate requests) prefills each prompt once.

Running prefills are inserted into the radix cache (locked by their request) and waiting requests that
share a long prefix with a running prefill wait for it; outputs must equal single-request runs.
"""

import asyncio

import pytest
import torch
from transformers import AutoTokenizer

from inference_engine import Engine
from inference_engine.config import EngineConfig
from inference_engine.model_runner import ModelRunner
from inference_engine.request import Req
from inference_engine.sampling_params import SamplingParams
from inference_engine.scheduler import Scheduler, admission

PROMPT_LEN, N = 40, 8


def grpo_traffic(groups=2, new_tokens=8):
    """groups prompts of PROMPT_LEN tokens, each sent N times: even groups greedy, odd groups seeded sampling."""
    gen = torch.Generator().manual_seed(0)
    prompts, params = [], []
    for g in range(groups):
        prompt = torch.randint(10, 500, (PROMPT_LEN,), generator=gen).tolist()
        for j in range(N):
            sp = {"max_new_tokens": new_tokens, "ignore_eos": True}
            sp.update({"temperature": 0} if g % 2 == 0 else {"temperature": 0.9, "top_p": 0.9, "seed": 100 * g + j})
            prompts.append(prompt)
            params.append(sp)
    return prompts, params


def single_runs(model, prompts, params):
    with Engine(model_path=str(model), max_total_tokens=2048, disable_radix_cache=True) as engine:
        return [engine.generate(input_ids=p, sampling_params=sp)["output_ids"] for p, sp in zip(prompts, params)]


@pytest.fixture(scope="module")
def singles(qwen3_model):
    return single_runs(qwen3_model, *grpo_traffic())


def cached_per_group(outs):
    """Sorted cached_tokens of each group of N outputs."""
    return [sorted(o["meta_info"]["cached_tokens"] for o in outs[i:i + N]) for i in range(0, len(outs), N)]


def assert_pool_whole(pool, req_to_token=None, max_reqs=None):
    """Every page free exactly once (no leak, no double free); every request row back."""
    pages = pool.free_page_ids()
    assert pages.numel() == pages.unique().numel() == pool.num_pages - 1
    assert pool.available_size() == pool.capacity
    if req_to_token is not None:
        assert req_to_token.available() == max_reqs


@pytest.mark.parametrize("options", [
    {"page_size": 4},
    {"page_size": 1},
    {"page_size": 4, "chunked_prefill_size": 16, "schedule_policy": "lpm"},
])
def test_grpo_groups_prefill_once_and_match_single_runs(qwen3_model, singles, options):
    prompts, params = grpo_traffic()
    page = options["page_size"]
    with Engine(model_path=str(qwen3_model), max_total_tokens=2048, **options) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=params)  # 16 separate requests, queued together
        stats = engine.scheduler.stats
        pool, tree = engine.runner.kv_pool, engine.scheduler.tree
        assert pool.available_size() + tree.total_size() == pool.capacity  # idle: every used slot is the tree's
        engine.flush_cache()
        assert_pool_whole(engine.runner.kv_pool, engine.runner.req_to_token, engine.config.max_running_requests)
    assert [o["output_ids"] for o in outs] == singles
    for cached in cached_per_group(outs):
        assert cached[0] == 0 and all(c >= PROMPT_LEN // page * page - page for c in cached[1:])
    assert stats.prefill_tokens == sum(PROMPT_LEN - o["meta_info"]["cached_tokens"] for o in outs)
    assert stats.deferred_admissions >= N - 1  # copies queued with their first prefill waited for it


def test_sharing_off_prefills_every_copy(qwen3_model, singles):
    prompts, params = grpo_traffic()
    with Engine(model_path=str(qwen3_model), max_total_tokens=2048, page_size=4,
                disable_prefix_sharing=True) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        assert engine.scheduler.stats.prefill_tokens == len(prompts) * PROMPT_LEN
        engine.flush_cache()
        assert_pool_whole(engine.runner.kv_pool)
    assert [o["output_ids"] for o in outs] == singles
    assert cached_per_group(outs) == [[0] * N, [0] * N]


async def test_concurrent_async_requests_share_prefill(qwen3_model, singles):
    prompts, params = grpo_traffic()
    with Engine(model_path=str(qwen3_model), max_total_tokens=2048, page_size=4) as engine:
        outs = await asyncio.gather(*[engine.async_generate(input_ids=p, sampling_params=sp)
                                      for p, sp in zip(prompts, params)])
        engine.flush_cache()
        assert_pool_whole(engine.runner.kv_pool)
    assert [o["output_ids"] for o in outs] == singles
    for cached in cached_per_group(outs):
        assert sum(c >= PROMPT_LEN - 4 for c in cached) >= N - 1


def test_copies_prefilled_together_share_slots_without_leaks(qwen3_model, singles, monkeypatch):
    """With deferral bounded to zero every copy prefills; the later insertions adopt the first one's slots."""
    monkeypatch.setattr(admission, "MAX_PREFIX_DEFERRALS", 0)
    prompts, params = grpo_traffic()
    with Engine(model_path=str(qwen3_model), max_total_tokens=2048, page_size=4) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        assert engine.scheduler.stats.deferred_admissions == 0
        pool, tree = engine.runner.kv_pool, engine.scheduler.tree
        assert pool.available_size() + tree.total_size() == pool.capacity  # idle: every used slot is the tree's
        engine.flush_cache()
        assert_pool_whole(pool)
    assert [o["output_ids"] for o in outs] == singles
    assert cached_per_group(outs) == [[0] * N, [0] * N]


def test_short_copies_wait_but_a_shared_header_alone_does_not(qwen3_model):
    gen = torch.Generator().manual_seed(1)
    short = torch.randint(10, 500, (12,), generator=gen).tolist()
    header = torch.randint(10, 500, (8,), generator=gen).tolist()
    distinct = [header + torch.randint(10, 500, (30,), generator=gen).tolist() for _ in range(3)]
    sp = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
    with Engine(model_path=str(qwen3_model), max_total_tokens=2048, page_size=4) as engine:
        outs = engine.generate(input_ids=[short] * 4 + distinct, sampling_params=sp)
        deferred = engine.scheduler.stats.deferred_admissions
    # copies of a prompt shorter than prefix_sharing_min_tokens still wait for its first prefill ...
    assert [o["meta_info"]["cached_tokens"] for o in outs[:4]] == [0, 8, 8, 8]
    # ... but sharing an 8-token header with a running prefill is not worth a step's wait
    assert [o["meta_info"]["cached_tokens"] for o in outs[4:]] == [0, 0, 0] and deferred == 3


def make_scheduler(model, **options) -> Scheduler:
    """A scheduler stepped by the test itself (no engine thread)."""
    config = EngineConfig(model_path=str(model), max_total_tokens=1024, **options)
    return Scheduler(config, ModelRunner(config), AutoTokenizer.from_pretrained(model), eos_token_ids=set())


def greedy_req(rid, prompt, new_tokens):
    return Req(rid, list(prompt), SamplingParams.from_dict({"temperature": 0, "max_new_tokens": new_tokens,
                                                            "ignore_eos": True}))


def run_to_end(sched):
    while sched.has_work():
        sched.step()


@pytest.mark.parametrize("sharing", [True, False])
def test_running_prefill_is_cached_chunk_by_chunk_locked_and_reused(qwen3_model, sharing):
    prompts, _ = grpo_traffic()
    prompt = prompts[0]
    sched = make_scheduler(qwen3_model, page_size=4, chunked_prefill_size=16, disable_prefix_sharing=not sharing)
    first = greedy_req("first", prompt, 12)
    sched.add(first)
    for cached in (16, 32, 40):  # chunks of 16, 16, 8 tokens
        sched.step()
        assert sched.tree.protected_size == (cached if sharing else 0)
        assert sched.tree.evict(10 ** 6) == 0  # locked by the running request: nothing to evict
        assert sched.tree.match_prefix(prompt)[0].numel() == (cached if sharing else 0)
    sched.step()  # first now decodes; a copy of its prompt arrives
    second = greedy_req("second", prompt, 12)
    sched.add(second)
    run_to_end(sched)
    assert second.cached_tokens == (36 if sharing else 0)
    assert second.output_ids == first.output_ids
    alone = make_scheduler(qwen3_model, disable_radix_cache=True)
    ref = greedy_req("ref", prompt, 12)
    alone.add(ref)
    run_to_end(alone)
    assert first.output_ids == ref.output_ids
    sched.flush_cache()
    assert_pool_whole(sched.kv_pool, sched.req_to_token, sched.config.max_running_requests)


def test_flush_during_prefill_caches_nothing_stale_and_frees_everything(qwen3_model):
    prompts, _ = grpo_traffic()
    sched = make_scheduler(qwen3_model, page_size=4, chunked_prefill_size=16)
    req = greedy_req("r", prompts[0], 6)
    sched.add(req)
    sched.step()
    assert sched.tree.protected_size == 16
    sched.flush_cache()  # e.g. a weight update: KV computed before it must never be matched again
    later = greedy_req("later", prompts[N], 6)
    sched.add(later)
    run_to_end(sched)
    assert req.finish_reason["type"] == later.finish_reason["type"] == "length"
    assert sched.tree.match_prefix(prompts[0])[0].numel() == 0  # r's KV predates the flush: never inserted
    assert sched.tree.total_size() == (PROMPT_LEN + 5) // 4 * 4  # later's sequence only
    sched.flush_cache()
    assert_pool_whole(sched.kv_pool, sched.req_to_token, sched.config.max_running_requests)


@pytest.mark.parametrize("page_size", [1, 4])
def test_retraction_with_shared_prefixes_keeps_outputs(qwen3_model, page_size):
    prompts, params = grpo_traffic(groups=4, new_tokens=24)
    expected = single_runs(qwen3_model, prompts, params)
    with Engine(model_path=str(qwen3_model), context_length=96, max_total_tokens=200, page_size=page_size,
                chunked_prefill_size=64) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        assert engine.scheduler.stats.num_retractions > 0
        engine.flush_cache()
        assert_pool_whole(engine.runner.kv_pool, engine.runner.req_to_token, engine.config.max_running_requests)
    assert [o["output_ids"] for o in outs] == expected
    assert sum(o["meta_info"]["cached_tokens"] > 0 for o in outs) >= 4 * (N - 1)


def test_prefix_sharing_min_tokens_is_validated(qwen3_model):
    with pytest.raises(ValueError, match="prefix_sharing_min_tokens must be >= 1, got 0"):
        EngineConfig(model_path=str(qwen3_model), prefix_sharing_min_tokens=0)

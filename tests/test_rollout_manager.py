"""Default generate function and RolloutManager against fake engine clients."""

import asyncio
import re

import pytest
from transformers import AutoTokenizer

from rollout.config import DataConfig, RolloutConfig
from rollout.data import PromptDataset
from rollout.generate import GenerateArgs, generate
from rollout.manager import DataExhausted, RolloutManager
from kiln_common.plugins import load_function
from kiln_common.sample import Sample, Status
from rollout.testing import FakeEngineClient

MODULE = "test_rollout_manager"  # how pytest imports this file (tests/ is on sys.path)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def rows(n, start=0):
    return [{"prompt": f"What is {i} + 1?", "label": str(i + 1)} for i in range(start, start + n)]


def question(tok, input_ids):
    """(a, b) of the 'What is a + b?' in a prompt."""
    a, b = re.search(r"What is (\d+) \+ (\d+)\?", tok.decode(input_ids)).groups()
    return int(a), int(b)


def make_manager(tok, data_rows, client=None, data_config=None, **config):
    config.setdefault("progress", False)
    cfg = RolloutConfig(**config)
    data = PromptDataset(data_config or DataConfig(), tok, data_rows) if data_rows is not None else None
    client = client or FakeEngineClient(eos_id=tok.eos_token_id)
    return RolloutManager(cfg, data, [client], tok), client


# ---- default generate function ------------------------------------------------------------------------------

@pytest.mark.parametrize("budget, status", [(20, Status.COMPLETED), (3, Status.TRUNCATED)])
async def test_default_generate_fills_tokens_logprobs_mask(budget, status):
    engine = FakeEngineClient(response_len=6, eos_id=0)
    args = GenerateArgs(client=engine, tokenizer=None, config=RolloutConfig())
    prompt = [11, 12, 13]
    sample = await generate(args, Sample(index=4, group_index=2, tokens=list(prompt)), {"max_new_tokens": budget})
    full = engine._plans[tuple(prompt)]  # the 6 tokens + EOS the fake planned for this prompt
    out = full[:min(budget, len(full))]
    assert sample.tokens == prompt + out and sample.response_length == len(out) and sample.status == status
    assert sample.loss_mask == [1] * len(out)
    assert sample.rollout_logprobs == pytest.approx([-0.01 * (k + 1) for k in range(len(out))])
    assert engine.calls[0]["input_ids"] == prompt and engine.calls[0]["session_id"] == "group-2"
    sample.validate()


class AbortingClient(FakeEngineClient):
    async def generate(self, input_ids, sampling_params, return_logprob=True, session_id=None):
        out = await super().generate(input_ids, sampling_params, return_logprob, session_id)
        out["meta_info"]["finish_reason"] = {"type": "abort"}
        return out


async def test_default_generate_abort_status_and_resume():
    args = GenerateArgs(client=AbortingClient(eos_id=0), tokenizer=None, config=RolloutConfig())
    sample = await generate(args, Sample(tokens=[1, 2]), {"max_new_tokens": 4})
    assert sample.status == Status.ABORTED and sample.response_length == 4
    args.client = FakeEngineClient(eos_id=0)
    resumed = await generate(args, sample, {"max_new_tokens": 6})
    assert args.client.calls[0]["input_ids"] == sample.tokens[:6]  # prompt + partial response
    assert args.client.calls[0]["sampling_params"]["max_new_tokens"] == 2  # what is left of the budget
    assert resumed.response_length == 6 and resumed.status == Status.TRUNCATED and len(resumed.loss_mask) == 6


def test_load_function_errors():
    assert load_function("rollout.generate:generate") is generate
    assert load_function("rollout.generate.generate") is generate
    with pytest.raises(ImportError, match=r"module 'no_such_pkg.mod' not found"):
        load_function("no_such_pkg.mod:fn")
    with pytest.raises(ImportError, match=r"has no attribute 'nope'.*'generate'"):
        load_function("rollout.generate:nope")
    with pytest.raises(ValueError, match="must look like"):
        load_function("justaname")


# ---- manager --------------------------------------------------------------------------------------------------

async def test_batch_size_groups_rewards_and_metrics(tok):
    def answer(ids):  # right for even a, wrong for odd a
        a, b = question(tok, ids)
        return str(a + b if a % 2 == 0 else 0)

    client = FakeEngineClient(script=answer, tokenizer=tok, eos_id=tok.eos_token_id)
    manager, _ = make_manager(tok, rows(10), client, rollout_batch_size=4, n_samples_per_prompt=3)
    batch = await manager.generate(step=0)
    assert len(batch.samples) == 12 and len(batch.groups()) == 4 and not batch.failed
    for group in batch.groups():
        assert len(group) == 3 and len({tuple(s.tokens[:s.prompt_length]) for s in group}) == 1
        assert len({s.group_index for s in group}) == 1
    assert len({s.index for s in batch.samples}) == 12
    for s in batch.samples:
        s.validate()
        a = int(s.label) - 1
        assert s.reward == (1.0 if a % 2 == 0 else 0.0) and s.status == Status.COMPLETED
        assert s.response_tokens[-1] == tok.eos_token_id and s.loss_mask == [1] * s.response_length
    m = batch.metrics
    assert m["rollout/num_samples"] == 12 and m["rollout/reward_mean"] == pytest.approx(0.5)
    assert m["rollout/reward_std"] == pytest.approx(0.5) and m["rollout/truncated_rate"] == 0.0
    assert m["rollout/response_len_mean"] == pytest.approx(sum(s.response_length for s in batch.samples) / 12)
    assert m["rollout/failed_samples"] == 0 and m["rollout/completion_tokens"] == sum(
        s.response_length for s in batch.samples)
    following = await manager.generate(step=1)  # the next prompts, new group indices
    assert {s.label for s in following.samples} == {"5", "6", "7", "8"}
    assert not {s.group_index for s in following.samples} & {s.group_index for s in batch.samples}


async def test_cache_hit_rate_and_sampling_params(tok):
    manager, client = make_manager(tok, rows(1), rollout_batch_size=1, n_samples_per_prompt=4, sampling_seed=10,
                                   rollout_temperature=0.7, rollout_max_response_len=3)
    batch = await manager.generate(0)
    assert batch.metrics["rollout/cache_hit_rate"] == pytest.approx(3 / 4)  # one prompt, four requests
    assert all(s.status == Status.TRUNCATED for s in batch.samples)
    assert batch.metrics["rollout/truncated_rate"] == 1.0
    params = [c["sampling_params"] for c in client.calls]
    assert all(p["temperature"] == 0.7 and p["max_new_tokens"] == 3 for p in params)
    assert sorted(p["seed"] for p in params) == sorted(10 + s.index * 100_003 for s in batch.samples)


async def test_concurrency_limit_is_respected(tok):
    client = FakeEngineClient(token_delay=0.002, eos_id=tok.eos_token_id)
    manager, _ = make_manager(tok, rows(4), client, rollout_batch_size=4, n_samples_per_prompt=4,
                              rollout_concurrency=3)
    batch = await manager.generate(0)
    assert len(batch.samples) == 16 and client.max_in_flight == 3


async def test_concurrency_limit_is_per_engine(tok):
    """--rollout-concurrency is per engine (slime's --sglang-server-concurrency): two engines, 3 each, 6 in flight."""
    clients = [FakeEngineClient(name=f"e{i}", token_delay=0.002, eos_id=tok.eos_token_id) for i in range(2)]
    state = {"now": 0, "peak": 0}
    for client in clients:
        async def counted(*args, _inner=client.generate, **kwargs):
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            try:
                return await _inner(*args, **kwargs)
            finally:
                state["now"] -= 1
        client.generate = counted
    cfg = RolloutConfig(progress=False, rollout_batch_size=8, n_samples_per_prompt=4, rollout_concurrency=3)
    manager = RolloutManager(cfg, PromptDataset(DataConfig(), tok, rows(8)), clients, tok)
    batch = await manager.generate(0)
    assert len(batch.samples) == 32 and manager.max_in_flight == 6 and state["peak"] == 6


def alternating_answers(tok):
    """Groups of even a: every answer right (zero variance); odd a: right and wrong in turn."""
    count = {}

    def answer(ids):
        a, b = question(tok, ids)
        count[a] = count.get(a, 0) + 1
        return str(a + b if a % 2 == 0 or count[a] % 2 else 99)
    return answer


async def test_dynamic_filter_with_over_sampling(tok):
    client = FakeEngineClient(script=alternating_answers(tok), tokenizer=tok, eos_id=tok.eos_token_id)
    manager, _ = make_manager(tok, rows(20), client, rollout_batch_size=3, n_samples_per_prompt=2,
                              over_sampling_batch_size=4,
                              dynamic_sampling_filter_path="rollout.filters:nonzero_reward_std")
    batch = await manager.generate(0)
    groups = batch.groups()
    assert len(groups) == 3 and all(sorted(s.reward for s in g) == [0.0, 1.0] for g in groups)
    assert all((int(g[0].label) - 1) % 2 == 1 for g in groups)
    m = batch.metrics
    assert m["rollout/sampling_rounds"] == 2  # 4 prompts give 2 groups; a second round of 4 fills the batch
    assert m["rollout/dropped_groups_filter"] + m["rollout/returned_to_buffer"] + 3 == 8
    assert m["rollout/dropped_groups_filter"] >= 2


async def test_over_sampling_rounds_are_bounded(tok):
    always_right = FakeEngineClient(script=lambda ids: str(sum(question(tok, ids))), tokenizer=tok,
                                    eos_id=tok.eos_token_id)
    manager, _ = make_manager(tok, rows(50), always_right, rollout_batch_size=2, n_samples_per_prompt=2,
                              max_oversampling_rounds=2,
                              dynamic_sampling_filter_path="rollout.filters:nonzero_reward_std")
    batch = await manager.generate(0)  # every group has zero variance: all dropped, 3 rounds of 2
    assert batch.samples == [] and batch.metrics["rollout/sampling_rounds"] == 3
    assert batch.metrics["rollout/dropped_groups_filter"] == 6


async def fail_on_three(args, sample, sampling_params):
    if "What is 3 + 1?" in args.tokenizer.decode(sample.tokens):
        raise RuntimeError("tool crashed")
    return await generate(args, sample, sampling_params)


async def hang_on_three(args, sample, sampling_params):
    if "What is 3 + 1?" in args.tokenizer.decode(sample.tokens):
        await asyncio.sleep(30)
    return await generate(args, sample, sampling_params)


async def returns_garbage(args, sample, sampling_params):
    return "not a sample"


def not_async(args, sample, sampling_params):
    return sample


@pytest.mark.parametrize("fn, error", [("fail_on_three", "raised RuntimeError: tool crashed"),
                                       ("hang_on_three", "generate timed out after 0.2s")])
async def test_failing_generate_function_is_counted_and_refilled(tok, fn, error):
    manager, _ = make_manager(tok, rows(6), rollout_batch_size=4, n_samples_per_prompt=2, sample_timeout=0.2,
                              custom_generate_function_path=f"{MODULE}:{fn}")
    batch = await manager.generate(0)
    assert len(batch.groups()) == 4 and "4" not in {s.label for s in batch.samples}  # refilled from row 4
    assert len(batch.failed) == 2 and all(s.status == Status.FAILED and error in s.error for s in batch.failed)
    assert batch.metrics["rollout/failed_samples"] == 2 and batch.metrics["rollout/dropped_groups_failed"] == 1


async def test_generate_function_returning_garbage_fails_samples(tok):
    manager, _ = make_manager(tok, rows(1), rollout_batch_size=1, n_samples_per_prompt=2, max_oversampling_rounds=0,
                              custom_generate_function_path=f"{MODULE}:returns_garbage")
    batch = await manager.generate(0)
    assert batch.samples == [] and len(batch.failed) == 2 and "expected a Sample" in batch.failed[0].error


async def test_a_step_with_every_engine_down_logs_a_few_failures_not_every_sample(tok, caplog):
    client = FakeEngineClient(eos_id=tok.eos_token_id)
    client.down = True   # every request: EngineUnavailableError, and the router has no other engine
    manager, _ = make_manager(tok, rows(8), client=client, rollout_batch_size=8, n_samples_per_prompt=4,
                              max_oversampling_rounds=0)
    batch = await manager.generate(0)
    assert batch.samples == [] and len(batch.failed) == 32
    assert all("no healthy engine left to serve the request" in s.error or "fake is down" in s.error
               for s in batch.failed)
    warnings = [r.getMessage() for r in caplog.records if r.name == "rollout.manager"]
    assert sum(w.startswith("sample ") for w in warnings) == 20
    assert sum(w.startswith("more samples failed; the rest of this step's failures") for w in warnings) == 1


def slow_reward_on_two(args, sample):
    if sample.label == "3":
        import time
        time.sleep(0.5)
    return 1.0


async def test_reward_timeout_is_counted(tok):
    manager, _ = make_manager(tok, rows(4), rollout_batch_size=3, n_samples_per_prompt=2, reward_timeout=0.1,
                              custom_rm_path=f"{MODULE}:slow_reward_on_two")
    batch = await manager.generate(0)
    assert [g[0].label for g in batch.groups()] == ["1", "2", "4"]
    assert len(batch.failed) == 2 and "timed out after 0.1s" in batch.failed[0].error


async def doctor_and_patient(args, sample, sampling_params):
    doctor = await generate(args, sample, sampling_params)
    doctor.policy = "doctor"
    patient = Sample(index=sample.index, prompt="patient view", tokens=[5, 6, 7, 8], response_length=2,
                     loss_mask=[1, 1], rollout_logprobs=[-0.1, -0.2], status=Status.COMPLETED, policy="patient",
                     reward=0.5)
    return [doctor, patient]


async def test_multi_agent_lists_tagged_by_policy(tok):
    manager, _ = make_manager(tok, rows(2), rollout_batch_size=2, n_samples_per_prompt=2,
                              custom_generate_function_path=f"{MODULE}:doctor_and_patient")
    batch = await manager.generate(0)
    by_policy = batch.by_policy()
    assert len(by_policy["doctor"]) == 4 and len(by_policy["patient"]) == 4
    assert len({s.index for s in batch.samples}) == 8 and len(batch.groups()) == 2
    assert all(len(g) == 4 for g in batch.groups())
    assert all(s.reward == 0.5 for s in by_policy["patient"])  # a reward set by the function is kept


@pytest.mark.parametrize("partial", [True, False])
async def test_batch_full_aborts_the_rest_and_resumes_next_step(tok, partial):
    def delay(ids):  # "What is 0 + 1?" is fast, "What is 1 + 1?" slow
        return 0.01 if question(tok, ids)[0] == 0 else 0.05

    client = FakeEngineClient(token_delay=delay, response_len=6, eos_id=tok.eos_token_id)
    manager, _ = make_manager(tok, rows(2), client, rollout_batch_size=1, n_samples_per_prompt=1,
                              over_sampling_batch_size=2, partial_rollout=partial)
    first = await manager.generate(0)
    assert [s.label for s in first.samples] == ["1"] and first.metrics["rollout/returned_to_buffer"] == 1
    assert client.aborts == 1
    (slow,) = manager._buffer[0].samples
    prompt_len = len(manager._buffer[0].prompt.tokens)
    if partial:
        assert slow.status == Status.ABORTED and 0 < slow.response_length < 7
    else:
        assert slow.status == Status.PENDING and slow.response_length == 0
    sent = slow.tokens
    second = await manager.generate(1)
    (resumed,) = second.samples
    assert client.calls[-1]["input_ids"] == sent  # prompt (+ partial response with --partial-rollout)
    plan = client._plans[tuple(resumed.tokens[:prompt_len])]
    assert resumed.tokens[prompt_len:] == plan and resumed.status == Status.COMPLETED  # same as uninterrupted
    assert resumed.loss_mask == [1] * 7 and len(resumed.rollout_logprobs) == 7
    assert second.metrics["rollout/resumed_groups"] == (1 if partial else 0)
    with pytest.raises(DataExhausted):
        await manager.generate(2)


async def test_deadline_returns_what_is_done(tok):
    client = FakeEngineClient(token_delay=0.05, response_len=30, eos_id=tok.eos_token_id)
    manager, _ = make_manager(tok, rows(2), client, rollout_batch_size=2, n_samples_per_prompt=2,
                              rollout_deadline=0.2, partial_rollout=True)
    batch = await manager.generate(0)
    assert batch.samples == [] and batch.metrics["rollout/returned_to_buffer"] == 2
    assert all(s.status == Status.ABORTED for g in manager._buffer for s in g.samples)


async def test_state_dict_resumes_data_counters_and_buffer(tok):
    manager, _ = make_manager(tok, rows(12), data_config=DataConfig(rollout_shuffle=True), rollout_batch_size=3,
                              n_samples_per_prompt=2)
    await manager.generate(0)
    state = manager.state_dict()
    expected = await manager.generate(1)
    again, _ = make_manager(tok, rows(12), data_config=DataConfig(rollout_shuffle=True), rollout_batch_size=3,
                            n_samples_per_prompt=2)
    again.load_state_dict(state)
    got = await again.generate(1)
    key = [(s.index, s.group_index, s.label, tuple(s.tokens)) for s in expected.samples]
    assert [(s.index, s.group_index, s.label, tuple(s.tokens)) for s in got.samples] == key


async def test_save_and_load_debug_rollout_data(tok, tmp_path):
    path = str(tmp_path / "rollout_{step}.pt")
    manager, _ = make_manager(tok, rows(2), rollout_batch_size=2, n_samples_per_prompt=2, save_debug_rollout_data=path)
    saved = await manager.generate(3)
    assert (tmp_path / "rollout_3.pt").exists()
    client = FakeEngineClient()
    loader, _ = make_manager(tok, None, client, load_debug_rollout_data=path)
    loaded = await loader.generate(3)
    assert [s.to_dict() for s in loaded.samples] == [s.to_dict() for s in saved.samples] and client.calls == []
    assert loaded.metrics == saved.metrics
    with pytest.raises(FileNotFoundError, match="rollout_4.pt"):
        await loader.generate(4)


async def test_evaluate_uses_eval_sampling(tok):
    right_for_small = FakeEngineClient(script=lambda ids: str(sum(question(tok, ids)) if question(tok, ids)[0] < 3
                                                              else -1), tokenizer=tok, eos_id=tok.eos_token_id)
    manager, client = make_manager(tok, None, right_for_small, n_samples_per_eval_prompt=2, eval_temperature=0.0)
    metrics = await manager.evaluate(PromptDataset(DataConfig(), tok, rows(4)))
    assert metrics["eval/reward_mean"] == pytest.approx(3 / 4) and metrics["eval/num_samples"] == 8
    assert all(c["sampling_params"]["temperature"] == 0.0 for c in client.calls)


def test_bad_plugin_path_fails_at_construction(tok):
    with pytest.raises(ImportError, match="no attribute 'missing'"):
        make_manager(tok, rows(1), custom_generate_function_path="rollout.generate:missing")
    with pytest.raises(TypeError, match="must be `async def"):
        make_manager(tok, rows(1), custom_generate_function_path=f"{MODULE}:not_async")


def dict_reward(args, sample):
    return {"accuracy": 1.0}


async def test_reward_dict_without_reward_key_fails_the_group(tok):
    manager, _ = make_manager(tok, rows(1), rollout_batch_size=1, n_samples_per_prompt=2,
                              custom_rm_path=f"{MODULE}:dict_reward", max_oversampling_rounds=0)
    batch = await manager.generate(0)
    assert batch.samples == []
    assert "the reward is a dict (keys: ['accuracy']); set --reward-key" in batch.failed[0].error
    manager, _ = make_manager(tok, rows(1), rollout_batch_size=1, n_samples_per_prompt=2,
                              custom_rm_path=f"{MODULE}:dict_reward", reward_key="accuracy")
    batch = await manager.generate(0)
    assert batch.metrics["rollout/reward_mean"] == 1.0 and batch.samples[0].reward == {"accuracy": 1.0}


def centre_rewards(args, samples):
    """A batch-level reward hook: rewards minus the batch mean, plus the number of samples (so the call is visible)."""
    mean = sum(s.reward for s in samples) / len(samples)
    return [s.reward - mean + len(samples) for s in samples]


def broken_post_process(args, samples):
    return [1.0]  # one value for the whole batch: wrong length


async def test_reward_post_process_replaces_rewards_and_keeps_the_raw_ones(tok):
    client = FakeEngineClient(script=alternating_answers(tok), tokenizer=tok, eos_id=tok.eos_token_id)
    manager, _ = make_manager(tok, rows(8), client, rollout_batch_size=3, n_samples_per_prompt=2,
                              custom_reward_post_process_path="tests.test_rollout_manager:centre_rewards")
    batch = await manager.generate(0)
    raw = [s.metadata["raw_reward"] for s in batch.samples]
    assert len(batch.samples) == 6 and sorted(set(raw)) == [0.0, 1.0]
    mean = sum(raw) / 6
    assert [s.reward for s in batch.samples] == pytest.approx([r - mean + 6 for r in raw])
    assert batch.metrics["rollout/post_processed_reward_mean"] == pytest.approx(6.0)


async def test_broken_reward_post_process_fails_the_batch_not_the_run(tok):
    client = FakeEngineClient(script=alternating_answers(tok), tokenizer=tok, eos_id=tok.eos_token_id)
    manager, _ = make_manager(tok, rows(8), client, rollout_batch_size=2, n_samples_per_prompt=2,
                              custom_reward_post_process_path="tests.test_rollout_manager:broken_post_process")
    batch = await manager.generate(0)
    assert batch.samples == [] and len(batch.failed) == 4
    assert all(s.status == Status.FAILED and "got 1 values for 4 samples" in s.error for s in batch.failed)
    batch = await manager.generate(1)  # the manager goes on with the next step
    assert len(batch.failed) == 4

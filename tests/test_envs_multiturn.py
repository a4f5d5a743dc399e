"""Multi-turn episodes with a scripted fake engine: token exactness, masks, log-probs, limits and failures."""

import asyncio

import pytest
from transformers import AutoTokenizer

from envs import Env, StepResult
from envs.arithmetic import ArithmeticEnv, arithmetic_samples
from envs.multiturn import ChatDelta, run_episode
from kiln_common.sample import Sample, Status


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


class ScriptedClient:
    """Returns scripted turns as the engine would: output ids (tokenised text + eos) and log-probs."""

    def __init__(self, tok, turns, *, add_eos=True, finish="stop", weight_version=3):
        self.tok, self.turns, self.add_eos, self.finish, self.version = (
            tok, list(turns), add_eos, finish, weight_version
        )
        self.seen: list[list[int]] = []
        self.outputs: list[list[int]] = []
        self.params: list[dict] = []

    async def generate(self, input_ids, sampling_params, return_logprob=True, session_id=None):
        assert return_logprob
        self.seen.append(list(input_ids))
        self.params.append(dict(sampling_params))
        text = self.turns[len(self.seen) - 1]
        ids = self.tok.encode(text, add_special_tokens=False) + ([self.tok.eos_token_id] if self.add_eos else [])
        ids = ids[:sampling_params["max_new_tokens"]]
        self.outputs.append(ids)
        logprobs = [(-0.01 * (len(self.seen) * 100 + k + 1), t, None) for k, t in enumerate(ids)]
        return {"text": self.tok.decode(ids, skip_special_tokens=True), "output_ids": ids,
                "meta_info": {"output_token_logprobs": logprobs, "finish_reason": {"type": self.finish},
                              "weight_version": self.version + len(self.seen) - 1}}


def _calc(expr):
    return f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{expr}"}}}}</tool_call>'


async def test_five_tool_turns_are_token_exact(tok):
    sample = arithmetic_samples(1, seed=7)[0]
    expression = sample.prompt.removeprefix("What is ").removesuffix("?")
    turns = [f"Let me compute.\n{_calc(expression)}", f"Check again: {_calc(expression + ' + 0')}",
             f"{_calc('1 +')} oops", f"Once more {_calc(expression)}\n{_calc('2*3')}", f"Fine. {_calc('7*6')}",
             f"Answer: {sample.label}"]
    client = ScriptedClient(tok, turns)
    out = await run_episode(client, tok, ArithmeticEnv(), sample, {"temperature": 1.0, "max_new_tokens": 64},
                            max_turns=8, max_total_tokens=4096, step_timeout=5.0)
    assert out.status is Status.COMPLETED and out.error is None and out.reward == 1.0
    assert out.metadata["turns"] == 6 and out.metadata["weight_versions"] == [3, 4, 5, 6, 7, 8]
    assert out.weight_version == 3
    out.validate()
    # the engine saw, every turn, exactly the previous input + its own output + the new observation
    for k in range(1, len(client.seen)):
        prev = client.seen[k - 1] + client.outputs[k - 1]
        assert client.seen[k][:len(prev)] == prev
    assert out.tokens[:len(client.seen[-1])] == client.seen[-1]
    assert out.tokens == client.seen[-1] + client.outputs[-1]
    # decoding the tokens gives the chat-template rendering of the whole conversation
    messages = out.metadata["messages"]
    assert [m["role"] for m in messages] == ["system", "user"] + ["assistant", "user"] * 5 + ["assistant"]
    assert "error: calculator failed: CalculatorError: cannot parse" in messages[7]["content"]  # back to the model
    expected = tok.apply_chat_template(messages, tokenize=False)
    assert expected.endswith("<|im_end|>\n")
    assert tok.decode(out.tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False) == expected[:-1]
    # policy tokens: mask 1 with the engine's log-probs; everything else mask 0 and log-prob 0.0
    prompt_len = len(client.seen[0])
    assert out.prompt_length == prompt_len
    expected_mask, expected_lp = [], []
    for k, ids in enumerate(client.outputs):
        start = len(client.seen[k]) - prompt_len
        gap = start - len(expected_mask)
        expected_mask += [0] * gap + [1] * len(ids)
        expected_lp += [0.0] * gap + [-0.01 * ((k + 1) * 100 + j + 1) for j in range(len(ids))]
    assert out.loss_mask == expected_mask and out.rollout_logprobs == pytest.approx(expected_lp)
    assert sum(out.loss_mask) == sum(map(len, client.outputs))


async def test_turn_without_eos_is_closed_by_the_template(tok):
    sample = arithmetic_samples(1)[0]
    client = ScriptedClient(tok, [_calc("1+1"), f"Answer: {sample.label}"], add_eos=False)
    out = await run_episode(client, tok, ArithmeticEnv(), sample, {}, max_turns=3, max_total_tokens=2048,
                            step_timeout=5.0)
    assert out.status is Status.COMPLETED
    expected = tok.apply_chat_template(out.metadata["messages"], tokenize=False)
    assert tok.decode(out.tokens, skip_special_tokens=False) == expected[:-len("<|im_end|>\n")]


async def test_chat_delta_renders_only_the_new_turn(tok):
    chat = ChatDelta(tok)
    assert chat.turn_end == "<|im_end|>\n"
    assert chat.turn_text("user", "obs") == "<|im_start|>user\nobs<|im_end|>\n<|im_start|>assistant\n"
    ids = chat.observation_ids([5, tok.eos_token_id], "user", "obs")
    assert tok.decode(ids) == "\n<|im_start|>user\nobs<|im_end|>\n<|im_start|>assistant\n"


async def test_max_turns_and_max_total_tokens_truncate(tok):
    sample = arithmetic_samples(1)[0]
    client = ScriptedClient(tok, [_calc("1+1")] * 3)
    out = await run_episode(client, tok, ArithmeticEnv(), sample, {}, max_turns=3, max_total_tokens=4096,
                            step_timeout=5.0)
    assert out.status is Status.TRUNCATED and out.metadata["turns"] == 3 and out.reward == 0.0
    assert out.tokens == client.seen[-1] + client.outputs[-1]  # the last observation is not appended
    prompt_len = len(client.seen[0])
    limit = prompt_len + 60
    client = ScriptedClient(tok, [_calc("1+1")] * 10)
    out = await run_episode(client, tok, ArithmeticEnv(), sample, {"max_new_tokens": 1000}, max_turns=10,
                            max_total_tokens=limit, step_timeout=5.0)
    assert out.status is Status.TRUNCATED and len(out.tokens) <= limit
    assert all(len(s) + p["max_new_tokens"] <= limit for s, p in zip(client.seen, client.params))
    out.validate()


class _RaisingEnv(Env):
    env_name = "raising_env"

    async def reset(self, sample):
        return "q"

    async def step(self, action_text):
        raise RuntimeError("database gone")


class _SlowEnv(Env):
    async def reset(self, sample):
        return "q"

    async def step(self, action_text):
        await asyncio.sleep(30)


class _ChattyEnv(Env):
    async def reset(self, sample):
        return "q"

    async def step(self, action_text):
        await asyncio.sleep(0.05)
        return StepResult("more", 0.25, False)


async def test_env_failures_mark_the_sample_failed_and_keep_partial_tokens(tok):
    out = await run_episode(ScriptedClient(tok, ["hi"]), tok, _RaisingEnv(), Sample(index=4), {}, max_turns=3,
                            max_total_tokens=512, step_timeout=1.0)
    assert out.status is Status.FAILED
    assert out.error == "env 'raising_env' failed at step 1: RuntimeError: database gone"
    assert out.response_length > 0 and out.loss_mask == [1] * out.response_length
    slow = await run_episode(ScriptedClient(tok, ["hi"]), tok, _SlowEnv(), Sample(), {}, max_turns=3,
                             max_total_tokens=512, step_timeout=0.05)
    assert slow.status is Status.FAILED and "failed at step 1: no answer within 0.05s" in slow.error


async def test_episode_timeout_aborts_with_consistent_partial_sample(tok):
    out = await run_episode(ScriptedClient(tok, ["x"] * 100), tok, _ChattyEnv(), Sample(), {}, max_turns=100,
                            max_total_tokens=100_000, step_timeout=1.0, episode_timeout=0.3)
    assert out.status is Status.ABORTED and "episode_timeout=0.3s" in out.error
    out.validate()
    assert 1 <= out.metadata["turns"] < 100 and out.reward == pytest.approx(0.25 * len(out.metadata["step_rewards"]))


async def test_bad_engine_response_fails_the_sample(tok):
    class Broken:
        async def generate(self, **kw):
            return {"text": "x", "output_ids": [1, 2], "meta_info": {"output_token_logprobs": [(-1.0, 1, None)]}}

    out = await run_episode(Broken(), tok, _ChattyEnv(), Sample(), {}, max_turns=2, max_total_tokens=512,
                            step_timeout=1.0)
    assert out.status is Status.FAILED and "2 output ids but 1 log-probs" in out.error
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        await run_episode(Broken(), tok, _ChattyEnv(), Sample(), {}, max_turns=0, max_total_tokens=512,
                          step_timeout=1.0)

"""Rewards: math answer extraction and normalisation, exact match, format, remote RM, scorer failures."""

import json
import time

import httpx
import pytest

from rollout.config import RolloutConfig
from rollout.rewards import (RemoteRewardModel, RewardScorer, answers_match, exact_match_reward, extract_answer,
                             format_reward, math_reward, normalize_answer)
from kiln_common.sample import Sample, Status


@pytest.mark.parametrize("a, b", [
    ("1,000", "1000"), ("1000", "1000.0"), ("1,000.50", "1000.5"), ("0.5", "1/2"), ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{3}{4}", "0.75"), ("\\frac12", "1/2"), ("$42$", "42"), ("\\text{42}", "42"), ("x = 5", "5"),
    ("50\\%", "50"), ("90^\\circ", "90"), ("-3", "-3.00"), ("\\boxed{7}", "7"), ("2/4", "1/2"),
    ("\\sqrt{2}", "\\sqrt{2}"), ("\\left( 1 \\right)", "(1)"), ("12.", "12"),
])
def test_equivalent_answers(a, b):
    assert answers_match(a, b)


@pytest.mark.parametrize("a, b", [("1,00", "100"), ("1000", "100"), ("0.5", "0.25"), ("\\sqrt{2}", "\\sqrt{3}"),
                                  ("7", None), (None, "7"), ("1, 2", "12")])
def test_different_answers(a, b):
    assert not answers_match(a, b)


def test_normalize_is_canonical():
    assert normalize_answer("1,000.0") == "1000" and normalize_answer("\\frac{2}{4}") == "1/2"


@pytest.mark.parametrize("text, answer", [
    ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{3}, then \\boxed{ {4} }", " {4} "),
    ("3 apples and 4 pears make 7", "7"),
    ("The total is 1,234.5 dollars.", "1,234.5"),
    ("it is -2/3", "-2/3"),
    ("no answer here", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_math_exact_and_format_rewards():
    assert math_reward("Thus the answer is \\boxed{1,000}", "1000") == 1.0
    assert math_reward("I think 12 or maybe 13", "12") == 0.0  # the last number counts
    assert math_reward("", "1") == 0.0
    assert exact_match_reward("  Paris \n", "Paris") == 1.0 and exact_match_reward("paris", "Paris") == 0.0
    assert format_reward("<think>x</think>\n<answer>4</answer>", r"<think>.*</think>\s*<answer>.*</answer>") == 1.0
    assert format_reward("<answer>4</answer>", r"<think>.*</think>\s*<answer>.*</answer>") == 0.0


def done(response, label, index=0):
    return Sample(index=index, response=response, label=label, status=Status.COMPLETED)


async def test_scorer_builtin_math_skips_rewarded_and_unfinished():
    scorer = RewardScorer(RolloutConfig(), args=None)
    samples = [done("\\boxed{4}", "4", 0), done("5", "4", 1), Sample(index=2, status=Status.ABORTED, label="4"),
               Sample(index=3, reward=0.25, status=Status.COMPLETED)]
    await scorer.score(samples)
    assert [s.reward for s in samples] == [1.0, 0.0, None, 0.25]


def slow_reward(args, sample):
    time.sleep(0.3)
    return 1.0


def broken_reward(args, sample):
    if sample.index == 1:
        raise ZeroDivisionError("boom")
    return {"score": 0.5, "format": 1.0}


def batched_reward(args, samples):
    return [float(s.response == s.label) for s in samples]


def wrong_length_reward(args, samples):
    return [1.0]


async def test_scorer_timeout_and_raise_mark_failed():
    slow = RewardScorer(RolloutConfig(custom_rm_path="test_rewards:slow_reward", reward_timeout=0.05), None)
    s = done("x", "y")
    await slow.score([s])
    assert s.status == Status.FAILED and s.reward is None and "timed out after 0.05s" in s.error
    broken = RewardScorer(RolloutConfig(custom_rm_path="test_rewards:broken_reward"), None)
    samples = [done("a", "a", 0), done("b", "b", 1)]
    await broken.score(samples)
    assert samples[0].reward == {"score": 0.5, "format": 1.0} and samples[0].status == Status.COMPLETED
    assert samples[1].status == Status.FAILED and "ZeroDivisionError: boom" in samples[1].error


async def test_batched_custom_reward():
    scorer = RewardScorer(RolloutConfig(custom_rm_path="test_rewards:batched_reward", group_rm=True), None)
    samples = [done("a", "a"), done("b", "c")]
    await scorer.score(samples)
    assert [s.reward for s in samples] == [1.0, 0.0]
    bad = RewardScorer(RolloutConfig(custom_rm_path="test_rewards:wrong_length_reward", group_rm=True), None)
    samples = [done("a", "a"), done("b", "c")]
    await bad.score(samples)
    assert all(s.status == Status.FAILED and "expected a list of 2 rewards" in s.error for s in samples)


async def test_remote_reward_model():
    seen = []

    def handler(request):
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(200, json={"reward": 1.0 if body["response"] == body["label"] else 0.0})

    rm = RemoteRewardModel("http://rm:8000/score", transport=httpx.MockTransport(handler))
    sample = Sample(prompt="2+2?", response="4", label="4", metadata={"k": 1})
    assert await rm(None, sample) == 1.0
    assert seen == [{"prompt": "2+2?", "response": "4", "label": "4", "metadata": {"k": 1}}]
    failing = RemoteRewardModel("http://rm:8000/score",
                                transport=httpx.MockTransport(lambda r: httpx.Response(500, text="oops")))
    with pytest.raises(RuntimeError, match="answered 500: oops"):
        await failing(None, sample)


async def test_remote_rm_unreachable_fails_the_sample():
    scorer = RewardScorer(RolloutConfig(rm_type="remote", rm_url="http://127.0.0.1:9/score", reward_timeout=5), None)
    s = done("4", "4")
    await scorer.score([s])
    assert s.status == Status.FAILED and "ConnectError" in s.error


def test_quickstart_reward():
    from examples.quickstart.reward import arithmetic_reward
    assert arithmetic_reward(None, done("7", "7")) == 1.0
    assert arithmetic_reward(None, done(" 7<|im_end|>", "7")) == 1.0
    assert arithmetic_reward(None, done("7 8", "7")) == 0.0
    assert arithmetic_reward(None, done("17", "7")) == 0.0
    truncated = done("7", "7")
    truncated.status = Status.TRUNCATED
    assert arithmetic_reward(None, truncated) == 0.0

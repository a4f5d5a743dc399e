"""Sample.append, the one way to extend a response, and rollout.generate.append_response on top of it."""

import pytest

from kiln_common.sample import Sample, Status
from rollout.client import EngineError
from rollout.generate import append_response


def test_policy_tokens_carry_their_logprobs_and_mask_1():
    s = Sample(index=3, tokens=[10, 11])
    s.append([20, 21, 22], [-0.5, -1.0, -0.25], loss_mask=1, text="abc")
    assert s.tokens == [10, 11, 20, 21, 22]
    assert s.response_length == 3 and s.prompt_length == 2 and s.response_tokens == [20, 21, 22]
    assert s.loss_mask == [1, 1, 1]
    assert s.rollout_logprobs == [-0.5, -1.0, -0.25]
    assert s.response == "abc"
    s.validate()


def test_env_tokens_get_mask_0_and_logprob_0():
    s = Sample(tokens=[1])
    s.append([7, 8], loss_mask=0)
    assert s.tokens == [1, 7, 8] and s.response_length == 2
    assert s.loss_mask == [0, 0] and s.rollout_logprobs == [0.0, 0.0] and s.response == ""
    s.validate()


def test_mixed_appends_keep_the_invariant():
    s = Sample(tokens=[100, 101, 102])
    s.append([5, 6], [-0.1, -0.2], loss_mask=1, text="ab")
    s.append([9], loss_mask=0, text="|")
    s.append([], loss_mask=0)
    s.append([4, 3, 2], [-1.5, -2.5, -3.5], loss_mask=1, text="xyz")
    s.append([8, 8], loss_mask=0)
    assert s.tokens == [100, 101, 102, 5, 6, 9, 4, 3, 2, 8, 8]
    assert s.response_length == 8 and s.prompt_length == 3
    assert s.loss_mask == [1, 1, 0, 1, 1, 1, 0, 0]
    assert s.rollout_logprobs == [-0.1, -0.2, 0.0, -1.5, -2.5, -3.5, 0.0, 0.0]
    assert s.response == "ab|xyz"
    s.validate()


def test_append_never_mutates_shared_lists():
    prompt, mask, logprobs = [1, 2], [], []
    s = Sample(tokens=prompt, loss_mask=mask, rollout_logprobs=logprobs)
    s.append([3], [-1.0], loss_mask=1)
    assert prompt == [1, 2] and mask == [] and logprobs == []
    assert s.tokens == [1, 2, 3]


@pytest.mark.parametrize("tokens, logprobs, mask, problem", [
    ([1, 2, 3], [-0.1, -0.2], 1, r"sample 4: 3 tokens but 2 log-probs"),
    ([1], [-0.1, -0.2], 1, r"sample 4: 1 tokens but 2 log-probs"),
    ([1, 2], None, 1, r"sample 4: 2 tokens with loss_mask 1 need their log-probs"),
    ([1, 2], [-0.1, -0.2], 0, r"sample 4: tokens with loss_mask 0 get log-prob 0.0; got 2 log-probs"),
    ([1], [-0.1], 2, r"sample 4: loss_mask = 2; expected 1 .* or 0"),
])
def test_bad_appends_raise_and_leave_the_sample_alone(tokens, logprobs, mask, problem):
    s = Sample(index=4, tokens=[9], response_length=0)
    with pytest.raises(ValueError, match=problem):
        s.append(tokens, logprobs, loss_mask=mask)
    assert s.tokens == [9] and s.response_length == 0 and s.loss_mask == [] and s.rollout_logprobs == []


def test_append_refuses_an_inconsistent_sample():
    s = Sample(index=5, tokens=[1, 2, 3], response_length=2, loss_mask=[1, 1], rollout_logprobs=[])
    with pytest.raises(ValueError, match=r"sample 5: cannot append to a response of 2 tokens with 2 loss-mask "
                                         r"entries and 0 log-probs"):
        s.append([4], loss_mask=0)


def _response(ids, logprobs, finish="stop", **meta):
    return {"text": "t", "output_ids": ids,
            "meta_info": {"output_token_logprobs": [(lp, t, None) for lp, t in zip(logprobs, ids)],
                          "finish_reason": {"type": finish}, **meta}}


def test_append_response_sets_status_and_weight_version():
    s = Sample(tokens=[1, 2])
    append_response(s, _response([3, 4], [-0.5, -0.75], weight_version=7))
    assert s.tokens == [1, 2, 3, 4] and s.loss_mask == [1, 1] and s.rollout_logprobs == [-0.5, -0.75]
    assert s.status is Status.COMPLETED and s.weight_version == 7 and s.response == "t"
    append_response(s, _response([5], [-2.0], finish="length"))  # no weight_version: unchanged
    assert s.status is Status.TRUNCATED and s.weight_version == 7
    append_response(s, _response([6], [-3.0], finish="abort"), loss_mask=0)  # another policy's tokens
    assert s.status is Status.ABORTED
    assert s.loss_mask == [1, 1, 1, 0] and s.rollout_logprobs == [-0.5, -0.75, -2.0, 0.0] and s.response == "ttt"
    s.validate()


@pytest.mark.parametrize("response, problem", [
    ({"output_ids": [1, 2], "meta_info": {"output_token_logprobs": [(-1.0, 1, None)]}},
     "sample 6: engine returned 2 output ids but 1 log-probs"),
    ({"output_ids": [1, 2], "meta_info": {"output_token_logprobs": [(-1.0, 1, None), (-1.0, 3, None)]}},
     "sample 6: log-prob entry 1 is for token 3, but output id 1 is 2"),
    ({"output_ids": [1], "meta_info": {}}, "sample 6: no meta_info.output_token_logprobs"),
    ({"meta_info": {}}, "sample 6: no 'output_ids' list"),
    (_response([1], [-1.0], finish="weird"), "unknown finish_reason"),
])
def test_append_response_rejects_malformed_responses(response, problem):
    s = Sample(index=6, tokens=[1])
    with pytest.raises(EngineError, match=problem):
        append_response(s, response)
    assert s.tokens == [1] and s.response_length == 0 and s.status is Status.PENDING

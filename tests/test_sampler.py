"""Sampler on hand-made logits rows: truncation filters, penalties, log-probs before truncation, seeded draws."""

import math

import torch

from inference_engine.sampler import SamplingBatch, apply_penalties, filter_probs, sample
from inference_engine.sampling_params import SamplingParams

PROBS = torch.tensor([[0.0625, 0.375, 0.125, 0.25, 0.1875]])  # exact in binary; sorted order: 1, 3, 4, 2, 0


def batch(rows=1, vocab=5, **kw):
    base = dict(temperatures=torch.ones(rows), greedy=torch.zeros(rows, dtype=torch.bool),
                top_k=torch.full((rows,), vocab), top_p=torch.ones(rows), min_p=torch.zeros(rows),
                repetition_penalty=None, frequency_penalty=None, presence_penalty=None, seen_mask=None,
                output_counts=None, generators=[None] * rows, top_logprobs_num=0)
    base.update(kw)
    return SamplingBatch(**base)


def kept(top_k=5, top_p=1.0, min_p=0.0):
    out = filter_probs(PROBS, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))
    return set(torch.nonzero(out[0]).flatten().tolist())


def test_top_k_top_p_min_p_keep_exactly_the_expected_tokens():
    assert kept(top_k=2) == {1, 3}
    assert kept(top_k=1) == {1}
    assert kept(top_p=0.375) == {1}  # 0.375 reaches 0.375
    assert kept(top_p=0.38) == {1, 3}
    assert kept(top_p=0.8125) == {1, 3, 4}  # 0.375 + 0.25 + 0.1875
    assert kept(top_p=0.82) == {1, 3, 4, 2}
    assert kept(min_p=0.5) == {1, 3, 4}  # >= 0.5 * 0.375
    assert kept(min_p=0.51) == {1, 3}
    assert kept(top_k=3, top_p=0.5, min_p=0.0) == {1, 3}
    assert kept(top_p=1e-6) == {1}  # the top token always survives
    out = filter_probs(PROBS, torch.tensor([3]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert torch.equal(out, torch.tensor([[0.0, 0.375, 0.0, 0.25, 0.1875]]))


def test_penalties_follow_hf_and_openai_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_penalties(logits, batch(vocab=4, repetition_penalty=torch.tensor([2.0]), seen_mask=seen))
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    counts = torch.tensor([[0.0, 3.0, 1.0, 0.0]])
    out = apply_penalties(logits, batch(vocab=4, frequency_penalty=torch.tensor([0.5]),
                                        presence_penalty=torch.tensor([0.25]), output_counts=counts))
    assert torch.allclose(out, torch.tensor([[2.0, -1.0 - 1.5 - 0.25, 0.5 - 0.5 - 0.25, 3.0]]))


def test_logprobs_are_of_the_tempered_distribution_before_truncation():
    logits = torch.tensor([[1.0, 2.0, 0.5, 1.5, 0.0]])
    out = sample(logits, batch(temperatures=torch.tensor([0.5]), top_k=torch.tensor([1]),
                               greedy=torch.tensor([False]), top_logprobs_num=2), torch.Generator().manual_seed(0))
    assert out.tokens.tolist() == [1]  # top_k=1 leaves only the argmax
    expected = torch.log_softmax(logits / 0.5, -1)
    assert math.isclose(out.logprobs.item(), expected[0, 1].item(), abs_tol=1e-6)
    assert out.top_ids.tolist() == [[1, 3]]


def test_sampling_frequencies_follow_the_filtered_distribution_and_seeds_reproduce():
    logits = PROBS.log().repeat(4000, 1)
    sb = batch(rows=4000, top_k=torch.full((4000,), 3))  # keeps 1, 3, 4, renormalised
    tokens = sample(logits, sb, torch.Generator().manual_seed(1)).tokens
    freq = torch.bincount(tokens, minlength=5).float() / 4000
    assert freq[0] == 0 and freq[2] == 0
    assert torch.allclose(freq[[1, 3, 4]], torch.tensor([0.375, 0.25, 0.1875]) / 0.8125, atol=0.03)
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(6)]  # noqa: E731
    logits6 = torch.randn(6, 50)
    a = sample(logits6, batch(rows=6, vocab=50, generators=gens()), torch.Generator().manual_seed(1)).tokens
    b = sample(logits6, batch(rows=6, vocab=50, generators=gens()), torch.Generator().manual_seed(2)).tokens
    assert torch.equal(a, b)  # seeded rows ignore the shared generator


def test_sampling_params_validation():
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert SamplingParams.from_dict({"stop": "x"}).stop == ["x"]
    for bad in [{"top_k": 0}, {"min_p": 1.5}, {"n": 0}, {"repetition_penalty": 0}, {"frequency_penalty": 3},
                {"stop": [""]}, {"max_new_tokens": 1.5}, {"ignore_eos": "yes"}]:
        try:
            SamplingParams.from_dict(bad)
        except ValueError as e:
            assert next(iter(bad)) in str(e)
        else:
            raise AssertionError(f"{bad} accepted")


def test_all_greedy_fast_path_matches_float64_log_softmax():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 1000, generator=g) * 4
    sb = batch(rows=3, vocab=1000, greedy=torch.ones(3, dtype=torch.bool), all_greedy=True)
    out = sample(logits, sb, torch.Generator().manual_seed(0))
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert out.tokens.tolist() == logits.argmax(dim=-1).tolist()
    assert torch.allclose(out.logprobs.double(), ref.gather(-1, out.tokens[:, None])[:, 0], atol=1e-5)
    assert out.top_logprobs is None

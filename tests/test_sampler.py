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
                output_counts=None, seeds=torch.arange(rows), offsets=torch.zeros(rows, dtype=torch.int64),
                top_logprobs_num=0)
    base.update(kw)
    return SamplingBatch(**base)


def kept(top_k=5, top_p=1.0, min_p=0.0, probs=PROBS):
    out = filter_probs(probs, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))
    assert torch.equal(out[out > 0], probs[out > 0])  # survivors keep their probability (not renormalised)
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


def test_tied_tokens_survive_or_go_together():
    tied = torch.tensor([[0.25, 0.125, 0.25, 0.25, 0.125]])  # a sort would keep 1 or 2 of the three 0.25s
    assert kept(top_k=1, probs=tied) == {0, 2, 3}  # all most likely tokens survive
    assert kept(top_k=3, probs=tied) == {0, 2, 3}  # count(p > 0.125) = 3 is not < 3
    assert kept(top_k=4, probs=tied) == {0, 1, 2, 3, 4}
    assert kept(top_p=0.75, probs=tied) == {0, 2, 3}  # mass(p > 0.125) = 0.75 is not < 0.75
    assert kept(top_p=0.76, probs=tied) == {0, 1, 2, 3, 4}
    assert kept(min_p=0.5, probs=tied) == {0, 1, 2, 3, 4}  # 0.125 >= 0.5 * 0.25
    assert kept(min_p=0.51, probs=tied) == {0, 2, 3}
    assert kept(top_k=0, top_p=0.0, probs=tied) == {0, 2, 3}  # even with nothing allowed


def test_top_p_one_keeps_the_tail_of_a_row_summing_past_one():
    row = torch.tensor([[0.5, 0.5, 2.0 ** -30]])  # sums past 1, as a float32 softmax may
    assert kept(top_p=1.0, probs=row) == {0, 1, 2}  # mass(p > 2^-30) = 1 is not < 1, but top_p = 1 is off
    assert kept(top_p=0.999, probs=row) == {0, 1}


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
                               greedy=torch.tensor([False]), top_logprobs_num=2))
    assert out.tokens.tolist() == [1]  # top_k=1 leaves only the argmax
    expected = torch.log_softmax(logits / 0.5, -1)
    assert math.isclose(out.logprobs.item(), expected[0, 1].item(), abs_tol=1e-6)
    assert out.top_ids.tolist() == [[1, 3]]


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = PROBS.log().repeat(4000, 1)
    sb = batch(rows=4000, top_k=torch.full((4000,), 3))  # keeps 1, 3, 4, renormalised; rows = 4000 seeds
    tokens = sample(logits, sb).tokens
    freq = torch.bincount(tokens, minlength=5).float() / 4000
    assert freq[0] == 0 and freq[2] == 0
    assert torch.allclose(freq[[1, 3, 4]], torch.tensor([0.375, 0.25, 0.1875]) / 0.8125, atol=0.03)
    draws = sample(logits, batch(rows=4000, seeds=torch.full((4000,), 9), offsets=torch.arange(4000))).tokens
    freq = torch.bincount(draws, minlength=5).float() / 4000  # one seed, 4000 successive draws
    assert torch.allclose(freq, PROBS[0], atol=0.03)


def test_seeded_rows_reproduce_whatever_their_batch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    seeds, offsets = torch.tensor([3, 3, 4, 5, 2**62, 0]), torch.tensor([0, 1, 0, 7, 2**40, 3])
    a = sample(logits, batch(rows=6, vocab=50, seeds=seeds, offsets=offsets)).tokens
    b = sample(logits, batch(rows=6, vocab=50, seeds=seeds, offsets=offsets)).tokens
    assert torch.equal(a, b)
    order = torch.tensor([5, 2, 0, 4, 1, 3])  # the same rows in another batch order, and one row alone
    c = sample(logits[order], batch(rows=6, vocab=50, seeds=seeds[order], offsets=offsets[order])).tokens
    assert torch.equal(c, a[order])
    alone = sample(logits[3:4], batch(rows=1, vocab=50, seeds=seeds[3:4], offsets=offsets[3:4])).tokens
    assert alone.tolist() == a[3:4].tolist()
    flat = torch.zeros(1, 50)  # uniform row: successive draws of one seed differ, and other seeds differ
    draws = [sample(flat, batch(vocab=50, seeds=torch.tensor([s]), offsets=torch.tensor([o]))).tokens.item()
             for s in (1, 2) for o in range(20)]
    assert len(set(draws[:20])) > 5 and draws[:20] != draws[20:]


def test_race_noise_is_exponential_and_keys_separate_streams():
    from inference_engine.ops import reference

    keys = reference.race_keys(torch.tensor([0, 1, 2**33]), torch.tensor([0, 0, 0]))
    assert len(set(keys.tolist())) == 3 and all(0 <= k < 2**32 for k in keys.tolist())
    noise = reference.race_noise(keys, 200_000).double()  # [3, V]
    assert torch.isfinite(noise).all() and (noise > 0).all()
    assert torch.allclose(noise.mean(dim=1), torch.ones(3, dtype=torch.float64), atol=0.01)  # Exp(1): mean 1
    assert torch.allclose((noise > 1).double().mean(dim=1), torch.full((3,), math.exp(-1), dtype=torch.float64),
                          atol=0.005)  # P(E > 1) = 1/e
    corr = torch.corrcoef(noise)[0, 1:]
    assert corr.abs().max() < 0.01


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
    out = sample(logits, sb)
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert out.tokens.tolist() == logits.argmax(dim=-1).tolist()
    assert torch.allclose(out.logprobs.double(), ref.gather(-1, out.tokens[:, None])[:, 0], atol=1e-5)
    assert out.top_logprobs is None

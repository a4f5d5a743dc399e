"""Chunked fused output-projection + log-probs equals a full float64 log_softmax gather (values and grads)."""

import pytest
import torch

from trainer.logprobs import chunked_logprobs, vocab_parallel_logprobs
from trainer.testing import run_distributed

VOCAB, PADDED, HIDDEN, TOKENS = 50, 56, 12, 23


def _data(dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(PADDED, HIDDEN, generator=g, dtype=torch.float64) / 2
    weight[VOCAB:] = 5.0  # vocabulary padding rows: large, so including them by mistake would show
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    return hidden.to(device, dtype), weight.to(device, dtype), targets.to(device)


def _reference(hidden, weight, targets, temperature):
    """float64 log_softmax gather and entropy over the real vocabulary."""
    logp_all = torch.log_softmax((hidden @ weight[:VOCAB].t()) / temperature, dim=-1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_values_and_grads_match_full_log_softmax(chunk):
    hidden, weight, targets = _data()
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, entropy = chunked_logprobs(h, w, targets, vocab_start=0, vocab_size=VOCAB, temperature=0.7,
                                     with_entropy=True, chunk_tokens=chunk)
    rh, rw = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_logp, ref_entropy = _reference(rh, rw, targets, 0.7)
    assert logp.dtype == torch.float32
    assert (logp.double() - ref_logp).abs().max() < 1e-5
    assert (entropy.double() - ref_entropy).abs().max() < 1e-5
    g1, g2 = torch.randn(TOKENS, dtype=torch.float64), torch.randn(TOKENS, dtype=torch.float64)
    ((logp * g1).sum() + (entropy * g2).sum()).backward()
    ((ref_logp * g1).sum() + (ref_entropy * g2).sum()).backward()
    assert (h.grad - rh.grad).abs().max() < 1e-5
    assert (w.grad - rw.grad).abs().max() < 1e-5
    assert torch.all(w.grad[VOCAB:] == 0)


def test_chunked_equals_vocab_parallel_on_full_logits_without_entropy():
    hidden, weight, targets = _data(torch.float32)
    logp, entropy = chunked_logprobs(hidden, weight, targets, vocab_start=0, vocab_size=VOCAB, chunk_tokens=4)
    full, _ = vocab_parallel_logprobs(hidden @ weight.t(), targets, vocab_start=0, vocab_size=VOCAB)
    assert entropy is None
    assert (logp - full).abs().max() < 1e-6


def test_bad_arguments_name_the_value():
    hidden, weight, targets = _data(torch.float32)
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1, got 0"):
        chunked_logprobs(hidden, weight, targets, vocab_start=0, vocab_size=VOCAB, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"weight \[V_local, H\]"):
        chunked_logprobs(hidden, weight[:, :5], targets, vocab_start=0, vocab_size=VOCAB)


def _tp_worker(rank, world):
    import torch.distributed as dist

    hidden, weight, targets = _data(torch.float64)
    block = PADDED // world
    h = hidden.clone().requires_grad_(True)
    w = weight[rank * block:(rank + 1) * block].clone().requires_grad_(True)
    logp, entropy = chunked_logprobs(h, w, targets, vocab_start=rank * block, vocab_size=VOCAB, temperature=1.3,
                                     group=dist.group.WORLD, with_entropy=True, chunk_tokens=7)
    (logp.sum() - 0.5 * entropy.sum()).backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad


def test_vocab_parallel_chunked_matches_single_rank_reference():
    ranks = run_distributed(_tp_worker, 2)
    hidden, weight, targets = _data()
    rh, rw = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_logp, ref_entropy = _reference(rh, rw, targets, 1.3)
    (ref_logp.sum() - 0.5 * ref_entropy.sum()).backward()
    for logp, entropy, h_grad, _ in ranks:
        assert (logp.double() - ref_logp).abs().max() < 1e-5
        assert (entropy.double() - ref_entropy).abs().max() < 1e-5
        assert (h_grad - rh.grad).abs().max() < 1e-5  # grads w.r.t. the replicated input summed over ranks
    w_grad = torch.cat([r[3] for r in ranks])
    assert (w_grad - rw.grad).abs().max() < 1e-5


@pytest.mark.gpu
def test_bf16_chunked_matches_float64_reference_on_gpu():
    hidden, weight, targets = _data(torch.bfloat16, "cuda")
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, entropy = chunked_logprobs(h, w, targets, vocab_start=0, vocab_size=VOCAB, with_entropy=True,
                                     chunk_tokens=8)
    rh, rw = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref_logp, ref_entropy = _reference(rh, rw, targets, 1.0)
    assert (logp.double() - ref_logp).abs().max() < 0.1  # bf16 logits
    assert (entropy.double() - ref_entropy).abs().max() < 0.1
    (logp.sum() + entropy.sum()).backward()
    (ref_logp.sum() + ref_entropy.sum()).backward()
    assert (h.grad.double() - rh.grad).abs().max() < 0.05 * rh.grad.abs().max()
    assert (w.grad.double() - rw.grad).abs().max() < 0.05 * rw.grad.abs().max()

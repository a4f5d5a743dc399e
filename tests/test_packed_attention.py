"""Packed (THD) varlen attention equals per-sequence causal attention: float64 reference on CPU, flash kernel on GPU."""

import math

import pytest
import torch

from trainer.attention import cu_seqlens_from_lengths, padded_causal_attention, varlen_attention

LENGTHS = [5, 1, 9, 3]


def _naive(q, k, v, lengths, scale):
    """Explicit softmax(q k^T * scale + causal mask) v per sequence, GQA by repeating k/v heads; [T, Hq, D]."""
    reps = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = q[start:start + n], k[start:start + n], v[start:start + n]
        ks, vs = ks.repeat_interleave(reps, dim=1), vs.repeat_interleave(reps, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale  # [H, n, n]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=qs.device).triu(1), float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
        start += n
    return torch.cat(outs)


def _inputs(dtype, device, heads=4, kv_heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    q, k, v = (torch.randn(total, h, dim, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
    return [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (q, k, v)]


def test_varlen_reference_equals_per_sequence_attention_values_and_grads():
    q, k, v = _inputs(torch.float64, "cpu")
    scale = 1 / math.sqrt(16)
    out = varlen_attention(q, k, v, cu_seqlens_from_lengths(LENGTHS), max(LENGTHS), backend="reference")
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref = _naive(*ref_inputs, LENGTHS, scale)
    assert (out - ref).abs().max() < 1e-12
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    for a, b in zip((q, k, v), ref_inputs):
        assert (a.grad - b.grad).abs().max() < 1e-12


def test_sequences_do_not_see_each_other():
    q, k, v = _inputs(torch.float64, "cpu")
    cu = cu_seqlens_from_lengths(LENGTHS)
    base = varlen_attention(q, k, v, cu, max(LENGTHS)).detach()
    with torch.no_grad():  # change the first sequence's keys and values: the others must not move
        k[:LENGTHS[0]] += 1.0
        v[:LENGTHS[0]] -= 1.0
    moved = varlen_attention(q, k, v, cu, max(LENGTHS)).detach()
    assert (moved[LENGTHS[0]:] - base[LENGTHS[0]:]).abs().max() == 0
    assert (moved[:LENGTHS[0]] - base[:LENGTHS[0]]).abs().max() > 1e-3


def test_padded_rows_equal_packed_sequences():
    q, k, v = _inputs(torch.float64, "cpu")
    width = max(LENGTHS)
    padded = [torch.zeros(width, len(LENGTHS), t.shape[1], t.shape[2], dtype=t.dtype) for t in (q, k, v)]
    start = 0
    for row, n in enumerate(LENGTHS):
        for dst, src in zip(padded, (q, k, v)):
            dst[:n, row] = src[start:start + n].detach()
        start += n
    out = padded_causal_attention(*padded, scale=0.25)  # [s, b, Hq * D]
    packed = varlen_attention(q, k, v, cu_seqlens_from_lengths(LENGTHS), width, scale=0.25).detach()
    start = 0
    for row, n in enumerate(LENGTHS):
        assert (out[:n, row] - packed[start:start + n].reshape(n, -1)).abs().max() < 1e-12
        start += n


def test_bad_inputs_name_the_problem():
    q, k, v = _inputs(torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend='triton'"):
        varlen_attention(q, k, v, cu_seqlens_from_lengths(LENGTHS), 9, backend="triton")
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(q, k, v, cu_seqlens_from_lengths(LENGTHS).long(), 9)
    with pytest.raises(ValueError, match="run from 0 to T=18"):
        varlen_attention(q, k, v, cu_seqlens_from_lengths([5, 1, 9]), 9)
    with pytest.raises(ValueError, match="flash varlen needs CUDA"):
        varlen_attention(q, k, v, cu_seqlens_from_lengths(LENGTHS), 9, backend="flash")


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 64), (16, 8, 128), (8, 8, 128)])
def test_flash_varlen_matches_reference_on_gpu(heads, kv_heads, dim):
    q, k, v = _inputs(torch.bfloat16, "cuda", heads, kv_heads, dim, seed=heads)
    cu = cu_seqlens_from_lengths(LENGTHS, "cuda")
    out = varlen_attention(q, k, v, cu, max(LENGTHS), backend="flash")
    ref_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = _naive(*ref_inputs, LENGTHS, 1 / math.sqrt(dim))
    assert (out.double() - ref).abs().max() < 2e-2
    grad = torch.randn_like(ref)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    for a, b in zip((q, k, v), ref_inputs):
        assert (a.grad.double() - b.grad).abs().max() < 5e-2 * max(1.0, b.grad.abs().max().item())


def test_packed_seq_params_carry_boundaries_and_restarting_positions():
    from trainer.attention import packed_seq_params

    params = packed_seq_params(LENGTHS, "cpu")
    assert params.cu_seqlens_q.dtype == torch.int32 and params.cu_seqlens_q.tolist() == [0, 5, 6, 15, 18]
    assert params.positions.tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2]
    assert params.max_seqlen_q == params.max_seqlen_kv == 9
    with pytest.raises(ValueError, match="lengths >= 1"):
        packed_seq_params([3, 0], "cpu")

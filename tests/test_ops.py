"""Fused ops: the torch reference against float64 math, and the triton kernels against the reference.

On CPU the triton kernels run under the triton interpreter in one subprocess started with
TRITON_INTERPRET=1 (the variable must be set before triton builds the kernels); this file is also
that subprocess's script. The `gpu` test runs the compiled kernels on CUDA in bfloat16.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from inference_engine import ops
from inference_engine.models.layers import RotaryEmbedding
from inference_engine.ops import reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
EPS = 1e-6


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _inputs(seed: int, dtype: torch.dtype, device: str, tokens: int = 5, heads: int = 4, kv_heads: int = 2,
            head_dim: int = 32, hidden: int = 96, inter: int = 80):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    rotary = RotaryEmbedding(head_dim, 64, 10000.0).to(device)
    return dict(x=randn(tokens, hidden), residual=randn(tokens, hidden), weight=randn(hidden, scale=0.5) + 1,
                qkv=randn(tokens, (heads + 2 * kv_heads) * head_dim), q_weight=randn(head_dim) + 1,
                k_weight=randn(head_dim) + 1, gate_up=randn(tokens, 2 * inter, scale=2.0),
                positions=torch.randint(0, 64, (tokens,), generator=g).to(device), cos=rotary.cos, sin=rotary.sin,
                heads=heads, kv_heads=kv_heads, head_dim=head_dim)


def _all_ops(a: dict, impl) -> dict[str, torch.Tensor]:
    """Every op's outputs under impl (the reference module or the triton module), by name."""
    out = {"norm": impl.rms_norm(a["x"], a["weight"], EPS)}
    if impl is reference:
        out["add_norm"], out["add_norm_residual"] = impl.add_rms_norm(a["x"], a["residual"], a["weight"], EPS)
    else:
        out["add_norm"], out["add_norm_residual"] = impl.rms_norm(a["x"], a["weight"], EPS, a["residual"])
    for norm in (True, False):
        weights = (a["q_weight"], a["k_weight"]) if norm else (None, None)
        q, k, v = impl.qk_norm_rope(a["qkv"], a["positions"], a["cos"], a["sin"], a["heads"], a["kv_heads"],
                                    a["head_dim"], *weights, EPS)
        out.update({f"q_norm{norm}": q, f"k_norm{norm}": k, f"v_norm{norm}": v})
        tokens, d = a["qkv"].shape[0], a["head_dim"]
        cache = [torch.zeros(2 * tokens + 3, a["kv_heads"], d, dtype=a["qkv"].dtype, device=a["qkv"].device)
                 for _ in range(2)]  # [slots, KVH, D]: the written slots hold k and v, the rest stays zero
        loc = torch.randperm(2 * tokens + 3, generator=torch.Generator().manual_seed(tokens))[:tokens]
        q2, k2, v2 = impl.qk_norm_rope(a["qkv"], a["positions"], a["cos"], a["sin"], a["heads"], a["kv_heads"], d,
                                       *weights, EPS, (cache[0], cache[1], loc.to(a["qkv"].device)))
        assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
        assert torch.equal(cache[0][loc.to(cache[0].device)], k) and torch.equal(cache[1][loc.to(cache[1].device)], v)
        out.update({f"k_cache_norm{norm}": cache[0], f"v_cache_norm{norm}": cache[1]})
    out["silu_mul"] = impl.silu_and_mul(a["gate_up"])
    return out


def test_reference_matches_float64_math():
    a = _inputs(0, torch.float32, "cpu")
    x, r, w = a["x"].double(), a["residual"].double(), a["weight"].double()

    def norm64(v, weight):
        return weight * v / (v.pow(2).mean(-1, keepdim=True) + EPS).sqrt()

    assert _rel(reference.rms_norm(a["x"], a["weight"], EPS), norm64(x, w)) < 1e-6
    normed, residual = reference.add_rms_norm(a["x"], a["residual"], a["weight"], EPS)
    assert _rel(residual, x + r) < 1e-7 and _rel(normed, norm64(x + r, w)) < 1e-6
    # RoPE: pair (j, j + D/2) of each head rotated by angle pos * inv_freq[j]
    heads, kv_heads, d = a["heads"], a["kv_heads"], a["head_dim"]
    q, k, v = reference.qk_norm_rope(a["qkv"], a["positions"], a["cos"], a["sin"], heads, kv_heads, d,
                                     a["q_weight"], a["k_weight"], EPS)
    qkv = a["qkv"].double()
    q_in = norm64(qkv[:, :heads * d].view(-1, heads, d), a["q_weight"].double())
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = a["positions"].double()[:, None, None] * inv_freq  # [T, 1, D/2]
    x1, x2 = q_in[..., :d // 2], q_in[..., d // 2:]
    q_ref = torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)
    assert _rel(q, q_ref) < 1e-5
    assert k.shape == (5, kv_heads, d)
    assert torch.equal(v, a["qkv"][:, (heads + kv_heads) * d:].view(-1, kv_heads, d))
    gate, up = a["gate_up"].double().chunk(2, dim=-1)
    assert _rel(reference.silu_and_mul(a["gate_up"]), gate / (1 + (-gate).exp()) * up) < 1e-6


def test_dispatch_uses_reference_on_cpu():
    if os.environ.get("TRITON_INTERPRET"):
        pytest.skip("this process interprets triton")
    assert not ops.runs_triton("cpu")
    a = _inputs(1, torch.float32, "cpu")
    assert torch.equal(ops.silu_and_mul(a["gate_up"]), reference.silu_and_mul(a["gate_up"]))
    w = torch.randn(7, a["gate_up"].shape[1] // 2)
    assert torch.equal(ops.silu_and_mul_linear(a["gate_up"], w), reference.silu_and_mul(a["gate_up"]) @ w.T)
    x16, w16 = a["x"].bfloat16(), torch.randn(7, a["x"].shape[1]).bfloat16()
    logits = ops.linear(x16[:1], w16, out_dtype=torch.float32)  # one row: the GEMV's slot, torch on CPU
    assert logits.dtype == torch.float32 and torch.equal(logits, (x16[:1] @ w16.T).float())  # bf16, then widened
    with pytest.raises(ValueError, match="q_weight and k_weight"):
        ops.qk_norm_rope(a["qkv"], a["positions"], a["cos"], a["sin"], 4, 2, 32, a["q_weight"], None)


def _compare_triton(device: str, dtype: torch.dtype, seeds=(0, 1, 2), tol: float = 1e-2, **shape) -> None:
    from inference_engine.ops import triton_ops

    tol = 1e-6 if dtype == torch.float32 else tol
    for seed in seeds:
        a = _inputs(seed, dtype, device, **shape)
        ref, got = _all_ops(a, reference), _all_ops(a, triton_ops)
        for name, expected in ref.items():
            out = got[name]
            assert out.shape == expected.shape and out.dtype == expected.dtype, name
            assert torch.isfinite(out.float()).all(), name
            assert _rel(out, expected) < tol, (name, seed, dtype, _rel(out, expected))


def _compare_linear_and_race(device: str, dtype: torch.dtype, shapes, tol: float) -> None:
    """The triton GEMV (plain, bias, SiLU-and-mul input, float32 output) and seeded race against the reference."""
    from inference_engine.ops import triton_ops

    g = torch.Generator().manual_seed(11)
    for rows, n, k in shapes:
        x = torch.randn(rows, k, generator=g).to(dtype).to(device)
        gate_up = (torch.randn(rows, 2 * k, generator=g) * 2).to(dtype).to(device)
        w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(device)
        b = torch.randn(n, generator=g).to(dtype).to(device)
        exact = (x.double() @ w.double().T).to(dtype)  # the product rounded once, as cuBLAS rounds
        for out, ref in ((triton_ops.linear(x, w), exact),
                         (triton_ops.linear(x, w, b), (x.double() @ w.double().T + b.double()).to(dtype)),
                         (triton_ops.linear(x, w, out_dtype=torch.float32), exact.float()),
                         (triton_ops.linear(gate_up, w, silu_mul=True),
                          reference.linear(reference.silu_and_mul(gate_up), w))):
            assert out.shape == ref.shape and out.dtype == ref.dtype, (rows, n, k)
            assert _rel(out, ref) < tol, (rows, n, k, _rel(out, ref))
        with pytest.raises(ValueError, match="input width"):
            triton_ops.linear(x, w, silu_mul=True)
    probs = torch.softmax(torch.randn(5, 3001, generator=g) * 3, dim=-1).to(device)
    probs[:, ::5] = 0.0  # truncated tokens are never drawn
    seeds = torch.tensor([0, 1, 2**40 + 3, 7, 2**62], device=device)
    offsets = torch.tensor([0, 5, 9, 2**33, 1], device=device)
    drawn = triton_ops.seeded_race(probs, seeds, offsets)
    assert torch.equal(drawn, reference.seeded_race(probs, seeds, offsets)), drawn
    assert (drawn % 5 != 0).all()


def _compare_linear_greedy(device: str, dtype: torch.dtype, shapes, tol: float) -> None:
    """The LM-head GEMV with its greedy pick: logits as the reference's, the pick exactly torch.argmax of those logits
    (exact ties included: the lowest id), its log-prob as float64 log_softmax's."""
    from inference_engine.ops import triton_ops

    g = torch.Generator().manual_seed(13)
    for rows, n, k, config, merge_block in shapes:
        x = torch.randn(rows, k, generator=g)
        w = torch.randn(n, k, generator=g) / k ** 0.5
        winners = [[2, 3, n - 1], [n // 2 + 1, n - 2]][:rows]  # tied maxima: row 0's inside a block and in the last
        for row, ids in enumerate(winners):  # block, row 1's in two of the merge kernel's chunks (when there are two)
            x[row] = 0.0
            x[row, row] = 4.0
            w[ids] = 0.0
            w[ids, row] = 4.0  # logit 16 exactly at these ids, the rest far below
        x, w = x.to(dtype).to(device), w.to(dtype).to(device)
        logits, tokens, logprobs = triton_ops.linear_greedy(x, w, config, merge_block)
        ref = reference.linear(x, w, out_dtype=torch.float32)
        assert logits.shape == ref.shape and logits.dtype == torch.float32 and _rel(logits, ref) < tol, (rows, n, k)
        assert torch.equal(tokens, logits.argmax(dim=-1)), (rows, n, k, tokens)
        assert tokens[:len(winners)].tolist() == [ids[0] for ids in winners]
        exact = torch.log_softmax(logits.double(), dim=-1).gather(-1, tokens[:, None])[:, 0]
        assert torch.allclose(logprobs.double(), exact, atol=1e-5, rtol=0), (logprobs, exact)
    with pytest.raises(ValueError, match="input width"):
        triton_ops.linear_greedy(x[:, :-1], w)


def _compare_context_slots(device: str, block: int) -> None:
    """Each request's KV slots gathered from its table row, back to back: as a python loop (the kernel and the
    reference), for lengths across block boundaries, an empty request and rows out of order."""
    from inference_engine.ops import triton_ops

    g = torch.Generator().manual_seed(5)
    table = torch.randint(0, 10_000, (6, 3 * block + 5), generator=g).to(device)
    rows, lens = [4, 0, 2, 5], [block + 3, 0, 1, 3 * block + 5]
    indptr = [0]
    for n in lens:
        indptr.append(indptr[-1] + n)
    expected = torch.cat([table[r, :n] for r, n in zip(rows, lens)])
    args = (table, torch.tensor(rows, device=device), torch.tensor(indptr, device=device), indptr[-1], max(lens))
    assert torch.equal(reference.context_slots(*args), expected)
    assert torch.equal(triton_ops.context_slots(*args, block=block), expected)


def _compare_greedy(device: str, shapes) -> None:
    """The one-pass greedy pick over float32 logits: exactly torch.argmax (ties: the lowest id, also across chunks),
    its log-prob as float64 log_softmax's; -inf logits (masked tokens) count for nothing."""
    from inference_engine.ops import triton_ops

    g = torch.Generator().manual_seed(21)
    for rows, vocab, chunk in shapes:
        logits = torch.randn(rows, vocab, generator=g) * 4
        top = logits.max() + 1
        logits[0, [vocab // 2, 1, vocab - 1]] = top  # a tie across chunks: the lowest id wins
        if rows > 1:
            logits[1, :vocab // 2] = float("-inf")
            logits[1, [vocab - 2, vocab - 1]] = top  # a tie inside the last block
        logits = logits.to(device)
        tokens, logprobs = triton_ops.greedy(logits, chunk)
        assert torch.equal(tokens, logits.argmax(dim=-1)), (rows, vocab, chunk, tokens)
        assert tokens[0] == 1 and (rows == 1 or tokens[1] == vocab - 2)
        exact = torch.log_softmax(logits.double(), dim=-1).gather(-1, tokens[:, None])[:, 0]
        assert torch.allclose(logprobs.double(), exact, atol=1e-5, rtol=0), (logprobs, exact)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_match_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "interpreter checks passed" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernels_match_reference_on_gpu():
    assert ops.runs_triton("cuda")
    _compare_triton("cuda", torch.bfloat16, tokens=37, heads=16, kv_heads=8, head_dim=128, hidden=1024, inter=3072)
    _compare_triton("cuda", torch.float32, seeds=(3,), tokens=3, heads=32, kv_heads=8, head_dim=128, hidden=4096,
                    inter=12288)
    _compare_linear_and_race("cuda", torch.bfloat16, [(1, 6144, 4096), (8, 4096, 12288), (3, 1000, 4000)], 1e-2)
    _compare_linear_and_race("cuda", torch.float32, [(2, 512, 1024)], 1e-5)
    _compare_linear_greedy("cuda", torch.bfloat16, [(1, 151936, 4096, None, 4096), (2, 20000, 1024, None, 4096)],
                           1e-2)
    _compare_greedy("cuda", [(256, 151936, 8192), (3, 1000, 8192), (2, 50000, 4096)])
    _compare_context_slots("cuda", 1024)
    _compare_truncation("cuda", [(2, 12, 151936, [None, (1024, 4)]), (3, 9, 3000, [None, (128, 4)])])


def _truncation_rows(seed: int, rows: int, vocab: int, device: str):
    """(probs [rows, vocab] float32, top_k, top_p, min_p [rows]): flat to peaked rows, ties, a one-token row, zeros;
    rows cycle through all three filters, top-k only, top-p only and min-p only (the others at their off values:
    top_k = vocab, top_p = 1, min_p = 0); the last two rows take a tiny top_p and nothing."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([3.0, 0.3, 1.0, 8.0, 0.3, 1.0, 3.0, 8.0]).repeat(rows)[:rows, None]
    logits = torch.randn(rows, vocab, generator=g) * scale
    logits[1::3] = (logits[1::3] * 2).round()  # ties: equal logits give bitwise equal probabilities
    probs = torch.softmax(logits, dim=-1)
    probs[0] = 0.0
    probs[0, vocab // 3] = 1.0  # all mass in one token
    probs[2, ::4] = 0.0
    top_k = torch.randint(1, vocab + 1, (rows,), generator=g)
    top_p = torch.rand(rows, generator=g)
    min_p = torch.rand(rows, generator=g) * 0.2
    mode = torch.arange(rows) % 4  # 0: all three, 1: top-k, 2: top-p, 3: min-p
    top_k[(mode == 2) | (mode == 3)] = vocab
    top_p[(mode == 1) | (mode == 3)] = 1.0
    min_p[(mode == 1) | (mode == 2)] = 0.0
    top_k[-2], top_p[-2], min_p[-2] = vocab, 1e-6, 0.0
    top_k[-1], top_p[-1], min_p[-1] = vocab, 1.0, 0.0
    return [t.to(device) for t in (probs, top_k, top_p, min_p)]


def _compare_truncation(device: str, cases) -> None:
    """The truncation kernel's threshold and filtered rows exactly the reference's, whatever its block size."""
    from inference_engine.ops import triton_ops

    for seed, rows, vocab, configs in cases:
        probs, top_k, top_p, min_p = _truncation_rows(seed, rows, vocab, device)
        ref = reference.truncation_threshold(probs, top_k, top_p, min_p)
        filtered = reference.truncate(probs, top_k, top_p, min_p)
        assert (filtered > 0).sum(dim=-1).min() >= 1 and (filtered == 0).any(dim=-1).sum() >= rows // 2
        for config in configs:  # small blocks: several passes over the row before the undecided values fit one
            thr, out = triton_ops.truncation_threshold(probs, top_k, top_p, min_p, write=True, config=config)
            assert torch.equal(thr, ref), (seed, vocab, config, thr, ref)
            assert torch.equal(out, filtered), (seed, vocab, config)
            assert triton_ops.truncation_threshold(probs, top_k, top_p, min_p, config=config)[1] is None
    with pytest.raises(ValueError, match="float32"):
        triton_ops.truncation_threshold(probs.double(), top_k, top_p, min_p)


def test_truncation_reference_matches_float64_definition():
    row = torch.tensor([[0.125, 0.375, 0.1875, 0.0625, 0.1875, 0.0625]], dtype=torch.float64)  # exact in binary
    for (top_k, top_p, min_p), expected in [((2, 1.0, 0.0), 0.1875), ((1, 1.0, 0.0), 0.375), ((6, 0.5, 0.0), 0.1875),
                                            ((6, 0.375, 0.0), 0.375), ((6, 0.76, 0.0), 0.125), ((6, 1.0, 0.25), 0.125),
                                            ((6, 1.0, 0.5), 0.1875), ((6, 1.0, 0.0), 0.0625), ((0, 0.0, 1.0), 0.375),
                                            ((4, 0.9, 0.2), 0.125), ((5, 0.9, 0.1), 0.0625)]:
        thr = reference.truncation_threshold(row, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))
        assert thr.tolist() == [expected], (top_k, top_p, min_p, thr)
    for dtype in (torch.float32, torch.float64):  # the definition, token by token, in float64
        probs, top_k, top_p, min_p = _truncation_rows(0, 8, 120, "cpu")
        probs = probs.to(dtype)
        p = probs.double()
        higher = p[:, None, :] > p[:, :, None]  # [B, i, j]: p_j > p_i
        top = probs == probs.max(dim=-1, keepdim=True).values
        keep = ((higher.sum(-1) < top_k[:, None]) & (((higher * p[:, None, :]).sum(-1) < top_p[:, None].double())
                                                      | (top_p[:, None] >= 1))
                & (probs >= min_p[:, None].to(dtype) * probs.max(dim=-1, keepdim=True).values)) | top
        thr = reference.truncation_threshold(probs, top_k, top_p, min_p)
        assert torch.equal(probs >= thr[:, None], keep)
        assert torch.equal(reference.truncate(probs, top_k, top_p, min_p), probs * keep)
    if not ops.runs_triton("cpu"):
        assert torch.equal(ops.truncate(probs, top_k, top_p, min_p), probs * keep)
    with pytest.raises(ValueError, match="top_p must have shape"):
        ops.truncation_threshold(probs, top_k, top_p[:3], min_p)


if __name__ == "__main__":  # the interpreter subprocess
    assert ops.runs_triton("cpu")
    _compare_triton("cpu", torch.float32)
    _compare_triton("cpu", torch.float32, seeds=(4,), tokens=1, heads=2, kv_heads=1, head_dim=16, hidden=48, inter=20)
    _compare_triton("cpu", torch.bfloat16, seeds=(5,), tol=4e-2)  # the interpreter's float32 -> bf16 is not RNE
    _compare_linear_and_race("cpu", torch.float32, [(1, 24, 96), (3, 40, 200), (8, 16, 64), (5, 7, 33)], 1e-6)
    _compare_linear_greedy("cpu", torch.float32, [(1, 41, 32, None, 4096), (2, 37, 24, None, 4096),
                                                  (3, 301, 8, (4, 2, 8, 4), 16)], 1e-6)
    _compare_greedy("cpu", [(1, 40, 8192), (3, 301, 64), (2, 130, 16)])
    _compare_context_slots("cpu", 16)
    _compare_truncation("cpu", [(0, 8, 50, [(16, 1), (64, 4)]), (1, 6, 300, [(32, 2), (4096, 8)])])
    print("interpreter checks passed")

"""The trainer's GPU kernels side by side on the Qwen3-0.6B shape at 16k packed tokens, with their errors.

    python -m benchmarks.trainer_kernels [--out DIR]     # GPU only

Rows (median ms over repeated runs, CUDA-event timed by triton's do_bench):
- packed causal attention of one micro-batch (5 sequences, 16,298 tokens; 16 q heads, 8 kv heads, d 128):
  FlashAttention-2 varlen (`flash`), cuDNN ragged (`cudnn`, GQA native and with k/v heads repeated), cuDNN
  dense SDPA once per sequence; forward and forward + backward, TFLOP/s,
  and the relative error of output and input gradients against fp32 attention of the same inputs;
- SwiGLU of [16384, 2 x 3072]: eager, `torch.compile`, triton kernels;
- q/k RMSNorm + RoPE of the fused qkv [16384, 8 groups, 4 x 128]: eager, compiled, triton.
Each relative error is ||x - ref|| / ||ref||; bf16 lands between 1e-3 and 1e-2.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

LENGTHS = [3696, 3521, 3503, 3071, 2507]  # the first packed micro-batch of benchmarks/train_step.py's rollout
HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FFN, TOKENS = 16, 8, 128, 1024, 3072, 16384


def median_ms(fn) -> float:
    """Median milliseconds of fn() (CUDA events, warm-up first)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in fp64; inf if x has NaN."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm()) if torch.isfinite(x).all() else float("inf")


def fwd_bwd(fn, inputs: list[torch.Tensor], grad_outs):
    """A closure running fn(*inputs) forward and backward with fixed output gradients."""
    def run():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, grad_outs)
    return run


def attention_rows() -> list[dict]:
    """FA-2 varlen vs cuDNN ragged on one packed micro-batch; errors against fp32 attention."""
    from trainer import attention

    g = torch.Generator(device="cuda").manual_seed(0)
    total = sum(LENGTHS)
    cu = attention.cu_seqlens_from_lengths(LENGTHS, "cuda")
    q, k, v = (torch.randn(total, h, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16)
               for h in (HEADS, KV_HEADS, KV_HEADS))
    do = torch.randn(total, HEADS, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16)
    ref_in = [t.float().requires_grad_(True) for t in (q, k, v)]
    ref = attention.varlen_attention_reference(*ref_in, cu, 1 / math.sqrt(HEAD_DIM))
    ref.backward(do.float())
    fwd_flops = 2 * sum(n * n for n in LENGTHS) * HEAD_DIM * HEADS  # causal: 2 matmuls x 2 x L^2 / 2 x d x heads
    longest, bounds = max(LENGTHS), cu.tolist()

    def dense_per_sequence(a, b, c):  # cuDNN's dense SDPA once per sequence (GQA by the kernel)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.cat([F.scaled_dot_product_attention(
                *(t[s:e].transpose(0, 1)[None] for t in (a, b, c)), is_causal=True, enable_gqa=True)[0].transpose(0, 1)
                for s, e in zip(bounds[:-1], bounds[1:])])

    def cudnn_ragged(a, b, c):  # PyTorch's cuDNN attention over ragged (THD) inputs, differentiable through aten
        return torch.ops.aten._cudnn_attention_forward(a, b, c, None, cu, cu, longest, longest, True, 0.0, True, False,
                                                       scale=1 / math.sqrt(HEAD_DIM))[0]

    repeat = HEADS // KV_HEADS
    variants = {
        "flash": lambda a, b, c: attention.varlen_attention(a, b, c, cu, longest, backend="flash"),
        "cudnn": cudnn_ragged,
        "cudnn kv-repeated": lambda a, b, c: cudnn_ragged(a, b.repeat_interleave(repeat, 1),
                                                          c.repeat_interleave(repeat, 1)),
        "cudnn dense per sequence": dense_per_sequence,
    }
    rows = []
    for name, fn in variants.items():
        row = {"kernel": f"attention {name}"}
        try:
            inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
            out = fn(*inputs)
            out.backward(do)
            row["err_out"] = rel_err(out, ref)
            for label, t, r in zip("qkv", inputs, ref_in):
                row[f"err_d{label}"] = rel_err(t.grad, r.grad)
            with torch.no_grad():
                row["fwd_ms"] = median_ms(lambda: fn(q, k, v))
            row["fwd_bwd_ms"] = median_ms(fwd_bwd(fn, inputs, (do,)))
            row["fwd_tflops"] = round(fwd_flops / row["fwd_ms"] / 1e9, 1)
            row["bwd_tflops"] = round(2.5 * fwd_flops / (row["fwd_bwd_ms"] - row["fwd_ms"]) / 1e9, 1)
            if name == "flash":  # RL micro-batches rarely repeat a shape: first call at unseen lengths
                row["new_shape_ms"] = new_shape_ms(q, k, v, do)
        except Exception as e:  # a backend this torch build lacks: report, go on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        rows.append(row)
    return rows


def new_shape_ms(q, k, v, do) -> float:
    """Mean wall ms of forward + backward at 3 packings never seen before (kernel plans built per shape count)."""
    import time

    from trainer import attention

    spent = []
    for extra in (1, 2, 3):
        lengths = [n - 7 * extra for n in LENGTHS[:-1]] + [LENGTHS[-1] - 50 * extra]
        total = sum(lengths)
        cu = attention.cu_seqlens_from_lengths(lengths, "cuda")
        inputs = [t[:total].clone().requires_grad_(True) for t in (q, k, v)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        attention.varlen_attention(*inputs, cu, max(lengths), backend="flash").backward(do[:total])
        torch.cuda.synchronize()
        spent.append(time.perf_counter() - start)
    return round(1e3 * sum(spent) / len(spent), 2)


def swiglu_rows() -> list[dict]:
    """SwiGLU eager vs compiled vs triton, forward and forward + backward; errors against fp32 math."""
    from trainer import fused, fused_kernels

    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(TOKENS, 1, 2 * FFN, device="cuda", generator=g, dtype=torch.bfloat16)
    dy = torch.randn(TOKENS, 1, FFN, device="cuda", generator=g, dtype=torch.bfloat16)
    xf = x.double().requires_grad_(True)
    gate, up = xf.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    ref.backward(dy.double())
    variants = {"eager": fused.swiglu, "compiled": lambda t: fused.run(fused.swiglu, t),
                "triton": fused_kernels.SwiGLU.apply}
    rows = []
    for name, fn in variants.items():
        xi = x.clone().requires_grad_(True)
        out = fn(xi)
        out.backward(dy)
        row = {"kernel": f"swiglu {name}", "err_out": rel_err(out, ref), "err_dx": rel_err(xi.grad, xf.grad)}
        with torch.no_grad():
            row["fwd_ms"] = median_ms(lambda: fn(x))
        row["fwd_bwd_ms"] = median_ms(fwd_bwd(fn, [xi], (dy,)))
        bytes_fwd, bytes_bwd = 3 * TOKENS * FFN * 2, 5 * TOKENS * FFN * 2
        row["fwd_gbps"] = round(bytes_fwd / row["fwd_ms"] / 1e6)
        row["bwd_gbps"] = round(bytes_bwd / (row["fwd_bwd_ms"] - row["fwd_ms"]) / 1e6)
        rows.append(row)
    return rows


def qk_norm_rope_rows() -> list[dict]:
    """The fused q/k norm + RoPE: eager vs compiled vs triton, forward and forward + backward; errors vs fp64."""
    from trainer import fused, fused_kernels

    g = torch.Generator(device="cuda").manual_seed(2)
    q_per_group = HEADS // KV_HEADS
    mixed = torch.randn(TOKENS, 1, KV_HEADS, (q_per_group + 2) * HEAD_DIM, device="cuda", generator=g,
                        dtype=torch.bfloat16)
    positions = torch.cat([torch.arange(n) for n in LENGTHS + [TOKENS - sum(LENGTHS)]]).cuda()
    inv = 1e6 ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
    freqs = torch.outer(torch.arange(8192, dtype=torch.float32), inv)
    freqs = torch.cat([freqs, freqs], dim=-1).cuda()[:, None, None, :]  # [max_s, 1, 1, hn]
    cos, sin = fused.rope_cos_sin(freqs, positions, TOKENS)
    weights = [torch.rand(HEAD_DIM, device="cuda", generator=g).bfloat16() for _ in range(2)]
    ref_in = [mixed.double().requires_grad_(True)] + [w.double().requires_grad_(True) for w in weights]
    ref_out = fused.qkv_norm_rope(ref_in[0], q_per_group, HEAD_DIM, cos.double(), sin.double(), *ref_in[1:], 1e-6)
    upstream = tuple(torch.randn(t.shape, device="cuda", generator=g, dtype=torch.bfloat16) for t in ref_out)
    ref_grads = torch.autograd.grad(ref_out, ref_in, [u.double() for u in upstream])
    rows = []
    for name, fn in {"eager": fused.qkv_norm_rope, "compiled": lambda *a: fused.run(fused.qkv_norm_rope, *a),
                     "triton": fused_kernels.QKNormRoPE.apply}.items():
        inputs = [mixed.clone().requires_grad_(True)] + [w.clone().requires_grad_(True) for w in weights]
        call = (lambda m, wq, wk: fn(m, q_per_group, HEAD_DIM, cos, sin, wq, wk, 1e-6))
        out = call(*inputs)
        grads = torch.autograd.grad(out, inputs, upstream)
        row = {"kernel": f"qk-norm+rope {name}"}
        for label, a, r in zip(("q", "k", "v", "dmixed", "dwq", "dwk"), list(out) + list(grads),
                               list(ref_out) + list(ref_grads)):
            row[f"err_{label}"] = rel_err(a, r)
        with torch.no_grad():
            row["fwd_ms"] = median_ms(lambda: call(mixed, *weights))
        row["fwd_bwd_ms"] = median_ms(fwd_bwd(call, inputs, upstream))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".", help="folder for kernels.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.trainer_kernels needs a CUDA GPU")
    rows = []
    for section in (attention_rows, swiglu_rows, qk_norm_rope_rows):
        start = len(rows)
        try:
            rows += section()
        except Exception as e:  # one broken section must not hide the others
            rows.append({"kernel": section.__name__, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        for row in rows[start:]:
            print(json.dumps(row), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "kernels.json").write_text(json.dumps(rows, indent=1))
    print("| kernel | fwd ms | fwd+bwd ms | notes |\n| --- | ---: | ---: | --- |")
    for r in rows:
        notes = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) and k.startswith("err") else f"{k} {v}"
                          for k, v in r.items() if k not in ("kernel", "fwd_ms", "fwd_bwd_ms"))
        print(f"| {r['kernel']} | {r.get('fwd_ms', float('nan')):.3f} | {r.get('fwd_bwd_ms', float('nan')):.3f} | "
              f"{notes} |")


if __name__ == "__main__":
    main()

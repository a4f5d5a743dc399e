"""Paged attention kernels vs torch SDPA on gathered KV (GPU): prints a table of kernel times.

    python benchmarks/attention_kernels.py [--heads 32 --kv-heads 8 --head-dim 128]

Each request's context sits in random pages (16 slots) of one KV pool, as in the engine.
"triton" is inference_engine.kernels on the pool; "sdpa+gather" gathers each request's K/V
by slot id (and repeats KV heads) and then calls scaled_dot_product_attention, what an
engine without paged kernels does; "sdpa" times that SDPA call alone on pre-gathered K/V.
All requests of a row share one length so that SDPA can run them as one batch.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from triton.testing import do_bench

from inference_engine.kernels import decode_attention, default_num_kv_splits, extend_attention

PAGE = 16
DECODE_SHAPES = [(1, 4096), (1, 32768), (1, 131072), (8, 8192), (32, 4096), (128, 1024), (64, 8192)]  # (B, kv_len)
EXTEND_SHAPES = [(1, 0, 2048), (1, 8192, 512), (4, 1024, 1024), (16, 2048, 128), (1, 0, 16384)]  # (B, prefix, new)


def paged_pool(batch: int, kv_len: int, num_kv_heads: int, head_dim: int, dtype, gen):
    """KV buffers with `batch` contexts of kv_len slots each, in random pages; -> k, v, kv_indptr, kv_indices."""
    pages_each = -(-kv_len // PAGE)
    num_pages = batch * pages_each + 1
    k = torch.randn(num_pages * PAGE, num_kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn_like(k)
    pages = torch.randperm(num_pages, device="cuda", generator=gen)[: batch * pages_each].view(batch, pages_each)
    slots = (pages[:, :, None] * PAGE + torch.arange(PAGE, device="cuda")).view(batch, -1)[:, :kv_len]  # [B, kv_len]
    kv_indptr = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * kv_len
    return k, v, kv_indptr, slots.reshape(-1).contiguous()


def gather_dense(k, v, kv_indices, batch: int, kv_len: int, group: int):
    """Per-request dense K/V with KV heads repeated: [B, H, kv_len, D] each."""
    kd = k[kv_indices].view(batch, kv_len, k.shape[1], k.shape[2]).transpose(1, 2)
    vd = v[kv_indices].view(batch, kv_len, v.shape[1], v.shape[2]).transpose(1, 2)
    return kd.repeat_interleave(group, dim=1), vd.repeat_interleave(group, dim=1)


def bench_decode(batch, kv_len, heads, kv_heads, head_dim, dtype, gen):
    k, v, kv_indptr, kv_indices = paged_pool(batch, kv_len, kv_heads, head_dim, dtype, gen)
    q = torch.randn(batch, heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    group = heads // kv_heads
    out = torch.empty_like(q)
    splits = default_num_kv_splits(batch, kv_heads, q.device)
    t_triton = do_bench(lambda: decode_attention(q, k, v, kv_indptr, kv_indices, out=out, num_kv_splits=splits))
    t_one = do_bench(lambda: decode_attention(q, k, v, kv_indptr, kv_indices, out=out, num_kv_splits=1))

    def sdpa_gathered():
        kd, vd = gather_dense(k, v, kv_indices, batch, kv_len, group)
        return F.scaled_dot_product_attention(q[:, :, None], kd, vd)[:, :, 0]  # [B, H, D]

    kd, vd = gather_dense(k, v, kv_indices, batch, kv_len, group)
    t_gather = do_bench(sdpa_gathered)
    t_sdpa = do_bench(lambda: F.scaled_dot_product_attention(q[:, :, None], kd, vd))
    err = (
        decode_attention(q, k, v, kv_indptr, kv_indices, num_kv_splits=splits).float() - sdpa_gathered().float()
    ).abs().max()
    kv_bytes = 2 * batch * kv_len * kv_heads * head_dim * q.element_size()
    return dict(
        shape=f"decode B={batch} kv={kv_len}", splits=splits, triton=t_triton, triton_1split=t_one,
        sdpa_gather=t_gather, sdpa=t_sdpa, gbps=kv_bytes / t_triton / 1e6, err=float(err),
    )  # fmt: skip


def bench_extend(batch, prefix, new, heads, kv_heads, head_dim, dtype, gen):
    kv_len = prefix + new
    k, v, kv_indptr, kv_indices = paged_pool(batch, kv_len, kv_heads, head_dim, dtype, gen)
    q = torch.randn(batch * new, heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    qo_indptr = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * new
    group = heads // kv_heads
    out = torch.empty_like(q)
    t_triton = do_bench(lambda: extend_attention(q, k, v, qo_indptr, kv_indptr, kv_indices, out=out, max_q_len=new))
    qd = q.view(batch, new, heads, head_dim).transpose(1, 2)  # [B, H, new, D]
    mask = causal_lower_right(new, kv_len)

    def sdpa_gathered():
        kd, vd = gather_dense(k, v, kv_indices, batch, kv_len, group)
        return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)

    kd, vd = gather_dense(k, v, kv_indices, batch, kv_len, group)
    t_gather = do_bench(sdpa_gathered)
    t_sdpa = do_bench(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask))
    ours = extend_attention(q, k, v, qo_indptr, kv_indptr, kv_indices, max_q_len=new)
    err = (ours.float() - sdpa_gathered().transpose(1, 2).reshape_as(q).float()).abs().max()
    flops = 4 * batch * heads * head_dim * (new * prefix + new * (new + 1) / 2)  # causal QK^T and PV
    return dict(
        shape=f"extend B={batch} prefix={prefix} new={new}", splits="-", triton=t_triton, triton_1split=float("nan"),
        sdpa_gather=t_gather, sdpa=t_sdpa, gbps=flops / t_triton / 1e9, err=float(err),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention_kernels.py needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    dims = (args.heads, args.kv_heads, args.head_dim, dtype, gen)
    print(f"{torch.cuda.get_device_name()}  H={args.heads} H_kv={args.kv_heads} D={args.head_dim} "
          f"{args.dtype}; times in ms")
    header = ("shape", "splits", "triton", "1 split", "sdpa+gather", "sdpa", "vs +gather", "GB/s|TFLOP/s", "max err")
    widths = (-36, 7, 9, 9, 13, 9, 11, 14, 10)
    print("".join(f"{h:<{-w}}" if w < 0 else f"{h:>{w}}" for h, w in zip(header, widths)))
    rows = ([bench_decode(b, n, *dims) for b, n in DECODE_SHAPES]
            + [bench_extend(b, p, n, *dims) for b, p, n in EXTEND_SHAPES])
    for r in rows:
        print(
            f"{r['shape']:<36}{r['splits']!s:>7}{r['triton']:>9.4f}{r['triton_1split']:>9.4f}{r['sdpa_gather']:>13.4f}"
            f"{r['sdpa']:>9.4f}{r['sdpa_gather'] / r['triton']:>10.2f}x{r['gbps']:>14.1f}{r['err']:>10.4f}"
        )
    print("GB/s|TFLOP/s: KV bytes read per second for decode, causal attention TFLOP/s for extend")


if __name__ == "__main__":
    main()

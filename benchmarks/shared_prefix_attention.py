"""Shared-prefix decode attention, one layer of a W1-shaped decode step: each kernel's device time and bytes read.

    python -m benchmarks.shared_prefix_attention                  # GPU: Qwen3-0.6B's heads, W1 mid-rollout
    python -m benchmarks.shared_prefix_attention --suffix 1 --suffix 1024   # several suffix lengths, one table
    python -m benchmarks.shared_prefix_attention --smoke          # CPU: the code path on a tiny batch, no timing

--requests requests in groups of --group share a --prefix-token prompt in the same pages (as the radix cache leaves
GRPO's n samples of a prompt), each followed by --suffix tokens of its own, in random pages of --page slots. The
attention backends run as in the engine (eager: `init_forward_metadata`, then `forward` of one layer), with
shared-prefix decode off (the whole contexts) and on (the suffixes with their LSE, then the shared-prefix kernel),
and the pieces of the "on" path alone. Each row: device time (CUDA events, mean of --iters calls), the KV bytes it
must read and the fraction of the copy bandwidth measured in the same run that those bytes at that time are.
The prefix kernel reads each chunk's prefix once: chunks x prefix tokens, against requests x prefix without it.
"""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

import torch

from benchmarks.engine_throughput import copy_bandwidth, event_ms
from inference_engine.attention.shared_prefix import chunk_members
from inference_engine.forward_batch import ForwardBatch
from inference_engine.kernels import shared_prefix_attention


def make_batch(args, device: torch.device, dtype: torch.dtype, suffix: int,
               backend) -> tuple[ForwardBatch, torch.Tensor]:
    """A decode ForwardBatch of W1's shape over a fresh KV pool, and its queries [B, H, D]."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    page, groups = args.page, args.requests // args.group
    prefix_pages, suffix_pages = args.prefix // page, -(-suffix // page)
    num_pages = 1 + groups * prefix_pages + args.requests * suffix_pages
    order = torch.randperm(num_pages - 1, generator=gen) + 1  # page 0 is the pool's padding page
    slots = (order[:, None] * page + torch.arange(page)).flatten()  # every page, in a random order
    prefix = slots[:groups * args.prefix].view(groups, args.prefix)
    own = slots[groups * args.prefix:].view(-1, suffix_pages * page)[:args.requests, :suffix]
    indices = torch.cat([torch.cat([prefix[r // args.group], own[r]]) for r in range(args.requests)])
    seq_len = args.prefix + suffix
    k = torch.randn(num_pages * page, args.kv_heads, args.head_dim, generator=gen).to(device, dtype)
    v = torch.randn(num_pages * page, args.kv_heads, args.head_dim, generator=gen).to(device, dtype)
    pool = SimpleNamespace(k_buffer=[k], v_buffer=[v], layer_scales=lambda layer_id: None, dtype=dtype,
                           quantized=False)
    b = args.requests
    ints = dict(dtype=torch.int64, device=device)
    fb = ForwardBatch(
        input_ids=torch.zeros(b, **ints), positions=torch.full((b,), seq_len - 1, **ints),
        out_cache_loc=own[:, suffix - 1].to(device), qo_indptr=torch.arange(b + 1, **ints),
        kv_indptr=torch.arange(b + 1, **ints) * seq_len, kv_indices=indices.to(device),
        seq_lens=torch.full((b,), seq_len, **ints), seq_lens_cpu=torch.full((b,), seq_len, dtype=torch.int64),
        extend_lens=[1] * b, kv_pool=pool, attn_backend=backend,
        prefix_keys=[r // args.group for r in range(b)], prefix_lens=[args.prefix] * b)
    q = torch.randn(b, args.heads, args.head_dim, generator=gen).to(device, dtype)
    return fb, q


def backends(args, device: torch.device, dtype: torch.dtype, shared: bool) -> dict[str, object]:
    """{name: backend}: flashinfer (CUDA) and triton, decode through their own kernels."""
    from inference_engine.attention.triton_backend import TritonAttentionBackend

    common = dict(page_size=args.page, dtype=dtype, shared_prefix_decode=shared)
    out = {"triton": TritonAttentionBackend(args.heads, args.kv_heads, args.head_dim, device, **common)}
    if device.type == "cuda":
        from inference_engine.attention.flashinfer_backend import FlashInferAttentionBackend

        out["flashinfer"] = FlashInferAttentionBackend(args.heads, args.kv_heads, args.head_dim, device, **common)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--group", type=int, default=8, help="requests sharing one prefix (GRPO's n)")
    ap.add_argument("--prefix", type=int, default=256, help="shared prompt tokens (whole pages)")
    ap.add_argument("--suffix", type=int, action="append", help="own tokens of each request (repeatable; 512)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: the code path only, outputs compared")
    args = ap.parse_args(argv)
    if args.smoke:
        args.requests, args.group, args.prefix, args.heads, args.kv_heads, args.head_dim, args.page = \
            8, 4, 32, 4, 2, 16, 4
        args.suffix = args.suffix or [5]
    args.suffix = args.suffix or [512]
    if args.prefix % args.page or args.requests % args.group:
        ap.error("--prefix must be whole pages and --requests a multiple of --group")
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    bw = None if args.smoke else copy_bandwidth()
    kv_token = args.kv_heads * args.head_dim * 2 * torch.empty(0, dtype=dtype).element_size()  # K and V, one layer
    members = chunk_members(args.heads, args.kv_heads)
    chunks = args.requests // args.group * -(-args.group // members)
    layer = SimpleNamespace(layer_id=0, scaling=1 / math.sqrt(args.head_dim))
    rows: list[dict] = []
    if bw is not None:
        print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s; one layer, "
              f"{args.requests} requests in groups of {args.group}, prefix {args.prefix}, {args.heads} heads, "
              f"{args.kv_heads} kv heads, head dim {args.head_dim}, page {args.page}, bf16, eager")
        print("| suffix | path | ms | KV MB read | of copy bandwidth |")
        print("| --- | --- | --- | --- | --- |")
    for suffix in args.suffix:
        whole = args.requests * (args.prefix + suffix) * kv_token
        suffixes = args.requests * suffix * kv_token
        prefixes = chunks * args.prefix * kv_token
        outputs = {}
        for shared in (False, True):
            for name, backend in backends(args, device, dtype, shared).items():
                fb, q = make_batch(args, device, dtype, suffix, backend)
                backend.init_forward_metadata(fb)
                md = fb.attn_metadata
                assert (md.prefix is not None) == shared, "the batch formed no shared-prefix chunk"
                run = lambda: backend.forward(q, None, None, layer, fb)  # noqa: E731
                outputs[name, shared] = run().float()
                if bw is None:
                    continue
                timed = [(f"{name}, {'suffixes + shared prefixes' if shared else 'whole contexts'}", run,
                          suffixes + prefixes if shared else whole)]
                if shared and name == "flashinfer":
                    paged = tuple(t.view(-1, args.page, args.kv_heads, args.head_dim)
                                  for t in (fb.kv_pool.k_buffer[0], fb.kv_pool.v_buffer[0]))
                    out, lse = md.wrapper.run(q, paged, return_lse=True)
                    timed += [("  flashinfer decode of the suffixes, with LSE", lambda: md.wrapper.run(
                                   q, paged, return_lse=True), suffixes),
                              ("  shared-prefix kernel", lambda: shared_prefix_attention(
                                   q, fb.kv_pool.k_buffer[0], fb.kv_pool.v_buffer[0], fb.kv_indptr, fb.kv_indices,
                                   md.prefix.members, md.prefix.lens, layer.scaling, out, lse), prefixes)]
                for label, fn, nbytes in timed:
                    ms = event_ms(fn, args.iters)
                    row = {"suffix": suffix, "path": label.strip(), "ms": ms, "kv_bytes": nbytes,
                           "of_bandwidth": nbytes / (ms / 1e3) / bw}
                    rows.append(row)
                    print(f"| {suffix} | {label} | {ms:.3f} | {nbytes / 1e6:.1f} | {row['of_bandwidth']:.0%} |",
                          flush=True)
        for name in {n for n, _ in outputs}:
            torch.testing.assert_close(outputs[name, True], outputs[name, False],
                                       atol=1e-4 if args.smoke else 2e-2, rtol=0)
    if args.smoke:
        print(f"smoke: shared-prefix decode equals whole-context decode ({len(outputs)} runs)")
    return rows


if __name__ == "__main__":
    main()

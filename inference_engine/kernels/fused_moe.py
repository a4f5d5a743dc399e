"""Fused mixture-of-experts layer: routing, then two triton grouped GEMMs over the (token, expert) pairs sorted by
expert.

`route` is one program per token: softmax of the router logits in float32, the top-k (highest first, the lowest id
among ties), renormalised when asked, the weights cast to the activation dtype, and the chosen ids written to the
token's KV slot in the routed-experts buffer. `align` groups the T * top_k pairs by expert and pads each expert's
group to a multiple of BLOCK_M, so that every BLOCK_M-row block of the sorted order belongs to one expert
(`block_expert`; blocks past the end get E and return at once): one program for up to ALIGN_KERNEL_MAX_PAIRS pairs
(decode), torch ops for more. The first GEMM kernel multiplies each block's token rows by its expert's gate and up
rows together (one pass over x, two accumulators) and stores silu(gate) * up [T k, I] by pair; the second
multiplies those by the expert's down projection, scales each row by its routing weight and stores [T k, hidden]
by pair; the top_k rows of a token are summed last. Rounding follows `models.moe.moe_reference` (products, the
activation and the weighted output in the activation dtype), so results agree up to float32 accumulation order.

FP8 experts (`scales` given: e4m3 w13 / w2 with a float32 scale per `block x block` block of each expert matrix,
`weight_sync.fp8`): both GEMMs read the e4m3 weights and quantise their activation tiles on the fly, per token (or
pair) and `block` group of k, with `weight_sync.fp8`'s numerics (`kernels.fp8_gemm._quant_group`): the K loop steps
one scale block at a time, multiplies e4m3 x e4m3 on the FP8 tensor cores (blocks under 32, the FP8 MMA's k, through
float32 operands, whose TF32 rounding keeps every e4m3 value exact) and adds the float32 product times the token's
activation scale and the weight block's scale. This and not bf16 activations times dequantised weights: it is the
numerics of the dense FP8 linears and of the CPU specification (`models.moe.moe_reference` with scales, which
fake-quantises x and silu(gate) * up per token and group), so the kernel equals the specification up to float32
summation order, and it needs no extra launch or buffer (a program requantises its BLOCK_M x block tile of x or h
per k step, from L2). Rounding is otherwise unchanged: the projections, the activation and the weighted output in
x's dtype.

Nothing reads device values on the host and every shape depends on T only, so a decode step with these kernels
can be captured in a CUDA graph: the grids cover the most blocks T tokens can need, cdiv(T k, BLOCK_M) +
min(E, T k), and the empty ones exit. A decode step's MoE layer is six launches: the router GEMV, `route`,
`align`, the two GEMMs and the top-k sum. The four kernels here keep `ops/pdl.py`'s contract (launch the next
kernel, then wait for the previous one, before any load or store) and launch with PDL where it is on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from inference_engine.kernels.fp8_gemm import _quant_group
from inference_engine.ops import pdl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # triton < 3.4: pdl.enabled() is False, so no kernel traces the calls
    gdc_launch_dependents = gdc_wait = None

ONE_HOT_MAX_PAIRS = 4096  # torch align: up to this many pairs positions come from a one-hot cumsum, else a sort
ALIGN_KERNEL_MAX_PAIRS = 8192  # up to this many pairs `align` runs the one-program kernel
ALIGN_CHUNK = 64  # pairs per step of the align kernel

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the two GEMMs, by the mean rows per expert: the small one
# spreads a decode step's few rows per expert over many programs without padding them far (each expert's weights
# are read about once either way); not yet tuned on a GPU (benchmarks/moe_engine.py times the alternatives)
SMALL = (16, 32, 128, 4, 4)
LARGE = (64, 128, 64, 8, 3)
# FP8 experts: e4m3 clamp bound and the amax below which a group's scale is 1 (weight_sync.fp8.FP8_MAX / TINY)
_FP8_MAX = tl.constexpr(448.0)
_TINY = tl.constexpr(1e-30)


def default_config(pairs: int, num_experts: int) -> tuple[int, int, int, int, int]:
    """The tile config for `pairs` (token, expert) pairs over num_experts experts: SMALL up to 16 rows per expert
    on average (decode up to 256 tokens of top-8 over 128 experts), else LARGE."""
    return SMALL if pairs <= 16 * num_experts else LARGE


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, record_ptr, loc_ptr, stride_l, stride_slot, record_offset,
                  num_experts, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                  RENORMALIZE: tl.constexpr, RECORD: tl.constexpr, USE_PDL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    if USE_PDL:  # see ops/pdl.py: let the next kernel launch, then wait for the previous one's writes
        gdc_launch_dependents()
        gdc_wait()
    offs = tl.arange(0, BLOCK_E)
    mask = offs < num_experts
    x = tl.load(logits_ptr + t * stride_l + offs, mask=mask, other=float("-inf")).to(tl.float32)
    e = tl.where(mask, tl.exp(x - tl.max(x, axis=0)), 0.0)
    probs = tl.where(mask, e / tl.sum(e, axis=0), -1.0)  # [E] float32, -1 past the experts
    offs_k = tl.arange(0, BLOCK_K)
    top = tl.zeros((BLOCK_K,), dtype=tl.float32)
    top_ids = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for j in tl.static_range(TOP_K):  # the largest left, the lowest id among ties
        best = tl.max(probs, axis=0)
        best_id = tl.argmax(probs, axis=0, tie_break_left=True).to(tl.int32)
        top = tl.where(offs_k == j, best, top)
        top_ids = tl.where(offs_k == j, best_id, top_ids)
        probs = tl.where(offs == best_id, -2.0, probs)
    k_mask = offs_k < TOP_K
    if RENORMALIZE:
        top = top / tl.sum(tl.where(k_mask, top, 0.0), axis=0)
    tl.store(weights_ptr + t * TOP_K + offs_k, top.to(weights_ptr.dtype.element_ty), mask=k_mask)
    tl.store(ids_ptr + t * TOP_K + offs_k, top_ids, mask=k_mask)
    if RECORD:  # the token's KV slot, this layer's row
        slot = tl.load(loc_ptr + t)
        tl.store(record_ptr + slot * stride_slot + record_offset + offs_k,
                 top_ids.to(record_ptr.dtype.element_ty), mask=k_mask)


def route(logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype,
          record: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in dtype, expert ids [T, k] int32, best first) of router logits [T, E]; see
    `models.moe.route_reference`. record = (buffer [slots, moe layers, k], slots [T], moe layer): the ids also
    go to buffer[slots[t], moe layer]."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    tokens, experts = logits.shape
    weights = torch.empty(tokens, top_k, dtype=dtype, device=logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=logits.device)
    if record is not None:
        buffer, loc, layer = record
        if buffer.stride(2) != 1 or buffer.stride(1) != top_k:
            raise ValueError(f"routed-experts buffer strides {buffer.stride()}: expected [slots, layers, {top_k}] "
                             "contiguous inside a slot")
        buffer_ptr, loc_ptr, stride_slot, offset = buffer, loc, buffer.stride(0), layer * top_k
    else:
        buffer_ptr, loc_ptr, stride_slot, offset = ids, ids, 0, 0
    if tokens:
        _route_kernel[(tokens,)](logits, weights, ids, buffer_ptr, loc_ptr, logits.stride(0), stride_slot, offset,
                                 experts, TOP_K=top_k,
                                 BLOCK_E=triton.next_power_of_2(experts), BLOCK_K=triton.next_power_of_2(top_k),
                                 RENORMALIZE=renormalize, RECORD=record is not None, num_warps=4,
                                 **pdl.launch(logits.device))
    return weights, ids


@triton.jit
def _align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, num_pairs, num_blocks, num_experts, BLOCK_M: tl.constexpr,
                  BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < num_experts
    lanes = tl.arange(0, CHUNK)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):  # pairs per expert
        ids = tl.load(ids_ptr + start + lanes, mask=start + lanes < num_pairs, other=-1)
        counts += tl.sum((ids[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)  # [E] end of each expert's padded group
    for start in range(0, num_blocks * BLOCK_M, CHUNK):  # every row: no pair, until the pairs are placed
        tl.store(sorted_ptr + start + lanes, num_pairs, mask=start + lanes < num_blocks * BLOCK_M)
    tl.debug_barrier()  # the block's stores are visible to all its threads before the pairs overwrite them
    running = pad_end - padded  # [E] next free row of each expert's group
    for start in range(0, num_pairs, CHUNK):  # each pair to its group, in pair order
        ids = tl.load(ids_ptr + start + lanes, mask=start + lanes < num_pairs, other=-1)
        onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)  # [C, E]
        before = tl.cumsum(onehot, axis=0) - onehot  # earlier pairs of the same expert in this chunk
        dest = tl.sum(onehot * (before + running[None, :]), axis=1)
        tl.store(sorted_ptr + dest, start + lanes, mask=start + lanes < num_pairs)
        running += tl.sum(onehot, axis=0)
    for start in range(0, num_blocks, CHUNK):  # a block's expert: the groups that end at or before its first row
        b = start + lanes
        ended = (pad_end[None, :] <= (b * BLOCK_M)[:, None]) & e_mask[None, :]
        tl.store(block_expert_ptr + b, tl.sum(ended.to(tl.int32), axis=1), mask=b < num_blocks)


def num_blocks(pairs: int, num_experts: int, block_m: int) -> int:
    """Blocks of block_m rows that `pairs` pairs over num_experts experts can need, padding included."""
    return triton.cdiv(pairs, block_m) + min(num_experts, pairs)


def align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pairs [blocks * block_m] int32, block_expert [blocks] int32) of expert ids [T, k].

    sorted_pairs lists the pair indices (t * k + j) grouped by expert, in pair order inside a group, each group
    padded with T * k (no pair) to a multiple of block_m; block_expert[b] is the expert of rows
    [b * block_m, (b + 1) * block_m), num_experts for a block past the last group. One program for up to
    ALIGN_KERNEL_MAX_PAIRS pairs, else `align_reference`."""
    pairs = ids.numel()
    if pairs > ALIGN_KERNEL_MAX_PAIRS:
        return align_reference(ids, num_experts, block_m)
    blocks = num_blocks(pairs, num_experts, block_m)
    sorted_pairs = torch.empty(blocks * block_m, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=ids.device)
    _align_kernel[(1,)](ids.reshape(-1).to(torch.int32), sorted_pairs, block_expert, pairs, blocks, num_experts,
                        BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts), CHUNK=ALIGN_CHUNK,
                        num_warps=8, **pdl.launch(ids.device))
    return sorted_pairs, block_expert


def align_reference(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`align` in torch ops (no host syncs): a one-hot cumsum up to ONE_HOT_MAX_PAIRS pairs, else a stable sort."""
    pairs = ids.numel()
    flat = ids.reshape(-1).long()
    blocks = num_blocks(pairs, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat,
                                                                                        torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)  # [E] end of each expert's padded group
    if pairs <= ONE_HOT_MAX_PAIRS:  # rank of each pair inside its expert, in pair order
        onehot = F.one_hot(flat, num_experts)  # [pairs, E]
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1
        dest = pad_end[flat] - padded[flat] + rank
        index = torch.arange(pairs, device=ids.device)
    else:
        index = torch.argsort(flat, stable=True)  # pairs by expert, pair order inside
        sorted_e = flat[index]
        first = torch.cumsum(counts, 0) - counts  # [E] first sorted position of each expert
        dest = pad_end[sorted_e] - padded[sorted_e] + torch.arange(pairs, device=ids.device) - first[sorted_e]
    sorted_pairs = torch.full((blocks * block_m,), pairs, dtype=torch.int32, device=ids.device)
    sorted_pairs[dest] = index.to(torch.int32)
    starts = torch.arange(blocks, dtype=torch.int64, device=ids.device) * block_m
    block_expert = torch.searchsorted(pad_end, starts, right=True).to(torch.int32)  # E past the last group
    return sorted_pairs, block_expert


@triton.jit
def _fp8_dot(a, w, w_scale, acc, QBLOCK: tl.constexpr):
    """acc + (a quantised per row, e4m3) . w (e4m3 [QBLOCK, BN]) * row scales * w_scale [BN]: one k block of an FP8
    GEMM, a [BM, QBLOCK] in float32 (zeros where masked: their scale is 1 and they add nothing)."""
    aq, a_scale = _quant_group(a, _FP8_MAX, _TINY)
    if QBLOCK < 32:  # below the FP8 MMA's k: float32 operands (TF32 holds every e4m3 value exactly)
        prod = tl.dot(aq.to(tl.float32), w.to(tl.float32))
    else:
        prod = tl.dot(aq, w)
    return acc + prod * a_scale[:, None] * w_scale[None, :]


@triton.jit
def _block_pairs(pairs_ptr, pid_m, num_pairs, BLOCK_M: tl.constexpr, PAIR_BLOCKS: tl.constexpr):
    """The pair index of each row of block pid_m [BM] (num_pairs: a padding row): the aligned list's, or with
    PAIR_BLOCKS pair pid_m in row 0 and padding below."""
    rows = tl.arange(0, BLOCK_M)
    if PAIR_BLOCKS:
        pair = tl.where(rows == 0, pid_m, num_pairs)
    else:
        pair = tl.load(pairs_ptr + pid_m * BLOCK_M + rows)
    return pair.to(tl.int64)


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, ws_ptr, out_ptr, pairs_ptr, block_expert_ptr, num_pairs, N, K, stride_xt, stride_we,
                    stride_wn, stride_wse, stride_wsn, stride_ot, TOP_K: tl.constexpr, NUM_EXPERTS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QBLOCK: tl.constexpr,
                    IEEE: tl.constexpr, PAIR_BLOCKS: tl.constexpr, USE_PDL: tl.constexpr):
    """out[pair, n] = silu(x[t] . w[e, n]) * (x[t] . w[e, N + n]) for the pairs of one block and BLOCK_N columns.
    QBLOCK > 0: w is e4m3 with scales ws [E, 2N / QBLOCK, K / QBLOCK], x quantised on the fly (BLOCK_K == QBLOCK).
    PAIR_BLOCKS: block b is pair b alone, of expert block_expert[b] (the ids themselves; no align)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert >= NUM_EXPERTS:
        return
    dt: tl.constexpr = out_ptr.dtype.element_ty
    pair = _block_pairs(pairs_ptr, pid_m, num_pairs, BLOCK_M, PAIR_BLOCKS)  # [BM]
    valid = pair < num_pairs
    token = tl.where(valid, pair // TOP_K, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :]  # [BM, BK]
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, BN]
    u_ptrs = g_ptrs + N * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        a = tl.load(x_ptrs + k0, mask=valid[:, None] & k_mask[None, :], other=0.0)
        g = tl.load(g_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        u = tl.load(u_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if QBLOCK:  # FP8: this k block's weight scales (gate rows' blocks, then up rows' blocks)
            gs_ptrs = ws_ptr + expert * stride_wse + (offs_n // QBLOCK).to(tl.int64) * stride_wsn + k0 // QBLOCK
            g_s = tl.load(gs_ptrs, mask=n_mask, other=0.0)
            u_s = tl.load(gs_ptrs + (N // QBLOCK) * stride_wsn, mask=n_mask, other=0.0)
            a = a.to(tl.float32)
            acc_g = _fp8_dot(a, g, g_s, acc_g, QBLOCK)
            acc_u = _fp8_dot(a, u, u_s, acc_u, QBLOCK)
        elif IEEE:  # float32 operands without TF32 rounding
            acc_g = tl.dot(a, g, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, u, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
    gate = acc_g.to(dt).to(tl.float32)  # each projection rounded like the reference's linear
    up = acc_u.to(dt).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    out_ptrs = out_ptr + pair[:, None] * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, (act * up).to(dt), mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, ws_ptr, weights_ptr, out_ptr, pairs_ptr, block_expert_ptr, num_pairs, N, K, stride_ht,
                 stride_we, stride_wn, stride_wse, stride_wsn, stride_ot, NUM_EXPERTS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QBLOCK: tl.constexpr,
                 IEEE: tl.constexpr, PAIR_BLOCKS: tl.constexpr, USE_PDL: tl.constexpr):
    """out[pair, n] = weight[pair] * (h[pair] . w[e, n]) for the pairs of one block and BLOCK_N columns.
    QBLOCK > 0: w is e4m3 with scales ws [E, N / QBLOCK, K / QBLOCK], h quantised on the fly (BLOCK_K == QBLOCK).
    PAIR_BLOCKS: as in _gate_up_kernel."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert >= NUM_EXPERTS:
        return
    dt: tl.constexpr = out_ptr.dtype.element_ty
    pair = _block_pairs(pairs_ptr, pid_m, num_pairs, BLOCK_M, PAIR_BLOCKS)  # [BM]
    valid = pair < num_pairs
    safe = tl.where(valid, pair, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + safe[:, None] * stride_ht + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        a = tl.load(h_ptrs + k0, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if QBLOCK:  # FP8: this k block's weight scales
            w_s = tl.load(ws_ptr + expert * stride_wse + (offs_n // QBLOCK).to(tl.int64) * stride_wsn + k0 // QBLOCK,
                          mask=n_mask, other=0.0)
            acc = _fp8_dot(a.to(tl.float32), w, w_s, acc, QBLOCK)
        elif IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    weight = tl.load(weights_ptr + safe, mask=valid, other=0.0).to(tl.float32)
    y = acc.to(dt).to(tl.float32) * weight[:, None]
    out_ptrs = out_ptr + pair[:, None] * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, y.to(dt), mask=valid[:, None] & n_mask[None, :])


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
              config: tuple[int, int, int, int, int] | None = None, expert_offset: int | None = None,
              scales: tuple[torch.Tensor, torch.Tensor] | None = None, block: int = 0,
              pair_blocks: bool | None = None) -> torch.Tensor:
    """sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, j]: [T, hidden] of x [T, hidden],
    w13 [E, 2I, hidden] (gate rows, then up rows), w2 [E, hidden, I], weights [T, k] (x's dtype), ids [T, k].

    expert_offset (expert parallelism): w13 / w2 hold experts [expert_offset, expert_offset + E) of the model's;
    pairs routed elsewhere are grouped into one more expert, E, whose blocks the GEMMs skip (their rows stay zero:
    another rank computes them). Still no host read, so CUDA graphs capture it.

    scales = (w13 scale_inv [E, 2I/B, ceil(hidden/B)], w2 scale_inv [E, ceil(hidden/B), I/B]), block B: FP8 experts
    (w13 / w2 e4m3, I a multiple of B), activations quantised per token and B group inside the GEMMs (module
    docstring); config's BLOCK_K is B then.

    pair_blocks: each pair its own block, no align (only right where a token's experts are distinct); None: at one
    token (False there keeps the align, for benchmarks that time both)."""
    tokens, top_k = ids.shape
    num_experts, two_i, hidden = w13.shape
    inter = two_i // 2
    if w2.shape != (num_experts, hidden, inter) or x.shape[-1] != hidden:
        raise ValueError(f"fused_moe: x {tuple(x.shape)}, w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit "
                         "x [T, hidden], w13 [E, 2I, hidden], w2 [E, hidden, I]")
    if scales is not None:
        s13, s2 = (s.contiguous() for s in scales)
        hb = triton.cdiv(hidden, block)
        if inter % block or s13.shape != (num_experts, 2 * inter // block, hb) or \
                s2.shape != (num_experts, hb, inter // block) or w13.dtype != torch.float8_e4m3fn:
            raise ValueError(f"fused_moe: fp8 block {block}, e4m3 w13 {tuple(w13.shape)} ({w13.dtype}) with scales "
                             f"{tuple(s13.shape)}, w2 {tuple(w2.shape)} with {tuple(s2.shape)}: expected scales "
                             f"[E, 2I/B, ceil(hidden/B)] and [E, ceil(hidden/B), I/B], I a multiple of B")
    else:
        s13, s2, block = w13, w2, 0  # not read
    groups = num_experts
    if expert_offset is not None:  # other ranks' pairs: group E, skipped, their rows left zero
        local = ids.to(torch.int32) - expert_offset
        ids = torch.where((local >= 0) & (local < num_experts), local, num_experts)
        groups = num_experts + 1
    alloc = torch.empty if expert_offset is None else torch.zeros
    out = alloc(tokens, top_k, hidden, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out.sum(1)
    x = x.contiguous()
    w13, w2 = w13.contiguous(), w2.contiguous()
    pairs = tokens * top_k
    block_m, block_n, block_k, warps, stages = config or default_config(pairs, num_experts)
    if pair_blocks is None:
        pair_blocks = tokens == 1  # one token's top-k experts are distinct: each pair is its expert's only row
    if pair_blocks:  # block b = pair b, of expert ids[0, b]: no align launch (a decode step of batch 1)
        block_expert = ids.reshape(-1)
        sorted_pairs = block_expert  # not read
    else:
        sorted_pairs, block_expert = align(ids, groups, block_m)
    blocks = block_expert.numel()
    h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)  # silu(gate) * up by pair
    ieee = x.dtype == torch.float32  # float32 engines: no TF32 rounding of the inputs
    fp8 = block > 0
    _gate_up_kernel[(blocks, triton.cdiv(inter, block_n))](
        x, w13, s13, h, sorted_pairs, block_expert, pairs, inter, hidden, x.stride(0), w13.stride(0), w13.stride(1),
        s13.stride(0) if fp8 else 0, s13.stride(1) if fp8 else 0, h.stride(0), TOP_K=top_k, NUM_EXPERTS=num_experts,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block if fp8 else min(block_k, triton.next_power_of_2(hidden)),
        QBLOCK=block, IEEE=ieee, PAIR_BLOCKS=pair_blocks, num_warps=warps, num_stages=stages, **pdl.launch(x.device))
    flat_out = out.view(pairs, hidden)
    _down_kernel[(blocks, triton.cdiv(hidden, block_n))](
        h, w2, s2, weights.contiguous().view(-1), flat_out, sorted_pairs, block_expert, pairs, hidden, inter,
        h.stride(0), w2.stride(0), w2.stride(1), s2.stride(0) if fp8 else 0, s2.stride(1) if fp8 else 0,
        flat_out.stride(0), NUM_EXPERTS=num_experts, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block if fp8 else min(block_k, max(16, triton.next_power_of_2(inter))), QBLOCK=block, IEEE=ieee,
        PAIR_BLOCKS=pair_blocks, num_warps=warps, num_stages=stages, **pdl.launch(x.device))
    return out.sum(1) if top_k > 1 else out.view(tokens, hidden)

"""Triton kernels of the fused ops (one launch each), computing exactly what `reference.py` specifies.

Each kernel rounds intermediate values to the activation dtype where the reference (and HF) does, so
bf16 results agree with the torch path to the last bit up to float32 reduction order. None of them
reads tensor values on the host: all are safe inside CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inference_engine.ops import pdl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # triton < 3.4: pdl.enabled() is False, so no kernel traces the calls
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro, n_cols,
                     eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    if USE_PDL:  # see ops/pdl.py: let the next kernel launch, then wait for the previous one's writes
        gdc_launch_dependents()
        gdc_wait()
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # residual' = x + residual, rounded to the activation dtype like a torch add
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round(x, dtype: tl.constexpr):
    return x.to(dtype).to(tl.float32)


@triton.jit
def _to_e4m3(x):
    """float32 x clamped to e4m3's finite range and rounded to nearest even (kv_cache.quantize_kv)."""
    return tl.minimum(tl.maximum(x, -448.0), 448.0).to(tl.float8e4nv)


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, loc_ptr, k_cache_ptr,
                         v_cache_ptr, k_inv_ptr, v_inv_ptr, stride_t, stride_table, stride_slot, eps,
                         NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HALF: tl.constexpr, BLOCK: tl.constexpr, HAS_NORM: tl.constexpr, WRITE_KV: tl.constexpr,
                         KV_FP8: tl.constexpr, USE_PDL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    head = tl.program_id(1)  # q heads, then k heads, then (WRITE_KV) v heads: their order in the qkv row
    is_q = head < NUM_HEADS
    is_v = head >= NUM_HEADS + NUM_KV_HEADS
    dt: tl.constexpr = q_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    src = qkv_ptr + t * stride_t + head * HEAD_DIM
    raw1 = tl.load(src + offs, mask=mask, other=0.0)  # first half of the head
    raw2 = tl.load(src + HALF + offs, mask=mask, other=0.0)  # second half
    x1, x2 = raw1.to(tl.float32), raw2.to(tl.float32)
    if HAS_NORM:
        inv_rms = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / HEAD_DIM + eps)
        w1 = tl.where(is_q, tl.load(qw_ptr + offs, mask=mask, other=0.0), tl.load(kw_ptr + offs, mask=mask, other=0.0))
        w2 = tl.where(is_q, tl.load(qw_ptr + HALF + offs, mask=mask, other=0.0),
                      tl.load(kw_ptr + HALF + offs, mask=mask, other=0.0))
        x1 = _round(w1.to(tl.float32) * _round(x1 * inv_rms, dt), dt)
        x2 = _round(w2.to(tl.float32) * _round(x2 * inv_rms, dt), dt)
    pos = tl.load(pos_ptr + t)
    c = _round(tl.load(cos_ptr + pos * stride_table + offs, mask=mask, other=0.0), dt)
    s = _round(tl.load(sin_ptr + pos * stride_table + offs, mask=mask, other=0.0), dt)
    out1 = (_round(x1 * c, dt) + _round(-x2 * s, dt)).to(dt)
    out2 = (_round(x2 * c, dt) + _round(x1 * s, dt)).to(dt)
    kv_head = tl.minimum(tl.maximum(head - NUM_HEADS, 0), NUM_KV_HEADS - 1)
    q_dst = q_ptr + (t * NUM_HEADS + tl.minimum(head, NUM_HEADS - 1)) * HEAD_DIM
    k_dst = k_ptr + (t * NUM_KV_HEADS + kv_head) * HEAD_DIM
    q_mask = offs < tl.where(is_q, HALF, 0)  # the head's output goes to q, to k, or (raw) to the v cache
    k_mask = offs < tl.where(is_q | is_v, 0, HALF)
    tl.store(q_dst + offs, out1, mask=q_mask)
    tl.store(q_dst + HALF + offs, out2, mask=q_mask)
    tl.store(k_dst + offs, out1, mask=k_mask)
    tl.store(k_dst + HALF + offs, out2, mask=k_mask)
    if WRITE_KV:  # the new token's k (after norm and RoPE) and v into its slot of the layer's KV cache
        slot = tl.load(loc_ptr + t)
        v_head = tl.maximum(head - NUM_HEADS - NUM_KV_HEADS, 0)
        k_cache = k_cache_ptr + slot * stride_slot + kv_head * HEAD_DIM
        v_cache = v_cache_ptr + slot * stride_slot + v_head * HEAD_DIM
        v_mask = offs < tl.where(is_v, HALF, 0)
        if KV_FP8:  # e4m3 of the values rounded to dt, times the head's float32 1 / scale
            k_inv = tl.load(k_inv_ptr + kv_head)
            v_inv = tl.load(v_inv_ptr + v_head)
            tl.store(k_cache + offs, _to_e4m3(out1.to(tl.float32) * k_inv), mask=k_mask)
            tl.store(k_cache + HALF + offs, _to_e4m3(out2.to(tl.float32) * k_inv), mask=k_mask)
            tl.store(v_cache + offs, _to_e4m3(raw1.to(dt).to(tl.float32) * v_inv), mask=v_mask)
            tl.store(v_cache + HALF + offs, _to_e4m3(raw2.to(dt).to(tl.float32) * v_inv), mask=v_mask)
        else:
            tl.store(k_cache + offs, out1, mask=k_mask)
            tl.store(k_cache + HALF + offs, out2, mask=k_mask)
            tl.store(v_cache + offs, raw1.to(dt), mask=v_mask)
            tl.store(v_cache + HALF + offs, raw2.to(dt), mask=v_mask)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    dt: tl.constexpr = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    act = _round(gate / (1.0 + tl.exp(-gate)), dt)
    tl.store(out_ptr + row * stride_o + offs, (act * up).to(dt), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D [rows, last dim] tensor with unit stride in the last dim."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused (residual add +) RMSNorm; see reference.rms_norm / add_rms_norm."""
    shape, n = x.shape, x.shape[-1]
    x2 = _rows(x)
    out = torch.empty_like(x2)
    block = triton.next_power_of_2(n)
    warps = 4 if block <= 1024 else 8
    if residual is None:
        _rms_norm_kernel[(x2.shape[0],)](x2, x2, weight, out, out, x2.stride(0), 0, out.stride(0), 0, n, eps,
                                         HAS_RESIDUAL=False, BLOCK=block, num_warps=warps,
                                         **pdl.launch(x.device))
        return out.view(shape)
    r2 = _rows(residual)
    res_out = torch.empty_like(x2)
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, res_out, x2.stride(0), r2.stride(0), out.stride(0),
                                     res_out.stride(0), n, eps, HAS_RESIDUAL=True, BLOCK=block, num_warps=warps,
                                     **pdl.launch(x.device))
    return out.view(shape), res_out.view(shape)


def qk_norm_rope(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                 num_heads: int, num_kv_heads: int, head_dim: int, q_weight: torch.Tensor | None,
                 k_weight: torch.Tensor | None, eps: float,
                 kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 kv_inv_scale: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused per-head q/k RMSNorm and RoPE (and the KV-cache write, quantised to e4m3 with kv_inv_scale) in one
    launch; see reference.qk_norm_rope."""
    qkv = _rows(qkv)
    tokens = qkv.shape[0]
    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)  # [T, H, D]
    k = torch.empty(tokens, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)  # [T, KVH, D]
    half = head_dim // 2
    has_norm = q_weight is not None
    if kv_cache is not None:
        k_cache, v_cache, loc = kv_cache
        cache_dtype = torch.float8_e4m3fn if kv_inv_scale is not None else qkv.dtype
        if k_cache.dtype != cache_dtype or k_cache.stride(-1) != 1 or k_cache.stride(-2) != head_dim:
            raise ValueError(f"KV cache buffers must be [slots, {num_kv_heads}, {head_dim}] {cache_dtype} with unit "
                             f"strides inside a slot, got {k_cache.dtype} strides {k_cache.stride()}")
    else:
        k_cache = v_cache = loc = qkv
    k_inv, v_inv = kv_inv_scale if kv_inv_scale is not None else (qkv, qkv)
    if tokens:
        _qk_norm_rope_kernel[(tokens, num_heads + num_kv_heads * (2 if kv_cache is not None else 1))](
            qkv, positions, cos_table, sin_table, q_weight if has_norm else qkv, k_weight if has_norm else qkv,
            q, k, loc, k_cache, v_cache, k_inv, v_inv, qkv.stride(0), cos_table.stride(0),
            k_cache.stride(0) if kv_cache is not None else 0, eps, NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
            HEAD_DIM=head_dim, HALF=half, BLOCK=triton.next_power_of_2(half), HAS_NORM=has_norm,
            WRITE_KV=kv_cache is not None, KV_FP8=kv_inv_scale is not None, num_warps=1, **pdl.launch(qkv.device))
    kv_start = (num_heads + num_kv_heads) * head_dim
    v = qkv[:, kv_start:kv_start + num_kv_heads * head_dim].view(-1, num_kv_heads, head_dim)
    return q, k, v


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Fused silu(gate) * up; see reference.silu_and_mul."""
    x = _rows(gate_up)
    n = x.shape[-1] // 2
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if x.shape[0]:
        _silu_and_mul_kernel[(x.shape[0], triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n,
                                                                  BLOCK=block, num_warps=4,
                                                                  **pdl.launch(x.device))
    return out.view(*gate_up.shape[:-1], n)


@triton.jit
def _gemv_w_tile(w_ptrs, k0, K, n_mask, offs_k, EVEN_K: tl.constexpr):
    """The weight tile [BN, BK] at column k0, read once (evict_first)."""
    if EVEN_K:
        return tl.load(w_ptrs + k0, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
    return tl.load(w_ptrs + k0, mask=n_mask[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def _gemv_step(acc, w, x_ptrs, k0, K, m_mask, offs_k, dt: tl.constexpr, SILU_MUL: tl.constexpr,
               EVEN_K: tl.constexpr):
    """acc [BM, BN, BK] + x's tile at column k0 (cached: evict_last) times the weight tile w."""
    k_mask = (k0 + offs_k) < K
    if EVEN_K:
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0, eviction_policy="evict_last")
    else:
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_last")
    if SILU_MUL:  # x is [gate | up] of width 2K: the input is silu(gate) * up, rounded as silu_and_mul rounds
        up = tl.load(x_ptrs + K + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_last")
        gate = x.to(tl.float32)
        act = _round(gate / (1.0 + tl.exp(-gate)), dt)
        x = act * up.to(tl.float32)
    return acc + x.to(dt).to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]  # [BM, BN, BK]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, best_ptr, best_id_ptr, sum_ptr, M, N, K, stride_xm, stride_wn,
                 stride_ym, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, GREEDY: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    dt: tl.constexpr = x_ptr.dtype.element_ty
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]  # [BN, BK]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_start = 0
    if USE_PDL:  # no earlier kernel writes the weights: stream the first tile in while the previous kernel ends
        gdc_launch_dependents()
        w = _gemv_w_tile(w_ptrs, 0, K, n_mask, offs_k, EVEN_K)
        gdc_wait()  # x (and the output) belong to the previous kernel until it has completed
        acc = _gemv_step(acc, w, x_ptrs, 0, K, m_mask, offs_k, dt, SILU_MUL, EVEN_K)
        k_start = BLOCK_K
    for k0 in range(k_start, K, BLOCK_K):  # each weight byte is read once; x stays cached
        w = _gemv_w_tile(w_ptrs, k0, K, n_mask, offs_k, EVEN_K)
        acc = _gemv_step(acc, w, x_ptrs, k0, K, m_mask, offs_k, dt, SILU_MUL, EVEN_K)
    y = tl.sum(acc, axis=2)  # [BM, BN]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = y.to(dt).to(y_ptr.dtype.element_ty)  # rounded like the activation-dtype product, also when stored as float32
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y, mask=m_mask[:, None] & n_mask[None, :])
    if GREEDY:  # per row, this block's largest output, its first index, and sum(exp(output - largest))
        yf = tl.where(n_mask[None, :], y.to(tl.float32), float("-inf"))  # [BM, BN], exactly the stored values
        best = tl.max(yf, axis=1)  # [BM]
        best_id = tl.argmax(yf, axis=1, tie_break_left=True) + pid * BLOCK_N  # the lowest index among ties
        total = tl.sum(tl.exp(yf - best[:, None]), axis=1)
        part = offs_m * tl.num_programs(0) + pid  # [BM] into [M, programs]
        tl.store(best_ptr + part, best, mask=m_mask)
        tl.store(best_id_ptr + part, best_id, mask=m_mask)
        tl.store(sum_ptr + part, total, mask=m_mask)


@triton.jit
def _greedy_merge_kernel(best_ptr, best_id_ptr, sum_ptr, tokens_ptr, logprobs_ptr, P, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    m = tl.full((), float("-inf"), tl.float32)  # the row's largest logit so far
    total = tl.zeros((), tl.float32)  # sum of exp(logit - m) so far
    token = tl.full((), 0, tl.int64)
    for start in range(0, P, BLOCK):  # blocks in vocabulary order
        offs = start + tl.arange(0, BLOCK)
        mask = offs < P
        best = tl.load(best_ptr + row * P + offs, mask=mask, other=float("-inf"))
        sums = tl.load(sum_ptr + row * P + offs, mask=mask, other=0.0)
        chunk = tl.max(best, axis=0)
        first = tl.argmax(best, axis=0, tie_break_left=True)
        chunk_token = tl.load(best_id_ptr + row * P + start + first).to(tl.int64)
        token = tl.where(chunk > m, chunk_token, token)  # strictly: an earlier block keeps a tie, as torch.argmax
        m_new = tl.maximum(m, chunk)
        total = total * tl.exp(m - m_new) + tl.sum(tl.where(mask, sums * tl.exp(best - m_new), 0.0), axis=0)
        m = m_new
    tl.store(tokens_ptr + row, token)
    tl.store(logprobs_ptr + row, -tl.log(total))  # log-prob of the argmax: m - logsumexp = -log(sum(exp(x - m)))


def gemv_config(rows: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the GEMV for x [rows, k] @ W[n, k]^T.

    One row (H100, the 8B shape's linears, benchmarks/decode_kernels.py): 1024-wide K blocks, and at
    least ~1500 programs (4 output rows each, 2 for N < 6144) so that the last wave is short."""
    block_m = triton.next_power_of_2(rows)
    if block_m == 1:
        return 1, 4 if n >= 6144 else 2, min(1024, triton.next_power_of_2(k)), 4
    return block_m, 4, min(1024 // block_m, triton.next_power_of_2(k)), 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: tuple[int, int, int, int] | None = None, silu_mul: bool = False,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) for few rows M, accumulated in float32; see reference.linear.

    silu_mul: x is [M, 2K] = [gate | up] and the input is silu_and_mul(x); out_dtype (default x's) receives the
    result rounded to x's dtype first (float32 logits of a bf16 model, without a separate cast)."""
    x2 = _rows(x)
    rows, k = x2.shape[0], weight.shape[1]
    if x2.shape[1] != (2 * k if silu_mul else k):
        raise ValueError(f"linear: input width {x2.shape[1]} does not match weight {tuple(weight.shape)}"
                         f"{' (silu_mul: 2 x in_features)' if silu_mul else ''}")
    out = torch.empty(rows, weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    _gemv(x2, weight, bias, out, config or gemv_config(rows, weight.shape[0], k), silu_mul)
    return out.view(*x.shape[:-1], weight.shape[0])


def _gemv(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
          config: tuple[int, int, int, int], silu_mul: bool = False,
          greedy: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """One GEMV launch into out [M, N]; greedy = (best, best_id, sum) [M, programs] also get each block's partials."""
    (rows, n), k = out.shape, weight.shape[1]
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    block_m, block_n, block_k, warps = config
    best, best_id, sums = greedy if greedy is not None else (out, out, out)
    if rows:
        _gemv_kernel[(triton.cdiv(n, block_n),)](
            x2, weight, bias if bias is not None else weight, out, best, best_id, sums, rows, n, k, x2.stride(0),
            weight.stride(0), out.stride(0), HAS_BIAS=bias is not None, SILU_MUL=silu_mul, GREEDY=greedy is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, num_warps=warps,
            **pdl.launch(x2.device))


def linear_greedy(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, int, int, int] | None = None,
                  merge_block: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 logits [M, N] of x [M, K] @ weight [N, K]^T with each row's argmax [M] and log-prob [M]; see reference.

    The GEMV's programs also reduce their block of logits (max, first argmax, sum of exp); a second small kernel
    merges the blocks in vocabulary order, merge_block of them at a time, so ties go to the lowest token id as in
    torch.argmax."""
    x2 = _rows(x)
    rows, (n, k) = x2.shape[0], weight.shape
    if x2.shape[1] != k:
        raise ValueError(f"linear_greedy: input width {x2.shape[1]} does not match weight {tuple(weight.shape)}")
    config = config or gemv_config(rows, n, k)
    programs = triton.cdiv(n, config[1])
    logits = torch.empty(rows, n, dtype=torch.float32, device=x.device)
    parts = (torch.empty(rows, programs, dtype=torch.float32, device=x.device),  # [M, programs] block maxima
             torch.empty(rows, programs, dtype=torch.int32, device=x.device),  # their first token ids
             torch.empty(rows, programs, dtype=torch.float32, device=x.device))  # sum(exp(logit - block max))
    _gemv(x2, weight, None, logits, config, greedy=parts)
    tokens = torch.empty(rows, dtype=torch.int64, device=x.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        _greedy_merge_kernel[(rows,)](*parts, tokens, logprobs, programs,
                                      BLOCK=min(merge_block, triton.next_power_of_2(programs)), num_warps=8,
                                      **pdl.launch(x.device))
    return logits, tokens, logprobs


@triton.jit
def _greedy_partials_kernel(logits_ptr, best_ptr, best_id_ptr, sum_ptr, V, stride_l, CHUNK: tl.constexpr,
                            BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    m = tl.full((), float("-inf"), tl.float32)  # this chunk's largest logit so far, its first id, sum(exp(x - m))
    token = tl.full((), 0, tl.int32)
    total = tl.zeros((), tl.float32)
    for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row * stride_l + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=0)
        block_id = tl.argmax(x, axis=0, tie_break_left=True) + start
        token = tl.where(block_max > m, block_id, token)  # strictly: an earlier block keeps a tie
        m_new = tl.maximum(m, block_max)
        scale = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))  # a block past the end: nothing yet
        total = total * scale + tl.sum(tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new)), axis=0)
        m = m_new
    part = row * tl.num_programs(1) + chunk
    tl.store(best_ptr + part, m)
    tl.store(best_id_ptr + part, token)
    tl.store(sum_ptr + part, total)


def greedy(logits: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """The argmax [B] of float32 logits [B, V] (the lowest id among ties) and its log-prob [B]; see reference.greedy.

    One pass over the logits: programs of `chunk` columns each reduce their part (max, first argmax,
    sum(exp(logit - max))) and `_greedy_merge_kernel` merges the chunks of a row in vocabulary order. torch's
    argmax + logsumexp read the [B, V] logits about six times (0.57 ms per step at B = 256 on Qwen3's vocabulary)."""
    logits = _rows(logits)
    rows, vocab = logits.shape
    chunk = min(chunk, triton.next_power_of_2(vocab))
    block = min(2048, chunk)
    chunks = triton.cdiv(vocab, chunk)
    parts = (torch.empty(rows, chunks, dtype=torch.float32, device=logits.device),
             torch.empty(rows, chunks, dtype=torch.int32, device=logits.device),
             torch.empty(rows, chunks, dtype=torch.float32, device=logits.device))
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        launch = pdl.launch(logits.device)
        _greedy_partials_kernel[(rows, chunks)](logits, *parts, vocab, logits.stride(0), CHUNK=chunk, BLOCK=block,
                                                num_warps=4, **launch)
        _greedy_merge_kernel[(rows,)](*parts, tokens, logprobs, chunks, BLOCK=triton.next_power_of_2(chunks),
                                      num_warps=1, **launch)
    return tokens, logprobs


@triton.jit
def _context_slots_kernel(table_ptr, rows_ptr, indptr_ptr, out_ptr, stride_t, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    start = tl.load(indptr_ptr + i)
    mask = offs < tl.load(indptr_ptr + i + 1) - start
    row = tl.load(rows_ptr + i)
    slots = tl.load(table_ptr + row * stride_t + offs, mask=mask)
    tl.store(out_ptr + start + offs, slots, mask=mask)


def context_slots(table: torch.Tensor, rows: torch.Tensor, kv_indptr: torch.Tensor, total: int,
                  max_len: int, block: int = 1024) -> torch.Tensor:
    """One launch of `reference.context_slots`: a program per (request, block of `block` positions)."""
    out = torch.empty(total, dtype=table.dtype, device=table.device)
    if rows.numel() and max_len:
        _context_slots_kernel[(rows.numel(), triton.cdiv(max_len, block))](table, rows, kv_indptr, out,
                                                                          table.stride(0), BLOCK=block)
    return out


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


@triton.jit
def _seeded_race_kernel(probs_ptr, seeds_ptr, offsets_ptr, out_ptr, V, stride_p, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    seed = tl.load(seeds_ptr + row)
    key = _mix32(tl.load(offsets_ptr + row) & 0xFFFFFFFF)
    key = _mix32(key ^ ((seed >> 32) & 0xFFFFFFFF))
    key = _mix32(key ^ (seed & 0xFFFFFFFF))
    best = tl.full((), -1.0, tl.float32)
    best_id = tl.full((), 0, tl.int64)
    for start in range(0, V, BLOCK):
        ids = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = ids < V
        p = tl.load(probs_ptr + row * stride_p + ids, mask=mask, other=0.0).to(tl.float32)
        h = _mix32((key + ids * 0x9E3779B9) & 0xFFFFFFFF)
        u = ((h >> 9).to(tl.float32) * 2 + 1) * 5.9604644775390625e-08  # 2^-24
        score = tl.where(mask, p / -tl.log(u), -1.0)
        block_best = tl.max(score, axis=0)
        block_id = tl.argmax(score, axis=0).to(tl.int64) + start
        better = block_best > best  # strictly: the first maximum wins, as torch.argmax
        best_id = tl.where(better, block_id, best_id)
        best = tl.where(better, block_best, best)
    tl.store(out_ptr + row, best_id)


def seeded_race(probs: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """One launch over rows of probs [B, V]; see reference.seeded_race."""
    probs = _rows(probs)
    out = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
    if probs.shape[0]:
        _seeded_race_kernel[(probs.shape[0],)](probs, seeds, offsets, out, probs.shape[1], probs.stride(0),
                                               BLOCK=min(4096, triton.next_power_of_2(probs.shape[1])), num_warps=8)
    return out


@triton.jit
def _truncation_kernel(probs_ptr, top_k_ptr, top_p_ptr, min_p_ptr, thr_ptr, out_ptr, scratch_ptr, V, stride_p,
                       stride_o, WRITE: tl.constexpr, BLOCK: tl.constexpr):
    """One row: T = its smallest kept probability (reference.truncation_threshold) by bisection on float32 bits.

    Invariant: values <= a_val are dropped, values >= b_val kept, nxt is the smallest value above a_val (and a_val
    the float just below it); the search ends when nxt >= b_val, so T = nxt. Steps pass over the row (count,
    float64 mass and smallest value above the midpoint) until the undecided values (a_val, b_val] fit one block;
    those are then gathered (through scratch) into registers, where each step bisects between the smallest and
    the largest undecided value (each step decides at least one). WRITE stores the filtered row."""
    row = tl.program_id(0).to(tl.int64)
    src = probs_ptr + row * stride_p
    lanes = tl.arange(0, BLOCK)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row).to(tl.float64)
    hi = tl.zeros((BLOCK,), tl.float32)  # per-lane accumulators, reduced once per pass
    lo = tl.full((BLOCK,), float("inf"), tl.float32)
    for start in range(0, V, BLOCK):
        mask = start + lanes < V
        p = tl.load(src + start + lanes, mask=mask, other=0.0)
        hi = tl.maximum(hi, p)
        lo = tl.minimum(lo, tl.where(mask, p, float("inf")))
    pmax = tl.max(hi, axis=0)
    pmin = tl.min(lo, axis=0)
    floor = tl.load(min_p_ptr + row).to(tl.float32) * pmax  # min-p keeps p >= floor
    off = (top_k >= V) & (top_p >= 1.0) & (floor <= 0.0)  # every token kept: T = pmin, no search
    nxt = pmin
    a = nxt.to(tl.int32, bitcast=True) - 1  # the bits of a_val (probabilities are >= 0: -1 is below 0.0)
    a_val = tl.where(a >= 0, a.to(tl.float32, bitcast=True), -1.0)
    gt_a = tl.full((), 0, tl.int32) + V  # count(p > a_val)
    b_val = tl.where(off, pmin, pmax)  # the top value is kept whatever the parameters
    b = b_val.to(tl.int32, bitcast=True)
    gt_b = tl.full((), 0, tl.int32)  # count, mass and smallest value of p > b_val
    mass_b = tl.full((), 0.0, tl.float64)
    above_b = tl.full((), float("inf"), tl.float32)
    first = tl.minimum(floor.to(tl.int32, bitcast=True) - 1, b - 1)  # the largest float below floor: dropped
    steps = tl.full((), 0, tl.int32)  # valid rows need at most 31 steps; the bound only guards bad input
    while (nxt < b_val) & (gt_a - gt_b > BLOCK) & (steps < 32):
        mid = tl.maximum(a + ((b - a) >> 1), first)  # strictly between a and b
        t = mid.to(tl.float32, bitcast=True)
        counts = tl.zeros((BLOCK,), tl.int32)
        masses = tl.zeros((BLOCK,), tl.float64)
        mins = tl.full((BLOCK,), float("inf"), tl.float32)
        for start in range(0, V, BLOCK):
            p = tl.load(src + start + lanes, mask=start + lanes < V, other=0.0)  # padding 0.0 is never above t >= 0
            gt = p > t
            counts += gt.to(tl.int32)
            masses += tl.where(gt, p.to(tl.float64), 0.0)
            mins = tl.minimum(mins, tl.where(gt, p, float("inf")))
        count = tl.sum(counts, axis=0)
        mass = tl.sum(masses, axis=0)
        above = tl.min(mins, axis=0)
        keep = (count < top_k) & ((mass < top_p) | (top_p >= 1.0)) & (t >= floor)
        b, b_val, gt_b = tl.where(keep, mid, b), tl.where(keep, t, b_val), tl.where(keep, count, gt_b)
        mass_b, above_b = tl.where(keep, mass, mass_b), tl.where(keep, above, above_b)
        nxt, gt_a = tl.where(keep, nxt, above), tl.where(keep, gt_a, count)
        a = tl.where(keep, a, above.to(tl.int32, bitcast=True) - 1)  # no value lies in (t, above)
        a_val = tl.where(a >= 0, a.to(tl.float32, bitcast=True), -1.0)
        steps += 1
    if nxt < b_val:  # the undecided values (at most BLOCK) into registers
        size = tl.full((), 0, tl.int32)
        for start in range(0, V, BLOCK):
            mask = start + lanes < V
            p = tl.load(src + start + lanes, mask=mask, other=0.0)
            sel = mask & (p > a_val) & (p <= b_val)
            pos = size + tl.cumsum(sel.to(tl.int32), axis=0) - 1
            tl.store(scratch_ptr + row * BLOCK + pos, p, mask=sel & (pos < BLOCK))
            size += tl.sum(sel.to(tl.int32), axis=0)
        tl.debug_barrier()  # the block's stores are visible to all its threads
        valid = lanes < size
        q = tl.load(scratch_ptr + row * BLOCK + lanes, mask=valid, other=0.0)
        u = tl.max(tl.where(valid & (q < b_val), q, -1.0), axis=0)  # the largest undecided value (>= nxt)
        while (nxt < b_val) & (steps < 64):  # count(p > t) = gt_b + count(q > t) for t in [nxt, u]
            mid = tl.maximum((nxt.to(tl.int32, bitcast=True) + u.to(tl.int32, bitcast=True)) >> 1, first)
            t = mid.to(tl.float32, bitcast=True)
            gt = q > t
            count = gt_b + tl.sum(gt.to(tl.int32), axis=0)
            mass = mass_b + tl.sum(tl.where(gt, q.to(tl.float64), 0.0), axis=0)
            above = tl.minimum(above_b, tl.min(tl.where(gt, q, float("inf")), axis=0))
            below = tl.max(tl.where(valid & (q < t), q, -1.0), axis=0)
            keep = (count < top_k) & ((mass < top_p) | (top_p >= 1.0)) & (t >= floor)
            b_val, u = tl.where(keep, t, b_val), tl.where(keep, below, u)
            nxt = tl.where(keep, nxt, above)
            steps += 1
    tl.store(thr_ptr + row, nxt)
    if WRITE:
        for start in range(0, V, BLOCK):
            mask = start + lanes < V
            p = tl.load(src + start + lanes, mask=mask, other=0.0)
            tl.store(out_ptr + row * stride_o + start + lanes, tl.where(p >= nxt, p, 0.0), mask=mask)


TRUNCATION_CONFIG = (4096, 8)  # (BLOCK, num_warps) of the truncation kernel


def truncation_threshold(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                         write: bool = False, config: tuple[int, int] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(T [B], the filtered probs [B, V] when write) for float32 probs [B, V]: see reference.truncation_threshold."""
    if probs.dtype != torch.float32:
        raise ValueError(f"the truncation kernel takes float32 probabilities, got {probs.dtype}")
    probs = _rows(probs)
    rows, vocab = probs.shape
    block, warps = config or TRUNCATION_CONFIG
    block = min(block, triton.next_power_of_2(vocab))
    thr = torch.empty(rows, dtype=torch.float32, device=probs.device)
    out = torch.empty_like(probs) if write else None
    scratch = torch.empty(rows, block, dtype=torch.float32, device=probs.device)  # [B, BLOCK] undecided values
    if rows:
        _truncation_kernel[(rows,)](probs, top_k.contiguous(), top_p.contiguous(), min_p.contiguous(), thr,
                                    probs if out is None else out, scratch, vocab, probs.stride(0),
                                    0 if out is None else out.stride(0), WRITE=write, BLOCK=block, num_warps=warps)
    return thr, out

"""Triton kernels of `logprobs.chunked_logprobs` on CUDA: softmax statistics and logit gradients of bf16 logits.

The torch path of `chunked_logprobs` makes several fp32 [chunk, vocab] temporaries per chunk (cast,
shift, exp, products) in forward and again in backward. These kernels read the chunk's logits (in
the matmul's dtype) once per pass and keep everything else in registers:

- `softmax_stats`: per row, with z = logits / T over this rank's columns: max z, sum exp(z - max),
  sum exp(z - max) * z and z at the target column (online, one read);
- `logit_grads`: per row, d loss / d logits from the global log-normaliser, the entropy and the
  incoming gradients, written over the logits in place (one read, one write).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048
_MIN = -1e30  # "minus infinity" that keeps exp(a - b) finite for empty lanes


@triton.jit
def _softmax_stats_kernel(logits_ptr, stride, n_cols, ids_ptr, inv_temp, max_ptr, sum_ptr, zsum_ptr, picked_ptr,
                          BLOCK: tl.constexpr, MIN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], MIN, tl.float32)  # running max per lane
    s = tl.zeros([BLOCK], tl.float32)  # sum exp(z - m) per lane
    w = tl.zeros([BLOCK], tl.float32)  # sum exp(z - m) * z per lane
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
        z_in = tl.where(mask, z, MIN)
        m_new = tl.maximum(m, z_in)
        scale = tl.exp(m - m_new)
        e = tl.where(mask, tl.exp(z_in - m_new), 0.0)
        s = s * scale + e
        w = w * scale + e * z
        m = m_new
    row_max = tl.max(m, axis=0)
    factor = tl.exp(m - row_max)
    tl.store(max_ptr + row, row_max)
    tl.store(sum_ptr + row, tl.sum(s * factor, axis=0))
    tl.store(zsum_ptr + row, tl.sum(w * factor, axis=0))
    target = tl.load(ids_ptr + row)  # clamped into [0, n_cols)
    tl.store(picked_ptr + row, tl.load(base + target).to(tl.float32) * inv_temp)


@triton.jit
def _logit_grads_kernel(logits_ptr, stride, n_cols, ids_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_target_ptr,
                        g_entropy_ptr, inv_temp, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    offs = tl.arange(0, BLOCK)
    lse = tl.load(lse_ptr + row)
    h = tl.load(entropy_ptr + row)
    g_logp = tl.load(g_logp_ptr + row)
    g_target = tl.load(g_target_ptr + row)  # g_logp where the target is in this rank's block, else 0
    g_ent = tl.load(g_entropy_ptr + row)
    target = tl.load(ids_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        log_p = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp - lse
        p = tl.exp(log_p)
        dz = -p * (g_logp + g_ent * (log_p + h)) + tl.where(cols == target, g_target, 0.0)
        tl.store(base + cols, (dz * inv_temp).to(logits_ptr.dtype.element_ty), mask=mask)


def softmax_stats(logits: torch.Tensor, safe_ids: torch.Tensor, temperature: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max z, sum exp(z - max), sum exp(z - max) z, z[target]) per row of z = logits [c, n] / T; fp32 [c] each."""
    rows, n_cols = logits.shape
    out = torch.empty(4, rows, dtype=torch.float32, device=logits.device)
    if rows:
        _softmax_stats_kernel[(rows,)](logits, logits.stride(0), n_cols, safe_ids, 1.0 / temperature, out[0], out[1],
                                       out[2], out[3], BLOCK=_BLOCK, MIN=_MIN, num_warps=8)
    return out[0], out[1], out[2], out[3]


def logit_grads_(logits: torch.Tensor, safe_ids: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                 g_logp: torch.Tensor, g_target: torch.Tensor, g_entropy: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """Overwrite logits [c, n] with d(sum g_logp logp + g_entropy H)/d logits (fp32 [c] row inputs); returns logits."""
    rows, n_cols = logits.shape
    if rows:
        _logit_grads_kernel[(rows,)](logits, logits.stride(0), n_cols, safe_ids, lse, entropy, g_logp, g_target,
                                     g_entropy, 1.0 / temperature, BLOCK=_BLOCK, num_warps=8)
    return logits

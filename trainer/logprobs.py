"""Token log-probabilities and entropy from vocab-parallel logits, without gathering the vocabulary.

`chunked_logprobs` is what the trainer runs (policy, old-policy and reference passes): it takes
the final hidden states and this rank's output-layer rows and forms the logits a chunk of tokens
at a time, in forward and again in backward, so no [tokens, vocab] tensor (bf16 or fp32) exists
beyond one chunk. `vocab_parallel_logprobs` is the same math on a full logits tensor (reference).

Each tensor-parallel rank holds logits for a contiguous block of the (padded) vocabulary. As in
megatron's vocab-parallel cross-entropy, the softmax normaliser is assembled from a MAX
all-reduce (no gradient needed: log-sum-exp does not depend on the shift) and SUM all-reduces
whose backward is the identity (every TP rank computes the same loss from the reduced values).
Padding rows of the vocabulary (ids >= `vocab_size`) are excluded.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.distributed as dist


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce SUM in forward; identity in backward (the consumer is replicated across ranks)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        if group is None or dist.get_world_size(group) == 1:
            return x
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, vocab_start: int, vocab_size: int,
                            temperature: float = 1.0, group=None, with_entropy: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log_softmax(logits / T)[target] and (optionally) the entropy, per row, for this rank's vocab block.

    logits: [N, V_local] (this rank's columns [vocab_start, vocab_start + V_local)); targets: [N]
    global token ids. Returns float32 ([N], [N] or None), identical on all ranks of `group`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n_local = logits.shape[-1]
    n_real = max(0, min(n_local, vocab_size - vocab_start))  # columns that are not vocabulary padding
    z = logits[:, :n_real].float() / temperature  # [N, n_real]

    with torch.no_grad():
        shift = z.max(dim=-1).values if n_real else z.new_full((z.shape[0],), float("-inf"))
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    shifted = z - shift.unsqueeze(-1)  # [N, n_real], <= 0
    exp = shifted.exp()
    sum_exp = _SumAcrossRanks.apply(exp.sum(dim=-1), group)  # [N]
    log_norm = sum_exp.log()  # log-sum-exp minus shift

    local_ids = targets - vocab_start
    in_block = (local_ids >= 0) & (local_ids < n_real)
    picked = shifted.gather(-1, local_ids.clamp(0, max(n_real - 1, 0)).unsqueeze(-1)).squeeze(-1) if n_real \
        else shifted.new_zeros(targets.shape)
    target_shifted = _SumAcrossRanks.apply(torch.where(in_block, picked, torch.zeros_like(picked)), group)
    logp = target_shifted - log_norm

    entropy = None
    if with_entropy:  # H = log S - sum_j p_j * (z_j - shift), with S = sum_j exp(z_j - shift)
        weighted = _SumAcrossRanks.apply((exp * shifted).sum(dim=-1), group)
        entropy = log_norm - weighted / sum_exp
    return logp, entropy


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


@functools.cache
def _kernels():
    """trainer.logprob_kernels, or None without triton."""
    if importlib.util.find_spec("triton") is None:
        return None
    from trainer import logprob_kernels

    return logprob_kernels


def _runs_kernels(t: torch.Tensor) -> bool:
    return t.is_cuda and _kernels() is not None


def _chunk_stats(logits: torch.Tensor, safe_ids: torch.Tensor, temperature: float, with_entropy: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max z, sum exp(z - max), sum exp(z - max) z, z[target]) per row of z = logits [c, n] / T, this rank only."""
    if _runs_kernels(logits):
        return _kernels().softmax_stats(logits, safe_ids, temperature)
    z = logits.float().div_(temperature)  # [c, n]
    shift = z.max(dim=-1).values
    ex = (z - shift[:, None]).exp_()
    weighted = (ex * z).sum(-1) if with_entropy else torch.zeros_like(shift)
    return shift, ex.sum(-1), weighted, z.gather(-1, safe_ids[:, None]).squeeze(-1)


def _chunk_logit_grads(logits: torch.Tensor, safe_ids: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                       g_logp: torch.Tensor, g_target: torch.Tensor, g_entropy: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """d(sum g_logp logp + g_entropy H) / d logits [c, n], in the logits' dtype (fp32 [c] row inputs)."""
    if _runs_kernels(logits):
        return _kernels().logit_grads_(logits, safe_ids, lse, entropy, g_logp, g_target, g_entropy, temperature)
    log_p = logits.float().div_(temperature) - lse[:, None]
    # d logp/dz = onehot - p ; dH/dz = -p (log p + H)
    dz = log_p.exp().mul_(-(g_logp[:, None] + g_entropy[:, None] * (log_p + entropy[:, None])))
    dz.scatter_add_(-1, safe_ids[:, None], g_target[:, None])
    return dz.div_(temperature).to(logits.dtype)


class _ChunkedLogProbs(torch.autograd.Function):
    """Fused output projection + log_softmax gather (+ entropy), chunk by chunk, recomputed in backward.

    Saves only the inputs and two floats per token (log-normaliser, entropy); no [N, V] tensor
    outlives one chunk, and on CUDA the chunk's logits stay in the matmul's dtype (triton kernels,
    `logprob_kernels`). Forward all-reduces over the TP group (MAX, then one SUM of three values
    per token); backward all-reduces the hidden-state gradient (each rank sees its vocabulary block).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, n_real: int, vocab_start: int, temperature: float, group,
                chunk: int, with_entropy: bool):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        local_ids = targets - vocab_start
        in_block = (local_ids >= 0) & (local_ids < n_real)
        safe_ids = local_ids.clamp(0, max(n_real - 1, 0))
        w = weight[:n_real]
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            if n_real:
                local_max, sum_exp, weighted, picked = _chunk_stats(hidden[s:e] @ w.t(), safe_ids[s:e], temperature,
                                                                    with_entropy)  # [c] each
            else:
                local_max = torch.full((e - s,), float("-inf"), device=hidden.device)
                sum_exp = weighted = picked = torch.zeros_like(local_max)
            shift = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group)
            rescale = (local_max - shift).exp()  # this rank's sums relative to the global max
            sums = torch.stack([sum_exp * rescale, torch.where(in_block[s:e], picked, 0.0), weighted * rescale])
            _all_reduce(sums, dist.ReduceOp.SUM, group)  # [3, c]
            lse[s:e] = shift + sums[0].log()
            logp[s:e] = sums[1] - lse[s:e]
            if with_entropy:  # H = lse - E_p[z]
                entropy[s:e] = lse[s:e] - sums[2] / sums[0]
        ctx.save_for_backward(hidden, weight, safe_ids, in_block, lse, entropy)
        ctx.n_real, ctx.temperature, ctx.group, ctx.chunk = n_real, temperature, group, chunk
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, safe_ids, in_block, lse, entropy = ctx.saved_tensors
        n_real, temperature, chunk = ctx.n_real, ctx.temperature, ctx.chunk
        grad_hidden = torch.zeros_like(hidden)
        want_weight = ctx.needs_input_grad[1]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        w = weight[:n_real]
        g_logp = grad_logp.float().contiguous()
        g_target = g_logp * in_block  # the target's own term lives on one rank only
        g_entropy = grad_entropy.float().contiguous()
        for s in range(0, hidden.shape[0], chunk):
            e = min(hidden.shape[0], s + chunk)
            if not n_real:
                break
            dlogits = _chunk_logit_grads(hidden[s:e] @ w.t(), safe_ids[s:e], lse[s:e], entropy[s:e], g_logp[s:e],
                                         g_target[s:e], g_entropy[s:e], temperature)  # [c, n_real]
            grad_hidden[s:e] = dlogits @ w
            if want_weight:
                _accumulate_matmul(grad_weight[:n_real], dlogits.t(), hidden[s:e])
        _all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.group)
        grad_weight = grad_weight.to(weight.dtype) if want_weight else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def _accumulate_matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (fp32) += a @ b; on CUDA one matmul accumulating in fp32 for low-precision a, b."""
    if out.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    else:
        out += (a @ b).float()


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, vocab_start: int,
                     vocab_size: int, temperature: float = 1.0, group=None, with_entropy: bool = False,
                     chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log_softmax(hidden @ weight.T / T)[target] (and entropy) per row, without a full [N, V] logits tensor.

    hidden: [N, H] (replicated over `group`); weight: [V_local, H], this rank's vocabulary rows
    [vocab_start, vocab_start + V_local); targets: [N] global ids. Logits are formed `chunk_tokens`
    rows at a time (in the inputs' dtype, softmax in fp32) and formed again in backward. Returns
    float32 ([N], [N] or None), identical on all ranks of `group`; same values as
    `vocab_parallel_logprobs(hidden @ weight.T, ...)`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if (hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]
            or targets.shape != hidden.shape[:1]):
        raise ValueError(f"expected hidden [N, H], weight [V_local, H], targets [N]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    n_real = max(0, min(weight.shape[0], vocab_size - vocab_start))  # rows that are not vocabulary padding
    logp, entropy = _ChunkedLogProbs.apply(hidden, weight, targets, n_real, vocab_start, temperature, group,
                                           chunk_tokens, with_entropy)
    return logp, entropy if with_entropy else None

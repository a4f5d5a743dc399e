"""Token log-probabilities and entropy from vocab-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds logits for a contiguous block of the (padded) vocabulary. As in
megatron's vocab-parallel cross-entropy, the softmax normaliser is assembled from a MAX
all-reduce (no gradient needed: log-sum-exp does not depend on the shift) and SUM all-reduces
whose backward is the identity (every TP rank computes the same loss from the reduced values).
Padding rows of the vocabulary (ids >= `vocab_size`) are excluded.
"""

from __future__ import annotations

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

"""Context parallelism (CP) over packed (THD) micro-batches: each sequence split over the CP ranks.

Every sequence of a packed row is right-padded to a multiple of 2*CP and cut into 2*CP equal
chunks; CP rank r holds chunks r and 2*CP-1-r (the load-balanced causal split of megatron and
Transformer Engine: every rank gets the same share of the causal attention work). Each rank runs
the transformer on its local tokens, with RoPE at their global positions. Attention all-gathers K
and V over the CP group (backward: the K/V gradients summed back onto their owners), and each
local query chunk attends causally to the prefix of its sequence that ends with it. The padding
sits at the end of a sequence, so causal attention hides it from every real token.

Log-probs are computed on the local shards, for the response tokens whose predicting position is
local, then summed into the full per-token vector on every CP rank (backward: identity, each rank
keeps the gradient of its own entries). The loss is therefore the CP=1 loss, replicated on the CP
ranks, and each rank's parameter gradients are its local tokens' share: summing them over DP x CP
(megatron's data-parallel-with-context-parallel group) gives the full gradient.

All-gather rather than ring attention: one collective per layer and a plain varlen call with
separate query / key offsets, on the same kernel as CP=1; K/V of a whole sequence is held per layer
for its attention only (the activations that scale with length stay sharded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer import attention


@dataclass
class ContextParallel:
    """This CP rank's view of one packed micro-batch of sequences `lengths` (all index tensors on the host)."""

    group: object
    size: int
    rank: int
    lengths: list[int]  # real tokens per sequence
    padded: list[int]  # per sequence, rounded up to a multiple of 2 * size
    local_index: torch.Tensor  # [T_local] this rank's tokens as indices into the padded row
    positions: torch.Tensor  # [T_local] their RoPE positions within their sequence
    gathered_order: torch.Tensor  # [T_padded] padded-row order of the rank-major gathered rows
    cu_q: torch.Tensor  # [2 * seqs + 1] int32, local query chunks
    cu_k: torch.Tensor  # [2 * seqs + 1] int32, the prefixes they attend to
    k_index: torch.Tensor  # [sum of prefixes] indices into the padded row of those prefixes
    max_q: int
    max_k: int

    @classmethod
    def build(cls, lengths: list[int], group, size: int, rank: int) -> ContextParallel:
        if not lengths or min(lengths) < 1:
            raise ValueError(f"packed sequences need lengths >= 1, got {lengths}")
        parts = 2 * size
        padded = [math.ceil(n / parts) * parts for n in lengths]
        starts = [0]
        for n in padded[:-1]:
            starts.append(starts[-1] + n)

        def owned(r: int) -> list[tuple[int, int, int]]:  # (sequence, chunk id, chunk length)
            return [(i, c, padded[i] // parts) for i in range(len(lengths)) for c in (r, parts - 1 - r)]

        def indices(r: int) -> torch.Tensor:
            return torch.cat([starts[i] + c * w + torch.arange(w) for i, c, w in owned(r)])

        mine = owned(rank)
        local_index = indices(rank)
        positions = torch.cat([c * w + torch.arange(w) for _, c, w in mine])
        gathered = torch.cat([indices(r) for r in range(size)])
        q_lens = [w for _, _, w in mine]
        k_lens = [(c + 1) * w for _, c, w in mine]
        k_index = torch.cat([starts[i] + torch.arange(n) for (i, _, _), n in zip(mine, k_lens)])
        cu = [torch.zeros(len(mine) + 1, dtype=torch.int32) for _ in range(2)]
        cu[0][1:] = torch.tensor(q_lens).cumsum(0)
        cu[1][1:] = torch.tensor(k_lens).cumsum(0)
        return cls(group=group, size=size, rank=rank, lengths=list(lengths), padded=padded, local_index=local_index,
                   positions=positions, gathered_order=torch.argsort(gathered), cu_q=cu[0], cu_k=cu[1],
                   k_index=k_index, max_q=max(q_lens), max_k=max(k_lens))

    def to(self, device) -> ContextParallel:
        """The index tensors on `device` (cu_seqlens int32, the others int64)."""
        moved = {k: getattr(self, k).to(device, non_blocking=True)
                 for k in ("local_index", "positions", "gathered_order", "cu_q", "cu_k", "k_index")}
        return ContextParallel(**{**self.__dict__, **moved})

    def local_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's tokens [1, T_local] of a packed row [1, sum(lengths)] (padding: token 0)."""
        row = self._pad_row(tokens.view(-1))
        return row[self.local_index.cpu()].unsqueeze(0)

    def _pad_row(self, flat: torch.Tensor) -> torch.Tensor:
        pieces = []
        for seq_start, n, p in zip(_starts(self.lengths), self.lengths, self.padded):
            pieces += [flat[seq_start:seq_start + n], flat.new_zeros(p - n)]
        return torch.cat(pieces)

    def split_positions(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For flat indices `positions` into the unpadded row: (those held here, as local indices; their places
        in `positions`)."""
        shift = torch.tensor([p - s for p, s in zip(_starts(self.padded), _starts(self.lengths))])
        seq = torch.bucketize(positions, torch.tensor(_starts(self.lengths)[1:]), right=True)
        in_padded = positions + shift[seq]
        local_of = torch.full((sum(self.padded),), -1, dtype=torch.long)
        local_of[self.local_index.cpu()] = torch.arange(self.local_index.numel())
        local = local_of[in_padded]
        keep = local >= 0
        return local[keep], keep.nonzero().squeeze(1)


def _starts(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths[:-1]:
        out.append(out[-1] + n)
    return out


class _GatherRows(torch.autograd.Function):
    """All-gather [T_local, ...] over `group` into [size * T_local, ...], rank-major; backward sums the gradients
    over the ranks and keeps this rank's rows (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, size: int, rank: int):
        x = x.contiguous()
        out = x.new_empty((size * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        ctx.group, ctx.size, ctx.rank, ctx.rows = group, size, rank, x.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = grad.new_empty((ctx.rows,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None, None, None
        grad = grad.clone()  # autograd's incoming gradient is not ours to change in place
        dist.all_reduce(grad, group=ctx.group)  # gloo: all-reduce and keep this rank's rows
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows].clone(), None, None, None


class _SumShards(torch.autograd.Function):
    """Sum over `group` of vectors that are zero outside each rank's own entries; backward: identity (the loss
    built on the sum is the same on every rank, so each rank's entries take its gradient as is)."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def gather_shards(values: torch.Tensor, places: torch.Tensor, total: int, cp: ContextParallel) -> torch.Tensor:
    """The full [total] vector on every CP rank from each rank's `values` at `places` (autograd-correct)."""
    full = values.new_zeros(total).index_put((places.to(values.device),), values)
    return _SumShards.apply(full, cp.group)


def full_sequence_kv(k: torch.Tensor, v: torch.Tensor, cp: ContextParallel) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of this rank's local rows -> the prefixes its query chunks attend to, concatenated (cu_k, k_index)."""
    kv = torch.cat([k, v], dim=1)  # [T_local, 2 * Hkv, D]: one collective for both
    full = _GatherRows.apply(kv, cp.group, cp.size, cp.rank)[cp.gathered_order]  # padded-row order
    prefix = full[cp.k_index]
    return prefix[:, :k.shape[1]], prefix[:, k.shape[1]:]


def chunk_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: ContextParallel,
                              scale: float) -> torch.Tensor:
    """Each query chunk [w] against its prefix [n >= w], causal aligned at the end (one SDPA call each)."""
    cu_q, cu_k = cp.cu_q.tolist(), cp.cu_k.tolist()
    outs = []
    for qs, qe, ks, ke in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        w, n = qe - qs, ke - ks
        mask = torch.ones(w, n, dtype=torch.bool, device=q.device).tril(n - w)  # query i sees keys <= n - w + i
        qc, kc, vc = (t.transpose(0, 1).unsqueeze(0) for t in (q[qs:qe], k[ks:ke], v[ks:ke]))
        out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale,
                                             enable_gqa=qc.shape[1] != kc.shape[1])
        outs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outs)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: ContextParallel,
                               scale: float, backend: str = "auto") -> torch.Tensor:
    """Causal attention of this rank's chunks q [T_local, Hq, D] over their whole sequences; [T_local, Hq, D]."""
    k_pre, v_pre = full_sequence_kv(k, v, cp)
    if backend == "auto":
        backend = "flash" if attention.flash_varlen_supported(q, k) else "reference"
    if backend == "reference":
        return chunk_attention_reference(q, k_pre, v_pre, cp, scale)
    return attention.flash_varlen(q, k_pre, v_pre, cp.cu_q, cp.cu_k, cp.max_q, cp.max_k, scale)

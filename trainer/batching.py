"""Splitting a rollout into global batches, data-parallel shares and token-budgeted micro-batches.

A micro-batch is either
- packed (the trainer's default): ONE row holding its sequences back to back, no padding; the
  attention is causal within each sequence (THD varlen, `cu_seqlens`) and RoPE positions restart
  at 0 per sequence; sequences are placed first-fit by decreasing length and the budget counts
  real tokens; or
- padded: one sequence per row, right-padded to the longest (causal attention makes right padding
  invisible to real tokens); sequences sorted by length so padding stays small, and the budget
  counts padded tokens (rows x longest).

With balancing (`balance_data`, slime's --balance-data) a global batch is split over DP ranks by
Karmarkar-Karp on each sequence's compute cost (linear layers ~ tokens, attention ~ tokens^2,
weighed from the model's shape), and each rank's packed share into the fewest micro-batches the
token budget allows, costs spread over them longest first (`plan_micro_batches`).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch


@dataclass
class MicroBatch:
    """One forward pass: `indices` into the caller's sample list and their tokens, packed [1, T] or padded."""

    indices: list[int]
    tokens: torch.Tensor  # packed: [1, sum(lengths)]; padded: [rows, max_len], right-padded with 0
    lengths: list[int]  # real tokens per sequence
    response_lengths: list[int]
    packed: bool = False

    @property
    def padded_tokens(self) -> int:
        """Tokens processed including padding (rows x width)."""
        return self.tokens.numel()

    def starts(self) -> list[int]:
        """Flat offset into tokens.view(-1) where each sequence begins."""
        if not self.packed:
            return [row * self.tokens.shape[1] for row in range(len(self.lengths))]
        offsets = [0]
        for n in self.lengths[:-1]:
            offsets.append(offsets[-1] + n)
        return offsets

    def position_ids(self) -> torch.Tensor:
        """RoPE positions, restarting at 0 for every sequence; same shape as `tokens`."""
        if not self.packed:
            return torch.arange(self.tokens.shape[1]).expand_as(self.tokens)
        return torch.cat([torch.arange(n) for n in self.lengths]).unsqueeze(0)

    def response_positions(self) -> torch.Tensor:
        """Flat indices into tokens.view(-1) of the logits that predict each response token; [T]."""
        pieces = [start + torch.arange(n - r - 1, n - 1) for start, n, r in
                  zip(self.starts(), self.lengths, self.response_lengths)]
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)

    def response_targets(self) -> torch.Tensor:
        """The response token ids, flat over sequences; [T]."""
        flat = self.tokens.view(-1)
        pieces = [flat[start + n - r:start + n] for start, n, r in
                  zip(self.starts(), self.lengths, self.response_lengths)]
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def split_global_batches(num_samples: int, global_batch_size: int) -> list[range]:
    """Consecutive sample ranges of `global_batch_size` (the last may be shorter): one optimizer step each."""
    return [range(start, min(start + global_batch_size, num_samples))
            for start in range(0, num_samples, global_batch_size)]


def data_parallel_shares(lengths: list[int], dp_size: int) -> list[list[int]]:
    """Disjoint index lists per DP rank, balanced by token count (longest first to the lightest rank)."""
    shares: list[list[int]] = [[] for _ in range(dp_size)]
    load = [0] * dp_size
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(dp_size), key=lambda r: (load[r], r))
        shares[rank].append(i)
        load[rank] += lengths[i]
    return [sorted(s) for s in shares]


def pack_micro_batches(indices: list[int], tokens: list[list[int]], response_lengths: list[int],
                       max_tokens: int, *, packed: bool = False) -> list[MicroBatch]:
    """Group samples `indices` into micro-batches of at most `max_tokens` tokens (padded tokens unless `packed`)."""
    order = sorted(indices, key=lambda i: (-len(tokens[i]), i))
    groups: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        n = len(tokens[i])
        if n > max_tokens:
            raise ValueError(f"sample {i} has {n} tokens, more than max_tokens_per_gpu={max_tokens}")
        if packed:  # first fit: the earliest micro-batch with room
            slot = next((g for g, load in enumerate(loads) if load + n <= max_tokens), None)
        else:  # rows of one micro-batch share the width of its first (longest) sequence
            fits = groups and (len(groups[-1]) + 1) * len(tokens[groups[-1][0]]) <= max_tokens
            slot = len(groups) - 1 if fits else None
        if slot is None:
            groups.append([])
            loads.append(0)
            slot = len(groups) - 1
        groups[slot].append(i)
        loads[slot] += n
    return [_micro_batch(group, tokens, response_lengths, packed) for group in groups]


def _micro_batch(group: list[int], tokens: list[list[int]], response_lengths: list[int], packed: bool) -> MicroBatch:
    lengths = [len(tokens[i]) for i in group]
    if packed:
        rows = torch.tensor([t for i in group for t in tokens[i]], dtype=torch.long).unsqueeze(0)  # [1, T]
    else:
        rows = torch.zeros(len(group), max(lengths), dtype=torch.long)  # [rows, max_len]
        for row, i in enumerate(group):
            rows[row, :lengths[row]] = torch.tensor(tokens[i], dtype=torch.long)
    return MicroBatch(indices=group, tokens=rows, lengths=lengths,
                      response_lengths=[response_lengths[i] for i in group], packed=packed)


# ----------------------------------------------------------------------------------------------
# balanced plans (balance_data)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CostModel:
    """Relative forward compute of one sequence of n tokens: n + attention_weight * n^2 (linear layers + attention)."""

    attention_weight: float = 0.0

    def __call__(self, n: int) -> float:
        return n + self.attention_weight * n * n

    @classmethod
    def for_model(cls, spec) -> CostModel:
        """From a model's shape (`trainer.bridge.MegatronSpec`): causal attention costs 2 * q_dim * n^2 FLOPs per
        layer against 2 * (weights per layer) * n for the matmuls, so the weight is q_dim / weights per layer."""
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        mlp = spec.moe_top_k * spec.moe_ffn_hidden_size if getattr(spec, "num_experts", 0) else spec.ffn_hidden_size
        per_token = spec.hidden_size * (q + 2 * kv) + q * spec.hidden_size + 3 * spec.hidden_size * mlp
        return cls(q / per_token)


def balanced_partition(costs: list[float], parts: int) -> list[list[int]]:
    """`parts` disjoint index lists with near-equal cost sums (Karmarkar-Karp largest differencing), each sorted."""
    if parts == 1:
        return [list(range(len(costs)))]
    heap: list = []
    for count, i in enumerate(sorted(range(len(costs)), key=lambda i: (-costs[i], i))):
        sums = [costs[i]] + [0.0] * (parts - 1)
        heapq.heappush(heap, (-costs[i], count, sums, [[i]] + [[] for _ in range(parts - 1)]))
    count = len(costs)
    while len(heap) > 1:  # merge the two partitions with the largest spreads: big sums meet small ones
        _, _, sums_a, groups_a = heapq.heappop(heap)
        _, _, sums_b, groups_b = heapq.heappop(heap)
        order_a = sorted(range(parts), key=lambda j: -sums_a[j])
        order_b = sorted(range(parts), key=lambda j: sums_b[j])
        sums = [sums_a[a] + sums_b[b] for a, b in zip(order_a, order_b)]
        groups = [groups_a[a] + groups_b[b] for a, b in zip(order_a, order_b)]
        count += 1
        heapq.heappush(heap, (-(max(sums) - min(sums)), count, sums, groups))
    groups = heap[0][3] if heap else [[] for _ in range(parts)]
    return [sorted(g) for g in groups]


def balanced_micro_batches(indices: list[int], tokens: list[list[int]], response_lengths: list[int],
                           max_tokens: int, cost: CostModel) -> list[MicroBatch]:
    """Packed micro-batches of `indices`: the fewest the `max_tokens` budget allows, their costs balanced."""
    lengths = {i: len(tokens[i]) for i in indices}
    for i, n in lengths.items():
        if n > max_tokens:
            raise ValueError(f"sample {i} has {n} tokens, more than max_tokens_per_gpu={max_tokens}")
    order = sorted(indices, key=lambda i: (-cost(lengths[i]), i))
    count = max(1, math.ceil(sum(lengths.values()) / max_tokens)) if indices else 0
    while True:  # longest first to the cheapest micro-batch with room; one more micro-batch if one does not fit
        groups: list[list[int]] = [[] for _ in range(count)]
        loads, costs = [0] * count, [0.0] * count
        for i in order:
            room = [g for g in range(count) if loads[g] + lengths[i] <= max_tokens]
            if not room:
                break
            g = min(room, key=lambda g: (costs[g], loads[g], g))
            groups[g].append(i)
            loads[g] += lengths[i]
            costs[g] += cost(lengths[i])
        else:
            return [_micro_batch(g, tokens, response_lengths, True) for g in groups if g]
        count += 1


def _imbalance(values: list[float]) -> float:
    """max / mean of `values` (1 = perfectly balanced); 1 for nothing to balance."""
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else 1.0


def plan_micro_batches(indices: list[int], tokens: list[list[int]], response_lengths: list[int], *, dp_size: int,
                       dp_rank: int, max_tokens: int, packed: bool, balance: bool = False,
                       cost: CostModel = CostModel()) -> tuple[list[MicroBatch], dict[str, float]]:
    """This DP rank's micro-batches of samples `indices`, and (with `balance`) the imbalance metrics.

    Without `balance`: shares by token count (`data_parallel_shares`), then `pack_micro_batches`. With
    it: shares by cost (`balanced_partition`), packed micro-batches by `balanced_micro_batches` (padded
    ones keep `pack_micro_batches`). The metrics are max / mean of the cost per DP rank and per
    micro-batch (over all ranks' plans), for the plain plan (`*_before`) and the balanced one (`*_after`).
    """
    def plan(rank_shares: list[list[int]], balanced: bool) -> list[list[MicroBatch]]:
        return [balanced_micro_batches(share, tokens, response_lengths, max_tokens, cost) if balanced and packed
                else pack_micro_batches(share, tokens, response_lengths, max_tokens, packed=packed)
                for share in rank_shares]

    plain = [[indices[j] for j in share] for share in data_parallel_shares([len(tokens[i]) for i in indices],
                                                                           dp_size)]
    if not balance:
        return plan([plain[dp_rank]], False)[0], {}
    costs = [cost(len(tokens[i])) for i in indices]
    shares = [[indices[j] for j in share] for share in balanced_partition(costs, dp_size)]
    metrics = {}
    for name, rank_shares, balanced in (("before", plain, False), ("after", shares, True)):
        plans = plan(rank_shares, balanced)
        mb_costs = [sum(cost(n) for n in mb.lengths) for batches in plans for mb in batches]
        metrics[f"dp_imbalance_{name}"] = _imbalance([sum(cost(len(tokens[i])) for i in s) for s in rank_shares])
        metrics[f"mb_imbalance_{name}"] = _imbalance(mb_costs)
        if balanced:
            mine = plans[dp_rank]
    return mine, metrics

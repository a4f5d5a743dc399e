"""Splitting a rollout into global batches, data-parallel shares and token-budgeted micro-batches.

A micro-batch is either
- packed (the trainer's default): ONE row holding its sequences back to back, no padding; the
  attention is causal within each sequence (THD varlen, `cu_seqlens`) and RoPE positions restart
  at 0 per sequence; sequences are placed first-fit by decreasing length and the budget counts
  real tokens; or
- padded: one sequence per row, right-padded to the longest (causal attention makes right padding
  invisible to real tokens); sequences sorted by length so padding stays small, and the budget
  counts padded tokens (rows x longest).
"""

from __future__ import annotations

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

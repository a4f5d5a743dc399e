"""Splitting a rollout into global batches, data-parallel shares and token-budgeted micro-batches.

A micro-batch is a set of sequences, one per row, right-padded to the longest of them (causal
attention makes right padding invisible to real tokens, and RoPE positions stay 0..len-1 per
row). Sequences are sorted by length before packing, so rows of similar length share a
micro-batch and padding stays small; the budget counts padded tokens (rows x longest).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MicroBatch:
    """Rows of one forward pass: `indices` into the caller's sample list, tokens [rows, max_len]."""

    indices: list[int]
    tokens: torch.Tensor  # [rows, max_len], right-padded with 0
    lengths: list[int]  # real tokens per row
    response_lengths: list[int]

    @property
    def padded_tokens(self) -> int:
        """Tokens processed including padding (rows x max_len)."""
        return self.tokens.numel()

    def response_positions(self) -> torch.Tensor:
        """Flat indices into [rows * max_len] of the logits that predict each response token; [T]."""
        width = self.tokens.shape[1]
        pieces = [row * width + torch.arange(n - r - 1, n - 1) for row, (n, r) in
                  enumerate(zip(self.lengths, self.response_lengths))]
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)

    def response_targets(self) -> torch.Tensor:
        """The response token ids, flat over rows; [T]."""
        pieces = [self.tokens[row, n - r:n] for row, (n, r) in enumerate(zip(self.lengths, self.response_lengths))]
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
                       max_tokens: int) -> list[MicroBatch]:
    """Group samples `indices` into micro-batches of at most `max_tokens` padded tokens each."""
    order = sorted(indices, key=lambda i: (-len(tokens[i]), i))
    groups: list[list[int]] = []
    for i in order:
        n = len(tokens[i])
        if n > max_tokens:
            raise ValueError(f"sample {i} has {n} tokens, more than max_tokens_per_gpu={max_tokens}")
        if groups and (len(groups[-1]) + 1) * len(tokens[groups[-1][0]]) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    batches = []
    for group in groups:
        width = len(tokens[group[0]])
        rows = torch.zeros(len(group), width, dtype=torch.long)  # [rows, max_len]
        for row, i in enumerate(group):
            rows[row, : len(tokens[i])] = torch.tensor(tokens[i], dtype=torch.long)
        batches.append(MicroBatch(indices=group, tokens=rows, lengths=[len(tokens[i]) for i in group],
                                  response_lengths=[response_lengths[i] for i in group]))
    return batches

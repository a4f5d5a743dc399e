"""Batched sampling on tensors: penalties, temperature, top-k / top-p / min-p, seeded draws, log-probs.

Order per step (one row per request):
  1. penalties on the raw logits: repetition (HF: divide positive / multiply negative logits of
     tokens seen in prompt or output), then frequency and presence (OpenAI: subtract per count /
     once, output tokens only);
  2. log-probs = log_softmax(logits / T) with T = temperature (T = 1 for greedy rows): the reported
     log-prob of a token, BEFORE any top-k / top-p / min-p truncation and AFTER penalties, so that a
     trainer recomputing log_softmax(logits / T) gets the same number;
  3. greedy rows take the argmax; the others sample from softmax(logits / T) truncated by top-k,
     top-p and min-p (`filter_probs`: a token survives when fewer than top_k tokens are more likely,
     their mass is below top_p, and it has at least min_p * max prob; ties survive together), via an
     exponential race whose noise is a hash of (the row's seed, its draw number, the token id)
     (`ops.seeded_race`): no generator state, one kernel for the whole batch, and a seeded request draws
     the same tokens whatever batch it runs in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference_engine import ops


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors, built once per step."""

    temperatures: torch.Tensor  # [B] float, 1.0 on greedy rows
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor  # [B] int64, vocab size when off
    top_p: torch.Tensor  # [B] float
    min_p: torch.Tensor  # [B] float
    repetition_penalty: torch.Tensor | None  # [B] float; None when no row uses it
    frequency_penalty: torch.Tensor | None  # [B]
    presence_penalty: torch.Tensor | None  # [B]
    seen_mask: torch.Tensor | None  # [B, V] bool: token in prompt or output (repetition penalty)
    output_counts: torch.Tensor | None  # [B, V] float: occurrences in the output (frequency / presence)
    seeds: torch.Tensor  # [B] int64 >= 0: the row's random stream (the request's seed, or one the engine drew)
    offsets: torch.Tensor  # [B] int64: the row's draw number (tokens its request sampled before)
    top_logprobs_num: int  # max over rows; 0 = none
    all_greedy: bool = False  # host flag: every row is greedy, so no draw is made (False: decided per row)
    truncates: bool = True  # host flag: some row sets top-k / top-p / min-p (False skips filter_probs)

    @property
    def plain_greedy(self) -> bool:
        """Every row takes the argmax of unpenalised logits and reports no top log-probs (the graphs' greedy pick)."""
        return (self.all_greedy and not self.top_logprobs_num and self.repetition_penalty is None
                and self.frequency_penalty is None)


@dataclass
class SampleOutput:
    """Chosen tokens and their log-probs."""

    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float
    top_logprobs: torch.Tensor | None  # [B, k] float
    top_ids: torch.Tensor | None  # [B, k] int64


def apply_penalties(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """Penalised copy of logits [B, V] (logits itself when no row is penalised)."""
    if sb.repetition_penalty is None and sb.frequency_penalty is None:
        return logits
    logits = logits.clone()
    if sb.repetition_penalty is not None:
        p = sb.repetition_penalty[:, None].expand_as(logits)
        penalised = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(sb.seen_mask, penalised, logits)
    if sb.frequency_penalty is not None:
        logits -= sb.frequency_penalty[:, None] * sb.output_counts
        logits -= sb.presence_penalty[:, None] * (sb.output_counts > 0).to(logits.dtype)
    return logits


def filter_probs(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the probabilities [B, V] that top-k, top-p and min-p drop (not renormalised; no sort on the GPU).

    Token i of a row p [V] survives iff count(p > p_i) < top_k, mass(p > p_i) < top_p (top_p >= 1 is off) and
    p_i >= min_p * max(p), or p_i = max(p); tied tokens survive or go together (ops.truncation_threshold)."""
    return ops.truncate(probs, top_k, top_p, min_p)


def sample(logits: torch.Tensor, sb: SamplingBatch) -> SampleOutput:
    """Pick one token per row of float32 logits [B, V]."""
    logits = apply_penalties(logits, sb)
    if sb.all_greedy and not sb.top_logprobs_num:  # argmax, and log_softmax at it only (T = 1)
        return SampleOutput(*ops.greedy(logits), None, None)
    scaled = logits / sb.temperatures[:, None]
    logprobs_all = torch.log_softmax(scaled, dim=-1)  # [B, V]
    tokens = logits.argmax(dim=-1)
    if not sb.all_greedy:
        probs = logprobs_all.exp()
        if sb.truncates:
            probs = filter_probs(probs, sb.top_k, sb.top_p, sb.min_p)
        drawn = ops.seeded_race(probs, sb.seeds, sb.offsets)  # a draw from probs (renormalised)
        tokens = torch.where(sb.greedy, tokens, drawn)
    logprobs = logprobs_all.gather(-1, tokens[:, None])[:, 0]
    top_lp = top_ids = None
    if sb.top_logprobs_num:
        top_lp, top_ids = logprobs_all.topk(sb.top_logprobs_num, dim=-1)
    return SampleOutput(tokens, logprobs, top_lp, top_ids)


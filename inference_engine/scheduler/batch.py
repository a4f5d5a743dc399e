"""Batch building: a step's (request, new tokens) list as the device tensors of its forward pass and sampling.

`forward_batch` lays the step's tokens end to end (ids, positions, lengths, prefix sums, request rows, new
slots, the rows that sample) in one host tensor, sends it in one copy, records the new slots in
req_to_token and gathers every request's context slots. An input token that is still on the device
(overlap: `Req.pending`) is read there, from the scheduler's `token_buf`. `sampling_batch` builds the
SamplingBatch: per-row parameters, seeds and draw numbers, and for the penalties the seen-token mask and
output-token counts, pending tokens included.
"""

from __future__ import annotations

import itertools
import random

import torch

from inference_engine import ops
from inference_engine.config import EngineConfig
from inference_engine.forward_batch import ForwardBatch
from inference_engine.model_runner import ModelRunner
from inference_engine.request import Req
from inference_engine.sampler import SamplingBatch
from kiln_common.tensors import to_device

SEED_MASK = 2**63 - 1  # request seeds as non-negative int64


class BatchBuilder:
    """Builds a step's ForwardBatch and SamplingBatch; remembers the previous decode batch (`same_pages`)."""

    def __init__(self, config: EngineConfig, runner: ModelRunner, token_buf: torch.Tensor):
        self.page_size = config.page_size
        self.runner = runner
        self.kv_pool = runner.kv_pool
        self.req_to_token = runner.req_to_token
        self.device = runner.device
        self.token_buf = token_buf  # [max_running_requests] by row: the latest sampled token (overlap)
        self.seed_stream = random.Random(config.random_seed)  # seeds of the rows whose request has none
        self._last_decode: list[int] | None = None  # admission ids of the previous step's decode batch
        self.shared_prefix_decode = config.shared_prefix_decode

    def forward_batch(self, batch: list[tuple[Req, int]], sampling: list[tuple[Req, int]]
                      ) -> tuple[ForwardBatch, torch.Tensor, torch.Tensor]:
        """The batch's tensors, sent to the device in one copy; this step's slots recorded in req_to_token.

        Also returns, on the device, the token rows [S] that sample and their requests' rows [S]. A request
        whose input token is still pending (overlap) gets it from token_buf on the device."""
        ids: list[int] = []
        positions: list[int] = []
        lookahead = False
        decode = [req.admitted for req, n in batch if n == 1]
        same_pages = (len(decode) == len(batch) and decode == self._last_decode
                      and all(req.kv_len % self.page_size for req, _ in batch))  # no token starts a page
        self._last_decode = decode if len(decode) == len(batch) else None
        for req, n in batch:
            if req.pending:  # a decode of the token sampled last step: known on the device only
                assert n == 1, f"request {req.rid} has a pending token but extends by {n}"
                ids.append(-1)
                req.lookahead = lookahead = True
            else:
                ids.extend(req.tokens(req.kv_len, req.kv_len + n))
            positions.extend(range(req.kv_len, req.kv_len + n))
        extend_lens = [n for _, n in batch]
        seq_lens = [req.kv_len + n for req, n in batch]
        num_tokens, bs, ns = len(ids), len(batch), len(sampling)
        slots = [slot for req, _ in batch for slot in req.new_slots]
        qo_indptr = [0, *itertools.accumulate(extend_lens)]  # prefix sums on the host: no device kernels for them
        kv_indptr = [0, *itertools.accumulate(seq_lens)]
        host = torch.tensor(ids + positions + extend_lens + seq_lens + qo_indptr + kv_indptr
                            + [req.row for req, _ in batch] + slots + [row for _, row in sampling]
                            + [req.row for req, _ in sampling], dtype=torch.int64)
        (input_ids, positions_d, extend_d, seq_lens_d, qo_indptr_d, kv_indptr_d, rows_d, out_cache_loc, sample_rows,
         sample_req_rows) = to_device(host, self.device).split(
            [num_tokens, num_tokens, bs, bs, bs + 1, bs + 1, bs, num_tokens, ns, ns])
        table = self.req_to_token.req_to_token
        if num_tokens == bs:  # one token per request (decode): each token's request row is its request's
            token_rows = rows_d
        else:
            token_rows = rows_d.repeat_interleave(extend_d, output_size=num_tokens)  # [T] each token's request row
        table[token_rows, positions_d] = out_cache_loc
        if lookahead:
            input_ids = torch.where(input_ids >= 0, input_ids, self.token_buf[token_rows])
        fb = ForwardBatch(
            input_ids=input_ids,
            positions=positions_d,
            out_cache_loc=out_cache_loc,
            qo_indptr=qo_indptr_d,
            kv_indptr=kv_indptr_d,
            kv_indices=ops.context_slots(table, rows_d, kv_indptr_d, kv_indptr[-1], max(seq_lens, default=0)),
            seq_lens=seq_lens_d,
            seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int64),
            extend_lens=extend_lens,
            kv_pool=self.kv_pool,
            attn_backend=self.runner.attn_backend,
            same_pages=same_pages,
        )
        if self.shared_prefix_decode and num_tokens == bs:  # the prefixes decode requests share (shared_prefix.py)
            fb.prefix_keys = [id(req.last_node) for req, _ in batch]
            fb.prefix_lens = [req.prefix_len for req, _ in batch]
        return fb, sample_rows, sample_req_rows

    def sampling_batch(self, reqs: list[Req]) -> SamplingBatch:
        """The sampling parameters, seeds and penalty state of the requests that sample this step, on the device."""
        dev, vocab = self.device, self.runner.spec.vocab_size
        sps = [r.sampling for r in reqs]

        def col(values, dtype=torch.float32):
            return to_device(torch.tensor(values, dtype=dtype), dev)

        # output tokens still on the device (overlap): (batch index, token) pairs for the penalties
        pending = [i for i, r in enumerate(reqs) if r.pending]
        if pending and any(sp.repetition_penalty != 1.0 or sp.frequency_penalty or sp.presence_penalty for sp in sps):
            pending_idx = col(pending, torch.int64)
            pending_tok = self.token_buf[col([reqs[i].row for i in pending], torch.int64)]
        rep = freq = pres = seen = counts = None
        if any(sp.repetition_penalty != 1.0 for sp in sps):
            rep = col([sp.repetition_penalty for sp in sps])
            seen = torch.zeros(len(reqs), vocab, dtype=torch.bool, device=dev)
            for i, r in enumerate(reqs):
                seen[i, col(r.tokens(0, r.fill_len), torch.int64)] = True
            if pending:
                seen[pending_idx, pending_tok] = True
        if any(sp.frequency_penalty or sp.presence_penalty for sp in sps):
            freq = col([sp.frequency_penalty for sp in sps])
            pres = col([sp.presence_penalty for sp in sps])
            counts = torch.zeros(len(reqs), vocab, device=dev)
            for i, r in enumerate(reqs):
                if r.output_ids:
                    counts[i].index_add_(0, col(r.output_ids, torch.int64), torch.ones(len(r.output_ids), device=dev))
            if pending:
                counts.index_put_((pending_idx, pending_tok), torch.ones(len(pending), device=dev), accumulate=True)
        params = to_device(torch.tensor(  # [B, 5] in one copy
            [[1.0 if sp.greedy else sp.temperature, sp.greedy, vocab if sp.top_k == -1 else sp.top_k, sp.top_p,
              sp.min_p] for sp in sps], dtype=torch.float64), dev)
        base = self.seed_stream.getrandbits(62)  # unseeded rows: fresh draws every step
        draws = to_device(torch.tensor(  # [B, 2]: (seed, draw number); a seeded request replays its stream
            [[base + i if r.seed is None else r.seed & SEED_MASK,
              len(r.output_ids) + r.pending] for i, r in enumerate(reqs)], dtype=torch.int64), dev)
        return SamplingBatch(
            temperatures=params[:, 0].float(),
            greedy=params[:, 1].bool(),
            top_k=params[:, 2].long(),
            top_p=params[:, 3].float(),
            min_p=params[:, 4].float(),
            repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres,
            seen_mask=seen, output_counts=counts,
            seeds=draws[:, 0], offsets=draws[:, 1],
            top_logprobs_num=max(r.sampling.top_logprobs_num if r.return_logprob else 0 for r in reqs),
            all_greedy=all(sp.greedy for sp in sps),
            truncates=any(sp.top_k not in (-1, vocab) or sp.top_p < 1.0 or sp.min_p > 0.0 for sp in sps),
        )

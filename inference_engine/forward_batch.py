"""ForwardBatch: the one context object that carries a step's tokens and attention metadata through the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch


if TYPE_CHECKING:
    from inference_engine.attention.base import AttentionBackend
    from inference_engine.kv_cache import KVPool


@dataclass
class ForwardBatch:
    """Tokens of B requests laid end to end (each request extends its context by one or more tokens).

    Request i's new tokens are input_ids[qo_indptr[i]:qo_indptr[i+1]]; its whole context after this
    step (cached prefix + new tokens) lives in the KV slots kv_indices[kv_indptr[i]:kv_indptr[i+1]],
    the new tokens' slots being out_cache_loc[qo_indptr[i]:qo_indptr[i+1]] (the last ones of it).
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64 slot of each new token
    qo_indptr: torch.Tensor  # [B+1] int64
    kv_indptr: torch.Tensor  # [B+1] int64
    kv_indices: torch.Tensor  # [sum of context lengths] int64
    seq_lens: torch.Tensor  # [B] int64 context length after this step
    seq_lens_cpu: torch.Tensor  # [B] int64 host copy of seq_lens (backends plan from it without a device sync)
    extend_lens: list[int]  # new tokens per request (host copy, for backends that loop)
    kv_pool: "KVPool"
    attn_backend: "AttentionBackend"
    attn_metadata: Any = field(default=None)  # whatever the backend precomputed in init_forward_metadata
    same_pages: bool = False  # decode of the previous step's requests, in order, none of them starting a page:
    # the paged layout is unchanged, only every length grew by one (a backend may keep its plan)
    prefix_keys: list[int] | None = None  # decode with EngineConfig.shared_prefix_decode: per request, the id of
    # the radix-tree node that ends its cached prefix (requests with the same key hold the same slots up to it)
    prefix_lens: list[int] | None = None  # and that prefix's length in tokens (attention/shared_prefix.py)

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.extend_lens)

    @property
    def is_decode(self) -> bool:
        """Whether every request adds exactly one token."""
        return all(n == 1 for n in self.extend_lens)

"""The attention backend interface: precompute per-batch metadata once, then attend layer by layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from inference_engine.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    """Writes each layer's new k/v into the KV pool and computes causal attention over every request's context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.device = device

    @abstractmethod
    def init_forward_metadata(self, fb: "ForwardBatch") -> None:
        """Precompute whatever the layers of this batch share and store it in fb.attn_metadata."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer, fb: "ForwardBatch") -> torch.Tensor:
        """Store k, v [T, KVH, D] at fb.out_cache_loc of layer.layer_id, return attention output [T, H, D] for q [T, H, D]."""

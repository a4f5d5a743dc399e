"""The attention backend interface: precompute per-batch metadata once, then attend layer by layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from inference_engine.attention.shared_prefix import PrefixChunks, SharedPrefixState
if TYPE_CHECKING:
    from inference_engine.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    """Computes causal attention over every request's context in the KV pool (the new tokens' k/v already stored).

    CUDA graphs (decode only): `init_cuda_graph_state` once, then `init_graph_metadata(fb, capture=True)`
    for each captured batch size and `init_graph_metadata(fb, capture=False)` before each replay. fb is
    then the graph runner's static, padded batch; the metadata must live in tensors whose addresses
    stay fixed between capture and replay, and `forward` must not read device values on the host.

    FP8 KV cache (`fb.kv_pool.quantized`): the buffers hold e4m3 and `fb.kv_pool.layer_scales(layer_id)` the
    per-kv-head float32 scales; a backend that reads such a pool sets `supports_fp8_kv` (EngineConfig refuses
    the combination otherwise) and attends over `dequantize_kv(buffer, scale)` (kv_cache.py).
    """

    supports_fp8_kv = False

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device,
                 page_size: int = 1, dtype: torch.dtype = torch.float32, triton_decode_max_bs: int = 0,
                 decode_tensor_cores: bool = False, shared_prefix_decode: bool = False):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.device, self.page_size, self.dtype = device, page_size, dtype
        # decode batches of at most this many requests run Kiln's triton split-KV kernel instead of the backend's
        # own decode (EngineConfig.decode_attention; honoured by the flashinfer backend, the only one with a choice)
        self.triton_decode_max_bs = triton_decode_max_bs
        # the backend's own decode through its tensor-core kernels (EngineConfig.decode_tensor_cores; flashinfer)
        self.decode_tensor_cores = decode_tensor_cores
        # decode requests sharing a cached prefix attend to it once per chunk (EngineConfig.shared_prefix_decode;
        # the triton and flashinfer backends)
        self.shared = SharedPrefixState(num_heads, num_kv_heads, torch.device(device)) if shared_prefix_decode else None

    def decode_chunks(self, fb: "ForwardBatch") -> PrefixChunks | None:
        """The shared-prefix chunks of decode batch fb, on the host (None: shared-prefix decode off, not a decode
        batch, or nothing shared)."""
        return self.shared.chunks(fb) if self.shared is not None and fb.is_decode else None

    @abstractmethod
    def init_forward_metadata(self, fb: "ForwardBatch") -> None:
        """Precompute whatever the layers of this batch share and store it in fb.attn_metadata."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer, fb: "ForwardBatch") -> torch.Tensor:
        """Attention output [T, H, D] for q [T, H, D]; the new tokens' k, v [T, KVH, D] are already in the KV cache.

        The caller stored them at fb.out_cache_loc of layer.layer_id (`ops.qk_norm_rope` does, fused with RoPE)."""

    def init_cuda_graph_state(self, max_bs: int, max_context: int) -> None:
        """Allocate the static buffers decode graphs of up to max_bs requests of up to max_context tokens need."""
        if self.shared is not None:
            self.shared.init_graph_state(max_bs)

    @abstractmethod
    def init_graph_metadata(self, fb: "ForwardBatch", capture: bool) -> None:
        """Set fb.attn_metadata for a graph's static decode batch fb: new buffers at capture, refilled at replay."""

"""Paged KV cache: per-layer k/v buffers indexed by slot, a page allocator, and the request -> slot table.

Layout (fixed; the triton kernels rely on it): per layer k_buffer and v_buffer of shape
[num_slots, num_kv_heads, head_dim]; page p is slots [p * page_size, (p + 1) * page_size).
Page 0 is never handed out: it is the padding target of padded kernels.
A mixture-of-experts model also gets `routed_experts` [num_slots, moe layers, top_k]: the experts each token's
forward chose, kept with its KV (so prefix-cache hits keep theirs).

FP8 KV cache (EngineConfig.kv_cache_dtype "fp8_e4m3"): the buffers hold float8_e4m3fn and the pool holds one
float32 scale per (layer, kv head) for K and for V (`k_scale`, `v_scale` [num_layers, num_kv_heads], with their
float32 reciprocals `k_inv_scale`, `v_inv_scale`). A value x is stored as `e4m3(clamp(x * inv_scale, -448, 448))`
(round to nearest even) and read as `q * scale` (`quantize_kv` / `dequantize_kv`, the definition every kernel
follows). The scales live at fixed addresses (CUDA graphs read them) and change only with the weights
(`models/kv_scales.py`), when no cached KV survives.

Memory: every buffer is a view of one flat allocation (`vmm.Buffer`). On CUDA it is virtual memory whose physical
pages `free_buffers` gives back and `allocate_buffers` maps again at the same addresses (`stable_addresses`), so
the engine keeps its decode graphs across release_memory / resume_memory instead of capturing them again.
"""

from __future__ import annotations

import math

import torch

from inference_engine.vmm import Buffer

KV_CACHE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn}  # EngineConfig.kv_cache_dtype -> storage dtype ("auto": `dtype`)
FP8_MAX = 448.0  # largest finite e4m3fn value


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether a KV buffer of this dtype holds e4m3 values that need their scales."""
    return dtype == torch.float8_e4m3fn


def quantize_kv(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """e4m3 [..., KVH, D] of x [..., KVH, D] with float32 inv_scale [KVH]: e4m3(clamp(x * inv_scale, +-448)), RNE."""
    return (x.float() * inv_scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values [..., KVH, D] (in dtype) that e4m3 q [..., KVH, D] with float32 scale [KVH] stands for."""
    return (q.float() * scale[:, None]).to(dtype)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V of one token over all layers (an e4m3 cache: one byte an element; its scales are per head)."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize


def kv_slots_for_memory(free_bytes: int, fraction: float, num_layers: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
    """KV slots that `fraction` of `free_bytes` holds (the pool's size on a GPU when max_total_tokens is unset)."""
    return int(free_bytes * fraction) // kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)


class KVPool:
    """K/V buffers for every layer plus a free list of pages."""

    def __init__(self, num_slots: int, page_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device,
                 routed_experts: tuple[int, int, torch.dtype] | None = None, use_vmm: bool = True):
        self.page_size = page_size
        self.num_pages = num_slots // page_size
        if self.num_pages < 2:
            raise ValueError(f"KV pool of {num_slots} slots holds fewer than 2 pages of {page_size}")
        self.num_slots = self.num_pages * page_size
        self.shape = (self.num_slots, num_kv_heads, head_dim)
        self.num_layers, self.dtype, self.device = num_layers, dtype, device
        self.routed_shape = routed_experts  # (moe layers, top_k, id dtype) or None for a dense model
        self.k_buffer: list[torch.Tensor] = []
        self.v_buffer: list[torch.Tensor] = []
        self.routed_experts: torch.Tensor | None = None
        # fp8: per (layer, kv head) scales, allocated once (never freed with the buffers: graphs hold their address)
        self.k_scale = self.v_scale = self.k_inv_scale = self.v_inv_scale = None
        if is_fp8(dtype):
            ones = [torch.ones(num_layers, num_kv_heads, dtype=torch.float32, device=device) for _ in range(4)]
            self.k_scale, self.v_scale, self.k_inv_scale, self.v_inv_scale = ones
        self._layout, nbytes = self._plan_layout()
        self._memory = Buffer(nbytes, device, use_vmm)
        self.allocate_buffers()
        self.clear()

    def _plan_layout(self) -> tuple[list[tuple[int, tuple[int, ...], torch.dtype]], int]:
        """([(byte offset, shape, dtype)] of every buffer in the flat allocation, each 256-byte aligned: K of every
        layer, V of every layer, then the routed experts; the allocation's total bytes)."""
        entries = [(self.shape, self.dtype)] * (2 * self.num_layers)
        if self.routed_shape is not None:
            layers, top_k, id_dtype = self.routed_shape
            entries.append(((self.num_slots, layers, top_k), id_dtype))
        layout, offset = [], 0
        for shape, dtype in entries:
            layout.append((offset, shape, dtype))
            offset += -(-math.prod(shape) * dtype.itemsize // 256) * 256
        return layout, offset

    @property
    def stable_addresses(self) -> bool:
        """Whether the buffers come back at the same addresses after free_buffers / allocate_buffers (CUDA virtual
        memory), so graphs captured over them stay valid."""
        return self._memory.stable

    @property
    def capacity(self) -> int:
        """Slots that can be handed out (all pages but the padding page)."""
        return (self.num_pages - 1) * self.page_size

    @property
    def quantized(self) -> bool:
        """Whether the buffers hold e4m3 values read through `k_scale` / `v_scale`."""
        return self.k_scale is not None

    def layer_scales(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(k_scale, v_scale) [KVH] float32 of a layer (views at fixed addresses), or None for an unscaled cache."""
        return None if self.k_scale is None else (self.k_scale[layer_id], self.v_scale[layer_id])

    def layer_inv_scales(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(1 / k_scale, 1 / v_scale) [KVH] float32 of a layer, what the store path multiplies by; None if unscaled."""
        return None if self.k_scale is None else (self.k_inv_scale[layer_id], self.v_inv_scale[layer_id])

    def set_scales(self, layer_ids: list[int], k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
        """Set the scales [len(layer_ids), KVH] of these layers in place (and their float32 reciprocals).

        Only while no KV stored with the old scales will be read again (the engine changes them with the weights,
        whose update drops every cached and running request's KV)."""
        index = torch.tensor(layer_ids, dtype=torch.int64, device=self.device)
        k_scale = k_scale.to(self.device, torch.float32)
        v_scale = v_scale.to(self.device, torch.float32)
        self.k_scale.index_copy_(0, index, k_scale)
        self.v_scale.index_copy_(0, index, v_scale)
        self.k_inv_scale.index_copy_(0, index, 1.0 / k_scale)
        self.v_inv_scale.index_copy_(0, index, 1.0 / v_scale)

    def allocate_buffers(self) -> None:
        """(Re)create the zeroed K/V buffers (views of one flat allocation, see `stable_addresses`)."""
        flat = self._memory.allocate()
        views = [flat[offset:offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                 for offset, shape, dtype in self._layout]
        self.k_buffer, self.v_buffer = views[:self.num_layers], views[self.num_layers:2 * self.num_layers]
        self.routed_experts = views[-1] if self.routed_shape is not None else None

    def free_buffers(self) -> None:
        """Drop the K/V buffers and give their memory back (release_memory); the allocator state must be empty."""
        self.k_buffer, self.v_buffer, self.routed_experts = [], [], None
        self._memory.free()

    @property
    def bytes(self) -> int:
        """Memory the K/V buffers take when allocated."""
        return self.num_slots * kv_bytes_per_token(self.num_layers, self.shape[1], self.shape[2], self.dtype)

    def clear(self) -> None:
        """Mark every page but the padding page free."""
        self._free_pages = torch.arange(1, self.num_pages, dtype=torch.int64)
        self._released: list[torch.Tensor] = []

    def available_size(self) -> int:
        """Free slots."""
        return (self._free_pages.numel() + sum(t.numel() for t in self._released)) * self.page_size

    def free_page_ids(self) -> torch.Tensor:
        """Ids [k] of the free pages (for accounting checks: a page listed twice was freed twice)."""
        return torch.cat([self._free_pages, *self._released])

    def alloc_pages(self, n: int) -> torch.Tensor | None:
        """n free page ids [n], or None if there are fewer."""
        if self._free_pages.numel() < n and self._released:
            self._free_pages = torch.cat([self._free_pages, *self._released])
            self._released = []
        if self._free_pages.numel() < n:
            return None
        pages, self._free_pages = self._free_pages[:n], self._free_pages[n:]
        return pages

    def alloc_extend(self, start: int, n: int, last_slot: int) -> torch.Tensor | None:
        """Slots [n] for positions [start, start + n) of a sequence with last_slot at start - 1 (-1 if start == 0).

        Positions inside the sequence's last, partly filled page reuse it; the rest get new pages.
        Returns None (allocating nothing) if the pool lacks free pages.
        """
        p = self.page_size
        open_page = start % p != 0
        new_pages = -(-(start + n) // p) - -(-start // p)
        pages = self.alloc_pages(new_pages)
        if pages is None:
            return None
        if open_page:
            pages = torch.cat([torch.tensor([last_slot // p], dtype=torch.int64), pages])
        pos = torch.arange(start, start + n, dtype=torch.int64)
        return pages[pos // p - start // p] * p + pos % p

    def free_slots(self, slots: torch.Tensor) -> None:
        """Return the pages of these slots (whole pages; the caller owns them exclusively)."""
        if slots.numel():
            self._released.append(torch.unique(slots.cpu() // self.page_size))


class ReqToTokenPool:
    """req_to_token [max_reqs, max_context]: the KV slot of every token of every running request (SGLang's table)."""

    def __init__(self, max_reqs: int, max_context: int, device: torch.device):
        self.req_to_token = torch.zeros((max_reqs, max_context), dtype=torch.int64, device=device)
        self._free = list(range(max_reqs))

    def available(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        """A free row, or None."""
        return self._free.pop() if self._free else None

    def free(self, row: int) -> None:
        self._free.append(row)

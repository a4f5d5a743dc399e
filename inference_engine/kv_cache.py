"""Paged KV cache: per-layer k/v buffers indexed by slot, a page allocator, and the request -> slot table.

Layout (fixed; the triton kernels rely on it): per layer k_buffer and v_buffer of shape
[num_slots, num_kv_heads, head_dim]; page p is slots [p * page_size, (p + 1) * page_size).
Page 0 is never handed out: it is the padding target of padded kernels.
A mixture-of-experts model also gets `routed_experts` [num_slots, moe layers, top_k]: the experts each token's
forward chose, kept with its KV (so prefix-cache hits keep theirs).
"""

from __future__ import annotations

import torch


class KVPool:
    """K/V buffers for every layer plus a free list of pages."""

    def __init__(self, num_slots: int, page_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device,
                 routed_experts: tuple[int, int, torch.dtype] | None = None):
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
        self.allocate_buffers()
        self.clear()

    @property
    def capacity(self) -> int:
        """Slots that can be handed out (all pages but the padding page)."""
        return (self.num_pages - 1) * self.page_size

    def allocate_buffers(self) -> None:
        """(Re)create the zeroed K/V buffers."""
        self.k_buffer = [torch.zeros(self.shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v_buffer = [torch.zeros(self.shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        if self.routed_shape is not None:
            layers, top_k, id_dtype = self.routed_shape
            self.routed_experts = torch.zeros(self.num_slots, layers, top_k, dtype=id_dtype, device=self.device)

    def free_buffers(self) -> None:
        """Drop the K/V buffers (release_memory); the allocator state must be empty."""
        self.k_buffer, self.v_buffer, self.routed_experts = [], [], None

    @property
    def bytes(self) -> int:
        """Memory the K/V buffers take when allocated."""
        return 2 * self.num_layers * self.num_slots * self.shape[1] * self.shape[2] * self.dtype.itemsize

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

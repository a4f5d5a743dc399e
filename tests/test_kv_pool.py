"""Paged KV pool: page-aware slot allocation, freeing, and the buffer layout the kernels rely on."""

import pytest
import torch

from inference_engine.kv_cache import KVPool, ReqToTokenPool


def test_alloc_extend_fills_pages_before_taking_new_ones():
    pool = KVPool(num_slots=32, page_size=4, num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32,
                  device=torch.device("cpu"))
    assert pool.capacity == 28 and pool.available_size() == 28  # page 0 is the padding page
    first = pool.alloc_extend(0, 6, -1)
    assert first.tolist()[:4] == list(range(first[0], first[0] + 4)) and first[0] % 4 == 0
    assert first[4] % 4 == 0 and first[5] == first[4] + 1  # second page, two slots used
    assert pool.available_size() == 20
    more = pool.alloc_extend(6, 3, int(first[-1]))
    assert more[:2].tolist() == [int(first[-1]) + 1, int(first[-1]) + 2]  # finishes the open page
    assert more[2] % 4 == 0 and pool.available_size() == 16
    assert 0 not in torch.cat([first, more]) // 4
    assert pool.alloc_extend(0, 17, -1) is None and pool.available_size() == 16  # nothing taken on failure
    pool.free_slots(torch.cat([first, more]))
    assert pool.available_size() == 28


def test_buffer_layout_free_and_reallocate():
    pool = KVPool(num_slots=16, page_size=1, num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.float16,
                  device=torch.device("cpu"))
    assert len(pool.k_buffer) == 3 and pool.k_buffer[0].shape == (16, 2, 4) and pool.k_buffer[0].dtype == torch.float16
    assert len(pool.v_buffer) == 3 and pool.v_buffer[2].shape == (16, 2, 4)
    pool.k_buffer[1][torch.tensor([3, 7])] = 1.0  # what the q/k-norm + RoPE kernel does at a forward's slots
    pool.free_buffers()
    assert pool.k_buffer == []
    pool.allocate_buffers()
    assert pool.k_buffer[1].abs().sum() == 0


def test_req_to_token_rows():
    table = ReqToTokenPool(max_reqs=2, max_context=8, device=torch.device("cpu"))
    assert table.req_to_token.shape == (2, 8)
    a, b = table.alloc(), table.alloc()
    assert {a, b} == {0, 1} and table.alloc() is None
    table.free(a)
    assert table.available() == 1


def test_buffers_are_disjoint_views_of_one_allocation():
    """K, V of every layer and the routed experts tile one flat allocation without overlap (fp8 and int16 included),
    each contiguous and 256-byte aligned; writes land only in their own buffer."""
    pool = KVPool(num_slots=24, page_size=4, num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float8_e4m3fn,
                  device=torch.device("cpu"), routed_experts=(2, 3, torch.int16))
    buffers = pool.k_buffer + pool.v_buffer + [pool.routed_experts]
    assert pool.routed_experts.shape == (24, 2, 3) and pool.routed_experts.dtype == torch.int16
    base = pool._memory.tensor.data_ptr()  # CUDA allocations are 256-byte aligned, CPU ones only 64
    assert all(b.is_contiguous() and (b.data_ptr() - base) % 256 == 0 for b in buffers)
    spans = sorted((b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in buffers)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
    assert not pool.stable_addresses  # CPU: an ordinary allocation, new after every free
    for i, b in enumerate(buffers):
        b.view(torch.uint8).fill_(i + 1)
    assert [int(b.view(torch.uint8).min()) for b in buffers] == [int(b.view(torch.uint8).max()) for b in buffers] \
        == list(range(1, len(buffers) + 1))
    pool.free_buffers()
    assert pool.routed_experts is None
    pool.allocate_buffers()
    assert all(int(b.view(torch.uint8).abs().max()) == 0 for b in pool.k_buffer + pool.v_buffer + [pool.routed_experts])


@pytest.mark.gpu
def test_vmm_buffer_returns_memory_at_the_same_address():
    """CUDA virtual memory: free gives the physical pages back to the device (another allocation can use them),
    allocate maps fresh zeroed pages at the same address; torch reads and writes the view like any tensor."""
    from inference_engine.vmm import Buffer

    device = torch.device("cuda")
    nbytes = 256 * 2**20
    buffer = Buffer(nbytes, device)
    assert buffer.stable
    view = buffer.allocate().view(torch.float32)
    address = view.data_ptr()
    view.fill_(3.0)
    assert float(view.sum()) == 3.0 * view.numel()
    torch.cuda.synchronize()
    free = torch.cuda.mem_get_info()[0]
    buffer.free()
    assert torch.cuda.mem_get_info()[0] - free >= nbytes
    other = torch.empty(nbytes, dtype=torch.uint8, device=device)  # the trainer's turn: the pages are usable
    del other
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    free = torch.cuda.mem_get_info()[0]
    again = buffer.allocate().view(torch.float32)
    assert again.data_ptr() == address and int(again.count_nonzero()) == 0
    assert free - torch.cuda.mem_get_info()[0] >= nbytes
    buffer.region.close()

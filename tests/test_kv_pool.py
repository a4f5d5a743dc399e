"""Paged KV pool: page-aware slot allocation, freeing, and the buffer layout the kernels rely on."""

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

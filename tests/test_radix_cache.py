"""Radix tree: page-aligned matching, splitting, duplicate detection, locking, LRU eviction, flush with locked nodes."""

import torch

from inference_engine.radix_cache import RadixCache


def make(page_size=1):
    freed = []
    tree = RadixCache(page_size, lambda slots: freed.extend(slots.tolist()))
    return tree, freed


def slots(a, b):
    return torch.arange(a, b)


def test_match_insert_split_and_duplicates():
    tree, freed = make()
    assert tree.insert([1, 2, 3, 4], slots(10, 14)) == 0
    value, node = tree.match_prefix([1, 2, 9])
    assert value.tolist() == [10, 11] and node.key == [1, 2]  # split at the mismatch
    assert tree.insert([1, 2, 3, 5, 6], slots(20, 25)) == 3  # the first three already cached
    assert tree.match_prefix([1, 2, 3, 5, 6, 7])[0].tolist() == [10, 11, 12, 23, 24]
    assert tree.match_prefix([7, 8])[0].numel() == 0
    assert tree.total_size() == 6 and tree.evictable_size == 6 and not freed


def test_page_aligned_matching():
    tree, _ = make(page_size=4)
    assert tree.insert(list(range(10)), slots(100, 110)) == 0  # only 8 tokens (two pages) are kept
    assert tree.total_size() == 8
    assert tree.match_prefix(list(range(7)) + [99])[0].tolist() == [100, 101, 102, 103]
    assert tree.match_prefix(list(range(10)))[0].tolist() == list(range(100, 108))
    assert tree.insert([0, 1, 2, 3, 9, 9, 9, 9], slots(200, 208)) == 4


def test_locked_nodes_survive_eviction_and_lru_order():
    tree, freed = make()
    tree.insert([1, 2, 3], slots(0, 3))
    tree.insert([4, 5], slots(3, 5))
    tree.insert([6], slots(5, 6))
    _, node = tree.match_prefix([1, 2, 3])
    tree.inc_lock(node)
    assert tree.protected_size == 3 and tree.evictable_size == 3
    tree.match_prefix([6])  # touch [6]: [4, 5] is now least recently used
    assert tree.evict(1) == 2 and freed == [3, 4]
    assert tree.evict(100) == 1 and freed == [3, 4, 5]
    assert tree.match_prefix([1, 2, 3])[0].tolist() == [0, 1, 2]  # locked: kept
    tree.dec_lock(node)
    assert tree.evictable_size == 3
    tree.evict(3)
    assert sorted(freed) == [0, 1, 2, 3, 4, 5] and tree.total_size() == 0


def test_evicting_a_leaf_exposes_its_parent():
    tree, freed = make()
    tree.insert([1, 2, 3, 4], slots(0, 4))
    tree.insert([1, 2, 7], slots(10, 13))  # splits: [1, 2] -> {[3, 4], [7]}
    assert tree.evict(10) == 5
    assert sorted(freed) == [0, 1, 2, 3, 12]


def test_reset_frees_unlocked_now_and_locked_on_last_unlock():
    tree, freed = make()
    tree.insert([1, 2, 3], slots(0, 3))
    tree.insert([8, 9], slots(3, 5))
    _, node = tree.match_prefix([1, 2, 3])
    tree.inc_lock(node)
    tree.reset()
    assert sorted(freed) == [3, 4]
    assert tree.match_prefix([1, 2, 3])[0].numel() == 0 and tree.evictable_size == 0
    tree.dec_lock(node)
    assert sorted(freed) == [0, 1, 2, 3, 4]


def test_disabled_cache_matches_nothing():
    tree = RadixCache(1, lambda s: None, disabled=True)
    assert tree.insert([1, 2], slots(0, 2)) == 0
    assert tree.match_prefix([1, 2])[0].numel() == 0


def test_insert_below_a_locked_node_returns_end_node_and_the_trees_slots():
    tree, freed = make(page_size=2)
    assert tree.insert([1, 2, 3, 4], slots(10, 14)) == 0
    _, first = tree.match_prefix([1, 2])
    tree.inc_lock(first)
    # an in-progress sequence [1, 2 | 3, 4, 5, 6, 7] inserts what follows its locked prefix
    already, end, cached = tree.insert_below(first, [3, 4, 5, 6, 7], slots(20, 25))
    assert already == 2 and cached.tolist() == [12, 13]  # [3, 4] was there: the caller frees its 20, 21
    assert end.key == [5, 6] and end.value.tolist() == [22, 23]  # the odd token 7 is not cached
    tree.inc_lock(end)
    tree.dec_lock(first)
    assert tree.protected_size == 6 and tree.evictable_size == 0
    assert tree.evict(100) == 0 and not freed  # locked by the running sequence
    assert tree.match_prefix([1, 2, 3, 4, 5, 6, 9])[0].tolist() == [10, 11, 12, 13, 22, 23]
    tree.dec_lock(end)
    assert tree.evict(100) == 6 and sorted(freed) == [10, 11, 12, 13, 22, 23]


def test_reset_starts_a_new_epoch():
    tree, _ = make()
    epoch = tree.epoch
    tree.reset()
    assert tree.epoch == epoch + 1

"""Radix tree over token ids whose nodes own KV slots: page-aligned prefix matching, locking and LRU eviction."""

from __future__ import annotations

import heapq
import itertools
from typing import Callable

import torch

_clock = itertools.count()


class TreeNode:
    """An edge of token ids (a whole number of pages) and the KV slots holding them."""

    def __init__(self, key: list[int], value: torch.Tensor, parent: "TreeNode | None"):
        self.key = key
        self.value = value  # [len(key)] int64 slot ids
        self.parent = parent
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.lock_ref = 0
        self.last_access = next(_clock)
        self.stale = False  # detached by a flush while locked: freed when its last lock goes

    def __lt__(self, other: "TreeNode") -> bool:
        return self.last_access < other.last_access


class RadixCache:
    """Prefix cache of finished, retracted and running sequences; `free_slots` returns evicted slots to the KV pool."""

    def __init__(self, page_size: int, free_slots: Callable[[torch.Tensor], None], disabled: bool = False):
        self.page_size = page_size
        self.free_slots = free_slots
        self.disabled = disabled
        self.epoch = -1
        self.reset()

    def reset(self) -> None:
        """Forget every cached sequence: unlocked nodes are freed now, locked ones when their last user unlocks.

        `epoch` counts resets: KV computed before the latest one (e.g. with old weights) must not be inserted.
        """
        self.epoch += 1
        if hasattr(self, "root"):
            stack = list(self.root.children.values())
            while stack:
                node = stack.pop()
                stack.extend(node.children.values())
                if node.lock_ref == 0:
                    self.free_slots(node.value)
                else:
                    node.stale = True
        self.root = TreeNode([], torch.empty(0, dtype=torch.int64), None)
        self.root.lock_ref = 1
        self.evictable_size = 0  # tokens in unlocked nodes
        self.protected_size = 0  # tokens in locked nodes

    def _child_key(self, key: list[int]) -> tuple[int, ...]:
        return tuple(key[:self.page_size])

    def _aligned(self, n: int) -> int:
        return n // self.page_size * self.page_size

    def _common_len(self, a: list[int], b: list[int]) -> int:
        n = min(len(a), len(b))
        i = next((j for j in range(n) if a[j] != b[j]), n)
        return self._aligned(i)

    def match_prefix(self, key: list[int]) -> tuple[torch.Tensor, TreeNode]:
        """Slots [m] of the longest cached page-aligned prefix of key, and the node it ends at."""
        node, values = self.root, []
        if self.disabled:
            return torch.empty(0, dtype=torch.int64), node
        key = key[:self._aligned(len(key))]
        while key:
            child = node.children.get(self._child_key(key))
            if child is None:
                break
            n = self._common_len(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = next(_clock)
            values.append(child.value)
            node, key = child, key[n:]
        value = torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
        return value, node

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut child's edge after n tokens; returns the new upper node."""
        upper = TreeNode(child.key[:n], child.value[:n], child.parent)
        upper.lock_ref, upper.last_access = child.lock_ref, child.last_access
        child.parent.children[self._child_key(upper.key)] = upper
        child.key, child.value, child.parent = child.key[n:], child.value[n:], upper
        upper.children[self._child_key(child.key)] = child
        return upper

    def insert(self, key: list[int], value: torch.Tensor) -> int:
        """Cache key's page-aligned part with its slots; returns how many leading tokens were already cached.

        The caller frees its own copies of those already-cached slots (they duplicate the tree's).
        """
        if self.disabled:
            return 0
        return self.insert_below(self.root, key, value)[0]

    def insert_below(self, node: TreeNode, key: list[int],
                     value: torch.Tensor) -> tuple[int, TreeNode, torch.Tensor]:
        """Cache the page-aligned part of key, the tokens that follow node's path, with its slots value [len(key)].

        Returns (how many leading tokens of key were already cached, the node where the aligned key ends,
        the tree's slots [already] of those tokens). node must be locked (so a flush or eviction cannot detach it).
        """
        n_aligned = self._aligned(len(key))
        key, value = key[:n_aligned], value[:n_aligned]
        done, cached = 0, []
        while done < len(key):
            rest = key[done:]
            child = node.children.get(self._child_key(rest))
            if child is None:
                leaf = TreeNode(rest, value[done:].clone(), node)
                node.children[self._child_key(rest)] = leaf
                self.evictable_size += len(rest)
                node = leaf
                break
            n = self._common_len(child.key, rest)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = next(_clock)
            cached.append(child.value)
            node, done = child, done + n
        return done, node, torch.cat(cached) if cached else torch.empty(0, dtype=torch.int64)

    def inc_lock(self, node: TreeNode) -> None:
        """Protect node and its ancestors from eviction."""
        while node is not None and node is not self.root:
            if node.lock_ref == 0 and not node.stale:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock(self, node: TreeNode) -> None:
        """Undo inc_lock; stale nodes whose last lock goes are freed."""
        while node is not None and node.parent is not None:
            node.lock_ref -= 1
            parent = node.parent
            if node.stale:
                if node.lock_ref == 0:
                    self.free_slots(node.value)
            elif node.lock_ref == 0:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            node = parent

    def evict(self, num_tokens: int) -> int:
        """Free at least num_tokens slots from LRU unlocked leaves (fewer if not enough); returns slots freed."""
        leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            self.free_slots(leaf.value)
            freed += len(leaf.key)
            self.evictable_size -= len(leaf.key)
            parent = leaf.parent
            del parent.children[self._child_key(leaf.key)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return freed

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node

    def total_size(self) -> int:
        """Tokens held by the tree."""
        return sum(len(n.key) for n in self._nodes())

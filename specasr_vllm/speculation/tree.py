"""The one data shape of the algorithm: a draft tree in target-token space.

Node ``i`` holds a target token, its parent (``-1``: the root, i.e. the last token the target
emitted) and the draft's probability for it. A chain is a tree with one child per node. Nodes are
kept in insertion order with every parent before its children, so a node's index is also its offset
in the verification pass, and the trie structure merges branches that share a prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specasr_vllm.models.packing import TreeRow

ROOT = -1


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    recycled: list[bool] = field(default_factory=list)  # came from draft recycling (for statistics)

    @classmethod
    def chain(cls, tokens: list[int], probs: list[float] | None = None, recycled: int = 0) -> DraftTree:
        tree = cls()
        tree.add_path(ROOT, tokens, probs, recycled)
        return tree

    def __len__(self) -> int:
        return len(self.tokens)

    def child(self, parent: int, token: int) -> int | None:
        for i, (p, t) in enumerate(zip(self.parents, self.tokens)):
            if p == parent and t == token:
                return i
        return None

    def add_path(self, parent: int, tokens: list[int], probs: list[float] | None = None, recycled: int = 0) -> list[int]:
        """Insert ``tokens`` below ``parent``, reusing existing nodes (trie merge); returns the path's nodes."""
        probs = probs if probs is not None else [1.0] * len(tokens)
        path = []
        for k, (tok, p) in enumerate(zip(tokens, probs)):
            node = self.child(parent, tok)
            if node is None:
                self.tokens.append(tok)
                self.parents.append(parent)
                self.probs.append(p)
                self.recycled.append(k < recycled)
                node = len(self.tokens) - 1
            path.append(node)
            parent = node
        return path

    def depth(self, node: int) -> int:
        d = 0
        while node != ROOT:
            node, d = self.parents[node], d + 1
        return d

    def max_depth(self) -> int:
        return max((self.depth(i) for i in range(len(self))), default=0)

    def path_to(self, node: int) -> list[int]:
        path = []
        while node != ROOT:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def verification_row(self, last_token: int) -> TreeRow:
        """One target pass over [last_token] + nodes: input 0 is the root (the target's last emitted
        token, not yet in its cache); input ``i + 1`` is node ``i`` and sees the root, its ancestors
        and itself (parents precede children, so depths follow in one sweep)."""
        depths = [0]
        for parent in self.parents:
            depths.append(depths[parent + 1] + 1)
        return TreeRow([last_token, *self.tokens], [-1] + [p + 1 for p in self.parents], depths)

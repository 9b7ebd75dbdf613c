"""One batch of token rows for a decode call, built on the host and moved to the model's device once.

Both the drafter (catch-up, recycling candidates, draft steps) and the verifier (a draft tree per
request) feed rows of different lengths whose tokens form trees: each token names its parent within
the row (``-1``: the cached context) and its depth below the context. Padding tokens see only
themselves, so they never change what the real tokens see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TreeRow:
    tokens: list[int]
    parents: list[int]  # index of each token's parent within the row, -1 for the cached context
    depths: list[int]  # distance from the cached context (position offset)

    @classmethod
    def chain(cls, tokens: list[int]) -> TreeRow:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), list(range(len(tokens))))


@dataclass
class PackedRows:
    tokens: torch.Tensor  # (batch, n)
    mask: torch.Tensor | None  # (batch, n, n): token i sees token j; None: every row a chain (the causal default)
    depths: torch.Tensor | None  # (batch, n); None with ``mask``: token i at depth i


def pack_rows(rows: list[TreeRow], pad_token: int, device: torch.device, width: int | None = None) -> PackedRows:
    """Rows padded to ``width`` (default: the longest row), with each token's ancestor mask.

    Rows that are all chains of the full width need no mask: ``mask`` and ``depths`` are then None and the
    decoder takes its causal default (what most verification passes and catch-up passes are). Built as
    Python lists and moved to ``device`` once: a pass costs no tensor operation per token.
    """
    n = width or max(len(r.tokens) for r in rows)
    for row in rows:
        if len(row.tokens) > n:
            raise ValueError(f"row of {len(row.tokens)} tokens does not fit width {n}")
    tokens = [row.tokens + [pad_token] * (n - len(row.tokens)) for row in rows]
    if all(len(row.tokens) == n and row.parents == list(range(-1, n - 1)) for row in rows):
        return PackedRows(torch.tensor(tokens, device=device), None, None)
    depths = [row.depths + [0] * (n - len(row.depths)) for row in rows]
    masks = []
    for row in rows:
        seen: list[list[bool]] = []
        for i in range(n):  # ancestors first (a parent precedes its children); padding sees itself alone
            parent = row.parents[i] if i < len(row.parents) else -1
            line = list(seen[parent]) if parent >= 0 else [False] * n
            line[i] = True
            seen.append(line)
        masks.append(seen)
    return PackedRows(torch.tensor(tokens, device=device), torch.tensor(masks, device=device),
                      torch.tensor(depths, device=device))

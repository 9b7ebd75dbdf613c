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
    mask: torch.Tensor  # (batch, n, n): token i sees token j
    depths: torch.Tensor  # (batch, n)


def pack_rows(rows: list[TreeRow], pad_token: int, device: torch.device, width: int | None = None) -> PackedRows:
    """Rows padded to ``width`` (default: the longest row), with each token's ancestor mask."""
    n = width or max(len(r.tokens) for r in rows)
    host = torch.device("cpu")
    tokens = torch.full((len(rows), n), pad_token, dtype=torch.long, device=host)
    mask = torch.eye(n, dtype=torch.bool, device=host).repeat(len(rows), 1, 1)
    depths = torch.zeros(len(rows), n, dtype=torch.long, device=host)
    for b, row in enumerate(rows):
        if len(row.tokens) > n:
            raise ValueError(f"row of {len(row.tokens)} tokens does not fit width {n}")
        tokens[b, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long, device=host)
        depths[b, : len(row.depths)] = torch.tensor(row.depths, dtype=torch.long, device=host)
        for i, parent in enumerate(row.parents):
            if parent >= 0:
                mask[b, i] |= mask[b, parent]
    return PackedRows(tokens.to(device, non_blocking=True), mask.to(device, non_blocking=True),
                      depths.to(device, non_blocking=True))

"""A decoding batch's rows in the target's KV cache: claimed at the start, shrunk as requests end.

Both decoding loops (AR and speculative) keep their unfinished requests in the first rows of the
cache, so each step reads one contiguous block; a finished request's row goes back to the pool and
the rows behind it move up (``DecoderCache.compact``).
"""

from __future__ import annotations

from typing import Self

import torch

from specasr_vllm.models.kv_cache import DecoderCache
from specasr_vllm.models.whisper import Whisper


class BatchRows:
    """``active[p]`` is the request (index into the batch) decoding in cache row ``rows[p]``; ``rows`` stay in
    increasing order, so a batch in rows ``0 .. n - 1`` is read as one block, in the order of its positions."""

    def __init__(self, model: Whisper, audio_features: torch.Tensor, cache: DecoderCache | None = None):
        self.cache = cache if cache is not None else model.empty_cache(audio_features.shape[0])
        self.rows = self.cache.claim(*model.cross_kv(audio_features))
        self.active = list(range(audio_features.shape[0]))

    def keep(self, positions: list[int]) -> None:
        """Keep the requests at these positions of ``active``; the others are done."""
        if len(positions) == len(self.active):
            return
        kept = set(positions)
        self.cache.release([row for p, row in enumerate(self.rows) if p not in kept])
        rows = self.cache.compact([self.rows[p] for p in positions])
        # compaction moves the rows behind a hole into it, out of order (rows 0, 2, 3, 4, 1): positions follow the
        # rows, else the block is not in the batch's order and the step runs the eager module over scattered rows
        # (the Xeon CPU, 5 of 8 rows left: 57 ms a step against 31 ms compiled, more than the 40 ms for all 8)
        pairs = sorted(zip(rows, (self.active[p] for p in positions)))
        self.rows = [row for row, _ in pairs]
        self.active = [request for _, request in pairs]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.cache.release(self.rows)  # also when decoding failed: the pool must not leak rows
        self.rows, self.active = [], []

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
    """``active[p]`` is the request (index into the batch) decoding in cache row ``rows[p]``."""

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
        self.rows = self.cache.compact([self.rows[p] for p in positions])
        self.active = [self.active[p] for p in positions]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.cache.release(self.rows)  # also when decoding failed: the pool must not leak rows
        self.rows, self.active = [], []

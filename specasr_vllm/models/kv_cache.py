"""The decoder's per-request state: self-attention KV cache (growable, croppable) and cross-attention KV.

Speculative decoding needs three things a plain cache lacks:
- per-row lengths, since requests in one batch accept different numbers of tokens;
- rollback (``crop``) after the target rejects part of a draft;
- compaction (``keep``) after tree verification, where the accepted path is a scattered subset of
  the nodes just written.
Rows can be selected (``select``) to drop finished requests from a batch or regroup requests, and
appended (``cat``) when requests join a running batch (the vLLM proposer's continuous batching).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DecoderCache:
    """All tensors are (layers, batch, heads, positions, head_dim); ``lengths`` is (batch,).

    ``cross_valid`` (batch, frames), when set, marks the audio frames each row really has: rows whose
    audio was encoded over fewer frames are padded, and cross-attention must not see the padding.
    """

    self_k: torch.Tensor
    self_v: torch.Tensor
    cross_k: torch.Tensor
    cross_v: torch.Tensor
    lengths: torch.Tensor
    cross_valid: torch.Tensor | None = None

    @classmethod
    def allocate(cls, cross_k: torch.Tensor, cross_v: torch.Tensor, capacity: int) -> "DecoderCache":
        layers, batch, heads, _, head_dim = cross_k.shape
        shape = (layers, batch, heads, capacity, head_dim)
        return cls(
            self_k=cross_k.new_zeros(shape),
            self_v=cross_k.new_zeros(shape),
            cross_k=cross_k,
            cross_v=cross_v,
            lengths=torch.zeros(batch, dtype=torch.long, device=cross_k.device),
        )

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.self_k.shape[3]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store (batch, heads, n, head_dim) new keys/values at each row's slots ``lengths .. lengths + n``."""
        n = k.shape[2]
        rows = torch.arange(self.batch_size, device=k.device)[:, None]
        slots = self.lengths[:, None] + torch.arange(n, device=k.device)
        # advanced indices around a slice put (batch, n) first, so move heads after them
        self.self_k[layer, rows, :, slots] = k.transpose(1, 2)
        self.self_v[layer, rows, :, slots] = v.transpose(1, 2)

    def crop(self, lengths: torch.Tensor | list[int]) -> None:
        """Roll rows back (or forward over already written slots) to the given lengths."""
        self.lengths = torch.as_tensor(lengths, dtype=torch.long, device=self.lengths.device).clone()

    def keep(self, row: int, start: int, offsets: list[int]) -> None:
        """Compact slots ``start + offsets[i]`` to ``start + i`` and crop the row to ``start + len(offsets)``.

        After a tree pass the accepted path is a subset of the nodes written from ``start``; this makes
        it contiguous so the row looks exactly as if the path alone had been decoded.
        """
        if offsets != list(range(len(offsets))):
            src = torch.tensor(offsets, device=self.self_k.device) + start
            self.self_k[:, row, :, start : start + len(offsets)] = self.self_k[:, row, :, src]
            self.self_v[:, row, :, start : start + len(offsets)] = self.self_v[:, row, :, src]
        self.lengths[row] = start + len(offsets)

    def select(self, rows: list[int] | torch.Tensor) -> "DecoderCache":
        """A new cache holding only ``rows`` (in that order)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        return DecoderCache(
            self_k=self.self_k.index_select(1, idx),
            self_v=self.self_v.index_select(1, idx),
            cross_k=self.cross_k.index_select(1, idx),
            cross_v=self.cross_v.index_select(1, idx),
            lengths=self.lengths.index_select(0, idx),
            cross_valid=None if self.cross_valid is None else self.cross_valid.index_select(0, idx),
        )

    def cat(self, other: "DecoderCache") -> "DecoderCache":
        """This cache's rows followed by ``other``'s; audio encoded over different frame counts is padded
        to the longer one and masked (``cross_valid``)."""
        if other.self_k.shape[2:] != self.self_k.shape[2:] or other.cross_k.shape[4] != self.cross_k.shape[4]:
            raise ValueError(f"cannot join caches shaped {tuple(self.self_k.shape)} and {tuple(other.self_k.shape)}")
        frames = max(self.cross_k.shape[3], other.cross_k.shape[3])
        parts = [self._padded_cross(frames), other._padded_cross(frames)]
        joined = {name: torch.cat([getattr(self, name), getattr(other, name)], dim=1) for name in ("self_k", "self_v")}
        return DecoderCache(**joined, cross_k=torch.cat([p[0] for p in parts], dim=1),
                            cross_v=torch.cat([p[1] for p in parts], dim=1),
                            lengths=torch.cat([self.lengths, other.lengths]),
                            cross_valid=torch.cat([p[2] for p in parts]))

    def _padded_cross(self, frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        have = self.cross_k.shape[3]
        valid = self.cross_valid if self.cross_valid is not None else \
            torch.ones(self.batch_size, have, dtype=torch.bool, device=self.cross_k.device)
        if have == frames:
            return self.cross_k, self.cross_v, valid
        pad = (0, 0, 0, frames - have)
        return (F.pad(self.cross_k, pad), F.pad(self.cross_v, pad), F.pad(valid, (0, frames - have), value=False))

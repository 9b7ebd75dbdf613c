"""The decoder's per-request state, preallocated: self-attention KV slots and cross-attention KV per row.

Speculative decoding needs what a plain cache lacks:
- per-row lengths, since requests in one batch accept different numbers of tokens;
- rollback (``set_length``) after the target rejects part of a draft;
- compaction (``keep``) after tree verification, where the accepted path is a scattered subset of
  the nodes just written.

The tensors are allocated once, with a fixed number of slots per row (Whisper's 448 positions) and a
pool of rows that requests ``claim`` and ``release`` through a free list, so memory addresses stay put
while requests come and go (what a compiled or graph-captured decode step needs). The pool grows by
doubling when every row is taken (continuous batching may bring more requests than expected).
``compact`` moves live rows to the front so a dense batch reads its rows as one contiguous view.

Row lengths live on the host: they are known there anyway (the host decides what is kept), and
reading them never waits for the device.
"""

from __future__ import annotations

import heapq

import torch


class DecoderCache:
    """Per layer, self K/V: (rows, heads, capacity, head_dim); cross K/V: (rows, heads, frames, head_dim).

    One tensor per layer rather than one stacked tensor: a compiled step that writes into slices of a
    stacked tensor makes the compiler copy the whole of it on every call.

    ``frames`` grows to the longest audio a row has claimed; each row remembers how many of them hold
    its audio (rows encoded over fewer frames, e.g. the draft's unpadded encoder, are masked).

    ``cross_dtype`` (default ``dtype``) stores the cross K/V in another dtype: the draft's in bfloat16, since a
    step of several rows is bound by reading them (``DraftModel``); attention then computes in that dtype.
    """

    def __init__(self, layers: int, heads: int, head_dim: int, capacity: int, rows: int,
                 device: torch.device, dtype: torch.dtype, cross_dtype: torch.dtype | None = None):
        def per_layer(slots: int, dtype: torch.dtype) -> list[torch.Tensor]:
            return [torch.zeros((rows, heads, slots, head_dim), device=device, dtype=dtype) for _ in range(layers)]

        self.self_k, self.self_v = per_layer(capacity, dtype), per_layer(capacity, dtype)
        self.cross_k, self.cross_v = per_layer(0, cross_dtype or dtype), per_layer(0, cross_dtype or dtype)
        self._lengths = [0] * rows
        self._frames = [0] * rows  # audio frames each row holds in cross_k / cross_v
        self._free = list(range(rows))  # a heap: the lowest free row is taken first
        self._row_views: dict[tuple[int, int], tuple[int, list[torch.Tensor]]] = {}  # ``row_kv``'s, per (row, span)

    # ---- shape ---------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.self_k[0].shape[2]

    @property
    def rows(self) -> int:
        return self.self_k[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.self_k[0].device

    @property
    def layers(self) -> int:
        return len(self.self_k)

    # ---- rows --------------------------------------------------------------------------------------------
    def claim(self, cross_k: torch.Tensor, cross_v: torch.Tensor) -> list[int]:
        """Rows for new requests, given each one's cross-attention K/V (layers, n, heads, frames, head_dim)."""
        n, frames = cross_k.shape[1], cross_k.shape[3]
        while len(self._free) < n:
            self._grow_rows()
        if frames > self.cross_k[0].shape[2]:
            self._grow_frames(frames)
        rows = [heapq.heappop(self._free) for _ in range(n)]
        idx = torch.tensor(rows, device=self.device)
        for layer in range(self.layers):
            self.cross_k[layer][idx, :, :frames] = cross_k[layer].to(self.cross_k[layer].dtype)
            self.cross_v[layer][idx, :, :frames] = cross_v[layer].to(self.cross_v[layer].dtype)
        for row in rows:
            self._lengths[row], self._frames[row] = 0, frames
        return rows

    def reserve(self, rows: int, frames: int) -> None:
        """Grow now to at least ``rows`` rows and ``frames`` audio frames, so that later claims move nothing
        (what graphs captured on this cache's tensors need)."""
        while self.rows < rows:
            self._grow_rows()
        if frames > self.cross_k[0].shape[2]:
            self._grow_frames(frames)

    def release(self, rows: list[int]) -> None:
        """Give rows back to the pool (their contents are simply overwritten by the next claim)."""
        for row in rows:
            if row in self._free:
                raise ValueError(f"row {row} is not in use")
            self._lengths[row], self._frames[row] = 0, 0
            heapq.heappush(self._free, row)

    def compact(self, rows: list[int]) -> list[int]:
        """Move the live ``rows`` to the front (rows ``0 .. len(rows) - 1``); returns each one's new row.

        Only rows outside the front move (one copy each), so a batch that loses a request pays for the
        requests behind it, not for every request.
        """
        front = set(range(len(rows)))
        holes = sorted(front - set(rows))
        moved = {}
        for row in rows:
            if row not in front:
                dst = holes.pop(0)
                self._move(row, dst)
                moved[row] = dst
        return [moved.get(row, row) for row in rows]

    def fork(self, row: int, length: int) -> int:
        """A new row holding ``row``'s audio and its first ``length`` slots (a branch to explore)."""
        if not self._free:
            self._grow_rows()
        dst = heapq.heappop(self._free)
        self._copy(row, dst, length)
        return dst

    def _copy(self, src: int, dst: int, used: int) -> None:
        frames = self._frames[src]
        for layer in range(self.layers):
            self.self_k[layer][dst, :, :used] = self.self_k[layer][src, :, :used]
            self.self_v[layer][dst, :, :used] = self.self_v[layer][src, :, :used]
            self.cross_k[layer][dst, :, :frames] = self.cross_k[layer][src, :, :frames]
            self.cross_v[layer][dst, :, :frames] = self.cross_v[layer][src, :, :frames]
        self._lengths[dst], self._frames[dst] = used, frames

    def _move(self, src: int, dst: int) -> None:
        if dst not in self._free:
            raise ValueError(f"row {dst} is in use")
        self._free.remove(dst)
        heapq.heapify(self._free)
        self._copy(src, dst, self._lengths[src])
        self.release([src])

    def _grow_rows(self) -> None:
        self._row_views.clear()
        old = self.rows
        grow = max(old, 1)
        for name in ("self_k", "self_v", "cross_k", "cross_v"):
            setattr(self, name, [torch.cat([t, t.new_zeros((grow, *t.shape[1:]))]) for t in getattr(self, name)])
        self._lengths += [0] * grow
        self._frames += [0] * grow
        for row in range(old, old + grow):
            heapq.heappush(self._free, row)

    def _grow_frames(self, frames: int) -> None:
        self._row_views.clear()
        for name in ("cross_k", "cross_v"):
            setattr(self, name, [torch.cat([t, t.new_zeros((*t.shape[:2], frames - t.shape[2], t.shape[3]))], dim=2)
                                 for t in getattr(self, name)])

    # ---- lengths -----------------------------------------------------------------------------------------
    def length(self, row: int) -> int:
        return self._lengths[row]

    def lengths(self, rows: list[int]) -> list[int]:
        return [self._lengths[r] for r in rows]

    def set_length(self, row: int, length: int) -> None:
        """Roll a row back, or forward over slots the last call wrote for its real tokens, to ``length`` tokens.
        Not further: the slots past those may hold a padded step's K/V (``step_graphs.bucket``)."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"length {length} outside 0..{self.capacity}")
        self._lengths[row] = length

    def advance(self, rows: list[int], n: int) -> None:
        for row in rows:
            self._lengths[row] += n

    def keep(self, row: int, start: int, offsets: list[int]) -> None:
        """Compact slots ``start + offsets[i]`` to ``start + i`` and set the row's length to ``start + len(offsets)``.

        After a tree pass the accepted path is a subset of the nodes written from ``start``; this makes
        it contiguous so the row looks exactly as if the path alone had been decoded.
        """
        if offsets != list(range(len(offsets))):
            src = torch.tensor(offsets, device=self.device) + start
            for layer in range(self.layers):
                self.self_k[layer][row, :, start : start + len(offsets)] = self.self_k[layer][row, :, src]
                self.self_v[layer][row, :, start : start + len(offsets)] = self.self_v[layer][row, :, src]
        self.set_length(row, start + len(offsets))

    # ---- what a decode call reads --------------------------------------------------------------------------
    def frames(self, rows: list[int]) -> list[int]:
        return [self._frames[r] for r in rows]

    def row_kv(self, row: int, span: int) -> list[torch.Tensor]:
        """One row's K/V as views (batch of one): self K, self V over its first ``span`` slots, cross K, cross V
        over its own audio frames, a layer each. Kept per (row, span), with the frames they cover, until the tensors
        grow: a small model's step reads them many times, and slicing 16 views cost ~20 us of a 1 ms draft step."""
        frames = self._frames[row]
        kept = self._row_views.get((row, span))
        if kept is None or kept[0] != frames:
            own = slice(row, row + 1)
            kept = frames, ([t[own, :, :span] for tensors in (self.self_k, self.self_v) for t in tensors]
                            + [t[own, :, :frames] for tensors in (self.cross_k, self.cross_v) for t in tensors])
            self._row_views[(row, span)] = kept
        return kept[1]

    def view(self, rows: list[int], fixed: bool = False) -> RowView:
        """The tensors a decode call over ``rows`` reads and writes.

        Consecutive rows are read as views (no copy); scattered rows are gathered for reading and
        written back by index. ``fixed`` reads every frame (a shape that does not depend on the rows).
        """
        index = torch.tensor(rows, device=self.device)  # one index per call, for every layer's writes
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        read = slice(rows[0], rows[0] + len(rows)) if contiguous else index
        frames = self.cross_k[0].shape[2] if fixed else max(self.frames(rows))
        return RowView(self, read, index, frames)


class RowView:
    """One decode call's window onto a ``DecoderCache``: its rows and the audio frames they attend to."""

    def __init__(self, cache: DecoderCache, read: slice | torch.Tensor, rows: torch.Tensor, frames: int):
        self.cache, self.index, self.frames = cache, read, frames
        self._rows = rows[:, None]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store (batch, heads, n, head_dim) keys/values at each row's ``slots`` (batch, n)."""
        self.cache.self_k[layer][self._rows, :, slots] = k.transpose(1, 2)
        self.cache.self_v[layer][self._rows, :, slots] = v.transpose(1, 2)

    def self_kv(self, layer: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.self_k[layer][self.index, :, :span], self.cache.self_v[layer][self.index, :, :span]

    def cross_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.cache.cross_k[layer][self.index, :, : self.frames],
                self.cache.cross_v[layer][self.index, :, : self.frames])


class FixedView:
    """A decode step's cache as plain per-layer tensors of its rows (what a compiled step reads and writes)."""

    def __init__(self, self_k: list[torch.Tensor], self_v: list[torch.Tensor], cross_k: list[torch.Tensor],
                 cross_v: list[torch.Tensor]):
        self.self_k, self.self_v, self.cross_k, self.cross_v = self_k, self_v, cross_k, cross_v

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None]
        self.self_k[layer][rows, :, slots] = k.transpose(1, 2)
        self.self_v[layer][rows, :, slots] = v.transpose(1, 2)

    def self_kv(self, layer: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.self_k[layer][:, :, :span], self.self_v[layer][:, :, :span]

    def cross_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cross_k[layer], self.cross_v[layer]


class OneRowView(FixedView):
    """``FixedView`` of one row (batch of one) whose writes a tracer records for any number of new tokens: an
    advanced-index write (``FixedView.write``) records the shape of the values it stores, ``index_copy_`` does
    not."""

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        self.self_k[layer].index_copy_(2, slots[0], k)
        self.self_v[layer].index_copy_(2, slots[0], v)

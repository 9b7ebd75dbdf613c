"""A lean Whisper built for speculative decoding.

Module and parameter names follow Hugging Face's ``WhisperForConditionalGeneration`` (minus the
``model.`` prefix) so its safetensors load directly. What differs is the decoder's interface:
``decode`` takes several new tokens per row with any attention mask among them (a tree), and a
preallocated ``DecoderCache`` whose rows requests claim and release, with per-row lengths that the
caller can crop and compact.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specasr_vllm.models.kv_cache import DecoderCache, FixedView, RowView


@dataclass(frozen=True)
class WhisperDims:
    n_mels: int
    vocab_size: int
    d_model: int
    encoder_layers: int
    encoder_heads: int
    encoder_ffn: int
    decoder_layers: int
    decoder_heads: int
    decoder_ffn: int
    max_source_positions: int = 1500
    max_target_positions: int = 448

    @classmethod
    def from_hf_config(cls, cfg: dict) -> WhisperDims:
        return cls(
            n_mels=cfg["num_mel_bins"], vocab_size=cfg["vocab_size"], d_model=cfg["d_model"],
            encoder_layers=cfg["encoder_layers"], encoder_heads=cfg["encoder_attention_heads"],
            encoder_ffn=cfg["encoder_ffn_dim"], decoder_layers=cfg["decoder_layers"],
            decoder_heads=cfg["decoder_attention_heads"], decoder_ffn=cfg["decoder_ffn_dim"],
            max_source_positions=cfg.get("max_source_positions", 1500),
            max_target_positions=cfg.get("max_target_positions", 448),
        )


class Attention(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, d_model // heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``q`` is (batch, t, d_model); ``k``/``v`` are already split into heads. K/V stored in another dtype (the
        draft's cross K/V in bfloat16, ``DecoderCache``) set the dtype the attention computes in."""
        out = F.scaled_dot_product_attention(self.split(q).to(k.dtype), k, v, attn_mask=mask).to(q.dtype)
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = Attention(d_model, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1, self.fc2 = nn.Linear(d_model, ffn), nn.Linear(ffn, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.self_attn_layer_norm(x)
        a = self.self_attn
        x = x + a.attend(a.q_proj(h), a.split(a.k_proj(h)), a.split(a.v_proj(h)))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = Attention(d_model, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.encoder_attn = Attention(d_model, heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1, self.fc2 = nn.Linear(d_model, ffn), nn.Linear(ffn, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, layer: int, view: RowView | FixedView, slots: torch.Tensor, mask: torch.Tensor,
                span: int, audio_mask: torch.Tensor | None) -> torch.Tensor:
        a = self.self_attn
        h = self.self_attn_layer_norm(x)
        view.write(layer, a.split(a.k_proj(h)), a.split(a.v_proj(h)), slots)
        x = x + a.attend(a.q_proj(h), *view.self_kv(layer, span), mask)
        c = self.encoder_attn
        x = x + c.attend(c.q_proj(self.encoder_attn_layer_norm(x)), *view.cross_kv(layer), audio_mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


@dataclass
class StepInputs:
    """What one decode call needs besides the tokens, all on the model's device."""

    positions: torch.Tensor  # (batch, n) position embedding of each new token
    slots: torch.Tensor  # (batch, n) cache slot each new token's K/V is written to
    mask: torch.Tensor  # (batch, 1, n, span) which cached or new slots each new token sees
    audio_mask: torch.Tensor | None  # (batch, 1, 1, frames) which audio frames each row holds, or None: all
    span: int  # self-attention slots read


def step_inputs(starts: list[int], n: int, tree_mask: torch.Tensor | None, depths: torch.Tensor | None,
                span: int, audio: list[int] | None, frames: int, device: torch.device) -> StepInputs:
    """Positions, slots and masks for ``n`` new tokens per row after each row's ``starts`` cached tokens.

    ``tree_mask[b, i, j]`` (default causal) says whether new token ``i`` sees new token ``j``;
    ``depths[b, i]`` (default ``i``) is its distance from the cached prefix. ``audio`` (optional) is
    how many of the ``frames`` audio frames each row holds.
    """
    batch = len(starts)
    start = torch.tensor(starts, device=device)
    new = torch.arange(n, device=device)
    slot = torch.arange(span, device=device)
    audio_mask = None
    if audio is not None:
        held = torch.tensor(audio, device=device)
        audio_mask = (torch.arange(frames, device=device)[None, :] < held[:, None])[:, None, None, :]
    if tree_mask is None and depths is None:  # a chain (every greedy step): token i sees the slots up to its own
        positions = start[:, None] + new  # also the slots, as a tensor of their own (compiled graphs guard aliasing)
        return StepInputs(positions, start[:, None] + new, (slot[None, None, :] <= positions[:, :, None])[:, None],
                          audio_mask, span)
    depths = new.expand(batch, n) if depths is None else depths.to(device, non_blocking=True)
    if tree_mask is None:
        tree_mask = torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(batch, n, n)
    else:
        tree_mask = tree_mask.to(device, non_blocking=True)
    # key slot s is visible to new token i of row b if it is cached (s < start) or a visible new token
    cached = slot[None, None, :] < start[:, None, None]
    rel = (slot[None, :] - start[:, None]).clamp(0, n - 1)  # (batch, span)
    in_new = (slot[None, :] >= start[:, None]) & (slot[None, :] < start[:, None] + n)
    new_visible = torch.gather(tree_mask, 2, rel[:, None, :].expand(batch, n, span)) & in_new[:, None, :]
    return StepInputs(start[:, None] + depths, start[:, None] + new, (cached | new_visible)[:, None], audio_mask, span)


def block_step(tokens: torch.Tensor, cache: DecoderCache, rows: list[int], tree_mask: torch.Tensor | None,
               depths: torch.Tensor | None, device: torch.device, granule: int | None = None
               ) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """A fixed-shape step over the contiguous block ``rows`` of ``cache`` (what compiled and captured steps run,
    through a ``FixedView``): its inputs (tokens, positions, slots, mask, audio mask) on ``device``, and the
    block's K/V tensors it reads and writes: self K, self V, cross K, cross V, a layer each.

    With ``granule``, the K/V are views over only what the rows hold (for a traced, shape-generic step, as
    ``row_step``): self K and V up to the next multiple of ``granule`` slots past the new tokens, cross K and V
    over the longest row's audio frames; else over every slot and frame (shapes that depend on the rows alone)."""
    starts, n = cache.lengths(rows), tokens.shape[1]
    if max(starts) + n > cache.capacity:
        raise ValueError(f"decoder positions exceed {cache.capacity}")
    frames = cache.frames(rows)
    span, held = cache.capacity, cache.cross_k[0].shape[2]
    if granule is not None:
        span, held = _granule_span(max(starts) + n, cache.capacity, granule), max(frames)
    step = step_inputs(starts, n, tree_mask, depths, span, frames, held, device)
    block = slice(rows[0], rows[0] + len(rows))
    state = ([t[block, :, :span] for tensors in (cache.self_k, cache.self_v) for t in tensors]
             + [t[block, :, :held] for tensors in (cache.cross_k, cache.cross_v) for t in tensors])
    return (tokens.to(device, non_blocking=True), step.positions, step.slots, step.mask, step.audio_mask), state


def row_step(tokens: torch.Tensor, cache: DecoderCache, row: int, tree_mask: torch.Tensor | None,
             depths: torch.Tensor | None, device: torch.device, granule: int = 64
             ) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """A step over one row that reads only what the row holds (what a traced, shape-generic step runs, through a
    ``FixedView``): its inputs (tokens, positions, slots, mask) on ``device``, and the row's K/V: self K and V
    up to the next multiple of ``granule`` slots past its new tokens, cross K and V over its own audio frames
    (so no audio mask). A small decoder's step streams its cache: 64 slots instead of 448 and a 12 s
    recording's frames instead of a 30 s one took a tiny.en int8 step from 1.84 to 1.63 ms alone."""
    start, n = cache.length(row), tokens.shape[1]
    if start + n > cache.capacity:
        raise ValueError(f"decoder positions exceed {cache.capacity}")
    span = _granule_span(start + n, cache.capacity, granule)
    step = step_inputs([start], n, tree_mask, depths, span, None, 0, device)
    return (tokens.to(device, non_blocking=True), step.positions, step.slots, step.mask), cache.row_kv(row, span)


def _granule_span(end: int, capacity: int, granule: int) -> int:
    """Self-attention slots a traced step reads to reach slot ``end``: the next multiple of ``granule``, at most all."""
    return min(capacity, -(-end // granule) * granule)


class Encoder(nn.Module):
    def __init__(self, dims: WhisperDims):
        super().__init__()
        d = dims.d_model
        self.conv1 = nn.Conv1d(dims.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(dims.max_source_positions, d)
        self.layers = nn.ModuleList(EncoderLayer(d, dims.encoder_heads, dims.encoder_ffn) for _ in range(dims.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) -> (batch, frames // 2, d_model); frames may be fewer than 3000."""
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
        x = x + self.embed_positions.weight[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class Decoder(nn.Module):
    def __init__(self, dims: WhisperDims):
        super().__init__()
        d = dims.d_model
        self.embed_tokens = nn.Embedding(dims.vocab_size, d)
        self.embed_positions = nn.Embedding(dims.max_target_positions, d)
        self.layers = nn.ModuleList(DecoderLayer(d, dims.decoder_heads, dims.decoder_ffn) for _ in range(dims.decoder_layers))
        self.layer_norm = nn.LayerNorm(d)


class Cast(nn.Module):
    """A copy of a module (one tensor in, one out) that computes in another dtype behind the original's interface:
    its input cast to that dtype, its output back to the original's (``with_encoder_dtype``)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = copy.deepcopy(module).to(dtype)
        self.dtype, self.outer = dtype, next(module.parameters()).dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.dtype)).to(self.outer)


def with_encoder_dtype(model: Whisper, dtype: torch.dtype) -> Whisper:
    """``model`` with the work it does once per window over the audio in ``dtype``: the encoder, and the decoder's
    cross-attention keys and values over its output (``cross_kv``), as ``Cast`` copies; the decoder itself is
    shared, not copied, and keeps its dtype. ``model`` itself where the encoder already computes in ``dtype``.

    Why: on a CPU with native bfloat16 (AMX) whisper-base's encoder runs a 30 s window ~3x faster in bfloat16
    (compiled: 355 -> 120 ms on the Xeon) and its cross K/V 5x (32 -> 6 ms), while the decoder, which decides every
    token, keeps its own dtype: speculative decoding still reproduces AR token for token, both reading the same
    K/V. 63 of 64 English dev transcripts were unchanged, the same with the cross K/V in bfloat16 or not."""
    if next(model.encoder.parameters()).dtype == dtype:
        return model
    cross = nn.ModuleList(nn.ModuleList([Cast(layer.encoder_attn.k_proj, dtype),
                                         Cast(layer.encoder_attn.v_proj, dtype)]) for layer in model.decoder.layers)
    return Whisper(model.dims, encoder=Cast(model.encoder, dtype), decoder=model.decoder, cross=cross).eval()


class Whisper(nn.Module):
    def __init__(self, dims: WhisperDims, encoder: nn.Module | None = None, decoder: nn.Module | None = None,
                 cross: nn.ModuleList | None = None):
        """``encoder``/``decoder`` let a variant share or replace a part (a quantised draft decoder); ``cross``, per
        decoder layer, the key and value projections ``cross_kv`` applies to the audio features instead of the
        layer's own (``with_encoder_dtype``)."""
        super().__init__()
        self.dims = dims
        self.encoder = encoder if encoder is not None else Encoder(dims)
        self.decoder = decoder if decoder is not None else Decoder(dims)
        self.cross = cross

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def eager(self) -> Whisper:
        """The module itself (a compiled wrapper returns the module it wraps): for code that hooks into layers."""
        return self

    @torch.no_grad()
    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        return self.encoder(mel.to(self.device, self.dtype))

    @torch.no_grad()
    def cross_kv(self, audio_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values (layers, batch, heads, frames, head_dim), computed once per audio."""
        ks, vs = [], []
        for i, layer in enumerate(self.decoder.layers):
            attn = layer.encoder_attn
            k_proj, v_proj = (attn.k_proj, attn.v_proj) if self.cross is None else self.cross[i]
            ks.append(attn.split(k_proj(audio_features)))
            vs.append(attn.split(v_proj(audio_features)))
        return torch.stack(ks), torch.stack(vs)

    def empty_cache(self, rows: int, cross_dtype: torch.dtype | None = None) -> DecoderCache:
        """A preallocated cache with ``rows`` rows (it grows if more are claimed), on this model's device, its
        cross K/V in ``cross_dtype`` (default: the model's)."""
        d = self.dims
        return DecoderCache(d.decoder_layers, d.decoder_heads, d.d_model // d.decoder_heads, d.max_target_positions,
                            rows, self.device, self.dtype, cross_dtype)

    def new_cache(self, audio_features: torch.Tensor) -> DecoderCache:
        """A cache whose rows ``0 .. batch - 1`` hold ``audio_features``' requests (a one-off batch)."""
        cache = self.empty_cache(audio_features.shape[0])
        cache.claim(*self.cross_kv(audio_features))
        return cache

    @torch.no_grad()
    def decode(
        self,
        tokens: torch.Tensor,
        cache: DecoderCache,
        rows: list[int] | None = None,
        tree_mask: torch.Tensor | None = None,
        depths: torch.Tensor | None = None,
        head: Callable[[torch.Tensor], torch.Tensor] | None = None,
        fixed: bool = False,
    ) -> torch.Tensor:
        """Logits (batch, n, vocab) for ``n`` new tokens per row, appended after each row's cached length.

        ``rows`` are the cache rows of the batch (default ``0 .. batch - 1``). ``tree_mask[b, i, j]``
        (optional, default causal) says whether new token ``i`` sees new token ``j``; ``depths[b, i]``
        (default ``i``) is its distance from the cached prefix, which sets its position embedding.
        Inputs may live anywhere: they move to this model's device once. The new tokens occupy slots
        ``length .. length + n`` and each row's length grows by ``n``: the caller crops or compacts
        to what it accepts. ``head`` replaces the tied output projection (a draft may project onto part
        of the vocabulary only). ``fixed`` attends over every slot and frame of the cache under a mask,
        so the call's shapes depend only on the batch and ``n`` (what compilation or graph capture needs).
        """
        batch, n = tokens.shape
        rows = list(range(batch)) if rows is None else rows
        dev = self.device
        starts = cache.lengths(rows)
        if max(starts) + n > cache.capacity:
            raise ValueError(f"decoder positions exceed {cache.capacity}")
        span = cache.capacity if fixed else max(starts) + n
        view = cache.view(rows, fixed)
        frames = cache.frames(rows)
        audio = frames if fixed or min(frames) < view.frames else None  # some rows hold fewer frames than read
        step = step_inputs(starts, n, tree_mask, depths, span, audio, view.frames, dev)
        logits = self.run_decoder(tokens.to(dev, non_blocking=True), step, view, head)
        cache.advance(rows, n)
        return logits

    def run_decoder(self, tokens: torch.Tensor, step: StepInputs, view: RowView | FixedView,
                    head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The decoder proper: embeddings, layers (reading and writing ``view``), final norm, projection."""
        x = self.decoder.embed_tokens(tokens) + self.decoder.embed_positions(step.positions)
        for i, layer in enumerate(self.decoder.layers):
            x = layer(x, i, view, step.slots, step.mask, step.span, step.audio_mask)
        x = self.decoder.layer_norm(x)
        return head(x) if head is not None else x @ self.decoder.embed_tokens.weight.T

"""Word-level timestamps: where each word sits in the audio, from cross-attention and dynamic time warping.

Whisper predicts timestamps only at segment boundaries. Inside a segment, a few cross-attention heads
of the decoder (the model's ``alignment_heads``) look at the audio a token is spoken over. One decoder
pass over a window's text gives their attention; normalised per frame, smoothed along time and averaged
over heads, it is a token-by-frame similarity that monotonic DTW turns into each token's start frame.

The semantics are openai-whisper's (``timing.py``): the pass is ``[sot sequence, <|notimestamps|>, text,
<|endoftext|>]`` (any prompt and timestamp tokens left out), attention is cropped to the real audio
before the softmax, a token's start is where the row that *predicts* it first takes the DTW path, word
pieces are grouped at spaces, and punctuation joins its neighbour. transformers'
``return_token_timestamps`` uses the row where a token is *input* (one later) and normalises only over
the generated rows; the building blocks here reproduce it exactly (see ``tests/test_word_timestamps.py``).
"""

from __future__ import annotations

import itertools
import string
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from specasr_vllm.models.registry import ASRModel
from specasr_vllm.models.tokenizer import TIME_PRECISION, WhisperTokenizer

MEDIAN_FILTER_WIDTH = 7  # every Whisper checkpoint's (openai-whisper's medfilt_width, transformers' default)
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END = ".。!！?？"
UNSPACED_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}  # words are split where characters end, not at spaces


@dataclass
class Word:
    start: float  # seconds, absolute (the window's time offset added)
    end: float
    word: str  # as decoded, leading space kept (" Hello"), punctuation merged in
    probability: float  # mean probability of its tokens in the alignment pass
    tokens: list[int] = field(default_factory=list)  # its text tokens, to assign words to segments


@dataclass
class TokenTiming:
    """One window's text tokens and when each starts, from the alignment pass."""

    tokens: list[int]  # text tokens only (special and timestamp tokens dropped)
    starts: np.ndarray  # seconds from the window's start, len(tokens) + 1: the last is <|endoftext|>'s
    probabilities: np.ndarray  # each text token's probability (softmax over text tokens, as openai-whisper)
    language: str | None  # from the prefix's language token; None on English-only models


def sot_sequence(tokenizer: WhisperTokenizer, prefix: list[int]) -> list[int]:
    """``<|startoftranscript|>`` [language, task] of a decoder prefix: a prompt before it and
    ``<|notimestamps|>`` are dropped, since the alignment pass is made without them."""
    start = prefix.index(tokenizer.sot)
    return [t for t in prefix[start:] if t != tokenizer.no_timestamps]


def attention_pass(asr: ASRModel, audio_features: torch.Tensor,
                   sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder pass over ``sequences`` (one per window of ``audio_features``, (batch, frames, d_model)).

    Returns the logits (batch, n, vocab) and the alignment heads' cross-attention scores
    q·k/sqrt(head_dim) before the softmax (batch, heads, n, frames, float32). Shorter sequences are
    padded at the end with <|endoftext|>; under the causal mask the padding changes nothing before it.
    """
    if not asr.alignment_heads:
        raise ValueError(f"model {asr.name!r} has no alignment_heads in its generation_config.json")
    model = asr.model.eager  # forward hooks need the eager modules
    n = max(len(s) for s in sequences)
    tokens = torch.tensor([s + [asr.tokenizer.eot] * (n - len(s)) for s in sequences], device=model.device)
    layers = sorted({layer for layer, _ in asr.alignment_heads})
    queries: dict[int, torch.Tensor] = {}
    hooks = [
        model.decoder.layers[layer].encoder_attn.q_proj.register_forward_hook(
            lambda _module, _inputs, output, layer=layer: queries.__setitem__(layer, output))
        for layer in layers
    ]
    try:
        cache = model.new_cache(audio_features)
        logits = model.decode(tokens, cache)
    finally:
        for hook in hooks:
            hook.remove()
    scores = []
    for layer, head in asr.alignment_heads:
        attn = model.decoder.layers[layer].encoder_attn
        q = attn.split(queries[layer].float() * attn.head_dim**-0.5)[:, head]  # scaled first, as transformers
        k = cache.cross_k[layer][: len(sequences), head].float()
        scores.append(q @ k.transpose(1, 2))
    return logits, torch.stack(scores, dim=1)


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Median of each ``width`` neighbours along the last dimension, edges reflected (as both references)."""
    pad = width // 2
    if x.shape[-1] <= pad:  # reflection needs more samples than the padding
        return x
    padded = F.pad(x[None] if x.dim() == 2 else x, (pad, pad), mode="reflect")
    out = padded.unfold(-1, width, 1).sort(dim=-1).values[..., pad]  # sort beats torch.median here
    return out[0] if x.dim() == 2 else out


def alignment_matrix(weights: torch.Tensor) -> torch.Tensor:
    """(heads, tokens, frames) attention -> (tokens, frames): each head standardised over tokens per frame
    (so a frame's score says which token it belongs to, not how loud it is), median-filtered along time,
    then averaged over heads."""
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    return median_filter((weights - mean) / std, MEDIAN_FILTER_WIDTH).mean(dim=0)


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through ``cost`` (tokens, frames): its (token, frame) indices in order.

    Bit-for-bit the recurrence of openai-whisper's ``dtw_cpu`` and transformers' ``_dynamic_time_warping``
    (float32 accumulated costs, their tie-breaking: diagonal, then up, else left), but swept one
    anti-diagonal at a time, whose cells depend only on the two before it, so each step is one vector
    operation (about 1,650 steps for a full window instead of 225,000 scalar ones).
    """
    n, m = cost.shape
    # acc[d, i] is the accumulated cost of cell (i, j = d - i) of the (n + 1, m + 1) table; row 0 and
    # column 0 are the boundary (0 at the origin, inf elsewhere)
    acc = np.full((n + m + 1, n + 1), np.inf, dtype=np.float32)
    acc[0, 0] = 0.0
    trace = np.zeros((n + m + 1, n + 1), dtype=np.int8)
    i_all = np.arange(n + 1)
    for d in range(2, n + m + 1):
        lo, hi = max(1, d - m), min(n, d - 1)  # rows whose column d - i lies in 1..m
        diagonal, up, left = acc[d - 2, lo - 1 : hi], acc[d - 1, lo - 1 : hi], acc[d - 1, lo : hi + 1]
        step = np.where((diagonal < up) & (diagonal < left), 0, np.where((up < diagonal) & (up < left), 1, 2))
        best = np.choose(step, (diagonal, up, left))
        rows = i_all[lo : hi + 1]
        acc[d, lo : hi + 1] = cost[rows - 1, d - rows - 1].astype(np.float64) + best  # rounded to float32
        trace[d, lo : hi + 1] = step
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = 2 if i == 0 else 1 if j == 0 else trace[i + j, i]
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    text, time = np.array(path[::-1]).T
    return text, time


def jump_times(text_indices: np.ndarray, time_indices: np.ndarray) -> np.ndarray:
    """Seconds at which the path enters each token row: that token's start."""
    jumps = np.diff(text_indices, prepend=-1).astype(bool)
    return time_indices[jumps] * TIME_PRECISION


def token_timings(asr: ASRModel, audio_features: torch.Tensor, prefixes: list[list[int]], tokens: list[list[int]],
                  num_frames: list[int]) -> list[TokenTiming]:
    """Start times of each window's text tokens; one decoder pass for the batch, one DTW per window.

    ``audio_features``: (batch, frames, d_model) encoder output of 30 s windows (model device and dtype);
    ``prefixes``: each window's decoder prompt; ``tokens``: what was generated (timestamp tokens allowed,
    no <|endoftext|>); ``num_frames``: mel frames of real audio per window (attention is cropped to half).
    """
    tok = asr.tokenizer
    sots = [sot_sequence(tok, p) for p in prefixes]
    texts = [[t for t in ts if t < tok.eot] for ts in tokens]
    # a window that ran to the last position leaves no room for <|endoftext|>, whose row only joins the
    # normalisation; it is dropped then
    limit = asr.model.dims.max_target_positions
    sequences = [[*sot, tok.no_timestamps, *text, tok.eot][:limit] for sot, text in zip(sots, texts)]
    logits, scores = attention_pass(asr, audio_features, sequences)
    codes = {i: c for c, i in tok.language_ids.items()}
    timings = []
    for b, (sot, text, frames) in enumerate(zip(sots, texts, num_frames)):
        language = codes.get(sot[1]) if len(sot) > 1 else None
        if not text:
            timings.append(TokenTiming([], np.zeros(1), np.zeros(0), language))
            continue
        rows = len(sequences[b])
        weights = scores[b, :, :rows, : max(frames // 2, 1)].softmax(dim=-1)
        matrix = alignment_matrix(weights)[len(sot) : len(sot) + len(text) + 1]  # rows predicting text and eot
        starts = jump_times(*dtw(-matrix.double().cpu().numpy()))
        predicted = logits[b, len(sot) : len(sot) + len(text), : tok.eot].float().softmax(dim=-1)
        probs = predicted.gather(1, torch.tensor(text, device=predicted.device)[:, None])[:, 0]
        timings.append(TokenTiming(text, starts, probs.cpu().numpy(), language))
    return timings


def split_words(tokenizer: WhisperTokenizer, tokens: list[int], language: str | None) -> list[list[int]]:
    """Text tokens grouped into words, as openai-whisper's ``split_to_word_tokens``.

    First into pieces that are whole UTF-8 characters (a byte-level BPE token may hold part of one);
    in languages written with spaces, a piece then joins the word before it unless it starts with a
    space or is punctuation.
    """
    pieces: list[list[int]] = []
    current: list[int] = []
    data = b""
    for t in tokens:
        current.append(t)
        data += tokenizer.token_bytes[t]
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data":  # a character continues in the next token
                continue
        pieces.append(current)
        current, data = [], b""
    if current:
        pieces.append(current)
    if language in UNSPACED_LANGUAGES:
        return pieces
    words: list[list[int]] = []
    for piece in pieces:
        text = _text(tokenizer, piece)
        if not words or text.startswith(" ") or text.strip() in string.punctuation:
            words.append(list(piece))
        else:
            words[-1].extend(piece)
    return words


def _text(tokenizer: WhisperTokenizer, tokens: list[int]) -> str:
    return b"".join(tokenizer.token_bytes[t] for t in tokens).decode("utf-8", errors="replace")


def merge_punctuations(words: list[Word]) -> list[Word]:
    """Opening punctuation joins the word after it, closing punctuation the word before it (openai-whisper's
    rule: the merged word keeps that word's times and probability); emptied words are dropped."""
    i, j = len(words) - 2, len(words) - 1
    while i >= 0:
        previous, following = words[i], words[j]
        if previous.word.startswith(" ") and previous.word.strip() in PREPEND_PUNCTUATION:
            following.word, following.tokens = previous.word + following.word, previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(words):
        previous, following = words[i], words[j]
        if not previous.word.endswith(" ") and following.word in APPEND_PUNCTUATION:
            previous.word, previous.tokens = previous.word + following.word, previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j
        j += 1
    return [w for w in words if w.word]


def timing_words(tokenizer: WhisperTokenizer, timing: TokenTiming, time_offset: float = 0.0) -> list[Word]:
    """A window's words from its token timings: a word runs from its first token's start to the next
    word's (the last to <|endoftext|>'s)."""
    groups = split_words(tokenizer, timing.tokens, timing.language)
    bounds = np.cumsum([0] + [len(g) for g in groups])
    words = [Word(float(timing.starts[a]), float(timing.starts[b]), _text(tokenizer, g),
                  float(np.mean(timing.probabilities[a:b])), list(g))
             for g, a, b in zip(groups, bounds[:-1], bounds[1:])]
    _truncate_at_sentence_ends(words)
    words = merge_punctuations(words)
    for w in words:
        w.start, w.end = round(time_offset + w.start, 2), round(time_offset + w.end, 2)
    return words


def _truncate_at_sentence_ends(words: list[Word]) -> None:
    """openai-whisper's guard: DTW gives a pause to the word beside it, so a sentence-end mark, or the word
    after one, longer than twice the median word (at most 0.7 s) is cut to that length."""
    durations = np.array([w.end - w.start for w in words])
    durations = durations[durations.nonzero()]
    if len(durations) == 0:
        return
    longest = 2 * min(0.7, float(np.median(durations)))
    for previous, word in itertools.pairwise(words):
        if word.end - word.start > longest:
            if word.word in SENTENCE_END:
                word.end = word.start + longest
            elif previous.word in SENTENCE_END:
                word.start = word.end - longest


def align_windows(asr: ASRModel, audio_features: torch.Tensor, prefixes: list[list[int]], tokens: list[list[int]],
                  num_frames: list[int], time_offsets: list[float]) -> list[list[Word]]:
    """``align_words`` for a batch of windows ((batch, frames, d_model) features): one decoder pass."""
    timings = token_timings(asr, audio_features, prefixes, tokens, num_frames)
    return [timing_words(asr.tokenizer, t, offset) for t, offset in zip(timings, time_offsets)]


def align_words(asr: ASRModel, audio_features: torch.Tensor, prefix: list[int], tokens: list[int],
                num_frames: int, time_offset: float = 0.0) -> list[Word]:
    """Words of one 30 s window with their times.

    ``audio_features``: (frames, d_model) encoder output of the window (model device and dtype);
    ``prefix``: the decoder prompt used; ``tokens``: the window's generated tokens (timestamp tokens are
    skipped; no <|endoftext|>); ``num_frames``: mel frames of real audio in the window (<= 3000);
    ``time_offset``: where the window starts in the audio, in seconds.
    """
    return align_windows(asr, audio_features[None], [prefix], [tokens], [num_frames], [time_offset])[0]


def assign_words(tokenizer: WhisperTokenizer, segments: list, words: list[Word]) -> None:
    """Give each segment of a window its words (``segment.words``), in order, by their text tokens.

    As openai-whisper does, a first word that starts well before its segment (DTW hands it the pause
    before) starts at the segment instead, and a last word that runs well past its segment ends there;
    the segments' own times stay the decoder's.
    """
    durations = [w.end - w.start for w in words if w.end > w.start]
    median = min(0.7, float(np.median(durations))) if durations else 0.0
    queue = iter(words)
    for segment in segments:
        count = sum(1 for t in segment.tokens if t < tokenizer.eot)
        taken: list[Word] = []
        while sum(len(w.tokens) for w in taken) < count and (word := next(queue, None)) is not None:
            taken.append(word)
        if taken:
            first, last = taken[0], taken[-1]
            if segment.start < first.end and segment.start - 0.5 > first.start:
                first.start = max(0.0, min(first.end - median, segment.start))
            if segment.end > last.start and segment.end + 0.5 < last.end:
                last.end = max(last.start + median, segment.end)
        segment.words = taken

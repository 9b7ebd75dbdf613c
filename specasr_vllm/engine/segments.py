"""A decoded window as segments: the whole window, or the spans between Whisper's timestamp tokens.

Each segment carries what its window's decode reported (temperature, average log-probability,
compression ratio, no-speech probability), as openai-whisper's ``verbose_json`` does: those are the
numbers the temperature fallback judged the window by.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from specasr_vllm.engine.decoded import Decoded
from specasr_vllm.models.tokenizer import WhisperTokenizer


def compression_ratio(text: str) -> float:
    """Text bytes over their zlib size: Whisper's signal for repetition loops (above 2.4 is suspect)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


@dataclass
class Segment:
    start: float
    end: float
    text: str
    tokens: list[int]
    logprobs: list[float] = field(default_factory=list)
    no_speech_prob: float = 0.0  # of the window the segment is in
    window_start: float = 0.0  # seconds: where the segment's 30 s window begins
    temperature: float = 0.0  # of the decode that produced the window
    avg_logprob: float = 0.0  # of the window's tokens, end of text included
    compression_ratio: float = 0.0  # of the window's text
    words: list = field(default_factory=list)  # ``alignment.Word``s, with word timestamps


def segment_maker(tokenizer: WhisperTokenizer, decoded: Decoded,
                  window_start: float) -> Callable[[int, int, float, float], Segment]:
    """``make(lo, hi, start, end)``: the segment of ``decoded.tokens[lo:hi]``, with the window's figures
    (computed once per window)."""
    ratio = compression_ratio(tokenizer.decode(decoded.tokens).strip())

    def make(lo: int, hi: int, start: float, end: float) -> Segment:
        tokens = decoded.tokens[lo:hi]
        return Segment(start, end, tokenizer.decode(tokens).strip(), tokens, decoded.logprobs[lo:hi],
                       decoded.no_speech_prob, window_start, decoded.temperature, decoded.avg_logprob, ratio)

    return make


def window_segments(decoded: Decoded, tokenizer: WhisperTokenizer, start: float, end: float) -> list[Segment]:
    """Segments of one window (audio of at most 30 s) that spans ``start``..``end`` seconds.

    Without timestamp tokens the window is one segment. With them, each segment runs from its opening
    timestamp to its closing one; text after the last timestamp ends with the window.
    """
    ts = tokenizer.timestamp_begin
    tokens = decoded.tokens
    make = segment_maker(tokenizer, decoded, start)
    bounds = [i for i, t in enumerate(tokens) if t >= ts]
    if not bounds:
        return [make(0, len(tokens), start, end)]
    segments = []
    open_at: int | None = None  # index of the current segment's opening timestamp
    for i in bounds:
        if open_at is not None and i > open_at + 1:  # text between two timestamps closes a segment
            segments.append(make(open_at, i + 1, start + tokenizer.seconds(tokens[open_at]),
                                 start + tokenizer.seconds(tokens[i])))
            open_at = None
        else:
            open_at = i
    if open_at is not None and open_at + 1 < len(tokens):  # an unclosed last segment
        segments.append(make(open_at, len(tokens), start + tokenizer.seconds(tokens[open_at]), end))
    for s in segments:  # timestamps may point into the padding past the audio's end
        s.end = min(s.end, end)
    return [s for s in segments if s.start < end]

"""A decoded window as segments: the whole window, or the spans between Whisper's timestamp tokens."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from specasr_vllm.engine.decoded import Decoded
from specasr_vllm.models.tokenizer import WhisperTokenizer


@dataclass
class Segment:
    start: float
    end: float
    text: str
    tokens: list[int]
    logprobs: list[float] = field(default_factory=list)
    no_speech_prob: float = 0.0  # of the window the segment is in
    window_start: float = 0.0  # seconds: where the segment's 30 s window begins

    @property
    def avg_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0

    @property
    def compression_ratio(self) -> float:
        """Text bytes over their zlib size: Whisper's signal for repetition loops (above 2.4 is suspect)."""
        data = self.text.encode("utf-8")
        return len(data) / len(zlib.compress(data)) if data else 0.0


def window_segments(decoded: Decoded, tokenizer: WhisperTokenizer, start: float, end: float) -> list[Segment]:
    """Segments of one window that spans ``start``..``end`` seconds of the audio.

    Without timestamp tokens the window is one segment. With them, each segment runs from its opening
    timestamp to its closing one; text after the last timestamp ends with the window.
    """
    ts = tokenizer.timestamp_begin
    tokens, logprobs = decoded.tokens, decoded.logprobs
    bounds = [i for i, t in enumerate(tokens) if t >= ts]
    if not bounds:
        return [Segment(start, end, tokenizer.decode(tokens).strip(), tokens, logprobs, decoded.no_speech_prob, start)]
    segments = []
    open_at: int | None = None  # index of the current segment's opening timestamp
    for i in bounds:
        if open_at is not None and i > open_at + 1:  # text between two timestamps closes a segment
            body = tokens[open_at : i + 1]
            segments.append(Segment(
                start + tokenizer.seconds(tokens[open_at]), start + tokenizer.seconds(tokens[i]),
                tokenizer.decode(body).strip(), body, logprobs[open_at : i + 1], decoded.no_speech_prob, start,
            ))
            open_at = None
        else:
            open_at = i
    if open_at is not None and open_at + 1 < len(tokens):  # an unclosed last segment
        body = tokens[open_at:]
        segments.append(Segment(start + tokenizer.seconds(tokens[open_at]), end, tokenizer.decode(body).strip(),
                                body, logprobs[open_at:], decoded.no_speech_prob, start))
    for s in segments:  # timestamps may point into the padding past the audio's end
        s.end = min(s.end, end)
    return [s for s in segments if s.start < end]

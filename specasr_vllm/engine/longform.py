"""Whisper's long-form algorithm: decode 30 s from a seek point, keep the complete segments, move on.

Audio longer than one window is decoded the way openai-whisper's ``transcribe`` and transformers'
sequential long-form ``generate`` do it (token for token the latter, greedy):
- the log-mel features are computed once over the whole recording (their dynamic range is the
  recording's, not a window's);
- each window is the 3000 frames from ``seek`` (zero-padded past the end), decoded with timestamps;
- its segments are the spans between consecutive timestamp pairs; unless the window ends on a single
  timestamp (nothing more is said in it), the text after the last pair is dropped and the next window
  starts at that pair's time, so speech cut by the window's edge is decoded again, whole, next time;
- a window with no timestamp pair is one segment, and the next window starts where this one ends.

No speech falls between windows, which cutting the audio before decoding cannot promise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specasr_vllm.config import HOP_LENGTH, N_FRAMES, SAMPLE_RATE, DecodeOptions
from specasr_vllm.engine.decoded import Decoded
from specasr_vllm.engine.segments import Segment, segment_maker, window_segments
from specasr_vllm.engine.window_rules import is_silence
from specasr_vllm.models.tokenizer import TIME_PRECISION, WhisperTokenizer

FRAMES_PER_TIMESTAMP = round(TIME_PRECISION * SAMPLE_RATE / HOP_LENGTH)  # 2 mel frames per timestamp step
SECONDS_PER_FRAME = HOP_LENGTH / SAMPLE_RATE


def is_long(samples: int) -> bool:
    """Whether audio of ``samples`` samples needs more than one window (over 3000 mel frames)."""
    return samples // HOP_LENGTH > N_FRAMES


def window_features(mel: torch.Tensor, seek: int) -> tuple[torch.Tensor, int]:
    """The (n_mels, 3000) window of whole-audio features ``mel`` at ``seek``, and its real frames."""
    frames = min(N_FRAMES, mel.shape[-1] - seek)
    return F.pad(mel[:, seek : seek + frames], (0, N_FRAMES - frames)), frames


def seek_segments(decoded: Decoded, tokenizer: WhisperTokenizer, seek: int, frames: int,
                  duration: float) -> tuple[list[Segment], int]:
    """The segments of a window decoded at ``seek`` over ``frames`` real frames, and the frames to advance.

    ``duration`` (seconds of audio) bounds the segments' times (a timestamp may point into the padding);
    the tokens and the seek arithmetic are the reference's.
    """
    ts = tokenizer.timestamp_begin
    tokens = decoded.tokens
    stamp = [t >= ts for t in tokens]
    single_ending = stamp[-2:] == [False, True]
    offset = seek * SECONDS_PER_FRAME
    cuts = [i + 1 for i in range(len(tokens) - 1) if stamp[i] and stamp[i + 1]]  # second token of each pair

    make = segment_maker(tokenizer, decoded, offset)

    def piece(lo: int, hi: int, start: float, end: float) -> Segment:
        return make(lo, hi, min(offset + start, duration), min(offset + end, duration))

    if not cuts:
        stamps = [t for t in tokens if t >= ts]
        end = frames * SECONDS_PER_FRAME
        if stamps and stamps[-1] != ts:  # a timestamp but no pair: the last one ends the text
            end = tokenizer.seconds(stamps[-1])
        return ([piece(0, len(tokens), 0.0, end)] if tokens else []), frames
    if single_ending:
        cuts.append(len(tokens))
    else:
        cuts[-1] += 1  # the last complete segment keeps both tokens of its closing pair
    segments, lo = [], 0
    for k, hi in enumerate(cuts):
        closing = tokens[hi - 1] if k < len(cuts) - 1 or single_ending else tokens[hi - 2]
        segments.append(piece(lo, hi, tokenizer.seconds(tokens[lo]), tokenizer.seconds(closing)))
        lo = hi
    if single_ending:  # nothing is said after the last timestamp: the whole window is done
        return segments, frames
    advance = (tokens[lo - 2] - ts) * FRAMES_PER_TIMESTAMP
    return segments, advance if advance > 0 else frames  # a pair at 0.00 would never move (the reference loops)


def window_outcome(decoded: Decoded, tokenizer: WhisperTokenizer, options: DecodeOptions, *, long: bool, seek: int,
                   frames: int, duration: float) -> tuple[list[Segment], int]:
    """What a decoded window adds to its audio's transcript, and the frames to advance: the one rule both
    engines follow. Short audio is one window (all of it done: ``N_FRAMES``); a silent window has no text."""
    if is_silence(decoded, options):
        return [], frames if long else N_FRAMES
    if long:
        return seek_segments(decoded, tokenizer, seek, frames, duration)
    return window_segments(decoded, tokenizer, 0.0, duration), N_FRAMES


def history_tokens(segments: list[Segment], tokenizer: WhisperTokenizer) -> list[int]:
    """A window's tokens as later windows are prompted with them (``condition_on_previous_text``): the
    reference keeps one timestamp of each segment's closing pair."""
    history = []
    for s in segments:
        ending_pair = len(s.tokens) > 2 and s.tokens[-2] >= tokenizer.timestamp_begin
        history += s.tokens[:-1] if ending_pair else s.tokens
    return history

"""Render transcripts in OpenAI's response formats (shared by the CLI and the HTTP server).

``json`` is the text alone; ``verbose_json`` adds language, duration and timestamped segments;
``srt``/``vtt`` are subtitles. The last three need segments from Whisper's timestamp tokens, so a
caller decodes with timestamps exactly when ``needs_timestamps`` says so.
"""

from __future__ import annotations

import json
import math

from transformers.models.whisper.tokenization_whisper import LANGUAGES

from specasr_vllm.config import HOP_LENGTH, SAMPLE_RATE
from specasr_vllm.engine import Transcript

FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # OpenAI's ``seek`` counts mel frames


def needs_timestamps(fmt: str) -> bool:
    return fmt in ("verbose_json", "srt", "vtt")


def _timestamp(seconds: float, decimal: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"


def to_srt(t: Transcript) -> str:
    cues = [s for s in t.segments if s.text]
    return "".join(
        f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text}\n\n" for i, s in enumerate(cues, 1)
    )


def to_vtt(t: Transcript) -> str:
    cues = [s for s in t.segments if s.text]
    return "WEBVTT\n\n" + "".join(f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text}\n\n" for s in cues)


def usage(t: Transcript) -> dict:
    """OpenAI bills whisper by started second of audio."""
    return {"type": "duration", "seconds": math.ceil(t.duration)}


def to_json(t: Transcript) -> dict:
    return {"text": t.text, "usage": usage(t)}


def to_verbose_json(t: Transcript, task: str = "transcribe") -> dict:
    """OpenAI's shape; ``words`` (start and end in seconds) when word timestamps were computed."""
    words = [{"word": w.word.strip(), "start": round(w.start, 2), "end": round(w.end, 2)}
             for s in t.segments for w in s.words]
    return {
        "task": task,
        "language": LANGUAGES.get(t.language, t.language),
        "duration": round(t.duration, 3),
        "text": t.text,
        "segments": [
            {
                "id": i, "seek": round(s.window_start * FRAMES_PER_SECOND), "start": round(s.start, 2),
                "end": round(s.end, 2), "text": s.text, "tokens": s.tokens, "temperature": s.temperature,
                "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
            }
            for i, s in enumerate(t.segments)
        ],
        **({"words": words} if words else {}),
        "usage": usage(t),
    }


def render(t: Transcript, fmt: str, task: str = "transcribe") -> str:
    if fmt == "text":
        return t.text + "\n"
    if fmt == "json":
        return json.dumps(to_json(t), ensure_ascii=False) + "\n"
    if fmt == "verbose_json":
        return json.dumps(to_verbose_json(t, task), ensure_ascii=False) + "\n"
    if fmt == "srt":
        return to_srt(t)
    if fmt == "vtt":
        return to_vtt(t)
    raise ValueError(f"unknown output format {fmt!r}")

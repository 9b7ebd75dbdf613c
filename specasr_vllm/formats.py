"""Render transcripts as text, JSON, SRT or WebVTT (shared by the CLI and the HTTP server)."""

from __future__ import annotations

import json

from specasr_vllm.engine import Transcript

OUTPUT_FORMATS = ("text", "json", "srt", "vtt")


def _timestamp(seconds: float, decimal: str) -> str:
    ms = int(round(seconds * 1000))
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


def to_dict(t: Transcript) -> dict:
    return {
        "text": t.text,
        "language": t.language,
        "duration": round(t.duration, 3),
        "segments": [{"start": s.start, "end": s.end, "text": s.text, "tokens": s.tokens} for s in t.segments],
    }


def render(t: Transcript, fmt: str) -> str:
    if fmt == "text":
        return t.text + "\n"
    if fmt == "json":
        return json.dumps(to_dict(t), ensure_ascii=False) + "\n"
    if fmt == "srt":
        return to_srt(t)
    if fmt == "vtt":
        return to_vtt(t)
    raise ValueError(f"unknown output format {fmt!r}")

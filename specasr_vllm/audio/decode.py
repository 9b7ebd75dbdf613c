"""Decode audio from a path or bytes into 16 kHz mono float32, with one clear error per failure.

PyAV (FFmpeg) reads every container Whisper users send (wav, flac, mp3, ogg/opus, m4a/aac, webm);
soxr resamples. Channels are averaged, as Whisper's own loader does.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import av
import numpy as np
import soxr

from specasr_vllm.config import SAMPLE_RATE
from specasr_vllm.errors import AudioDecodeError, AudioTooLongError

AudioSource = str | os.PathLike | bytes


def decode_audio(source: AudioSource, *, max_seconds: float | None = None, name: str | None = None) -> np.ndarray:
    """Return the first audio stream of ``source`` as 16 kHz mono float32 in [-1, 1].

    ``max_seconds`` stops decoding as soon as the limit is passed (an oversized upload costs little);
    ``name`` is what error messages call the source (an upload's file name).
    """
    name = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise AudioDecodeError(f"{name}: no such file")
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), mode="r") as container:
            if not container.streams.audio:
                raise AudioDecodeError(f"{name}: the file has no audio stream")
            stream = container.streams.audio[0]
            rate = stream.rate or SAMPLE_RATE
            pieces, total = [], 0
            # fltp at the native rate: planar float per channel, so averaging channels is exact
            resampler = av.AudioResampler(format="fltp", layout=stream.layout, rate=rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray().mean(axis=0))
                    total += out.samples
                if max_seconds is not None and total > max_seconds * rate:
                    raise AudioTooLongError(f"{name}: audio is longer than the limit of {max_seconds:g} s")
    except av.error.FFmpegError as exc:
        raise AudioDecodeError(f"{name}: not a decodable audio file ({exc.strerror or type(exc).__name__})") from exc
    if total == 0:
        raise AudioDecodeError(f"{name}: the file contains no audio samples")
    audio = check_finite(np.concatenate(pieces).astype(np.float32), name)
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return audio


def check_finite(audio: np.ndarray, name: str) -> np.ndarray:
    """``audio`` if every sample is a number: NaN or infinite samples (a float file can hold them) would
    reach the models as garbage, so they are refused like any undecodable input."""
    bad = np.count_nonzero(~np.isfinite(audio))
    if bad:
        raise AudioDecodeError(f"{name}: the audio has {bad} NaN or infinite samples")
    return audio

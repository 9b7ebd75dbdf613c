"""Whisper's log-mel spectrogram, computed with torch (parity-tested against WhisperFeatureExtractor).

Steps: pad or trim to the 30 s window, STFT (n_fft 400, hop 160, Hann), power, Slaney mel filters,
log10 with a 1e-10 floor, clamp to max - 8, then (x + 4) / 4.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from transformers.audio_utils import mel_filter_bank

from specasr_vllm.config import HOP_LENGTH, N_FFT, N_SAMPLES, SAMPLE_RATE


@lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) Slaney-style filters, the ones Whisper was trained with."""
    filters = mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2, num_mel_filters=n_mels, min_frequency=0.0,
        max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney",
    )
    return torch.from_numpy(filters.T.astype(np.float32))


def pad_or_trim(audio: np.ndarray, length: int = N_SAMPLES) -> np.ndarray:
    if len(audio) >= length:
        return audio[:length]
    return np.pad(audio, (0, length - len(audio)))


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80, *, pad: bool = True) -> torch.Tensor:
    """(n_mels, 3000) features of one 30 s window (``pad=False``: of the audio as it is)."""
    samples = torch.from_numpy(np.ascontiguousarray(pad_or_trim(audio) if pad else audio, dtype=np.float32))
    stft = torch.stft(samples, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    power = stft[..., :-1].abs().pow(2).contiguous()
    log_spec = (mel_filters(n_mels) @ power).clamp(min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0

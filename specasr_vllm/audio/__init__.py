"""Audio front end: decode any file, resample to 16 kHz mono, log-mel features."""

from specasr_vllm.audio.decode import check_finite, decode_audio
from specasr_vllm.audio.mel import log_mel_spectrogram

__all__ = ["check_finite", "decode_audio", "log_mel_spectrogram"]

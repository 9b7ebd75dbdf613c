"""What a request means to the draft, decided once for every host: whether the draft serves it, the
draft's forced prefix, and the log-mel features its encoder reads.
"""

from __future__ import annotations

import numpy as np
import torch

from specasr_vllm.config import DRAFT_MARGIN_FRAMES, HOP_LENGTH
from specasr_vllm.models.tokenizer import WhisperTokenizer


def draft_serves(draft: WhisperTokenizer, language: str, task: str) -> bool:
    """An English-only draft serves English transcription only; elsewhere the request runs as AR."""
    return draft.multilingual or (language == "en" and task == "transcribe")


def draft_prefix(draft: WhisperTokenizer, language: str, task: str, timestamps: bool, prompt: str | None) -> list[int]:
    """The draft's forced start for the request (an English-only draft takes no language or task)."""
    return draft.prefix(language if draft.multilingual else None, task, timestamps, prompt)


def draft_features(n_mels: int, mel: torch.Tensor | None, audio: np.ndarray | None, unpadded: bool,
                   multiple: int = 2) -> torch.Tensor:
    """The draft encoder's input: ``mel`` (n_mels, frames) when the draft reads the same front end,
    else a log-mel of ``audio`` computed for it; cut to the audio's frames when ``unpadded``, rounded up to a
    ``multiple`` of frames (even: the encoder's stride-2 convolution halves them; ``DraftModel.frame_multiple``)."""
    if mel is None or mel.shape[0] != n_mels:
        if audio is None:
            have = "no features" if mel is None else f"{mel.shape[0]} mel bins"
            raise ValueError(f"the draft reads {n_mels} mel bins and the request brings {have} and no audio; "
                             "pick a draft with the target's front end")
        # imported here: the audio front end pulls in transformers' audio utilities (and torchaudio, when
        # installed), which the vLLM plugin's install repair must be able to run without
        from specasr_vllm.audio import log_mel_spectrogram

        mel = log_mel_spectrogram(audio, n_mels)
    if not unpadded:
        return mel
    frames = audio_frames(mel) if audio is None else len(audio) // HOP_LENGTH + DRAFT_MARGIN_FRAMES
    return mel[:, : min(mel.shape[1], -(-frames // multiple) * multiple)]


def _even(frames: int) -> int:
    return frames + frames % 2  # the encoder's stride-2 convolution halves it


def audio_frames(mel: torch.Tensor) -> int:
    """How many leading frames of Whisper log-mel features (n_mels, frames) hold audio, plus a margin.

    Whisper pads audio with zeros to 30 s; a zero frame's log-mel is the clamp floor in every bin, so
    the audio ends after the last frame with any bin above the floor. (Digital silence inside the
    audio looks the same; the draft merely sees less of it, which costs no accuracy.)
    """
    floor = mel.min()
    sounding = (mel > floor + 1e-4).any(dim=0).nonzero()
    end = int(sounding[-1]) + 1 if len(sounding) else 0
    return _even(min(mel.shape[1], end + DRAFT_MARGIN_FRAMES))

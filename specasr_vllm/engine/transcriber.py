"""Audio in, text out: windows long audio, computes features, detects language, decodes in batches."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from specasr_vllm.audio import log_mel_spectrogram, split_points
from specasr_vllm.config import SAMPLE_RATE, EngineConfig
from specasr_vllm.engine.ar import decode_ar
from specasr_vllm.errors import InvalidRequestError
from specasr_vllm.models.registry import ASRModel, load_model
from specasr_vllm.models.rules import WhisperRules

METHODS = ("ar",)


@dataclass
class Segment:
    start: float
    end: float
    text: str
    tokens: list[int]


@dataclass
class Transcript:
    text: str
    language: str
    duration: float
    segments: list[Segment] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return [t for s in self.segments for t in s.tokens]


@dataclass
class _Window:
    audio_index: int
    window_index: int
    start: int
    end: int


class Transcriber:
    """Loads the configured models once; ``transcribe`` takes a list of 16 kHz mono arrays."""

    def __init__(self, config: EngineConfig | None = None, *, target: ASRModel | None = None):
        self.config = config or EngineConfig()
        if self.config.method not in METHODS:
            raise InvalidRequestError(f"unknown method {self.config.method!r}; choose from {', '.join(METHODS)}")
        if self.config.batch_size < 1:
            raise InvalidRequestError("batch_size must be at least 1")
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        dtype = getattr(torch, self.config.dtype)
        self.target = target or load_model(self.config.model, self.config.device, dtype)
        self.rules = WhisperRules(self.target)

    def transcribe(self, audios: list[np.ndarray], language: str | None = None, task: str = "transcribe") -> list[Transcript]:
        tok = self.target.tokenizer
        if language is not None:
            language = tok.language_code(language)
        if not tok.multilingual:
            language = "en"
        languages: list[str | None] = [language] * len(audios)
        windows = [
            _Window(a, w, s, e) for a, audio in enumerate(audios) for w, (s, e) in enumerate(split_points(audio))
        ]
        windows.sort(key=lambda w: (w.window_index, w.audio_index))  # every first window before any second
        texts: dict[tuple[int, int], Segment] = {}
        size = self.config.batch_size
        for b in range(0, len(windows), size):
            batch = windows[b : b + size]
            mels = torch.stack([log_mel_spectrogram(audios[w.audio_index][w.start : w.end], self.target.n_mels) for w in batch])
            features = self.target.model.encode(mels)
            undetected = [i for i, w in enumerate(batch) if languages[w.audio_index] is None]
            if undetected:
                for i, code in zip(undetected, self._detect_language(features[undetected])):
                    languages[batch[i].audio_index] = code
            prefixes = [tok.prefix(languages[w.audio_index], task) for w in batch]
            for w, tokens in zip(batch, decode_ar(self.target, self.rules, features, prefixes)):
                texts[(w.audio_index, w.window_index)] = Segment(
                    w.start / SAMPLE_RATE, w.end / SAMPLE_RATE, tok.decode(tokens).strip(), tokens
                )
        results = []
        for a, audio in enumerate(audios):
            segments = [texts[k] for k in sorted(k for k in texts if k[0] == a)]
            results.append(Transcript(
                text=" ".join(s.text for s in segments if s.text),
                language=languages[a] or "en",
                duration=len(audio) / SAMPLE_RATE,
                segments=segments,
            ))
        return results

    def _detect_language(self, features: torch.Tensor) -> list[str]:
        model = self.target.model
        cache = model.new_cache(features)
        sot = torch.full((features.shape[0], 1), self.target.tokenizer.sot, device=model.device)
        return self.rules.detect_language(model.decode(sot, cache)[:, -1])

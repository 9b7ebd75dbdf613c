"""Audio in, text out: windows long audio, computes features, detects language, decodes in batches."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from specasr_vllm.audio import check_finite, log_mel_spectrogram, split_points
from specasr_vllm.config import DEFAULT_DRAFT, METHODS, SAMPLE_RATE, EngineConfig
from specasr_vllm.engine.ar import decode_ar
from specasr_vllm.engine.segments import Segment, window_segments
from specasr_vllm.engine.speculative import decode_speculative
from specasr_vllm.errors import InvalidRequestError
from specasr_vllm.models.registry import ASRModel, load_model
from specasr_vllm.models.rules import WhisperRules
from specasr_vllm.speculation import Drafter, SpecStats


@contextmanager
def _threads(n: int):
    """Run a block with ``n`` torch threads in this thread, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Transcript:
    text: str
    language: str
    duration: float
    segments: list[Segment] = field(default_factory=list)
    stats: SpecStats = field(default_factory=SpecStats)
    timings: dict[str, float] = field(default_factory=dict)  # seconds of the batches this audio was in

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

    def __init__(self, config: EngineConfig | None = None, *, target: ASRModel | None = None,
                 draft: ASRModel | None = None):
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
        self.totals: dict[str, float] = {}
        self.cache = self.target.model.empty_cache(self.config.batch_size)  # rows reused batch after batch
        self.drafter: Drafter | None = None
        self._keys = itertools.count()  # one drafter request per window, over the transcriber's life
        if self.config.method != "ar":
            spec = self.config.spec
            draft = draft or load_model(self.config.draft or DEFAULT_DRAFT, self.config.device, dtype)
            # one drafter for every batch: calibration and measured costs carry over
            self.drafter = Drafter.build(draft, self.target.tokenizer, spec)
            # the draft runs ahead on a second thread; each thread then computes on one core
            self.pool = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) \
                if spec.concurrent_draft else None

    def transcribe(self, audios: list[np.ndarray], language: str | None | list[str | None] = None,
                   task: str = "transcribe", timestamps: bool = False, prompt: str | None = None,
                   on_window: Callable[[int, list[Segment]], None] | None = None) -> list[Transcript]:
        """Transcripts of ``audios`` (16 kHz mono); ``language`` for all or per audio (None: detect).

        ``timestamps`` decodes Whisper's timestamp tokens into segments; ``prompt`` conditions every
        window on earlier text (names, spellings, style); ``on_window(audio, segments)``
        hears each 30 s window as soon as its batch is decoded, windows of one audio in order.
        """
        tok = self.target.tokenizer
        for i, audio in enumerate(audios):
            check_finite(audio, f"audio {i}")
        languages = language if isinstance(language, list) else [language] * len(audios)
        if len(languages) != len(audios):
            raise InvalidRequestError(f"{len(languages)} languages for {len(audios)} audios")
        languages = [tok.language_code(code) if code is not None else None for code in languages]
        if not tok.multilingual:
            languages = ["en"] * len(audios)
        windows = [
            _Window(a, w, s, e) for a, audio in enumerate(audios) for w, (s, e) in enumerate(split_points(audio))
        ]
        windows.sort(key=lambda w: (w.window_index, w.audio_index))  # every first window before any second
        texts: dict[tuple[int, int], list[Segment]] = {}
        self.totals: dict[str, float] = {}  # seconds per phase over this call's batches
        results = [Transcript(text="", language="", duration=len(a) / SAMPLE_RATE) for a in audios]
        size = self.config.batch_size
        for b in range(0, len(windows), size):
            batch = windows[b : b + size]
            clips = [audios[w.audio_index][w.start : w.end] for w in batch]
            timings = {"encode": time.perf_counter()}
            mels = torch.stack([log_mel_spectrogram(c, self.target.n_mels) for c in clips])
            features = self.target.model.encode(mels)
            undetected = [i for i, w in enumerate(batch) if languages[w.audio_index] is None]
            if undetected:
                for i, code in zip(undetected, self._detect_language(features[undetected])):
                    languages[batch[i].audio_index] = code
            prefixes = [tok.prefix(languages[w.audio_index], task, timestamps, prompt) for w in batch]
            timings["encode"] = time.perf_counter() - timings["encode"]
            t0 = time.perf_counter()
            if self.drafter is None:
                outputs = decode_ar(self.target, self.rules, features, prefixes, timestamps=timestamps, cache=self.cache)
                stats = [SpecStats(output_tokens=len(d.tokens), target_passes=d.passes) for d in outputs]
            else:
                keys = [next(self._keys) for _ in batch]
                for key, clip, mel, w in zip(keys, clips, mels, batch):
                    self.drafter.start(key, languages[w.audio_index], task, timestamps, prompt, mel=mel, audio=clip)
                self.drafter.prepare(keys)
                timings["draft_encode"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                try:
                    with _threads(1 if self.pool else torch.get_num_threads()):
                        outputs = decode_speculative(self.target, self.rules, self.drafter, features, prefixes, keys,
                                                     pool=self.pool, timestamps=timestamps, cache=self.cache)
                finally:
                    final = self.drafter.release(keys)
                stats = [final[key] for key in keys]
            timings["decode"] = time.perf_counter() - t0
            for w, decoded, st in zip(batch, outputs, stats):
                segments = window_segments(decoded, tok, w.start / SAMPLE_RATE, w.end / SAMPLE_RATE)
                texts[(w.audio_index, w.window_index)] = segments
                results[w.audio_index].stats.merge(st)
                if on_window is not None:
                    on_window(w.audio_index, segments)
            for name, seconds in timings.items():
                self.totals[name] = self.totals.get(name, 0.0) + seconds
            for a in {w.audio_index for w in batch}:
                for name, seconds in timings.items():
                    results[a].timings[name] = results[a].timings.get(name, 0.0) + seconds
        for a, result in enumerate(results):
            result.segments = [s for k in sorted(k for k in texts if k[0] == a) for s in texts[k]]
            result.text = " ".join(s.text for s in result.segments if s.text)
            result.language = languages[a] or "en"
        return results

    def _detect_language(self, features: torch.Tensor) -> list[str]:
        model = self.target.model
        cache = model.new_cache(features)
        sot = torch.full((features.shape[0], 1), self.target.tokenizer.sot, device=model.device)
        return self.rules.detect_language(model.decode(sot, cache)[:, -1])

"""Audio in, text out: features, language detection, windows decoded in batches (with fallback), segments."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from specasr_vllm.audio import check_finite, log_mel_spectrogram
from specasr_vllm.config import (
    DEFAULT_DRAFT,
    DTYPES,
    HOP_LENGTH,
    METHODS,
    N_FRAMES,
    SAMPLE_RATE,
    DecodeOptions,
    EngineConfig,
)
from specasr_vllm.engine.alignment import align_windows, assign_words
from specasr_vllm.engine.ar import decode_ar
from specasr_vllm.engine.decoded import Decoded
from specasr_vllm.engine.longform import history_tokens, is_long, window_features, window_outcome
from specasr_vllm.engine.rows import BatchRows
from specasr_vllm.engine.segments import Segment
from specasr_vllm.engine.speculative import decode_speculative
from specasr_vllm.engine.window_rules import attempt_seed, needs_fallback, window_context
from specasr_vllm.errors import InvalidRequestError
from specasr_vllm.models.compiled import CompiledWhisper
from specasr_vllm.models.registry import ASRModel, load_model
from specasr_vllm.models.rules import WhisperRules
from specasr_vllm.models.sampling import Sampling
from specasr_vllm.models.tokenizer import WhisperTokenizer
from specasr_vllm.models.whisper import with_encoder_dtype
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
class _Audio:
    """One audio's progress: where its next window starts, and what its windows said so far."""

    index: int
    samples: np.ndarray
    language: str | None
    mel: torch.Tensor  # long audio: the whole recording's features; short: its one padded window
    long: bool
    seek: int = 0  # mel frames already decoded
    segments: list[Segment] = field(default_factory=list)
    history: list[int] = field(default_factory=list)  # earlier windows' tokens, for condition_on_previous_text
    conditioned: bool = True  # the last window was decoded at a low temperature (the reference's rule)

    @property
    def frames(self) -> int:
        """Mel frames to decode: the recording's (long), or one padded window's."""
        return self.mel.shape[-1]

    @property
    def done(self) -> bool:
        return self.seek >= self.frames

    def window(self) -> tuple[torch.Tensor, int, np.ndarray]:
        """The next window: its (n_mels, 3000) features, its real frames, its samples."""
        if not self.long:
            return self.mel, min(len(self.samples) // HOP_LENGTH, N_FRAMES), self.samples
        features, frames = window_features(self.mel, self.seek)
        return features, frames, self.samples[self.seek * HOP_LENGTH : (self.seek + frames) * HOP_LENGTH]


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
        for name, value in (("dtype", self.config.dtype), ("encoder_dtype", self.config.encoder_dtype)):
            if value not in DTYPES and not (name == "encoder_dtype" and value is None):
                raise InvalidRequestError(f"{name} must be one of {', '.join(DTYPES)}, got {value!r}")
        on_cpu = torch.device(self.config.device).type == "cpu"
        if self.config.method != "ar" and self.config.dtype != "float32" and on_cpu:
            # 16 English dev files, the target in bfloat16: SpecASR gave AR's tokens on 13 (compiled) and 14 (eager)
            raise InvalidRequestError(
                f"--method {self.config.method} on a CPU decodes in float32 only: in {self.config.dtype} a "
                "verification pass and a one-token step round differently and speculative output would not be AR's; "
                "--encoder-dtype bfloat16 speeds up the encoder and keeps it")
        dtype = getattr(torch, self.config.dtype)
        self.target = target or load_model(self.config.model, self.config.device, dtype)
        if self.config.encoder_dtype is not None:
            if isinstance(self.target.model, CompiledWhisper):
                raise ValueError("encoder_dtype needs the target's eager module (the engine compiles it after)")
            self.target = dataclasses.replace(
                self.target, model=with_encoder_dtype(self.target.model, getattr(torch, self.config.encoder_dtype)))
        if self.config.compile and not isinstance(self.target.model, CompiledWhisper):  # the caller's stays eager
            self.target = dataclasses.replace(self.target, model=CompiledWhisper(self.target.model))
        self.rules = WhisperRules(self.target)
        self.totals: dict[str, float] = {}
        self.cache = self.target.model.empty_cache(self.config.batch_size)  # rows reused batch after batch
        self.drafter: Drafter | None = None
        self._keys = itertools.count()  # one drafter request per window, over the transcriber's life
        if self.config.method != "ar":
            spec = self.config.spec
            draft = draft or load_model(self.config.draft or DEFAULT_DRAFT, self.config.device, dtype)
            # one drafter for every batch: calibration and measured costs carry over
            self.drafter = Drafter.build(draft, self.target.tokenizer, spec, compile=self.config.compile)
            # the draft runs ahead on a second thread; each thread then computes on one core
            self.pool = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) \
                if spec.concurrent_draft else None

    @property
    def name(self) -> str:
        """The target's model name, as the server reports it."""
        return self.config.model

    @property
    def tokenizer(self) -> WhisperTokenizer:
        return self.target.tokenizer

    def warm(self) -> float:
        """Compile now what the first requests would otherwise wait for (a server calls this before it
        serves): the target's graphs for one row and for a full batch, the draft's encoder at every input length
        and its steps (``Drafter.warm``), and an AR step's price. Returns the seconds it took (0 with eager
        modules)."""
        if not isinstance(self.target.model, CompiledWhisper):
            return 0.0
        began = time.perf_counter()
        self.target.model.warm(rows=self.config.batch_size, cache=self.cache)
        if self.drafter is not None:
            self.drafter.warm(self.config.batch_size)
            self._time_ar_step()
        return time.perf_counter() - began

    def _time_ar_step(self, steps: int = 8) -> None:
        """Tell the drafter what one AR step costs per row at one row and, where requests draft in batches, at
        ``SpecConfig.max_batch`` rows (a target step and the pick, on the engine's cache, median of ``steps``):
        what it weighs each request's speculative passes against (``Drafter.pays``); AR steps in the loop refine
        it. Once per engine, before its first speculative decode (or at ``warm``). On silence: a step's cost does
        not depend on what it decodes."""
        if self.drafter is None or self.drafter.costs.ar_step is not None:
            return
        model = self.target.model
        d = model.dims
        prefix = self.target.tokenizer.prefix("en")
        for rows in sorted({1, min(self.config.spec.max_batch, self.config.batch_size)}):
            features = torch.zeros(rows, d.max_source_positions, d.d_model, device=model.device, dtype=model.dtype)
            times = []
            with BatchRows(model, features, self.cache) as batch:
                model.decode(torch.tensor([prefix] * rows, device=model.device), batch.cache, batch.rows)
                token = torch.tensor([[prefix[-1]]] * rows, device=model.device)
                for _ in range(steps + 2):  # the first two warm caches and allocations
                    t0 = time.perf_counter()
                    self.rules.pick(model.decode(token, batch.cache, batch.rows)[:, -1])
                    times.append(time.perf_counter() - t0)
            self.drafter.costs.observe(ar_step=float(np.median(times[2:])) / rows, rows=rows)

    def check(self, options: DecodeOptions) -> None:
        """Refuse what this engine cannot decode (the server asks before it decodes the upload)."""
        if options.word_timestamps and not self.target.alignment_heads:
            raise InvalidRequestError(f"{self.target.name} names no alignment heads: word timestamps need them")

    def transcribe(self, audios: list[np.ndarray], language: str | None | list[str | None] = None,
                   options: DecodeOptions | None = None,
                   on_window: Callable[[int, list[Segment]], None] | None = None, **fields) -> list[Transcript]:
        """Transcripts of ``audios`` (16 kHz mono); ``language`` for all or per audio (None: detect).

        ``options`` (or its fields as keywords: ``timestamps=True``, ``prompt=...``) say how to decode.
        Audio up to 30 s is one window; longer audio is decoded window after window from a seek point
        (``longform``), always with timestamps. Windows of different audios decode together, in
        batches. ``on_window(audio, segments)`` hears each window's segments as soon as it is decoded,
        windows of one audio in order.
        """
        if options is not None and fields:
            raise TypeError("pass options or their fields, not both")
        options = options or DecodeOptions(**fields)
        tok = self.target.tokenizer
        self.check(options)
        for i, audio in enumerate(audios):
            check_finite(audio, f"audio {i}")
        languages = language if isinstance(language, list) else [language] * len(audios)
        if len(languages) != len(audios):
            raise InvalidRequestError(f"{len(languages)} languages for {len(audios)} audios")
        languages = [tok.language_code(code) if code is not None else None for code in languages]
        if not tok.multilingual:
            languages = ["en"] * len(audios)
        n_mels = self.target.n_mels
        states = [
            _Audio(i, audio, lang, log_mel_spectrogram(audio, n_mels, pad=not is_long(len(audio))), is_long(len(audio)))
            for i, (audio, lang) in enumerate(zip(audios, languages))
        ]
        self.totals = {}  # seconds per phase over this call's batches
        results = [Transcript(text="", language="", duration=len(a) / SAMPLE_RATE) for a in audios]
        prompt = tok.prompt_tokens(options.prompt)
        while pending := [s for s in states if not s.done]:
            batch = self._next_batch(pending, prompt, options)
            timings = self._decode_batch(batch, prompt, options, results, on_window)
            for name, seconds in timings.items():
                self.totals[name] = self.totals.get(name, 0.0) + seconds
                for state in batch:
                    results[state.index].timings[name] = results[state.index].timings.get(name, 0.0) + seconds
        for state, result in zip(states, results):
            result.segments = state.segments
            result.text = " ".join(s.text for s in result.segments if s.text)
            result.language = state.language or "en"
        return results

    @staticmethod
    def _context(state: _Audio, prompt: list[int], options: DecodeOptions) -> list[int]:
        return window_context(prompt, state.history, state.conditioned, options)

    def _next_batch(self, pending: list[_Audio], prompt: list[int], options: DecodeOptions) -> list[_Audio]:
        """The first pending audio's next window, with as many others as share its prefix's shape."""
        def shape(state: _Audio) -> tuple[bool, int]:
            return state.long or options.timestamps, len(self._context(state, prompt, options))
        key = shape(pending[0])
        return [s for s in pending if shape(s) == key][: self.config.batch_size]

    def _decode_batch(self, batch: list[_Audio], prompt: list[int], options: DecodeOptions, results: list[Transcript],
                      on_window: Callable[[int, list[Segment]], None] | None) -> dict[str, float]:
        """Encode and decode one window of each audio in ``batch`` (with fallback), then move each on."""
        tok = self.target.tokenizer
        timings = {"encode": time.perf_counter()}
        windows = [state.window() for state in batch]
        features = self.target.model.encode(torch.stack([w[0] for w in windows]))
        undetected = [i for i, s in enumerate(batch) if s.language is None]
        if undetected:
            for i, code in zip(undetected, self._detect_language(features[undetected])):
                batch[i].language = code
        timestamps = batch[0].long or options.timestamps
        prefixes = [tok.prefix(s.language, options.task, timestamps, self._context(s, prompt, options)) for s in batch]
        timings["encode"] = time.perf_counter() - timings["encode"]
        decoded, stats = self._decode_with_fallback(batch, windows, features, prefixes, timestamps, options, timings)
        kept = []
        for state, (_, frames, _), dec, st in zip(batch, windows, decoded, stats):
            results[state.index].stats.merge(st)
            duration = len(state.samples) / SAMPLE_RATE
            segments, advance = window_outcome(dec, tok, options, long=state.long, seek=state.seek, frames=frames,
                                               duration=duration)
            kept.append(segments)
            state.seek += advance
            state.segments += segments
            state.conditioned = dec.temperature < 0.5
            state.history += history_tokens(segments, tok)
        if options.word_timestamps:
            t0 = time.perf_counter()
            self._add_words(kept, features, prefixes, [w[1] for w in windows])
            timings["align"] = time.perf_counter() - t0
        if on_window is not None:
            for state, segments in zip(batch, kept):
                on_window(state.index, segments)
        return timings

    def _add_words(self, segments: list[list[Segment]], features: torch.Tensor, prefixes: list[list[int]],
                   frames: list[int]) -> None:
        """Word timestamps for each window's kept segments: one alignment pass for the batch."""
        rows = [i for i, window in enumerate(segments) if window]
        if not rows:
            return
        words = align_windows(self.target, features[rows], [prefixes[i] for i in rows],
                              [[t for s in segments[i] for t in s.tokens] for i in rows], [frames[i] for i in rows],
                              [segments[i][0].window_start for i in rows])
        for i, window_words in zip(rows, words):
            assign_words(self.target.tokenizer, segments[i], window_words)

    def _decode_with_fallback(self, batch: list[_Audio], windows: list, features: torch.Tensor,
                              prefixes: list[list[int]], timestamps: bool, options: DecodeOptions,
                              timings: dict[str, float]) -> tuple[list[Decoded], list[SpecStats]]:
        """Each window decoded at the first temperature of the schedule whose result passes the checks,
        and each window's statistics over all its attempts."""
        schedule = options.temperatures()
        final: list[Decoded | None] = [None] * len(batch)
        stats = [SpecStats() for _ in batch]
        todo = list(range(len(batch)))
        for attempt, temperature in enumerate(schedule):
            seeds = [attempt_seed(options.seed, batch[i].seek, attempt) for i in todo]  # Sampling mixes them
            sampling = Sampling(temperature, seeds) if temperature > 0 else None
            outputs, attempt_stats = self._decode(
                [batch[i] for i in todo], [windows[i] for i in todo], features[todo], [prefixes[i] for i in todo],
                timestamps, options, sampling, timings)
            retry = []
            for i, dec, st in zip(todo, outputs, attempt_stats):
                dec.temperature = temperature
                stats[i].merge(st)
                final[i] = dec
                if attempt + 1 < len(schedule) and needs_fallback(dec, self.target.tokenizer.decode(dec.tokens).strip(), options):
                    retry.append(i)
            if not retry:
                break
            todo = retry
        return final, stats

    def _decode(self, batch: list[_Audio], windows: list, features: torch.Tensor, prefixes: list[list[int]],
                timestamps: bool, options: DecodeOptions, sampling: Sampling | None,
                timings: dict[str, float]) -> tuple[list[Decoded], list[SpecStats]]:
        """One decode of these windows with the configured method, and each window's statistics."""
        t0 = time.perf_counter()
        # a batch wider than SpecConfig.max_batch decodes as AR: verifying drafts for several rows costs more
        # than it saves on this CPU, and the draft's encoder would run for nothing
        if self.drafter is None or len(batch) > self.config.spec.max_batch:
            outputs = decode_ar(self.target, self.rules, features, prefixes, timestamps=timestamps, cache=self.cache,
                                sampling=sampling)
            stats = [SpecStats(output_tokens=len(d.tokens), target_passes=d.passes) for d in outputs]
        else:
            self._time_ar_step()
            keys = [next(self._keys) for _ in batch]
            admitted = self.drafter.admit()  # the batch drafts together or decodes as AR (``Drafter.admit``)
            for key, state, (mel, _, clip) in zip(keys, batch, windows):
                self.drafter.start(key, state.language, options.task, timestamps, options.prompt, mel=mel, audio=clip,
                                   admitted=admitted)
            self.drafter.prepare(keys)
            timings["draft_encode"] = timings.get("draft_encode", 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                with _threads(1 if self.pool else torch.get_num_threads()):
                    outputs = decode_speculative(self.target, self.rules, self.drafter, features, prefixes, keys,
                                                 pool=self.pool, timestamps=timestamps, cache=self.cache,
                                                 sampling=sampling)
            finally:
                final = self.drafter.release(keys)
            stats = [final[key] for key in keys]
        timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t0
        return outputs, stats

    def _detect_language(self, features: torch.Tensor) -> list[str]:
        """On rows of the engine's own cache, as decoding does: a one-token step the compiled or captured
        graphs already serve (a one-off cache would make a GPU capture graphs for it alone)."""
        model = self.target.model
        sot = torch.full((features.shape[0], 1), self.target.tokenizer.sot, device=model.device)
        with BatchRows(model, features, self.cache) as batch:
            return self.rules.detect_language(model.decode(sot, batch.cache, batch.rows)[:, -1])

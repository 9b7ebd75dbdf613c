"""Our OpenAI server's engine on vLLM: ``VLLMEngine`` decodes each request with vLLM's asynchronous engine
(``AsyncLLM``, the SpecASR proposer inside it), so ``specasr serve --engine vllm`` answers exactly as the
embedded engine does (formats, streams, limits, queue, errors, metrics) while vLLM batches requests.

The per-window rules are ours (``engine.window_rules``, ``engine.longform``): language detection (one token
among the language tokens), the prompt and ``condition_on_previous_text``, the temperature fallback with its
thresholds, the silence skip, and Whisper's long form: audio over 30 s is decoded window after window from a
seek point, with timestamps (the plugin's ``_sample`` hook applies Whisper's timestamp grammar inside vLLM),
keeping the complete segments and seeking to the last one's end, as the embedded engine does. Audio up to
30 s is one window, with timestamps when the response format asks for them. What differs, and why:

- vLLM computes each window's log-mel from that window's samples (its Whisper processor takes audio, not
  features), where the embedded engine slices the whole recording's log-mel, so the floor of Whisper's
  normalisation (max - 8 dB) is the window's rather than the recording's, and past the end the padding is
  silence's features rather than zeros. Short audio is unaffected (one window, the same samples); on long
  audio greedy tokens can differ where a token is nearly a tie (measured: the same text on the dev set's two
  long English files, the same segments but for the last one's end; on the long German file 4 words differ).
- Word timestamps need the target's cross-attention, which vLLM does not expose: the server runs the
  alignment pass itself, on its own copy of the target (loaded at the first such request) and on the
  features the embedded engine would use (the window of the recording's log-mel), one encoder pass per
  window more; with the same tokens, the same words and times as the embedded engine.
- ``no_speech_prob`` comes from vLLM's prompt log-probabilities at ``<|startoftranscript|>`` (the top
  ``NO_SPEECH_TOP`` tokens): exact whenever ``<|nospeech|>`` is among them, which it always is when it can
  pass the silence threshold (it is then the likeliest token); otherwise reported as 0.
- ``target_passes`` counts vLLM's outputs for the request (one per engine step that gave it tokens);
  drafted, accepted and recycled tokens are the proposer's own counters (``speculation_since_last``).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from specasr_vllm.audio import check_finite, log_mel_spectrogram
from specasr_vllm.config import HOP_LENGTH, MAX_TARGET_POSITIONS, N_FRAMES, N_SAMPLES, SAMPLE_RATE, DecodeOptions
from specasr_vllm.engine.alignment import align_windows, assign_words
from specasr_vllm.engine.decoded import Decoded
from specasr_vllm.engine.longform import history_tokens, is_long, window_features, window_outcome
from specasr_vllm.engine.segments import Segment
from specasr_vllm.engine.transcriber import Transcript
from specasr_vllm.engine.window_rules import attempt_seed, needs_fallback, window_context
from specasr_vllm.errors import InvalidRequestError
from specasr_vllm.models.registry import ASRModel, alignment_heads, load_model, load_tokenizer, resolve_model
from specasr_vllm.speculation.stats import COUNTERS, SpecStats
from specasr_vllm.vllm_plugin.hooks import PROPOSER_STATS
from specasr_vllm.vllm_plugin.launch import batch_options, engine_options, plugin_settings, serving_dir, variables

NO_SPEECH_TOP = 5  # prompt log-probabilities asked per position: enough to hold <|nospeech|> whenever it matters


def engine_args(options: list[str]) -> Any:
    """vLLM's ``AsyncEngineArgs`` from engine options as ``vllm serve`` takes them (``launch.engine_options``
    plus the user's ``--vllm-args``), parsed by vLLM's own parser, so both servers accept the same options."""
    os.environ.update(variables())  # before vLLM reads its environment
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="specasr serve --engine vllm --vllm-args"))
    parsed = parser.parse_args(options)
    return AsyncEngineArgs.from_cli_args(parsed)


class VLLMEngine:
    """One vLLM engine behind our server: ``start`` builds it, ``transcribe`` decodes one request."""

    def __init__(self, name: str, args: Any, *, speculative: bool, ray_metrics: bool = False):
        self.name = name  # the target's model name, as the server reports it
        self.args = args
        self.speculative = speculative
        # in a Ray Serve replica vLLM's own metrics go through Ray's metrics agent (vLLM's Ray stat logger, as
        # Ray's LLM serving does it), where Prometheus scrapes every replica, as ``ray_vllm_*``
        self.ray_metrics = ray_metrics
        self.tokenizer = load_tokenizer(resolve_model(name))
        self.max_batch = args.max_num_seqs or 256  # vLLM's own default when unset
        self.alignment_heads = alignment_heads(resolve_model(name))
        self._aligner: ASRModel | None = None  # our copy of the target, for word timestamps (loaded when asked)
        self._aligning = threading.Lock()  # one alignment pass at a time, off the event loop
        self.llm: Any = None
        self._ids = itertools.count()
        self._seen = SpecStats()  # the proposer's totals at the last ``speculation_since_last`` call

    @classmethod
    def build(cls, model: str, method: str, *, draft: str | None = None, spec: dict | None = None,
              served_name: str | None = None, eager: bool = False, batch_size: int | None = None,
              extra: list[str] = (), ray_metrics: bool = False) -> VLLMEngine:
        """The engine for our settings (those ``specasr serve --engine vllm`` and the Ray app take), plus more
        vLLM engine options in ``extra``; nothing starts until ``start``."""
        settings, tokens = plugin_settings(method, draft, spec or {})
        options = engine_options(serving_dir(model, settings), method, tokens, [served_name or model])
        options += (["--enforce-eager"] if eager else []) + (batch_options(batch_size) if batch_size else [])
        return cls(model, engine_args(options + list(extra)), speculative=method != "ar", ray_metrics=ray_metrics)

    # ---- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start vLLM's engine (its engine-core process, the model, the proposer): 20-90 s on a CPU."""
        from vllm.v1.engine.async_llm import AsyncLLM  # the environment was set when ``args`` were parsed

        from specasr_vllm.vllm_plugin.version import check_vllm

        check_vllm()
        loggers = None
        if self.ray_metrics:
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            loggers = [RayPrometheusStatLogger]
        self.llm = AsyncLLM.from_engine_args(self.args, stat_loggers=loggers)

    async def warm(self) -> float:
        """Decode one second of silence, so the first request does not pay for first-call allocations (and,
        unless eager, compilation) inside vLLM and the proposer. Returns the seconds it took."""
        began = time.perf_counter()
        await self.transcribe(np.zeros(SAMPLE_RATE, dtype=np.float32), None, DecodeOptions(), None)
        await self.speculation_since_last()  # read and dropped: the warm-up's drafting is not traffic
        return time.perf_counter() - began

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    @property
    def alive(self) -> bool:
        return self.llm is not None and not self.llm.errored

    # ---- one request -----------------------------------------------------------------------------
    def check(self, options: DecodeOptions) -> None:
        """Refuse what this engine cannot decode, before the upload is decoded or queued."""
        if options.word_timestamps and not self.alignment_heads:
            raise InvalidRequestError(f"{self.name} names no alignment heads: word timestamps need them")

    async def transcribe(self, audio: np.ndarray, language: str | None, options: DecodeOptions,
                         on_window: Callable[[list[Segment]], None] | None = None) -> Transcript:
        """One request's transcript: one window, or Whisper's long form over windows from seek points, each
        window with the temperature fallback."""
        self.check(options)
        if not self.alive:
            raise RuntimeError("the vLLM engine is not running")
        check_finite(audio, "audio")
        began = time.perf_counter()
        tok = self.tokenizer
        long = is_long(len(audio))
        timestamps = long or options.timestamps
        language = "en" if not tok.multilingual else (tok.language_code(language) if language else None)
        if language is None:
            language = await self._detect_language(audio[:N_SAMPLES])
        duration = len(audio) / SAMPLE_RATE
        end = len(audio) // HOP_LENGTH if long else N_FRAMES  # mel frames to decode
        prompt, history, conditioned = tok.prompt_tokens(options.prompt), [], True
        segments: list[Segment] = []
        stats = SpecStats()
        mel = None  # for word timestamps: the features the embedded engine decodes (the recording's, or the window's)
        seek = 0
        while seek < end:
            frames = min(N_FRAMES, end - seek) if long else min(len(audio) // HOP_LENGTH, N_FRAMES)
            clip = audio[seek * HOP_LENGTH : (seek + frames) * HOP_LENGTH] if long else audio
            prefix = tok.prefix(language, options.task, timestamps, window_context(prompt, history, conditioned, options))
            decoded = await self._decode_with_fallback(clip, prefix, options, seek, stats)
            window, advance = window_outcome(decoded, tok, options, long=long, seek=seek, frames=frames,
                                             duration=duration)
            if options.word_timestamps and window:
                mel = await asyncio.to_thread(self._add_words, window, audio, mel, seek, prefix, frames)
            seek += advance
            segments += window
            conditioned = decoded.temperature < 0.5
            history += history_tokens(window, tok)
            if on_window is not None:
                on_window(window)
        return Transcript(text=" ".join(s.text for s in segments if s.text), language=language, duration=duration,
                          segments=segments, stats=stats, timings={"engine": time.perf_counter() - began})

    def _aligner_model(self) -> ASRModel:
        """Our copy of the target (eager, on the CPU), loaded at the first request for word timestamps."""
        with self._aligning:
            if self._aligner is None:
                self._aligner = load_model(self.name)
            return self._aligner

    def _add_words(self, segments: list[Segment], audio: np.ndarray, mel: torch.Tensor | None, seek: int,
                   prefix: list[int], frames: int) -> torch.Tensor:
        """Word timestamps for a window's kept segments: the embedded engine's alignment pass, on our model and
        the embedded engine's features (``mel``: the request's log-mel, computed here at its first window and
        returned for the next)."""
        asr = self._aligner_model()
        long = is_long(len(audio))
        if mel is None:
            mel = log_mel_spectrogram(audio, asr.n_mels, pad=not long)
        window = window_features(mel, seek)[0] if long else mel
        with self._aligning, torch.inference_mode():
            features = asr.model.encode(window[None].to(asr.model.device))
            words = align_windows(asr, features, [prefix], [[t for s in segments for t in s.tokens]], [frames],
                                  [segments[0].window_start])[0]
        assign_words(asr.tokenizer, segments, words)
        return mel

    async def _decode_with_fallback(self, clip: np.ndarray, prefix: list[int], options: DecodeOptions, seek: int,
                                    stats: SpecStats) -> Decoded:
        """The window at the first temperature of the schedule whose result passes openai-whisper's checks."""
        schedule = options.temperatures()
        for attempt, temperature in enumerate(schedule):
            decoded = await self._generate(clip, prefix, temperature, attempt_seed(options.seed, seek, attempt))
            stats.output_tokens += len(decoded.tokens)
            stats.target_passes += decoded.passes
            text = self.tokenizer.decode(decoded.tokens).strip()
            if attempt + 1 == len(schedule) or not needs_fallback(decoded, text, options):
                return decoded
        raise AssertionError("a fallback schedule is never empty")

    async def _generate(self, clip: np.ndarray, prefix: list[int], temperature: float, seed: int) -> Decoded:
        """One decode of one window by vLLM, with each token's log-probability and the no-speech probability."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=temperature, seed=seed if temperature > 0 else None, logprobs=0,
                                prompt_logprobs=NO_SPEECH_TOP, max_tokens=MAX_TARGET_POSITIONS - len(prefix))
        final, passes = None, 0
        async for output in self.llm.generate(self._prompt(clip, prefix), params, request_id=self._request_id()):
            final, passes = output, passes + 1
        completion = final.outputs[0]
        decoded = Decoded(passes=passes, temperature=temperature,
                          no_speech_prob=self._no_speech_prob(prefix, final.prompt_logprobs))
        logprobs = [entry[token].logprob for token, entry in zip(completion.token_ids, completion.logprobs)]
        decoded.extend(list(completion.token_ids), logprobs, self.tokenizer.eot)
        return decoded

    async def _detect_language(self, clip: np.ndarray) -> str:
        """The likeliest language token after ``<|startoftranscript|>``, as the embedded engine picks it."""
        from vllm import SamplingParams

        ids = self.tokenizer.language_ids
        params = SamplingParams(temperature=0.0, max_tokens=1, allowed_token_ids=sorted(ids.values()))
        final = None
        async for final in self.llm.generate(self._prompt(clip, [self.tokenizer.sot]), params,
                                             request_id=self._request_id()):
            pass
        token = final.outputs[0].token_ids[0]
        return next(code for code, i in ids.items() if i == token)

    def _no_speech_prob(self, prefix: list[int], prompt_logprobs: list | None) -> float:
        """P(<|nospeech|>) at ``<|startoftranscript|>``: the prompt log-probabilities of the token after it."""
        at = prefix.index(self.tokenizer.sot) + 1
        if not prompt_logprobs or at >= len(prompt_logprobs) or prompt_logprobs[at] is None:
            return 0.0
        entry = prompt_logprobs[at].get(self.tokenizer.no_speech)
        return math.exp(entry.logprob) if entry is not None else 0.0

    @staticmethod
    def _prompt(clip: np.ndarray, prefix: list[int]) -> dict:
        return {"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (clip, SAMPLE_RATE)}},
                "decoder_prompt": {"prompt_token_ids": prefix}}

    def _request_id(self) -> str:
        return f"specasr-{next(self._ids)}-{uuid.uuid4().hex[:8]}"

    def exposition(self) -> bytes:
        """vLLM's own metrics (``vllm:*``, ``vllm:spec_decode_*`` among them) in Prometheus' text format (none
        under Ray: its agent exports them)."""
        import prometheus_client as prom
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        return prom.generate_latest(get_prometheus_registry())

    # ---- the proposer's counters -----------------------------------------------------------------
    async def speculation_since_last(self) -> SpecStats:
        """The proposer's drafted, accepted and recycled tokens (and its draft steps) since the last call:
        the proposer runs in vLLM's engine process, so its counters are read there."""
        if not self.speculative or not self.alive:
            return SpecStats()
        totals = (await self.llm.collective_rpc(PROPOSER_STATS))[0]
        if totals is None:
            return SpecStats()
        now = SpecStats(**{name: totals[name] for name in COUNTERS},
                        acceptance_lengths=_counter(totals["acceptance_lengths"]))
        delta = SpecStats(**{name: getattr(now, name) - getattr(self._seen, name) for name in COUNTERS},
                          acceptance_lengths=now.acceptance_lengths - self._seen.acceptance_lengths)
        self._seen = now
        delta.output_tokens = delta.target_passes = 0  # counted per request from vLLM's outputs instead
        return delta


def _counter(lengths: dict) -> Counter:
    return Counter({int(k): v for k, v in lengths.items()})

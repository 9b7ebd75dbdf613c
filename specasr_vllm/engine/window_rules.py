"""openai-whisper's per-window rules, shared by both engines: when to decode a window again at a higher
temperature, when a window is silence, and what a window is prompted with."""

from __future__ import annotations

from specasr_vllm.config import DecodeOptions
from specasr_vllm.engine.decoded import Decoded
from specasr_vllm.engine.segments import compression_ratio
from specasr_vllm.models.tokenizer import MAX_PROMPT_TOKENS


def needs_fallback(decoded: Decoded, text: str, options: DecodeOptions) -> bool:
    """A repetition loop (``text`` compresses too well) or a low log-probability, unless the window is silence."""
    bad = (options.compression_ratio_threshold is not None
           and compression_ratio(text) > options.compression_ratio_threshold)
    bad |= options.logprob_threshold is not None and decoded.avg_logprob < options.logprob_threshold
    silence = (options.no_speech_threshold is not None and decoded.no_speech_prob > options.no_speech_threshold
               and options.logprob_threshold is not None and decoded.avg_logprob < options.logprob_threshold)
    return bad and not silence


def is_silence(decoded: Decoded, options: DecodeOptions) -> bool:
    """openai-whisper's skip: no speech is likely and the text is not confident."""
    if options.no_speech_threshold is None or decoded.no_speech_prob <= options.no_speech_threshold:
        return False
    return options.logprob_threshold is None or decoded.avg_logprob <= options.logprob_threshold


def attempt_seed(seed: int, seek: int, attempt: int) -> int:
    """The seed of one decode of one window: the request's ``seed``, the window's position (mel frames) and the
    fallback attempt, so every window and every retry samples afresh and the same request repeats itself."""
    return (seed * 1_000_003 + seek) * 31 + attempt


def window_context(prompt: list[int], history: list[int], conditioned: bool, options: DecodeOptions) -> list[int]:
    """The tokens a window is prompted with: the request's ``prompt``, then (when conditioning on previous
    text and the last window was decoded cool enough) the earlier windows' tokens."""
    if options.condition_on_previous_text and conditioned and history:
        return (prompt + history)[-MAX_PROMPT_TOKENS:]
    return prompt

"""Request validation: every field is checked before the engine sees anything.

Each failure is an ``APIError`` naming the field at fault, in the order OpenAI's API checks them,
so a client learns about its mistakes one cheap check at a time and uploads are decoded last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import UploadFile
from fastapi.concurrency import run_in_threadpool

from specasr_vllm.audio import decode_audio
from specasr_vllm.config import OUTPUT_FORMATS, DecodeOptions, check_temperatures
from specasr_vllm.errors import InvalidRequestError, SpecASRError
from specasr_vllm.formats import needs_timestamps
from specasr_vllm.server.errors import APIError, from_engine_error
from specasr_vllm.server.service import Service

AUDIO_EXTENSIONS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "opus", "wav", "webm")


@dataclass(frozen=True)
class Fallback:
    """openai-whisper's temperature fallback settings, beyond OpenAI's fields (None: the defaults)."""

    temperature_increment_on_fallback: float | None = None
    compression_ratio_threshold: float | None = None
    logprob_threshold: float | None = None
    no_speech_threshold: float | None = None
    condition_on_previous_text: bool | None = None
    seed: int | None = None

    def given(self) -> dict:
        return {name: value for name, value in vars(self).items() if value is not None}


@dataclass(frozen=True)
class AudioRequest:
    """The form fields of a transcription or translation, apart from the file."""

    task: str  # "transcribe" or "translate" (the endpoint decides)
    model: str
    language: str | None
    prompt: str | None
    response_format: str
    temperature: float
    granularities: tuple[str, ...] = ()
    stream: bool = False
    fallback: Fallback = field(default_factory=Fallback)


def validate(req: AudioRequest, service: Service) -> tuple[str | None, DecodeOptions]:
    """Check every field but the file; returns the language as a code (None: detect) and the decoding options."""
    _check_model(req.model, service.names)
    _check_format(req.response_format)
    _check_temperature(req.temperature, req.fallback.temperature_increment_on_fallback)
    _check_prompt(req.prompt, service)
    _check_stream(req.stream, req.response_format)
    _check_granularities(req.granularities, req.response_format)
    language = _language_code(req.language, service) if req.language else None
    if req.task == "translate" and not service.tokenizer.multilingual:
        raise APIError(400, f"The model '{req.model}' is English-only and cannot translate.", param="model",
                       code="unsupported_value")
    options = DecodeOptions(task=req.task, timestamps=needs_timestamps(req.response_format),
                            prompt=req.prompt or None, temperature=req.temperature,
                            word_timestamps="word" in req.granularities, **req.fallback.given())
    try:
        service.engine.check(options)
    except SpecASRError as exc:
        raise from_engine_error(exc, param="timestamp_granularities[]" if options.word_timestamps else None) from exc
    return language, options


def _check_model(model: str, names: tuple[str, ...]) -> None:
    if model not in names:
        raise APIError(404, f"The model '{model}' does not exist; this server serves {', '.join(names)}.",
                       param="model", code="model_not_found")


def _check_format(response_format: str) -> None:
    if response_format not in OUTPUT_FORMATS:
        raise APIError(400, f"Invalid response_format '{response_format}'; use one of {', '.join(OUTPUT_FORMATS)}.",
                       param="response_format", code="invalid_value")


def _check_temperature(temperature: float, increment: float | None) -> None:
    try:
        check_temperatures(temperature, increment)
    except InvalidRequestError as exc:
        param = "temperature" if str(exc).startswith("temperature must") else "temperature_increment_on_fallback"
        raise APIError(400, f"{exc}.", param=param, code="invalid_value") from exc


def _check_prompt(prompt: str | None, service: Service) -> None:
    try:
        service.tokenizer.prompt_tokens(prompt)
    except SpecASRError as exc:
        raise from_engine_error(exc, param="prompt") from exc


def _check_stream(stream: bool, response_format: str) -> None:
    if stream and response_format not in ("json", "text"):
        raise APIError(400, "stream=true sends text events; use response_format 'json' or 'text'.",
                       param="stream", code="unsupported_value")


def _check_granularities(granularities: tuple[str, ...], response_format: str) -> None:
    """Segment timestamps come from Whisper's timestamp tokens, word timestamps from cross-attention alignment."""
    for granularity in granularities:
        if granularity not in ("segment", "word"):
            raise APIError(400, f"Invalid timestamp granularity '{granularity}'; use 'segment' or 'word'.",
                           param="timestamp_granularities", code="invalid_value")
    if granularities and response_format != "verbose_json":
        raise APIError(400, "timestamp_granularities requires response_format 'verbose_json'.",
                       param="timestamp_granularities", code="invalid_value")


def _language_code(language: str, service: Service) -> str:
    try:
        return service.tokenizer.language_code(language)
    except SpecASRError as exc:
        raise from_engine_error(exc, param="language") from exc


def too_large(size: int, limit_mb: float) -> APIError:
    return APIError(413, f"Maximum content size limit ({limit_mb:g} MB) exceeded ({size / 1e6:.1f} MB received).",
                    param="file", code="file_too_large")


async def read_audio(file: UploadFile, service: Service) -> np.ndarray:
    """The upload as 16 kHz mono samples; size, emptiness and extension are checked before decoding."""
    try:
        data = await file.read()
    finally:
        await file.close()
    name = file.filename or "file"
    if len(data) > service.max_bytes:
        raise too_large(len(data), service.config.max_upload_mb)
    if not data:
        raise APIError(400, f"The uploaded file '{name}' is empty.", param="file", code="empty_file")
    extension = Path(name).suffix.lower().lstrip(".")
    if extension and extension not in AUDIO_EXTENSIONS:
        raise APIError(400, f"Invalid file format '{extension}'. Supported formats: {list(AUDIO_EXTENSIONS)}",
                       param="file", code="invalid_file_format")
    try:  # decoding is CPU work: off the event loop
        return await run_in_threadpool(decode_audio, data, max_seconds=service.config.max_audio_seconds, name=name)
    except SpecASRError as exc:
        raise from_engine_error(exc) from exc

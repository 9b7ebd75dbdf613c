"""OpenAI's audio API over the embedded engine: transcriptions, translations, models, health, metrics.

Every request is validated before it reaches the engine (model, format, temperature, language,
size, decodability), each failure answers in OpenAI's error envelope with the field at fault, and
the engine only ever sees decoded 16 kHz audio. Uploads are read into memory (Starlette spools big
ones to an anonymous temporary file, which has no name on disk and is gone when closed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from specasr_vllm.audio import decode_audio
from specasr_vllm.config import OUTPUT_FORMATS, ServerConfig
from specasr_vllm.engine import Segment, Transcriber, Transcript
from specasr_vllm.errors import SpecASRError
from specasr_vllm.formats import needs_timestamps, render, to_json, to_verbose_json
from specasr_vllm.server.errors import (
    APIError, from_engine_error, handle_api_error, handle_validation_error,
)
from specasr_vllm.server.metrics import Metrics
from specasr_vllm.server.scheduler import EngineWorker, Job, QueueFull

AUDIO_EXTENSIONS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "opus", "wav", "webm")
ENDPOINTS = ("/v1/audio/transcriptions", "/v1/audio/translations", "/v1/models", "/health", "/metrics")
log = logging.getLogger(__name__)
_DRAIN_LIMIT = 256 * 2**20  # an oversized body is read and dropped up to here, so the client sees the 413


def build_app(transcriber: Transcriber, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    metrics = Metrics(config.metrics_backend)
    worker = EngineWorker(transcriber, metrics, max_queue=config.max_queue, batch_wait_ms=config.batch_wait_ms)
    tokenizer = transcriber.target.tokenizer
    names = (config.served_model_name or transcriber.config.model, *config.aliases)
    started = int(time.time())
    max_bytes = int(config.max_upload_mb * 1_000_000)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="specasr-vllm", summary="OpenAI-compatible speech recognition with SpecASR", lifespan=lifespan)
    app.state.metrics, app.state.worker = metrics, worker
    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, lambda _, exc: APIError(exc.status_code, str(exc.detail)).response())

    @app.middleware("http")
    async def guard_and_count(request: Request, call_next) -> Response:
        start = time.perf_counter()
        request.state.start = start
        try:
            if request.url.path.startswith("/v1/"):
                _authorize(request, config.api_key)
                await _refuse_oversized(request, max_bytes)
            response = await call_next(request)
        except APIError as exc:
            response = exc.response()
        except Exception:  # a bug: this request gets a 500, the server keeps serving
            log.exception("unhandled error in %s", request.url.path)
            response = APIError(500, "internal server error", type="server_error").response()
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        if not getattr(request.state, "streaming", False):  # a stream's latency is taken at its end
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    def check_common(model: str, response_format: str, temperature: float, stream: bool) -> None:
        if model not in names:
            raise APIError(404, f"The model '{model}' does not exist; this server serves {', '.join(names)}.",
                           param="model", code="model_not_found")
        if response_format not in OUTPUT_FORMATS:
            raise APIError(400, f"Invalid response_format '{response_format}'; use one of {', '.join(OUTPUT_FORMATS)}.",
                           param="response_format", code="invalid_value")
        if not 0.0 <= temperature <= 1.0:
            raise APIError(400, f"temperature must be between 0 and 1, got {temperature:g}.", param="temperature",
                           code="invalid_value")
        if temperature > 0:
            raise APIError(400, "Only temperature 0 is supported: decoding is greedy, so that speculative output is "
                                "token-identical to the target model's.", param="temperature", code="unsupported_value")
        if stream and response_format not in ("json", "text"):
            raise APIError(400, "stream=true sends text events; use response_format 'json' or 'text'.",
                           param="stream", code="unsupported_value")

    async def read_audio(file: UploadFile) -> np.ndarray:
        try:
            data = await file.read()
        finally:
            await file.close()
        name = file.filename or "file"
        if len(data) > max_bytes:
            raise _too_large(len(data), config.max_upload_mb)
        if not data:
            raise APIError(400, f"The uploaded file '{name}' is empty.", param="file", code="empty_file")
        extension = Path(name).suffix.lower().lstrip(".")
        if extension and extension not in AUDIO_EXTENSIONS:
            raise APIError(400, f"Invalid file format '{extension}'. Supported formats: {list(AUDIO_EXTENSIONS)}",
                           param="file", code="invalid_file_format")
        try:
            return await run_in_threadpool(decode_audio, data, max_seconds=config.max_audio_seconds, name=name)
        except SpecASRError as exc:
            raise from_engine_error(exc) from exc

    async def handle(request: Request, task: str, file: UploadFile, model: str, language: str | None,
                     prompt: str | None, response_format: str, temperature: float, granularities: list[str],
                     stream: bool) -> Response:
        check_common(model, response_format, temperature, stream)
        for granularity in granularities:
            if granularity not in ("segment", "word"):
                raise APIError(400, f"Invalid timestamp granularity '{granularity}'; use 'segment'.",
                               param="timestamp_granularities", code="invalid_value")
            if granularity == "word":
                raise APIError(400, "Word timestamps are not supported; use timestamp_granularities[]=segment.",
                               param="timestamp_granularities", code="unsupported_value")
        if granularities and response_format != "verbose_json":
            raise APIError(400, "timestamp_granularities requires response_format 'verbose_json'.",
                           param="timestamp_granularities", code="invalid_value")
        if language:
            try:
                language = tokenizer.language_code(language)
            except SpecASRError as exc:
                raise from_engine_error(exc, param="language") from exc
        if task == "translate" and not tokenizer.multilingual:
            raise APIError(400, f"The model '{model}' is English-only and cannot translate.", param="model",
                           code="unsupported_value")
        audio = await read_audio(file)
        loop = asyncio.get_running_loop()
        job = Job(audio, language or None, task, needs_timestamps(response_format), prompt or None, loop,
                  loop.create_future())
        if stream:
            return stream_response(request, job)
        submit(job)
        try:
            transcript = await job.future
        except SpecASRError as exc:
            raise from_engine_error(exc) from exc
        return respond(transcript, response_format, task)

    def submit(job: Job) -> None:
        try:
            worker.submit(job)
        except QueueFull as exc:
            raise APIError(503, f"The server is overloaded ({exc}); retry after {config.retry_after_s} s.",
                           type="server_error", code="overloaded",
                           headers={"Retry-After": str(config.retry_after_s)}) from exc

    def stream_response(request: Request, job: Job) -> StreamingResponse:
        """Server-sent events: one ``transcript.text.delta`` per decoded window, then ``transcript.text.done``."""
        windows: asyncio.Queue[list[Segment]] = asyncio.Queue()
        job.on_window = windows.put_nowait
        submit(job)
        request.state.streaming = True
        start = request.state.start

        async def events() -> AsyncIterator[str]:
            sent = 0
            try:
                while not (job.future.done() and windows.empty()):
                    getter = asyncio.ensure_future(windows.get())
                    await asyncio.wait({getter, job.future}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        continue
                    text = " ".join(s.text for s in getter.result() if s.text)
                    if text:
                        if not sent:
                            metrics.ttft.observe(time.perf_counter() - start)
                        yield _sse({"type": "transcript.text.delta", "delta": (" " if sent else "") + text})
                        sent += 1
                try:
                    transcript = job.future.result()
                except SpecASRError as exc:
                    yield _sse(from_engine_error(exc).body())
                    return
                except Exception as exc:  # noqa: BLE001 - reported to this client only
                    yield _sse(APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body())
                    return
                yield _sse({"type": "transcript.text.done", "text": transcript.text})
            finally:
                if not job.future.done():
                    job.future.cancel()
                metrics.latency.labels(request.url.path).observe(time.perf_counter() - start)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(
        request: Request,
        file: UploadFile = File(...),
        model: str = Form(...),
        language: str | None = Form(None),
        prompt: str | None = Form(None),
        response_format: str = Form("json"),
        temperature: float = Form(0.0),
        timestamp_granularities: list[str] = Form([], alias="timestamp_granularities[]"),
        stream: bool = Form(False),
    ) -> Response:
        return await handle(request, "transcribe", file, model, language, prompt, response_format, temperature,
                            timestamp_granularities, stream)

    @app.post("/v1/audio/translations")
    async def translations(
        request: Request,
        file: UploadFile = File(...),
        model: str = Form(...),
        prompt: str | None = Form(None),
        response_format: str = Form("json"),
        temperature: float = Form(0.0),
    ) -> Response:
        return await handle(request, "translate", file, model, None, prompt, response_format, temperature, [], False)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list",
                "data": [{"id": n, "object": "model", "created": started, "owned_by": "specasr-vllm"} for n in names]}

    @app.get("/health")
    async def health() -> Response:
        if not worker.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "queue": worker.depth})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def respond(transcript: Transcript, response_format: str, task: str) -> Response:
    if response_format == "json":
        return JSONResponse(to_json(transcript))
    if response_format == "verbose_json":
        return JSONResponse(to_verbose_json(transcript, task))
    return PlainTextResponse(render(transcript, response_format, task))


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _too_large(size: int, limit_mb: float) -> APIError:
    return APIError(413, f"Maximum content size limit ({limit_mb:g} MB) exceeded ({size / 1e6:.1f} MB received).",
                    param="file", code="file_too_large")


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    if header != f"Bearer {api_key}":
        raise APIError(401, "Incorrect API key provided." if header else "Missing API key: send 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")


async def _refuse_oversized(request: Request, max_bytes: int) -> None:
    """413 before parsing when Content-Length already says too much (the body is drained, not stored)."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit() or int(length) <= max_bytes + 64 * 1024:  # room for the form's fields
        return
    drained = 0
    async for chunk in request.stream():
        drained += len(chunk)
        if drained > _DRAIN_LIMIT:
            break
    raise _too_large(int(length), max_bytes / 1e6)

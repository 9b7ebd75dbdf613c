"""The endpoints: OpenAI's transcriptions, translations and models, plus health and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from specasr_vllm.engine import Transcript
from specasr_vllm.errors import SpecASRError
from specasr_vllm.server.errors import APIError, from_engine_error
from specasr_vllm.server.responses import respond, stream_response
from specasr_vllm.server.scheduler import Job
from specasr_vllm.server.service import Service
from specasr_vllm.server.validation import AudioRequest, Fallback, read_audio, validate


def register_routes(app: FastAPI, service: Service) -> None:
    """Add every endpoint to ``app``; the handlers only parse the form and hand over to ``transcribe``."""

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
        temperature_increment_on_fallback: float | None = Form(None),
        compression_ratio_threshold: float | None = Form(None),
        logprob_threshold: float | None = Form(None),
        no_speech_threshold: float | None = Form(None),
        condition_on_previous_text: bool | None = Form(None),
        seed: int | None = Form(None),
    ) -> Response:
        fallback = Fallback(temperature_increment_on_fallback, compression_ratio_threshold, logprob_threshold,
                            no_speech_threshold, condition_on_previous_text, seed)
        req = AudioRequest("transcribe", model, language, prompt, response_format, temperature,
                           tuple(timestamp_granularities), stream, fallback)
        return await transcribe(request, req, file, service)

    @app.post("/v1/audio/translations")
    async def translations(
        request: Request,
        file: UploadFile = File(...),
        model: str = Form(...),
        prompt: str | None = Form(None),
        response_format: str = Form("json"),
        temperature: float = Form(0.0),
        seed: int | None = Form(None),
    ) -> Response:
        req = AudioRequest("translate", model, None, prompt, response_format, temperature, fallback=Fallback(seed=seed))
        return await transcribe(request, req, file, service)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": service.started,
                                            "owned_by": "specasr-vllm"} for name in service.names]}

    @app.get("/health")
    async def health() -> Response:
        if not service.worker.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "queue": service.worker.depth})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(service.exposition(), media_type=CONTENT_TYPE_LATEST)


async def transcribe(request: Request, req: AudioRequest, file: UploadFile, service: Service) -> Response:
    """Validate, decode the upload, queue it for the engine, and answer (whole or as a stream)."""
    language, options = validate(req, service)
    audio = await read_audio(file, service)
    loop = asyncio.get_running_loop()
    job = Job(audio, language, options, loop, loop.create_future())
    if req.stream:
        return stream_response(request, job, service)
    service.submit(job)
    try:
        transcript = await _answer_or_hang_up(request, job)
    except SpecASRError as exc:
        raise from_engine_error(exc) from exc
    return respond(transcript, req.response_format, req.task)


async def _answer_or_hang_up(request: Request, job: Job) -> Transcript:
    """The job's transcript, unless the client leaves first: then the job is cancelled (the engine drops
    it unless its batch is already decoding) and the request is counted as 499, not as an answer."""
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not job.future.done():
        job.future.cancel()
        raise APIError(499, "The client closed the request before it was answered.", code="client_closed_request")
    return job.future.result()


async def _disconnect(request: Request) -> None:
    """Returns when the client hangs up (the body is read: the next ASGI message can only be that)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - a broken receive channel means the client is gone too
        return

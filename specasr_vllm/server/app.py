"""OpenAI's audio API over the embedded engine: transcriptions, translations, models, health, metrics.

Every request is validated before it reaches the engine (model, format, temperature, language,
size, decodability), each failure answers in OpenAI's error envelope with the field at fault, and
the engine only ever sees decoded 16 kHz audio. Uploads are bounded while they stream (``guard``),
and a client that hangs up cancels its job (``routes``).

The pieces: ``service`` (what every part shares), ``guard`` (API key, upload size, request metrics),
``validation`` (the form fields and the upload), ``routes`` (the endpoints), ``responses`` (formats and streams).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from specasr_vllm.config import ServerConfig
from specasr_vllm.engine import Transcriber
from specasr_vllm.server.async_worker import AsyncEngine, AsyncWorker
from specasr_vllm.server.errors import APIError, handle_api_error, handle_validation_error
from specasr_vllm.server.guard import install_guard
from specasr_vllm.server.routes import register_routes
from specasr_vllm.server.scheduler import EngineWorker
from specasr_vllm.server.service import Service


def build_app(engine: Transcriber | AsyncEngine, config: ServerConfig | None = None) -> FastAPI:
    """The server around ``engine``: the embedded ``Transcriber`` (its thread runs while the app is served)
    or an engine that batches by itself (``vllm_plugin.serving.VLLMEngine``, started with the app)."""
    service = Service.create(engine, config or ServerConfig())
    app = FastAPI(title="specasr-vllm", summary="OpenAI-compatible speech recognition with SpecASR",
                  lifespan=_lifespan(service.worker))
    app.state.metrics, app.state.worker = service.metrics, service.worker
    _add_error_handlers(app)
    install_guard(app, service)
    register_routes(app, service)
    return app


def _lifespan(worker: EngineWorker | AsyncWorker) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start the engine with the server and stop it on shutdown."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await worker.open()
        try:
            yield
        finally:
            await worker.close()

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, FastAPI's own included, in OpenAI's envelope."""
    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_error)


async def _handle_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return APIError(exc.status_code, str(exc.detail)).response()

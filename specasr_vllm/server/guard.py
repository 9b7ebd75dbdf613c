"""The request guard: API key and upload size before any body is parsed, and every request counted.

This runs as middleware rather than as a route dependency so that a request without the key or with
an oversized body is refused before FastAPI reads its multipart form, and so that every answer,
errors and unknown paths included, reaches the request metrics.

``UploadLimit`` bounds bodies while they stream: a chunked upload declares no length, and Starlette
would otherwise spool all of it before the route could look at its size. Past the limit the app is
told the client left, the rest of the body is read and dropped, and the client gets the 413.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from specasr_vllm.server.errors import APIError
from specasr_vllm.server.service import Service
from specasr_vllm.server.validation import too_large

ENDPOINTS = ("/v1/audio/transcriptions", "/v1/audio/translations", "/v1/models", "/health", "/metrics")
DRAIN_LIMIT = 256 * 2**20  # an oversized body is read and dropped up to here, so the client sees the 413
FORM_ROOM = 64 * 1024  # Content-Length may exceed the upload limit by the form's other fields
log = logging.getLogger(__name__)

CallNext = Callable[[Request], Awaitable[Response]]


def install_guard(app: FastAPI, service: Service) -> None:
    """Add the guard to ``app`` as its HTTP middleware, inside the streaming upload limit."""

    @app.middleware("http")
    async def guard_and_count(request: Request, call_next: CallNext) -> Response:
        return await guard(request, call_next, service)

    app.add_middleware(UploadLimit, max_bytes=service.max_bytes + FORM_ROOM, limit_mb=service.config.max_upload_mb)


class UploadLimit:
    """ASGI middleware: no ``/v1/`` request body beyond ``max_bytes`` is ever handed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int, limit_mb: float):
        self.app, self.max_bytes, self.limit_mb = app, max_bytes, limit_mb

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        received, exceeded, more = 0, False, True

        async def counted() -> Message:
            nonlocal received, exceeded, more
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                more = message.get("more_body", False)
                if received > self.max_bytes:  # the app sees a client that left; nothing more is stored
                    exceeded = True
                    scope.setdefault("state", {})["upload_too_large"] = True
                    return {"type": "http.disconnect"}
            return message

        async def answer(message: Message) -> None:
            if not exceeded:
                await send(message)

        await self.app(scope, counted, answer)
        if exceeded:
            while more and received < DRAIN_LIMIT:  # read and drop, so the client can read the 413
                message = await receive()
                received += len(message.get("body", b""))
                more = message["type"] == "http.request" and message.get("more_body", False)
            await too_large(received, self.limit_mb).response()(scope, receive, send)


async def guard(request: Request, call_next: CallNext, service: Service) -> Response:
    """Check ``/v1/*`` requests, answer any failure in OpenAI's envelope, and record the outcome."""
    start = time.perf_counter()
    request.state.start = start
    try:
        if request.url.path.startswith("/v1/"):
            authorize(request, service.config.api_key)
            await refuse_oversized(request, service.max_bytes)
        response = await call_next(request)
    except APIError as exc:
        response = exc.response()
    except Exception:  # a bug: this request gets a 500, the server keeps serving
        if not getattr(request.state, "upload_too_large", False):
            log.exception("unhandled error in %s", request.url.path)
        response = APIError(500, "internal server error", type="server_error").response()
    if getattr(request.state, "upload_too_large", False):  # refused while streaming: UploadLimit sends the 413
        response = too_large(service.max_bytes + 1, service.config.max_upload_mb).response()
    endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
    service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
    if not getattr(request.state, "streaming", False):  # a stream's latency is taken at its end
        service.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
    return response


def authorize(request: Request, api_key: str | None) -> None:
    """With an API key configured, require ``Authorization: Bearer <key>`` (OpenAI's 401 otherwise)."""
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.strip().partition(" ")
    # the scheme is case-insensitive (RFC 9110); the key is compared in constant time (no timing oracle)
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        message = "Incorrect API key provided." if header else "Missing API key: send 'Authorization: Bearer <key>'."
        raise APIError(401, message, code="invalid_api_key")


async def refuse_oversized(request: Request, max_bytes: int) -> None:
    """413 before parsing when Content-Length already says too much (the body is drained, not stored)."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit() or int(length) <= max_bytes + FORM_ROOM:
        return
    drained = 0
    async for chunk in request.stream():
        drained += len(chunk)
        if drained > DRAIN_LIMIT:
            break
    raise too_large(int(length), max_bytes / 1e6)

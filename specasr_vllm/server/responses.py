"""Answers in OpenAI's shapes: a whole transcript in a response format, or a stream of text events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from specasr_vllm.engine import Segment, Transcript
from specasr_vllm.errors import SpecASRError
from specasr_vllm.formats import render, to_json, to_verbose_json
from specasr_vllm.server.errors import APIError, from_engine_error
from specasr_vllm.server.scheduler import Job
from specasr_vllm.server.service import Service


def respond(transcript: Transcript, response_format: str, task: str) -> Response:
    """json and verbose_json as JSON; text, srt and vtt as plain text."""
    if response_format == "json":
        return JSONResponse(to_json(transcript))
    if response_format == "verbose_json":
        return JSONResponse(to_verbose_json(transcript, task))
    return PlainTextResponse(render(transcript, response_format, task))


def sse(payload: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def stream_response(request: Request, job: Job, service: Service) -> StreamingResponse:
    """Server-sent events: one ``transcript.text.delta`` per decoded window, then ``transcript.text.done``.

    The request guard leaves a stream's latency to be measured here, when the last event is sent.
    """
    windows: asyncio.Queue[list[Segment]] = asyncio.Queue()
    job.on_window = windows.put_nowait
    service.submit(job)
    request.state.streaming = True
    events = _events(job, windows, service, request.url.path, request.state.start)
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _events(job: Job, windows: asyncio.Queue[list[Segment]], service: Service, endpoint: str,
                  start: float) -> AsyncIterator[str]:
    """Deltas as windows arrive, then the whole text (or the error); a client that leaves cancels the job."""
    try:
        sent = 0
        async with aclosing(_window_texts(job, windows)) as texts:
            async for text in texts:
                if not sent:
                    service.metrics.ttft.observe(time.perf_counter() - start)
                yield sse({"type": "transcript.text.delta", "delta": (" " if sent else "") + text})
                sent += 1
        yield _final_event(job)
    finally:
        if not job.future.done():
            job.future.cancel()
        service.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


async def _window_texts(job: Job, windows: asyncio.Queue[list[Segment]]) -> AsyncIterator[str]:
    """Each decoded window's text (empty ones skipped) until the job is done and every window is out."""
    while not (job.future.done() and windows.empty()):
        getter = asyncio.ensure_future(windows.get())
        await asyncio.wait({getter, job.future}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            continue
        text = " ".join(s.text for s in getter.result() if s.text)
        if text:
            yield text


def _final_event(job: Job) -> str:
    """``transcript.text.done`` with the whole text, or the error in OpenAI's envelope (to this client only)."""
    try:
        transcript = job.future.result()
    except SpecASRError as exc:
        return sse(from_engine_error(exc).body())
    except Exception as exc:  # noqa: BLE001 - reported to this client only
        return sse(APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body())
    return sse({"type": "transcript.text.done", "text": transcript.text})

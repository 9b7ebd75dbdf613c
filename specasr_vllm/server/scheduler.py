"""The engine's one thread, and the bounded queue in front of it.

Request handlers (asyncio) decode the upload, then ``submit`` a ``Job``. The engine thread takes the
oldest job plus every queued job that can share its batch (the same decoding options; any
languages), waits ``batch_wait_ms`` for company, and runs one ``Transcriber.transcribe`` over all
of them, so concurrent requests are decoded together. A full queue is refused at once (the caller
answers 503 with Retry-After). If a batch fails, its jobs are retried one by one, so one bad
request never takes its batch-mates down with it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from specasr_vllm.config import DecodeOptions
from specasr_vllm.engine import Segment, Transcriber, Transcript
from specasr_vllm.server.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the configured bound."""


@dataclass
class Job:
    audio: np.ndarray
    language: str | None
    options: DecodeOptions
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    on_window: Callable[[list[Segment]], None] | None = None  # called on the event loop, in window order
    queued_at: float = field(default_factory=time.perf_counter)
    delivered: int = 0  # windows already passed to ``on_window`` (a retried batch does not repeat them)

    @property
    def batch_key(self) -> DecodeOptions:
        return self.options


class EngineWorker:
    def __init__(self, transcriber: Transcriber, metrics: Metrics, *, max_queue: int, batch_wait_ms: float):
        self.transcriber = transcriber
        self.metrics = metrics
        self.max_queue = max_queue
        self.batch_wait = batch_wait_ms / 1000
        self.max_batch = transcriber.config.batch_size
        self._queue: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="specasr-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def open(self) -> None:
        """Start the engine thread (the server's start-up)."""
        self.start()

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> None:
        with self._wake:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting")
            self._queue.append(job)
            self.metrics.waiting.set(len(self._queue))
            self._wake.notify()

    def _next_batch(self) -> list[Job] | None:
        with self._wake:
            while not self._queue and not self._stopping:
                self._wake.wait()
            if self._stopping:
                return None
            deadline = time.perf_counter() + self.batch_wait
            while len(self._queue) < self.max_batch and (left := deadline - time.perf_counter()) > 0:
                self._wake.wait(left)
            key = self._queue[0].batch_key
            batch = [job for job in self._queue if job.batch_key == key][: self.max_batch]
            for job in batch:
                self._queue.remove(job)
            self.metrics.waiting.set(len(self._queue))
            return [job for job in batch if not job.future.cancelled()]

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            self.metrics.running.set(len(batch))
            try:
                self._finish(batch, self._transcribe(batch))
            except Exception as exc:
                if len(batch) == 1:
                    log.exception("transcription failed")
                    self._fail(batch[0], exc)
                else:
                    for job in batch:
                        try:
                            self._finish([job], self._transcribe([job]))
                        except Exception as single:
                            log.exception("transcription failed")
                            self._fail(job, single)
            finally:
                self.metrics.running.set(0)

    def _transcribe(self, batch: list[Job]) -> list[Transcript]:
        seen = [0] * len(batch)

        def on_window(index: int, segments: list[Segment]) -> None:
            job = batch[index]
            seen[index] += 1
            if job.on_window is not None and seen[index] > job.delivered:
                job.delivered += 1
                job.loop.call_soon_threadsafe(job.on_window, segments)

        return self.transcriber.transcribe(
            [job.audio for job in batch], [job.language for job in batch], batch[0].options, on_window=on_window,
        )

    def _finish(self, batch: list[Job], results: list[Transcript]) -> None:
        for job, result in zip(batch, results):
            self.metrics.observe_transcript(result.duration, sum(result.timings.values()), result.stats)
            job.loop.call_soon_threadsafe(settle, job.future, result, None)

    @staticmethod
    def _fail(job: Job, exc: BaseException) -> None:
        job.loop.call_soon_threadsafe(settle, job.future, None, exc)


def settle(future: asyncio.Future, result: Transcript | None, exc: BaseException | None) -> None:
    if future.done():  # the client went away
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)

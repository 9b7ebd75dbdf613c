"""The worker for an engine that batches by itself (vLLM's continuous batching): no queue of our own.

Each submitted job runs at once as its own task on the server's event loop (``engine.transcribe`` is a
coroutine), and vLLM's scheduler decides which requests share a step. ``max_queue`` bounds the jobs in
flight: beyond it a request is refused with 503 at once, as the embedded engine's full queue is. A job
whose client hangs up is cancelled, which aborts its requests inside vLLM.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import numpy as np

from specasr_vllm.config import DecodeOptions
from specasr_vllm.engine import Transcript
from specasr_vllm.errors import SpecASRError
from specasr_vllm.models.tokenizer import WhisperTokenizer
from specasr_vllm.server.metrics import Metrics
from specasr_vllm.server.scheduler import Job, QueueFull, settle
from specasr_vllm.speculation.stats import SpecStats

log = logging.getLogger(__name__)


class AsyncEngine(Protocol):
    """What the server needs of such an engine (``vllm_plugin.serving.VLLMEngine``)."""

    name: str  # the target's model name, as /v1/models reports it
    tokenizer: WhisperTokenizer  # validation's language codes and prompts
    max_batch: int  # requests the engine decodes in one step; the rest wait inside it

    def check(self, options: DecodeOptions) -> None: ...
    def start(self) -> None: ...
    def shutdown(self) -> None: ...
    async def warm(self) -> float: ...
    @property
    def alive(self) -> bool: ...
    async def transcribe(self, audio: np.ndarray, language: str | None, options: DecodeOptions,
                         on_window=None) -> Transcript: ...
    async def speculation_since_last(self) -> SpecStats: ...
    def exposition(self) -> bytes: ...


class AsyncWorker:
    def __init__(self, engine: AsyncEngine, metrics: Metrics, *, max_queue: int):
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self._tasks: set[asyncio.Task] = set()

    async def open(self) -> None:
        """Start the engine and decode a warm-up request before the server takes traffic."""
        self.engine.start()
        seconds = await self.engine.warm()
        log.info("engine started and warmed up in %.1f s", seconds)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.engine.shutdown()

    @property
    def alive(self) -> bool:
        return self.engine.alive

    @property
    def depth(self) -> int:
        """Jobs beyond what the engine decodes in one step (they wait inside vLLM's scheduler)."""
        return max(0, len(self._tasks) - self.engine.max_batch)

    def submit(self, job: Job) -> None:
        """Start ``job`` now (called on the event loop), unless ``max_queue`` jobs are already in flight."""
        if len(self._tasks) >= self.max_queue:
            raise QueueFull(f"{len(self._tasks)} requests are already in flight")
        task = job.loop.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._done)
        job.future.add_done_callback(lambda future: task.cancel() if future.cancelled() else None)
        self._gauges()

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.waiting.set(self.depth)
        self.metrics.running.set(len(self._tasks) - self.depth)

    async def _run(self, job: Job) -> None:
        """Decode ``job`` and settle its future, whatever happens (a cancelled job's client is gone)."""
        try:
            result = await self.engine.transcribe(job.audio, job.language, job.options, on_window=job.on_window)
            self.metrics.observe_transcript(result.duration, sum(result.timings.values()), result.stats)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, SpecASRError):
                log.exception("transcription failed")
            settle(job.future, None, exc)
            return
        settle(job.future, result, None)
        try:  # the proposer's counters, read from vLLM's engine process; the answer does not wait for them
            self.metrics.observe_speculation(await self.engine.speculation_since_last())
        except Exception:
            log.exception("could not read the proposer's counters")

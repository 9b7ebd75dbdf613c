"""The engine thread's batching and failure isolation, on a stand-in transcriber (no model needed)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from specasr_vllm.config import DecodeOptions
from specasr_vllm.engine import Transcript
from specasr_vllm.server.metrics import Metrics
from specasr_vllm.server.scheduler import EngineWorker, Job, QueueFull


class PickyTranscriber:
    """Transcribes anything except audio containing NaN; records the batches it was given."""

    def __init__(self):
        self.config = SimpleNamespace(batch_size=8)
        self.batches: list[int] = []

    def transcribe(self, audios, languages, options, on_window):
        self.batches.append(len(audios))
        if any(np.isnan(a).any() for a in audios):
            raise RuntimeError("NaN in the audio")
        return [Transcript(text=f"{len(a)} samples", language=lang or "en", duration=len(a) / 16000)
                for a, lang in zip(audios, languages)]


def _jobs(loop, audios, **kw):
    return [Job(a, None, DecodeOptions(), loop, loop.create_future(), **kw) for a in audios]


def test_a_failing_request_fails_alone_and_its_batch_mates_succeed():
    transcriber = PickyTranscriber()
    worker = EngineWorker(transcriber, Metrics(), max_queue=8, batch_wait_ms=200)

    async def scenario():
        loop = asyncio.get_running_loop()
        bad = np.full(100, np.nan, dtype=np.float32)
        jobs = _jobs(loop, [np.zeros(n, np.float32) for n in (10, 20)] + [bad] + [np.zeros(30, np.float32)])
        for job in jobs:
            worker.submit(job)
        worker.start()
        return await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)

    try:
        results = asyncio.run(scenario())
    finally:
        worker.stop()
    assert [r.text for r in results[:2]] + [results[3].text] == ["10 samples", "20 samples", "30 samples"]
    assert isinstance(results[2], RuntimeError)
    assert transcriber.batches == [4, 1, 1, 1, 1]  # one batch of all four, then each request alone


def test_the_queue_is_bounded():
    worker = EngineWorker(PickyTranscriber(), Metrics(), max_queue=2, batch_wait_ms=0)  # not started

    async def scenario():
        loop = asyncio.get_running_loop()
        jobs = _jobs(loop, [np.zeros(1, np.float32)] * 3)
        worker.submit(jobs[0])
        worker.submit(jobs[1])
        with pytest.raises(QueueFull, match="2 requests are already waiting"):
            worker.submit(jobs[2])

    asyncio.run(scenario())
    assert worker.depth == 2


class SlowAsyncEngine:
    """An engine that batches by itself (as vLLM does): each request sleeps, NaN audio fails, and reading the
    proposer's counters can be made to fail."""

    max_batch = 2

    def __init__(self):
        self.started = self.finished = self.cancelled = 0
        self.counters_fail = False

    async def transcribe(self, audio, language, options, on_window=None):
        self.started += 1
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if np.isnan(audio).any():
            raise RuntimeError("NaN in the audio")
        self.finished += 1
        return Transcript(text=f"{len(audio)} samples", language="en", duration=len(audio) / 16000)

    async def speculation_since_last(self):
        if self.counters_fail:
            raise RuntimeError("the engine process did not answer")
        from specasr_vllm.speculation.stats import SpecStats

        return SpecStats(drafted_tokens=3, accepted_tokens=2)


def test_async_worker_bounds_in_flight_requests_cancels_the_abandoned_and_isolates_failures():
    from specasr_vllm.server.async_worker import AsyncWorker

    engine, metrics = SlowAsyncEngine(), Metrics()
    worker = AsyncWorker(engine, metrics, max_queue=4)

    async def scenario():
        loop = asyncio.get_running_loop()
        audios = [np.zeros(10, np.float32), np.full(10, np.nan, np.float32), np.zeros(30, np.float32),
                  np.zeros(40, np.float32)]
        jobs = _jobs(loop, audios)
        for job in jobs:
            worker.submit(job)
        assert worker.depth == 2 and metrics.running._value.get() == 2  # beyond max_batch: waiting in the engine
        with pytest.raises(QueueFull):
            worker.submit(_jobs(loop, [np.zeros(5, np.float32)])[0])
        jobs[3].future.cancel()  # its client hung up
        engine.counters_fail = True  # the answer must not wait on (or fail with) the proposer's counters
        done = await asyncio.gather(*(job.future for job in jobs[:3]), return_exceptions=True)
        await asyncio.sleep(0.01)
        return done

    first, failed, third = asyncio.run(scenario())
    assert first.text == "10 samples" and third.text == "30 samples"
    assert isinstance(failed, RuntimeError)
    assert (engine.started, engine.finished, engine.cancelled) == (4, 2, 1)
    assert worker.depth == 0 and metrics.running._value.get() == 0

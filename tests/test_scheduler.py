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

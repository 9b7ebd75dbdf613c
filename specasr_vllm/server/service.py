"""What the routes and the middleware share, as one object instead of variables captured by a closure.

Keeping the engine worker, the metrics, the tokenizer and the served names together lets each part
of the server (validation, responses, routes, the request guard) be a plain function of this object.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from specasr_vllm.config import ServerConfig
from specasr_vllm.engine import Transcriber
from specasr_vllm.models.tokenizer import WhisperTokenizer
from specasr_vllm.server.async_worker import AsyncEngine, AsyncWorker
from specasr_vllm.server.errors import APIError
from specasr_vllm.server.metrics import Metrics
from specasr_vllm.server.scheduler import EngineWorker, Job, QueueFull


@dataclass
class Service:
    """One server's engine worker, metrics and identity."""

    config: ServerConfig
    engine: Transcriber | AsyncEngine  # the embedded engine, or one that batches by itself (vLLM)
    worker: EngineWorker | AsyncWorker
    metrics: Metrics
    tokenizer: WhisperTokenizer
    names: tuple[str, ...]  # the model names clients may send: the served name, then the aliases
    started: int = field(default_factory=lambda: int(time.time()))  # /v1/models' "created"

    @classmethod
    def create(cls, engine: Transcriber | AsyncEngine, config: ServerConfig) -> Service:
        metrics = Metrics(config.metrics_backend)
        if isinstance(engine, Transcriber):
            worker = EngineWorker(engine, metrics, max_queue=config.max_queue, batch_wait_ms=config.batch_wait_ms)
        else:
            worker = AsyncWorker(engine, metrics, max_queue=config.max_queue)
        names = (config.served_model_name or engine.name, *config.aliases)
        return cls(config, engine, worker, metrics, engine.tokenizer, names)

    @property
    def max_bytes(self) -> int:
        """The upload limit in bytes (``max_upload_mb`` counts decimal megabytes, as OpenAI does)."""
        return int(self.config.max_upload_mb * 1_000_000)

    def exposition(self) -> bytes:
        """``/metrics``: ours, then the engine's own where it keeps some (vLLM's ``vllm:*``; under Ray both go
        through Ray's metrics agent instead)."""
        ours = self.metrics.exposition()
        return ours if isinstance(self.engine, Transcriber) else ours + self.engine.exposition()

    def submit(self, job: Job) -> None:
        """Queue ``job`` for the engine; a full queue is a 503 the client is told to retry."""
        try:
            self.worker.submit(job)
        except QueueFull as exc:
            retry = self.config.retry_after_s
            raise APIError(503, f"The server is overloaded ({exc}); retry after {retry} s.", type="server_error",
                           code="overloaded", headers={"Retry-After": str(retry)}) from exc

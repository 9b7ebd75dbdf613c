"""The OpenAI-compatible HTTP API (FastAPI) and its Prometheus metrics."""

from specasr_vllm.server.app import build_app

__all__ = ["build_app"]

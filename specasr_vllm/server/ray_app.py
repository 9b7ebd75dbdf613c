"""The OpenAI-compatible server as a Ray Serve application: one engine per replica, Serve in front.

Each replica builds the same FastAPI app as ``specasr serve`` (``build_app``) around its own
``Transcriber``; Serve's proxy spreads requests over replicas, autoscales them, and replaces one
that dies. Metrics go through Ray's metrics agent (``metrics_backend="ray"``), so Prometheus sees
every replica. Run it with ``serve run deploy/serve_config.yaml``, ``specasr ray-serve --address ...``,
or a KubeRay ``RayService`` (``deploy/kuberay-rayservice.yaml``).
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from specasr_vllm.config import DEFAULT_DRAFT, DEFAULT_MODEL, EngineConfig, ServerConfig, SpecConfig
from specasr_vllm.engine import Transcriber
from specasr_vllm.errors import InvalidRequestError
from specasr_vllm.server.app import build_app

DEPLOYMENT = "SpecASRServer"
DEFAULT_AUTOSCALING = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}


@serve.deployment(
    name=DEPLOYMENT,
    autoscaling_config=DEFAULT_AUTOSCALING,
    max_ongoing_requests=32,  # beyond this Serve queues at the proxy; the replica's own queue bounds the rest
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=5,
)
@serve.ingress()
class SpecASRServer:
    def __init__(self, engine: dict, server: dict):
        method = engine.get("method", "specasr")
        spec = SpecConfig.for_method(method, **engine.get("spec", {}))
        config = EngineConfig(**{k: v for k, v in engine.items() if k != "spec"}, spec=spec)
        self._app = build_app(Transcriber(config), ServerConfig(**server, metrics_backend="ray"))

    def __serve_build_asgi_app__(self):
        return self._app

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose engine thread died is replaced."""
        if not self._app.state.worker.alive:
            raise RuntimeError("the engine thread has stopped")


_ENGINE_ARGS = {"model": str, "draft": str, "method": str, "threads": int, "batch_size": int, "device": str}
_SERVER_ARGS = {"api_key": str, "served_model_name": str, "max_upload_mb": float, "max_audio_seconds": float,
                "max_queue": int}
_SCALING_ARGS = {"min_replicas": int, "max_replicas": int, "target_ongoing_requests": int, "num_cpus": float}


def app_builder(args: dict[str, str]) -> Application:
    """Serve's application builder: ``serve run specasr_vllm.server.ray_app:app_builder model=whisper-base``.

    Accepts the engine's ``model``, ``draft``, ``method``, ``threads``, ``batch_size``, ``device``; the
    server's ``api_key``, ``served_model_name``, ``max_upload_mb``, ``max_audio_seconds``, ``max_queue``;
    and the deployment's ``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, ``num_cpus``
    (a Serve config file's ``deployments:`` section can set those too).
    """
    accepted = {**_ENGINE_ARGS, **_SERVER_ARGS, **_SCALING_ARGS}
    unknown = set(args) - set(accepted)
    if unknown:
        raise InvalidRequestError(f"unknown argument(s) {sorted(unknown)}; accepted: {sorted(accepted)}")
    engine = {"model": DEFAULT_MODEL, "draft": DEFAULT_DRAFT, "method": "specasr"}
    engine.update({k: _ENGINE_ARGS[k](v) for k, v in args.items() if k in _ENGINE_ARGS})
    server = {k: _SERVER_ARGS[k](v) for k, v in args.items() if k in _SERVER_ARGS}
    scaling = {k: _SCALING_ARGS[k](v) for k, v in args.items() if k in _SCALING_ARGS}
    options = {}
    if scaling.keys() - {"num_cpus"}:
        options["autoscaling_config"] = {**DEFAULT_AUTOSCALING, **{k: v for k, v in scaling.items() if k != "num_cpus"}}
    if "num_cpus" in scaling:
        options["ray_actor_options"] = {"num_cpus": scaling["num_cpus"]}
    return SpecASRServer.options(**options).bind(engine, server)

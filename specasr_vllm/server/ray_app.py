"""The OpenAI-compatible server as a Ray Serve application: one engine per replica, Serve in front.

Each replica builds the same FastAPI app as ``specasr serve`` (``build_app``) around its own engine:
the embedded ``Transcriber`` (``engine: embedded``), or one vLLM engine with the SpecASR proposer
(``engine: vllm``: the replica's ``AsyncLLM`` starts its engine-core process beside the replica, as
Ray's own LLM serving places one vLLM engine per replica; it starts and warms up with the app); Serve's proxy spreads requests over replicas, autoscales them, and replaces one
that dies. Metrics go through Ray's metrics agent (``metrics_backend="ray"``; vLLM's own through vLLM's
Ray stat logger), so Prometheus sees every replica: ours as ``ray_specasr_*``, vLLM's as ``ray_vllm_*``. Run it with ``serve run deploy/serve_config.yaml``, ``specasr ray-serve --address ...``,
or a KubeRay ``RayService`` (``deploy/kuberay-rayservice.yaml``).
"""

from __future__ import annotations

import shlex

from ray import serve
from ray.serve import Application

from specasr_vllm.config import DEFAULT_DRAFT, DEFAULT_MODEL, EngineConfig, ServerConfig, SpecConfig
from specasr_vllm.engine import Transcriber
from specasr_vllm.errors import InvalidRequestError
from specasr_vllm.server.app import build_app
from specasr_vllm.server.async_worker import AsyncEngine

DEPLOYMENT = "SpecASRServer"
DEFAULT_AUTOSCALING = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
DEFAULT_ACTOR_OPTIONS = {"num_cpus": 1}


@serve.deployment(
    name=DEPLOYMENT,
    autoscaling_config=DEFAULT_AUTOSCALING,
    max_ongoing_requests=32,  # beyond this Serve queues at the proxy; the replica's own queue bounds the rest
    ray_actor_options=dict(DEFAULT_ACTOR_OPTIONS),
    health_check_period_s=5,
)
@serve.ingress()
class SpecASRServer:
    def __init__(self, engine: dict, server: dict):
        self._app = build_app(build_engine(engine), ServerConfig(**server, metrics_backend="ray"))

    def __serve_build_asgi_app__(self):
        return self._app

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose engine thread died is replaced."""
        if not self._app.state.worker.alive:
            raise RuntimeError("the engine thread has stopped")


def build_engine(engine: dict) -> Transcriber | AsyncEngine:
    """The replica's engine from ``parse_args``' engine settings (the embedded one warmed up here; vLLM's
    starts and warms up with the app)."""
    settings = dict(engine)
    kind, method, spec = settings.pop("engine", "embedded"), settings.get("method", "specasr"), settings.pop("spec", {})
    if kind == "vllm":
        from specasr_vllm.vllm_plugin.serving import VLLMEngine

        return VLLMEngine.build(settings["model"], method, draft=settings.get("draft"), spec=spec,
                                eager=not settings.get("compile", True), batch_size=settings.get("batch_size"),
                                extra=shlex.split(settings.get("vllm_args", "")), ray_metrics=True)
    transcriber = Transcriber(EngineConfig(**settings, spec=SpecConfig.for_method(method, **spec)))
    transcriber.warm()  # compiled steps before the replica takes traffic (a no-op with compile: false)
    return transcriber


def _flag(value: str | bool) -> bool:
    """A Serve config's switch: YAML gives a bool, ``serve run ... key=value`` and the CLI give text."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise InvalidRequestError(f"expected true or false, got {value!r}")


_ENGINE_ARGS = {"engine": str, "model": str, "draft": str, "method": str, "threads": int, "batch_size": int,
                "device": str, "dtype": str, "encoder_dtype": str, "compile": _flag, "vllm_args": str}
ENGINES = ("embedded", "vllm")
# vLLM has its own ways for these, or none
_EMBEDDED_ONLY = ("threads", "device", "dtype", "encoder_dtype", "tree", "concurrent_draft")
_SPEC_ARGS = {"k": int, "adaptive": _flag, "recycling": _flag, "tree": _flag, "concurrent_draft": _flag}
_SERVER_ARGS = {"api_key": str, "served_model_name": str, "max_upload_mb": float, "max_audio_seconds": float,
                "max_queue": int}
_SCALING_ARGS = {"min_replicas": int, "max_replicas": int, "target_ongoing_requests": int}
_ACTOR_ARGS = {"num_cpus": float, "num_gpus": float}
_ACCEPTED = {**_ENGINE_ARGS, **_SPEC_ARGS, **_SERVER_ARGS, **_SCALING_ARGS, **_ACTOR_ARGS}


def _pick(args: dict, kinds: dict) -> dict:
    """The entries of ``args`` that belong to one group, converted to their types."""
    return {k: kinds[k](v) for k, v in args.items() if k in kinds}


def parse_args(args: dict[str, str]) -> tuple[dict, dict, dict]:
    """``app_builder``'s arguments as (engine, server, deployment options); unknown keys are refused.

    SpecConfig switches (``k``, ``adaptive``, ...) go under the engine's ``spec``; a switch the method
    would ignore (any with ``ar``, ``k`` with adaptive ``specasr``) is refused rather than dropped.
    """
    unknown = set(args) - set(_ACCEPTED)
    if unknown:
        raise InvalidRequestError(f"unknown argument(s) {sorted(unknown)}; accepted: {sorted(_ACCEPTED)}")
    engine = {"model": DEFAULT_MODEL, "draft": DEFAULT_DRAFT, "method": "specasr", **_pick(args, _ENGINE_ARGS)}
    spec = _pick(args, _SPEC_ARGS)
    kind = engine.get("engine", "embedded")
    if kind not in ENGINES:
        raise InvalidRequestError(f"unknown engine {kind!r}; choose from {', '.join(ENGINES)}")
    if kind == "vllm":
        given = sorted(name for name in _EMBEDDED_ONLY if name in args)
        if given:
            raise InvalidRequestError(f"{given} do not apply to engine vllm (see specasr serve --engine vllm --help)")
    elif "vllm_args" in engine:
        raise InvalidRequestError("vllm_args needs engine: vllm")
    if spec and engine["method"] == "ar":
        raise InvalidRequestError(f"{sorted(spec)} have no effect with method 'ar', which drafts nothing")
    if "k" in spec and engine["method"] == "specasr" and spec.get("adaptive", True):
        raise InvalidRequestError("k sets a fixed draft length; with method 'specasr' add adaptive: false")
    if spec:
        engine["spec"] = spec
    scaling, actor = _pick(args, _SCALING_ARGS), _pick(args, _ACTOR_ARGS)
    options = {}
    if scaling:
        options["autoscaling_config"] = {**DEFAULT_AUTOSCALING, **scaling}
    if actor:
        options["ray_actor_options"] = {**DEFAULT_ACTOR_OPTIONS, **actor}
    return engine, _pick(args, _SERVER_ARGS), options


def app_builder(args: dict[str, str]) -> Application:
    """Serve's application builder: ``serve run specasr_vllm.server.ray_app:app_builder model=whisper-base``.

    Accepts ``engine`` (``embedded``, the default, or ``vllm``); the engine's ``model``, ``draft``, ``method``,
    ``threads``, ``batch_size``, ``device``, ``dtype``, ``encoder_dtype``, ``compile`` (embedded only: ``threads``,
    ``device``, ``dtype``, ``encoder_dtype``; vLLM only: ``vllm_args``, more vLLM engine options in one string); its
    SpecConfig switches ``k``, ``adaptive``, ``recycling``, ``tree``, ``concurrent_draft``; the server's
    ``api_key``, ``served_model_name``, ``max_upload_mb``, ``max_audio_seconds``, ``max_queue``; and the
    deployment's ``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, ``num_cpus``, ``num_gpus``
    (a Serve config file's ``deployments:`` section can set those too).
    """
    engine, server, options = parse_args(args)
    return SpecASRServer.options(**options).bind(engine, server)

"""The server's metrics, defined once, exported two ways.

- Standalone (``specasr serve``): prometheus-client in vLLM's naming style (``specasr:`` prefix,
  seconds, ``_total`` counters), one registry per app, scraped at ``/metrics``.
- Ray Serve replicas: the same metrics through ``ray.util.metrics``, so every node's Ray metrics
  agent exports all its replicas together (a scrape of ``/metrics`` through Serve's proxy would see
  one random replica). Ray forbids ``:`` in names and adds its ``ray_`` namespace:
  ``specasr:requests`` becomes ``ray_specasr_requests``. Ray's agent forgets a gauge series that
  has not been set for two report intervals (that is how it drops dead workers), so the replica
  re-sends its gauges' last values every few seconds, and starts them at zero.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import prometheus_client as prom

from specasr_vllm.speculation.stats import SpecStats

prom.disable_created_metrics()  # as vLLM does: no ``*_created`` series beside every counter

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
_LENGTH_BUCKETS = tuple(float(n) for n in range(25))


@dataclass(frozen=True)
class _Metric:
    attr: str
    kind: str  # counter | gauge | histogram
    name: str
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


METRICS = (
    _Metric("requests", "counter", "specasr:requests", "Finished HTTP requests by endpoint and status code.",
          ("endpoint", "status")),
    _Metric("latency", "histogram", "specasr:e2e_request_latency_seconds", "Time from request to last byte.",
          ("endpoint",), _LATENCY_BUCKETS),
    _Metric("ttft", "histogram", "specasr:time_to_first_token_seconds", "Streams: time from request to the first text.",
          (), _LATENCY_BUCKETS),
    _Metric("audio_seconds", "counter", "specasr:audio_seconds", "Seconds of audio transcribed."),
    _Metric("rtf", "histogram", "specasr:real_time_factor", "Engine time over audio duration, per request.",
          (), _RTF_BUCKETS),
    _Metric("waiting", "gauge", "specasr:num_requests_waiting", "Requests queued for the engine."),
    _Metric("running", "gauge", "specasr:num_requests_running", "Requests in the engine's current batch."),
    _Metric("generation_tokens", "counter", "specasr:generation_tokens", "Tokens generated."),
    _Metric("target_passes", "counter", "specasr:target_passes", "Target decoder passes that emitted tokens (prefill included)."),
    _Metric("drafts", "counter", "specasr:spec_decode_num_drafts", "Verification passes that checked a draft."),
    _Metric("draft_tokens", "counter", "specasr:spec_decode_num_draft_tokens", "Drafted tokens verified."),
    _Metric("accepted_tokens", "counter", "specasr:spec_decode_num_accepted_tokens", "Drafted tokens accepted."),
    _Metric("recycled_tokens", "counter", "specasr:spec_decode_num_recycled_tokens",
          "Accepted tokens that came from draft recycling."),
    _Metric("draft_steps", "counter", "specasr:spec_decode_num_draft_steps", "Sequential draft model steps."),
    _Metric("acceptance_length", "histogram", "specasr:spec_decode_acceptance_length",
          "Accepted drafted tokens per verification pass.", (), _LENGTH_BUCKETS),
)


class _RayMetric:
    """prometheus-client's ``labels(...).inc/set/observe`` over a ``ray.util.metrics`` metric."""

    def __init__(self, metric, keys: tuple[str, ...], tags: dict[str, str] | None = None):
        self.metric, self.keys, self.tags = metric, keys, tags

    def labels(self, *values: str) -> _RayMetric:
        return _RayMetric(self.metric, self.keys, dict(zip(self.keys, values)))

    def inc(self, amount: float = 1.0) -> None:
        if amount > 0:  # Ray's counters refuse zero
            self.metric.inc(amount, tags=self.tags)

    def set(self, value: float) -> None:
        self.metric.set(value, tags=self.tags)

    def observe(self, value: float) -> None:
        self.metric.observe(value, tags=self.tags)


class _RayGauge(_RayMetric):
    """A Ray gauge that remembers its values so they can be re-sent before Ray's agent expires them."""

    def __init__(self, metric, keys: tuple[str, ...], tags: dict[str, str] | None = None,
                 values: dict[tuple, float] | None = None):
        super().__init__(metric, keys, tags)
        self.values = {} if values is None else values  # shared by every ``labels(...)`` child

    def labels(self, *values: str) -> _RayGauge:
        return _RayGauge(self.metric, self.keys, dict(zip(self.keys, values)), self.values)

    def set(self, value: float) -> None:
        self.values[tuple(sorted((self.tags or {}).items()))] = value
        super().set(value)

    def resend(self) -> None:
        for tags, value in list(self.values.items()):
            self.metric.set(value, tags=dict(tags) or None)


_GAUGE_RESEND_S = 2.0  # well inside Ray's expiry (two report intervals, at least 2 s)


def _keep_sending(gauges: list[_RayGauge]) -> None:
    while True:
        time.sleep(_GAUGE_RESEND_S)
        for gauge in gauges:
            gauge.resend()


def ray_name(spec_name: str) -> str:
    return spec_name.replace(":", "_")


class Metrics:
    def __init__(self, backend: str = "prometheus") -> None:
        self.backend = backend
        self.registry = prom.CollectorRegistry()
        for metric in METRICS:
            setattr(self, metric.attr, self._make(metric))
        if backend == "ray":
            gauges = [getattr(self, metric.attr) for metric in METRICS if metric.kind == "gauge"]
            for gauge in gauges:
                if not gauge.keys:
                    gauge.set(0)
            threading.Thread(target=_keep_sending, args=(gauges,), name="specasr-gauges", daemon=True).start()

    def _make(self, metric: _Metric):
        if self.backend == "ray":
            from ray.util import metrics as ray_metrics

            kwargs = {"description": metric.doc, "tag_keys": metric.labels}
            if metric.kind == "histogram":
                made = ray_metrics.Histogram(ray_name(metric.name), boundaries=[b for b in metric.buckets if b > 0],
                                             **kwargs)
            elif metric.kind == "gauge":
                return _RayGauge(ray_metrics.Gauge(ray_name(metric.name), **kwargs), metric.labels)
            else:
                made = ray_metrics.Counter(ray_name(metric.name), **kwargs)
            return _RayMetric(made, metric.labels)
        cls = {"counter": prom.Counter, "gauge": prom.Gauge, "histogram": prom.Histogram}[metric.kind]
        extra = {"buckets": metric.buckets} if metric.kind == "histogram" else {}
        return cls(metric.name, metric.doc, metric.labels, registry=self.registry, **extra)

    def observe_transcript(self, audio_seconds: float, engine_seconds: float, stats: SpecStats) -> None:
        self.audio_seconds.inc(audio_seconds)
        if audio_seconds > 0:
            self.rtf.observe(engine_seconds / audio_seconds)
        self.generation_tokens.inc(stats.output_tokens)
        self.target_passes.inc(stats.target_passes)
        self.observe_speculation(stats)

    def observe_speculation(self, stats: SpecStats) -> None:
        """The drafting counters of ``stats`` (a request's, or the vLLM proposer's since the last call)."""
        self.drafts.inc(sum(stats.acceptance_lengths.values()))
        self.draft_tokens.inc(stats.drafted_tokens)
        self.accepted_tokens.inc(stats.accepted_tokens)
        self.recycled_tokens.inc(stats.recycled_accepted)
        self.draft_steps.inc(stats.draft_steps)
        for length, passes in stats.acceptance_lengths.items():
            for _ in range(passes):
                self.acceptance_length.observe(length)

    def exposition(self) -> bytes:
        """The standalone registry in Prometheus' text format (empty under Ray: its agent exports)."""
        return prom.generate_latest(self.registry)


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def metric_names() -> set[str]:
    """Every series name the standalone server exports (with counter and histogram suffixes)."""
    return {metric.name + suffix for metric in METRICS for suffix in _SUFFIXES[metric.kind]}

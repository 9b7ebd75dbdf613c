"""Prometheus metrics in vLLM's naming style (``specasr:`` prefix, seconds, ``_total`` counters).

One ``Metrics`` per app, each with its own registry, so several servers (or tests) in one process
never share counters. ``METRIC_NAMES`` is what the Grafana dashboard may query.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from specasr_vllm.spec.stats import SpecStats

disable_created_metrics()  # as vLLM does: no ``*_created`` series beside every counter

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
_LENGTH_BUCKETS = tuple(range(0, 25))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("specasr:requests", "Finished HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("specasr:e2e_request_latency_seconds", "Time from request to last byte.",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("specasr:time_to_first_token_seconds", "Streams: time from request to the first text.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.audio_seconds = Counter("specasr:audio_seconds", "Seconds of audio transcribed.", registry=r)
        self.rtf = Histogram("specasr:real_time_factor", "Engine time over audio duration, per request.",
                             buckets=_RTF_BUCKETS, registry=r)
        self.waiting = Gauge("specasr:num_requests_waiting", "Requests queued for the engine.", registry=r)
        self.running = Gauge("specasr:num_requests_running", "Requests in the engine's current batch.", registry=r)
        self.generation_tokens = Counter("specasr:generation_tokens", "Tokens generated.", registry=r)
        self.target_passes = Counter("specasr:target_passes", "Target decoder passes after prefill.", registry=r)
        self.drafts = Counter("specasr:spec_decode_num_drafts", "Verification passes that checked a draft.",
                              registry=r)
        self.draft_tokens = Counter("specasr:spec_decode_num_draft_tokens", "Drafted tokens verified.", registry=r)
        self.accepted_tokens = Counter("specasr:spec_decode_num_accepted_tokens", "Drafted tokens accepted.",
                                       registry=r)
        self.recycled_tokens = Counter("specasr:spec_decode_num_recycled_tokens",
                                       "Accepted tokens that came from draft recycling.", registry=r)
        self.tree_nodes = Counter("specasr:spec_decode_num_tree_nodes", "Draft tree nodes verified.", registry=r)
        self.draft_steps = Counter("specasr:spec_decode_num_draft_steps", "Sequential draft model steps.", registry=r)
        self.acceptance_length = Histogram("specasr:spec_decode_acceptance_length",
                                           "Accepted drafted tokens per verification pass.",
                                           buckets=_LENGTH_BUCKETS, registry=r)

    def observe_transcript(self, audio_seconds: float, engine_seconds: float, stats: SpecStats) -> None:
        self.audio_seconds.inc(audio_seconds)
        if audio_seconds > 0:
            self.rtf.observe(engine_seconds / audio_seconds)
        self.generation_tokens.inc(stats.output_tokens)
        self.target_passes.inc(stats.target_passes)
        self.drafts.inc(sum(stats.acceptance_lengths.values()))
        self.draft_tokens.inc(stats.drafted_tokens)
        self.accepted_tokens.inc(stats.accepted_tokens)
        self.recycled_tokens.inc(stats.recycled_accepted)
        self.tree_nodes.inc(stats.tree_nodes)
        self.draft_steps.inc(stats.draft_steps)
        for length, passes in stats.acceptance_lengths.items():
            for _ in range(passes):
                self.acceptance_length.observe(length)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def metric_names() -> set[str]:
    """Every series name the server exports (with their counter and histogram suffixes)."""
    return {metric.name + suffix for metric in Metrics().registry.collect() for suffix in _SUFFIXES[metric.type]}

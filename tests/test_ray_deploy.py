"""The Ray Serve deployment on a real local Ray cluster (127.0.0.1, started here, stopped after).

Deployed with the README's ``specasr ray-serve`` command, once per engine (embedded, then vLLM): two replicas; transcripts through Serve's
HTTP proxy equal offline ones; one replica killed (SIGKILL) mid-load is replaced by Serve and every
request ends in success (client retries counted and printed); the replicas' metrics reach Ray's
metrics agent under the names the Grafana dashboard queries.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import ray
from ray import serve
from test_deploy_files import dashboard_metrics
from test_server import free_port

from specasr_vllm.server.ray_app import DEPLOYMENT

pytestmark = pytest.mark.real

BIN = Path(sys.executable).parent
REPLICA = f"ServeReplica:specasr:{DEPLOYMENT}"


@pytest.fixture(scope="module", params=["embedded", "vllm"])
def cluster(request):
    """A local cluster serving two replicas of one engine: the embedded one, then (a fresh cluster) vLLM's."""
    engine = request.param
    if engine == "vllm":
        pytest.importorskip("vllm")
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    # metrics reported every second: Ray's agent then expires a gauge not re-sent within 2 s; vLLM's KV cache
    # in GiB (Whisper's 448 positions need little), so two replicas' engines fit beside each other
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_metrics_report_interval_ms": "1000",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    engine_flags = ["--engine", "vllm", "--eager"] if engine == "vllm" else ["--threads", "1"]
    subprocess.run([BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--num-cpus=4", "--include-dashboard=false", f"--metrics-export-port={metrics_port}",
                    f"--temp-dir={temp}"], check=True, env=env, capture_output=True, timeout=120)
    address = f"127.0.0.1:{port}"
    try:
        deploy = subprocess.run(
            [BIN / "specasr", "ray-serve", "--address", address, "--http-host", "127.0.0.1", "--http-port",
             str(http_port), "--min-replicas", "2", "--max-replicas", "2", "--num-cpus", "1", *engine_flags],
            env=env, capture_output=True, text=True, timeout=600, check=False)
        assert deploy.returncode == 0, deploy.stderr[-3000:]
        assert f"serving on http://127.0.0.1:{http_port}/v1" in deploy.stdout
        ray.init(address=address, logging_level="ERROR")  # this process watches Serve's status
        yield {"address": address, "url": f"http://127.0.0.1:{http_port}", "metrics": f"http://127.0.0.1:{metrics_port}",
               "engine": engine}
    finally:
        if ray.is_initialized():
            serve.shutdown()  # also forgets this process's Serve client, bound to this cluster's controller
        ray.shutdown()
        subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True, timeout=120, check=False)


def replicas() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if any(REPLICA in part for part in p.info["cmdline"] or [])]


def test_transcripts_through_serve_equal_offline(cluster, manifest, base_ar):
    client = openai.OpenAI(base_url=f"{cluster['url']}/v1", api_key="unused")
    entries = [e for e in manifest if e.language == "en"][:6]
    with ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda e: client.audio.transcriptions.create(
            file=(e.audio.name, e.audio.read_bytes()), model="whisper-1", language="en").text, entries))
    assert texts == [base_ar[e.id].text for e in entries]
    events = list(client.audio.transcriptions.create(file=(entries[0].audio.name, entries[0].audio.read_bytes()),
                                                     model="whisper-1", language="en", stream=True))
    assert events[-1].type == "transcript.text.done" and events[-1].text == base_ar[entries[0].id].text
    assert len(replicas()) == 2


def test_replica_metrics_reach_rays_agent_under_the_dashboards_names(cluster, manifest):
    """Runs before the fault test: Ray's agent drops the series of a killed replica. With the vLLM engine,
    vLLM's own series (its Ray stat logger) arrive too, speculative decoding's among them."""
    ours = dashboard_metrics("ray_specasr_")
    vllms = {"ray_vllm_num_requests_running", "ray_vllm_spec_decode_num_drafts_total"} \
        if cluster["engine"] == "vllm" else set()
    entry = next(e for e in manifest if e.language == "en")
    client = openai.OpenAI(base_url=f"{cluster['url']}/v1", api_key="unused")
    list(client.audio.transcriptions.create(file=(entry.audio.name, entry.audio.read_bytes()), model="whisper-1",
                                            language="en", stream=True))  # time to first token
    deadline, exported = time.time() + 90, set()
    while time.time() < deadline and not ours | vllms <= (exported := _exported(cluster)):
        time.sleep(2)
    assert ours | vllms <= exported, sorted((ours | vllms) - exported)
    # idle for three times Ray's gauge expiry: our queue gauges must still be there (we re-send them; vLLM
    # sets its gauges only while it steps, so Ray's agent may drop those until the next request)
    time.sleep(6)
    assert ours <= _exported(cluster), sorted(ours - _exported(cluster))


def _exported(cluster) -> set[str]:
    text = httpx.get(f"{cluster['metrics']}/metrics", timeout=10).text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith(("ray_specasr_", "ray_vllm_"))}


def test_killed_replica_is_replaced_and_every_request_succeeds(cluster, manifest, base_ar):
    client = openai.OpenAI(base_url=f"{cluster['url']}/v1", api_key="unused", max_retries=0, timeout=300)
    entries = [e for e in manifest if e.language == "en"][:16]
    retries, lock, done = [0], threading.Lock(), [0]

    def one(e):
        for _ in range(10):
            try:
                text = client.audio.transcriptions.create(file=(e.audio.name, e.audio.read_bytes()),
                                                          model="whisper-1", language="en").text
                with lock:
                    done[0] += 1
                return text
            except (openai.APIConnectionError, openai.InternalServerError, openai.APIStatusError) as exc:
                if isinstance(exc, openai.APIStatusError) and exc.status_code < 500:
                    raise
                with lock:
                    retries[0] += 1
                time.sleep(1)
        raise AssertionError(f"{e.id}: failed 10 times")

    victim = replicas()[0]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, e) for e in entries]
        while done[0] < 4:
            time.sleep(0.1)
        killed_at = time.perf_counter()
        os.kill(victim.pid, signal.SIGKILL)
        down, recovered = _time_to_recover(killed_at)  # polls Serve (from this thread) while the load goes on
        texts = [f.result() for f in futures]
    print(f"\nfault test: {len(entries)} requests sent, {retries[0]} retried, 0 failed; Serve saw the replica "
          f"down {down:.1f} s after SIGKILL and had 2 RUNNING replicas again {recovered:.1f} s after it")
    assert texts == [base_ar[e.id].text for e in entries]


def _time_to_recover(killed_at: float) -> tuple[float, float]:
    """Seconds from the kill until Serve reports fewer than 2 running replicas, and until 2 again."""
    down = None
    while time.perf_counter() - killed_at < 240:
        states = serve.status().applications["specasr"].deployments[DEPLOYMENT].replica_states
        running = states.get("RUNNING", 0)
        if down is None and running < 2:
            down = time.perf_counter() - killed_at
        if down is not None and running == 2:
            return down, time.perf_counter() - killed_at
        time.sleep(0.25)
    raise AssertionError(f"Serve did not bring the replicas back to 2 running (down after {down} s)")

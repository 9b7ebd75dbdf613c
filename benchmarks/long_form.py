"""Long audio through both engines: the dev set's files over 30 s, decoded by Whisper's long form (windows from
seek points, with timestamps) in the embedded engine and in our server's vLLM engine, AR and SpecASR.

    python -m benchmarks.long_form                       # English long files, both engines, ar and specasr
    python -m benchmarks.long_form --language "" --eager # every long file, vLLM without torch.compile

One process: each engine is built, warmed up (``Transcriber.warm``; ``VLLMEngine.warm``), then decodes every
file once untimed (first-call compilation) and ``--reps`` times timed, one file at a time (medians). Each
row's text and segments are checked against the embedded AR row, and each SpecASR row's tokens against its
own engine's AR (the lossless promise). Results: ``benchmarks/results/long-form-engines.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.run import RESULTS, machine
from specasr_vllm.audio import decode_audio
from specasr_vllm.config import DEFAULT_MODEL, DecodeOptions, EngineConfig, SpecConfig, default_manifest
from specasr_vllm.engine import Transcriber, Transcript
from specasr_vllm.evaluation import read_manifest

LONG_S = 30.0
ROWS = ("embedded-ar", "embedded-specasr", "vllm-ar", "vllm-specasr")


def run_embedded(method: str, files: list, reps: int, eager: bool) -> tuple[list[Transcript], list[float]]:
    engine = Transcriber(EngineConfig(model=DEFAULT_MODEL, method=method, batch_size=1, compile=not eager,
                                      spec=SpecConfig.for_method(method)))
    engine.warm()

    def once(audio, language):
        return engine.transcribe([audio], language=language)[0]

    return _timed(once, files, reps)


def run_vllm(method: str, files: list, reps: int, eager: bool) -> tuple[list[Transcript], list[float]]:
    from specasr_vllm.vllm_plugin.serving import VLLMEngine

    engine = VLLMEngine.build(DEFAULT_MODEL, method, eager=eager)
    engine.start()
    loop = asyncio.new_event_loop()  # one loop for the engine's life: AsyncLLM's output task lives on it
    try:
        loop.run_until_complete(engine.warm())
        return _timed(lambda audio, language: loop.run_until_complete(engine.transcribe(audio, language, DecodeOptions())),
                      files, reps)
    finally:
        engine.shutdown()
        pending = asyncio.all_tasks(loop)  # AsyncLLM's output task: cancelled before its loop closes
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()


def _timed(once, files: list, reps: int) -> tuple[list[Transcript], list[float]]:
    """Each file once untimed, then ``reps`` timed passes over the files; the last pass's transcripts and
    each file's median seconds."""
    for audio, language in files:
        once(audio, language)
    seconds = [[] for _ in files]
    outs = []
    for _ in range(reps):
        outs = []
        for i, (audio, language) in enumerate(files):
            t0 = time.perf_counter()
            outs.append(once(audio, language))
            seconds[i].append(time.perf_counter() - t0)
    return outs, [statistics.median(s) for s in seconds]


def _times(t: Transcript) -> list[tuple[float, float]]:
    return [(round(s.start, 2), round(s.end, 2)) for s in t.segments]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", default=str(default_manifest()))
    p.add_argument("--language", default="en", help="only long files of this language ('' for all)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="both engines without torch.compile")
    p.add_argument("--out", default=str(RESULTS / "long-form-engines"))
    args = p.parse_args(argv)
    entries = [e for e in read_manifest(Path(args.manifest), language=args.language or None) if e.duration > LONG_S]
    if not entries:
        raise SystemExit("no files over 30 s in the manifest for that language")
    files = [(decode_audio(e.audio), e.language) for e in entries]
    rows = [r for r in args.rows.split(",") if r]
    if unknown := set(rows) - set(ROWS):
        raise SystemExit(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    results = {}
    for row in rows:
        engine, method = row.split("-", 1)
        outs, seconds = (run_embedded if engine == "embedded" else run_vllm)(method, files, args.reps, args.eager)
        results[row] = {"seconds": dict(zip([e.id for e in entries], seconds)), "total_s": sum(seconds),
                        "transcripts": outs}
        print(f"{row}: {sum(seconds):.2f} s", flush=True)
    reference = results.get("embedded-ar")
    summary = {}
    for row, r in results.items():
        engine = row.split("-", 1)[0]
        own_ar = results.get(f"{engine}-ar")
        summary[row] = {
            "total_s": r["total_s"], "seconds": r["seconds"],
            "speedup_vs_own_ar": own_ar["total_s"] / r["total_s"] if own_ar else None,
            "tokens_identical_to_own_ar": None if own_ar is None else
            [t.tokens for t in r["transcripts"]] == [t.tokens for t in own_ar["transcripts"]],
            "same_text_as_embedded_ar": None if reference is None else
            {e.id: t.text == ref.text for e, t, ref in zip(entries, r["transcripts"], reference["transcripts"])},
            "same_segment_times_as_embedded_ar": None if reference is None else
            {e.id: _times(t) == _times(ref) for e, t, ref in zip(entries, r["transcripts"], reference["transcripts"])},
        }
    info = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(), "eager": args.eager,
            "reps": args.reps, "files": {e.id: e.duration for e in entries}}
    Path(args.out).with_suffix(".json").write_text(json.dumps({"info": info, "rows": summary}, indent=1))
    Path(args.out).with_suffix(".md").write_text(markdown(summary, info))
    print(markdown(summary, info))


def markdown(summary: dict, info: dict) -> str:
    def mark(flags: dict | None) -> str:
        return "-" if flags is None else f"{sum(flags.values())}/{len(flags)}"

    lines = [f"# Long audio, both engines ({info['date']})", "",
             (f"{len(info['files'])} files over 30 s ({sum(info['files'].values()):.0f} s of audio), one at a time, "
             f"median of {info['reps']}; {'eager' if info['eager'] else 'compiled'}; {info['machine']['cpu']}, "
             f"{info['machine']['cores']} cores."), "",
             "| row | seconds | x own AR | tokens = own AR | text = embedded AR | segment times = embedded AR |",
             "|---|---|---|---|---|---|"]
    for row, s in summary.items():
        speed = "-" if s["speedup_vs_own_ar"] is None else f"{s['speedup_vs_own_ar']:.2f}"
        lines.append(f"| {row} | {s['total_s']:.2f} | {speed} | {s['tokens_identical_to_own_ar']} | "
                     f"{mark(s['same_text_as_embedded_ar'])} | {mark(s['same_segment_times_as_embedded_ar'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

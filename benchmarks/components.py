"""What each part of a decoding step costs, eager and compiled: alone, and inside the decoding loop.

    python -m benchmarks.components              # 8 dev files for the in-loop rows
    python -m benchmarks.components --limit 3    # a quick look

Alone (medians of ``--reps`` calls, context of 30 tokens, one 30 s window): the encoder, the target's
one-token step, its verification of 8 and 16 tokens (and those as multiples of a step), the draft's
one-token step. In the loop (the engine transcribing dev files at batch 1): the target's passes and
the draft's forwards timed where they run (all, and split into one-token calls, which greedy steps and
catch-up passes with one pending token are, and the wider catch-up passes: pending tokens and recycled
candidates), the once-per-window setup (the target's cross-attention
K/V), and what is left per pass (rules, acceptance, the draft's sync and
bridge, top-k, host transfers): the loop overhead. A step can cost more in the loop than alone
(caches evicted by the other model, allocations), which is why both are reported. Every in-loop row's
tokens are checked against eager AR's on the same files (the command exits 1 if one differs).
Results: ``benchmarks/results/components-<run>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

import torch

from benchmarks.run import RESULTS, machine
from benchmarks.steps import alone
from specasr_vllm.audio import decode_audio
from specasr_vllm.config import DEFAULT_DRAFT, DEFAULT_MODEL, EngineConfig, SpecConfig, default_manifest
from specasr_vllm.engine import Transcriber
from specasr_vllm.evaluation import read_manifest
from specasr_vllm.models.compiled import CompiledWhisper
from specasr_vllm.models.registry import load_model


class _Timer:
    """Within ``with``, sums the calls of and seconds in one method of one object (then removes itself);
    with ``kind`` (a function of the call's arguments), also per kind of call in ``by_kind``."""

    def __init__(self, owner, name: str, kind: Callable[..., str] | None = None):
        self.owner, self.name, self.calls, self.seconds = owner, name, 0, 0.0
        self.kind = kind
        self.by_kind: dict[str, list[float]] = {}  # kind -> [calls, seconds]

    def __enter__(self) -> Self:
        inner = getattr(self.owner, self.name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - t0
                self.seconds += seconds
                self.calls += 1
                if self.kind is not None:
                    tally = self.by_kind.setdefault(self.kind(*args, **kwargs), [0, 0.0])
                    tally[0] += 1
                    tally[1] += seconds

        setattr(self.owner, self.name, timed)  # an instance attribute shadowing the method
        return self

    def __exit__(self, *exc) -> None:
        delattr(self.owner, self.name)


def _draft_call(tokens, *args, **kwargs) -> str:
    """A one-token draft call (a greedy step, or a catch-up pass with one pending token) or a wider one."""
    return "one_token" if tuple(tokens.shape) == (1, 1) else "wider"


def in_loop(engine: Transcriber, audios: list, language: str) -> tuple[dict[str, float], list[list[int]]]:
    """Per-pass costs (ms) while ``engine`` transcribes ``audios`` one at a time, and each audio's tokens."""
    decode_s, passes, tokens, outputs = 0.0, 0, 0, []
    with ExitStack() as timers:
        target = timers.enter_context(_Timer(engine.target.model, "decode"))
        # once per window, not per pass: the target's cross-attention K/V (the draft's encoder and K/V are
        # timed as the transcript's draft_encode, outside its decode time)
        setup = [timers.enter_context(_Timer(engine.target.model, "cross_kv"))]
        draft = timers.enter_context(_Timer(engine.drafter.draft, "choices", _draft_call)) if engine.drafter else None
        for audio in audios:
            out = engine.transcribe([audio], language=language)[0]
            decode_s += out.timings["decode"]
            tokens += len(out.tokens)
            outputs.append(out.tokens)
            passes += out.stats.target_passes
    draft_s = draft.seconds if draft else 0.0
    setup_s = sum(t.seconds for t in setup)
    row = {"tokens": tokens, "target_passes": passes, "decode_ms_per_token": 1e3 * decode_s / tokens,
           "window_setup_ms": 1e3 * setup_s / len(audios), "target_pass_ms": 1e3 * target.seconds / target.calls,
           "loop_overhead_ms_per_pass": 1e3 * (decode_s - setup_s - target.seconds - draft_s) / passes}
    if draft:
        row.update(draft_forward_ms=1e3 * draft.seconds / draft.calls, draft_forwards_per_pass=draft.calls / passes)
        row.update({f"draft_{kind}_ms": 1e3 * seconds / calls for kind, (calls, seconds) in draft.by_kind.items()})
    return row, outputs


def markdown(info: dict, alone_rows: dict, loop_rows: dict) -> str:
    lines = [(f"Run {info['run']}: {info['machine']['torch_threads']} torch threads, {info['machine']['cpu']}, "
              f"target {info['model']}, draft {info['draft']}, load {info['load']}"), "",
             "Alone (ms, medians; context of 30 tokens, one 30 s window):", "",
             ("| path | encoder | target step | verify 8 | verify 16 | verify 8 / step | verify 16 / step "
              "| draft step |"),
             "|---|---|---|---|---|---|---|---|"]
    for name, r in alone_rows.items():
        lines.append(f"| {name} | {r['encoder']:.1f} | {r['target_step']:.2f} | {r['verify_8']:.2f} | "
                     f"{r['verify_16']:.2f} | {r['verify_8'] / r['target_step']:.2f} | "
                     f"{r['verify_16'] / r['target_step']:.2f} | {r.get('draft_step', float('nan')):.2f} |")
    lines += ["", f"In the loop ({info['files']} dev files, batch 1; ms):", "",
              ("| method | identical to ar-eager | tokens | target passes | decode / token | setup / window | target pass "
               "| draft forward | one-token draft call | wider catch-up pass | draft forwards / pass "
               "| loop overhead / pass |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in loop_rows.items():
        lines.append(f"| {name} | {r['identical_to_ar_eager']} | {r['tokens']} | {r['target_passes']} | "
                     f"{r['decode_ms_per_token']:.2f} | "
                     f"{r['window_setup_ms']:.1f} | "
                     f"{r['target_pass_ms']:.2f} | {r.get('draft_forward_ms', float('nan')):.2f} | "
                     f"{r.get('draft_one_token_ms', float('nan')):.2f} | {r.get('draft_wider_ms', float('nan')):.2f} | "
                     f"{r.get('draft_forwards_per_pass', 0):.2f} | {r['loop_overhead_ms_per_pass']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.components", description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, default=8, help="dev files for the in-loop rows")
    p.add_argument("--reps", type=int, default=30, help="timed calls per isolated figure")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--draft", default=DEFAULT_DRAFT)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, draft_asr = load_model(args.model), load_model(args.draft)
    entries = read_manifest(default_manifest(), language="en", max_duration=30.0)[: args.limit]
    audios = [decode_audio(e.audio) for e in entries]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    engines = {}
    for compiled in (False, True):
        for method in ("ar", "specasr"):
            # the compiled specasr engine shares the compiled ar engine's model: each shape compiled once
            model = engines[("ar", True)].target if (method, compiled) == ("specasr", True) else target
            engines[(method, compiled)] = Transcriber(
                EngineConfig(method=method, batch_size=1, compile=compiled, spec=SpecConfig.for_method(method)),
                target=model, draft=draft_asr if method != "ar" else None)
    compiled_model = engines[("ar", True)].target.model
    assert isinstance(compiled_model, CompiledWhisper)
    print(f"compiling: {compiled_model.warm(rows=1):.1f} s", file=sys.stderr)
    alone_rows = {"eager": alone(target.model, engines[("specasr", False)].drafter.draft, args.reps),
                  "compiled": alone(compiled_model, engines[("specasr", True)].drafter.draft, args.reps)}
    loop_rows, reference = {}, None
    for (method, compiled), engine in engines.items():  # eager AR first: the reference
        engine.transcribe([audios[0]], language="en")  # warm-up
        row, outputs = in_loop(engine, audios, "en")
        reference = outputs if reference is None else reference
        loop_rows[f"{method}{'' if compiled else '-eager'}"] = {**row, "identical_to_ar_eager": outputs == reference}
    run = args.name or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    info = {"run": run, "files": len(entries), "model": args.model, "draft": args.draft, "machine": machine(),
            "load": load, "compile_s": compiled_model.compiled}
    table = markdown(info, alone_rows, loop_rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"components-{run}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"info": {**info, "compile_s": {str(k): v for k, v in info["compile_s"].items()}},
         "alone": alone_rows, "in_loop": loop_rows}, indent=1))
    stem.with_suffix(".md").write_text(table)
    print(table)
    print("wrote", stem.with_suffix(".json"), stem.with_suffix(".md"))
    differ = [name for name, r in loop_rows.items() if not r["identical_to_ar_eager"]]
    if differ:
        print(f"FAILED: tokens differ from eager AR's: {', '.join(differ)}", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

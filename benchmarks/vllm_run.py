"""vLLM rows of the benchmark: vLLM alone, vLLM's ngram speculation and vLLM + SpecASR, side by side.

    python -m benchmarks.vllm_run                  # every English dev file; about 20 minutes here
    python -m benchmarks.vllm_run --every 8 --methods ar specasr   # a quick look

Each method runs in its own process with its own engine (``specasr_vllm.vllm_plugin.offline``: one
warm-up request, then all files submitted at once, then one at a time), on the same files, in the
same session. Every method's tokens are checked against vLLM alone. Results:
``benchmarks/results/vllm-<run>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.run import RESULTS, machine
from specasr_vllm.vllm_plugin.offline import METHODS
from specasr_vllm.vllm_plugin.version import installed_vllm


def run_method(method: str, args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"{method}.json"
    cmd = [sys.executable, "-m", "specasr_vllm.vllm_plugin.offline", "--method", method, "--language", "en",
           "--every", str(args.every), "--sequential", "--out", str(out)]
    print(f"vllm-{method} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"vllm-{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def summarise(reports: dict[str, dict]) -> dict[str, dict]:
    ar = reports.get("ar")
    rows = {}
    for method, r in reports.items():
        row = {"startup_s": r["startup_s"], "batched_s": r["batched_s"], "sequential_s": r["grouped_s"],
               "files": len(r["tokens"]), "tokens": sum(len(t) for t in r["tokens"].values()),
               "identical_to_vllm_ar": None if ar is None else r["tokens"] == ar["tokens"],
               "sequential_identical": r["grouped_identical"]}
        if ar is not None:
            row["sequential_speedup"] = ar["grouped_s"] / r["grouped_s"]
            row["batched_speedup"] = ar["batched_s"] / r["batched_s"]
        spec = r.get("spec_decode", {})
        drafts, drafted = spec.get("vllm:spec_decode_num_drafts"), spec.get("vllm:spec_decode_num_draft_tokens")
        accepted = spec.get("vllm:spec_decode_num_accepted_tokens")
        if drafts:
            row["draft_acceptance_rate"] = accepted / drafted
            row["mean_acceptance_length"] = 1 + accepted / drafts
        if "proposer" in r:
            p = r["proposer"]
            row.update(proposer_ms_per_step=p["ms_per_step"], proposer_ms_per_drafting_step=p["ms_per_drafting_step"],
                       recycled_accepted=p["recycled_accepted"], draft_steps=p["draft_steps"], steps=p["steps"],
                       drafting_steps=p["drafting_steps"])
        rows[f"vllm-{method}"] = row
    return rows


def markdown(rows: dict[str, dict], info: dict) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"# vLLM rows ({info['date']})", "",
             (f"vLLM {info['vllm']}, {info['files']} English dev files, {info['machine']['cpu']}, "
              f"{info['machine']['cores']} cores; whisper-base target, whisper-tiny.en draft; greedy."), "",
             ("| method | one at a time (s) | speedup | all at once (s) | speedup | identical to vLLM AR | "
              "acceptance rate | mean acceptance length | proposer ms/step | ms/drafting step |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['sequential_s']:.1f} | {f(r.get('sequential_speedup'), '.2f')}x | "
                     f"{r['batched_s']:.1f} | {f(r.get('batched_speedup'), '.2f')}x | "
                     f"{r['identical_to_vllm_ar'] and r['sequential_identical']} | "
                     f"{f(r.get('draft_acceptance_rate'), '.1%')} | {f(r.get('mean_acceptance_length'), '.2f')} | "
                     f"{f(r.get('proposer_ms_per_step'), '.1f')} | {f(r.get('proposer_ms_per_drafting_step'), '.1f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["ar", "ngram", "specasr"], choices=METHODS)
    p.add_argument("--every", type=int, default=1, help="every N-th English dev file")
    p.add_argument("--name", default=None, help="results file stem (default: vllm-dev, or vllm-every<N>)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        reports = {m: run_method(m, args, Path(tmp)) for m in args.methods}
    rows = summarise(reports)
    info = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "vllm": installed_vllm(),
            "machine": machine(), "files": len(next(iter(reports.values()))["tokens"])}
    stem = RESULTS / (args.name or ("vllm-dev" if args.every == 1 else f"vllm-every{args.every}"))
    stem.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(markdown(rows, info))
    print(markdown(rows, info))
    bad = [n for n, r in rows.items() if r["identical_to_vllm_ar"] is False or not r["sequential_identical"]]
    if bad:
        print(f"NOT IDENTICAL to vLLM AR: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

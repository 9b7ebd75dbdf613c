"""Transcribe manifest entries with vLLM's offline engine, one method per process, and report JSON.

    python -m specasr_vllm.vllm_plugin.offline --method specasr --language en --every 4 --out run.json
    python -m specasr_vllm.vllm_plugin.offline --method ar --ids ID1 ID2 --eager --out run.json
    python -m specasr_vllm.vllm_plugin.offline --method specasr --language en --group 8 --out run.json

Methods: ``ar`` (vLLM alone), ``ngram`` (vLLM's own prompt-lookup speculation), ``sd`` and
``specasr`` (the SpecASR proposer with fixed or adaptive length). Each run starts its own engine
in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the proposer's statistics can be read back;
the tests and ``benchmarks/vllm_run.py`` start one such process per method. Every method runs on vLLM's
V1 model runner (``launch.variables``: ``VLLM_USE_V2_MODEL_RUNNER=0``), where the plugin applies
Whisper's suppression, so ``ar`` is "vLLM alone" with Whisper's rules on any machine. The report holds
the tokens per entry, seconds with every request submitted at once (``batched``) and, with
``--sequential`` (one request at a time) or ``--group N`` (N at a time), ``grouped_*``: seconds in all
and per entry (a group's time shared among its entries), each request's time to first token and decode
phase from vLLM's own timestamps, vLLM's ``spec_decode`` counters, the proposer's own, and
which model runner ran (``runner``: its class, whether the hooks wrap it, whether suppression was on).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from specasr_vllm.config import DEFAULT_DRAFT, DEFAULT_MODEL, MAX_TARGET_POSITIONS, SpecConfig, default_manifest

METHODS = ("ar", "ngram", "sd", "specasr")


def speculative_config(method: str, k: int) -> dict | None:
    from specasr_vllm.vllm_plugin.launch import speculative_config as ours

    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    return ours(method, k if method == "sd" else SpecConfig.max_draft)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--draft", default=DEFAULT_DRAFT)
    p.add_argument("--k", type=int, default=SpecConfig.k, help="draft length for ngram and sd")
    p.add_argument("--manifest", default=str(default_manifest()))
    p.add_argument("--language", default=None, help="only entries of this language")
    p.add_argument("--every", type=int, default=1, help="every N-th entry")
    p.add_argument("--ids", nargs="*", default=None, help="exactly these entries (instead of --language/--every)")
    p.add_argument("--eager", action="store_true", help="skip torch.compile (faster start, slower steps)")
    p.add_argument("--sequential", action="store_true", help="also time one request at a time (--group 1)")
    p.add_argument("--group", type=int, default=None, help="also time the entries in groups of N submitted together")
    p.add_argument("--plugin-settings", default="{}", help='more specasr.json fields, e.g. \'{"max_batch": 1}\'')
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    from specasr_vllm.vllm_plugin.launch import CPU_KV_FRACTION, serving_dir, variables

    os.environ.update(variables())  # before vLLM reads its environment
    from vllm import LLM, SamplingParams

    from specasr_vllm.audio import decode_audio
    from specasr_vllm.config import VLLMPluginConfig
    from specasr_vllm.evaluation import read_manifest
    from specasr_vllm.vllm_plugin.version import check_vllm, is_cpu_build

    check_vllm()
    everything = read_manifest(Path(args.manifest))
    if args.ids is not None:
        entries = [e for e in everything if e.id in args.ids]
    else:
        entries = [e for e in everything if args.language in (None, e.language)][:: args.every]
    prompts = [{"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (decode_audio(e.audio), 16000)}},
                "decoder_prompt": f"<|startoftranscript|><|{e.language}|><|transcribe|><|notimestamps|>"}
               for e in entries]
    settings = VLLMPluginConfig(draft=args.draft, method="sd" if args.method == "sd" else "specasr",
                                **json.loads(args.plugin_settings))
    t0 = time.perf_counter()
    llm = LLM(str(serving_dir(args.model, settings)), dtype="float32", max_model_len=MAX_TARGET_POSITIONS,
              speculative_config=speculative_config(args.method, args.k), disable_log_stats=False,
              enforce_eager=args.eager,
              **({"gpu_memory_utilization": CPU_KV_FRACTION} if is_cpu_build() else {}))
    report = {"method": args.method, "startup_s": time.perf_counter() - t0, "ids": [e.id for e in entries]}
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TARGET_POSITIONS - 4)
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up: first-call allocations and compilation
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    report["batched_s"] = time.perf_counter() - t0
    report["tokens"] = {e.id: list(o.outputs[0].token_ids) for e, o in zip(entries, outputs)}
    if args.sequential or args.group:
        report["group"] = size = args.group or 1
        grouped, seconds = [], {}
        for start in range(0, len(entries), size):
            t0 = time.perf_counter()
            grouped += llm.generate(prompts[start : start + size], params, use_tqdm=False)
            share = (time.perf_counter() - t0) / len(entries[start : start + size])  # a group's time, per file
            seconds.update({e.id: share for e in entries[start : start + size]})
        report["grouped_s"] = sum(seconds.values())
        report["grouped_per_file_s"] = seconds
        report["grouped_phases_s"] = {e.id: _phases(o) for e, o in zip(entries, grouped)}
        report["grouped_identical"] = all(
            list(o.outputs[0].token_ids) == report["tokens"][e.id] for e, o in zip(entries, grouped))
    report["runner"] = llm.collective_rpc(_runner_facts)[0]
    report["spec_decode"] = {m.name: getattr(m, "value", None) for m in llm.get_metrics() if "spec_decode" in m.name}
    if args.method in ("sd", "specasr"):
        report["proposer"] = llm.collective_rpc(_proposer_stats)[0]
    Path(args.out).write_text(json.dumps(report, indent=1))


def _phases(output) -> dict[str, float] | None:
    """A request's time to its first token (encoder and prompt) and its decode phase (first to last token),
    from vLLM's per-request engine timestamps (kept while its statistics are on)."""
    stats = output.metrics
    if stats is None or not stats.first_token_ts:
        return None
    return {"first_token_s": stats.first_token_ts - stats.scheduled_ts, "decode_s": stats.last_token_ts - stats.first_token_ts}


def _proposer_stats(worker) -> dict:
    return worker.model_runner.drafter.stats()


def _runner_facts(worker) -> dict:
    """Which model runner decoded, whether the plugin's hooks wrap it and whether Whisper's suppression was
    applied (the evidence that "vLLM alone" ran with Whisper's rules)."""
    from specasr_vllm.vllm_plugin.hooks import is_hooked

    runner = worker.model_runner
    kind = type(runner)
    return {"class": f"{kind.__module__}.{kind.__qualname__}", "hooked": is_hooked(runner),
            "suppression": getattr(runner, "_specasr_rules", None) is not None}


if __name__ == "__main__":
    main()

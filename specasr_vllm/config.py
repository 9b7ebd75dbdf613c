"""Configuration in one place: paths, audio constants and defaults, each overridable by environment.

Everything else imports from here instead of repeating a literal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

# --- audio (Whisper's front end; these are properties of the model family, not tunables) ---
SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480 000 samples in one window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3 000 mel frames in one window

# --- decoding ---
MAX_TARGET_POSITIONS = 448  # Whisper's decoder length limit, prefix included

# --- models ---
DEFAULT_MODEL = "whisper-base"
DEFAULT_DRAFT = "whisper-tiny.en"


def cache_dir() -> Path:
    """Where converted models live: ``$SPECASR_CACHE_DIR`` or the user's cache directory."""
    env = os.environ.get("SPECASR_CACHE_DIR")
    return Path(env) if env else Path(platformdirs.user_cache_dir("specasr-vllm"))


def speech_data_dir() -> Path:
    """The bundled dev set: ``$SPECASR_SPEECH_DIR`` or ``../shared/data/speech`` beside the checkout."""
    env = os.environ.get("SPECASR_SPEECH_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "speech"


def default_manifest() -> Path:
    return speech_data_dir() / "manifest.jsonl"


@dataclass
class EngineConfig:
    """How the embedded engine runs: which models, which decoding method, where, how many at once."""

    model: str = DEFAULT_MODEL
    draft: str | None = None
    method: str = "ar"
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8  # 30 s windows encoded and decoded together
    threads: int | None = None  # torch intra-op threads; None keeps torch's default (all cores)

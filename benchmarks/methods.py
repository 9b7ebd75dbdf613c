"""The methods a benchmark run compares: ours (embedded engine), vLLM's engine, and peers (transformers,
faster-whisper).

Each method transcribes one 16 kHz array at a time (``run``) and reports its tokens and timings, so every
method sees the same files in the same process under the same thread count. Ours and vLLM also take a
group of files at once (``run_group``: one batch), for the harness's ``--batch-size``; a group's time is
shared equally among its files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from specasr_vllm.audio import log_mel_spectrogram
from specasr_vllm.config import EngineConfig, SpecConfig, cache_dir
from specasr_vllm.engine import Transcriber
from specasr_vllm.engine.longform import is_long
from specasr_vllm.models import registry
from specasr_vllm.models.registry import ASRModel


@dataclass
class Run:
    tokens: list[int]
    text: str
    total_s: float
    encode_s: float | None = None
    decode_s: float | None = None
    stats: dict = field(default_factory=dict)


class Ours:
    """The embedded engine with one method preset, SpecConfig switches and a batch size."""

    kind = "ours"

    def __init__(self, name: str, method: str, target: ASRModel, draft: ASRModel | None, compile: bool = True,
                 batch_size: int = 1, **spec):
        self.name, self.lossless = name, True
        config = EngineConfig(method=method, batch_size=batch_size, compile=compile,
                              spec=SpecConfig.for_method(method, **spec))
        self.transcriber = Transcriber(config, target=target, draft=draft if method != "ar" else None)

    def warm(self) -> None:
        """Compile what a server compiles before it serves (``Transcriber.warm``: the target's steps, the
        draft's encoder), so the timed files pay for compilation no more than a server's requests do."""
        self.transcriber.warm()

    def run(self, audio: np.ndarray, language: str) -> Run:
        return self.run_group([audio], [language])[0]

    def run_group(self, audios: list[np.ndarray], languages: list[str]) -> list[Run]:
        """The files in one ``transcribe`` call; each is credited an equal share of the call's time."""
        t0 = time.perf_counter()
        outs = self.transcriber.transcribe(audios, language=languages)
        share = (time.perf_counter() - t0) / len(audios)
        phases = self.transcriber.totals
        encode = (phases.get("encode", 0.0) + phases.get("draft_encode", 0.0)) / len(audios)
        return [Run(out.tokens, out.text, share, encode, phases.get("decode", 0.0) / len(audios), out.stats.to_dict())
                for out in outs]


class VLLMOffline:
    """vLLM's offline engine (``specasr_vllm.vllm_plugin.offline``) with or without the SpecASR proposer, in its
    own process, the files submitted ``group`` at a time.

    vLLM needs its own process (and both cores), so it cannot be interleaved with the in-process methods:
    ``prepare`` runs every file once before them, and ``run_entry`` hands back that file's result. One
    request at a time, encode and decode are vLLM's own per-request timestamps (time to the first token,
    then first to last token).
    """

    kind, lossless = "vllm", True  # greedy whisper-base like ours: the identity check applies

    def __init__(self, name: str, method: str, target: ASRModel, group: int = 1):
        self.name, self.method, self.model, self.tokenizer = name, method, target.name, target.tokenizer
        self.group = group
        self.results: dict[str, Run] = {}

    def prepare(self, entries: list, manifest: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "report.json"
            cmd = [sys.executable, "-m", "specasr_vllm.vllm_plugin.offline", "--method", self.method,
                   "--model", self.model, "--manifest", manifest, "--group", str(self.group), "--out", str(out),
                   "--ids", *[e.id for e in entries]]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{self.name} failed:\n{done.stderr[-3000:]}")
            report = json.loads(out.read_text())
        self.startup_s = report["startup_s"]
        self.proposer = report.get("proposer")
        for e in entries:
            tokens = [t for t in report["tokens"][e.id] if t < self.tokenizer.eot]  # text only, as ours reports it
            phases = report["grouped_phases_s"][e.id] if self.group == 1 else None
            self.results[e.id] = Run(tokens, self.tokenizer.decode(tokens).strip(), report["grouped_per_file_s"][e.id],
                                     phases and phases["first_token_s"], phases and phases["decode_s"])

    def run_entry(self, entry) -> Run:
        return self.results[entry.id]


class TransformersGreedy:
    """transformers' ``generate`` (greedy) on the same converted weights: the reference implementation."""

    kind, lossless = "peer", False

    def __init__(self, name: str, target: ASRModel):
        from transformers import WhisperForConditionalGeneration

        self.name = name
        self.model = WhisperForConditionalGeneration.from_pretrained(registry.resolve_model(target.name),
                                                                     dtype=torch.float32).eval()
        self.eot, self.tokenizer = target.tokenizer.eot, target.tokenizer

    @torch.no_grad()
    def run(self, audio: np.ndarray, language: str) -> Run:
        if is_long(len(audio)):  # sequential long-form generate, which encodes window by window itself
            t0 = time.perf_counter()
            out = self.model.generate(log_mel_spectrogram(audio, pad=False)[None], language=language,
                                      task="transcribe", return_timestamps=True)[0].tolist()
            tokens = [t for t in out if t != self.eot]
            return Run(tokens, self.tokenizer.decode(tokens).strip(), time.perf_counter() - t0)
        t0 = time.perf_counter()
        mel = log_mel_spectrogram(audio)[None]
        encoder_outputs = self.model.model.encoder(mel)
        t1 = time.perf_counter()
        out = self.model.generate(encoder_outputs=encoder_outputs, language=language, task="transcribe")[0].tolist()
        t2 = time.perf_counter()
        tokens = [t for t in out if t != self.eot]
        return Run(tokens, self.tokenizer.decode(tokens).strip(), t2 - t0, t1 - t0, t2 - t1)


def _ct2_dir(target: ASRModel) -> Path:
    """faster-whisper wants one model.bin: join the shipped parts once into the cache."""
    source = registry.BUILTIN_MODELS[target.name]()
    out = cache_dir() / "ct2" / target.name
    if not (out / "model.bin").is_file():
        tmp = out.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        with open(tmp / "model.bin", "wb") as f:
            f.writelines(part.read_bytes() for part in source.parts)
        for name in ("config.json", "tokenizer.json", "vocabulary.json", "vocabulary.txt"):
            if (source.config.parent / name).is_file():
                shutil.copy(source.config.parent / name, tmp / name)
        tmp.rename(out)
    return out


class FasterWhisper:
    """faster-whisper greedy (beam 1, no timestamps, no previous-text conditioning): what a CPU user picks."""

    kind, lossless = "peer", False
    apart = True  # its OpenMP threads slow the methods interleaved with it: measured after them (benchmarks.run)

    def __init__(self, name: str, target: ASRModel, compute_type: str, threads: int):
        from faster_whisper import WhisperModel

        self.name = name
        self.model = WhisperModel(str(_ct2_dir(target)), device="cpu", compute_type=compute_type, cpu_threads=threads)

    def run(self, audio: np.ndarray, language: str) -> Run:
        t0 = time.perf_counter()
        segments, _ = self.model.transcribe(audio, language=language, beam_size=1, temperature=0.0,
                                            without_timestamps=True, condition_on_previous_text=False, vad_filter=False)
        segments = list(segments)
        return Run([t for s in segments for t in s.tokens], " ".join(s.text.strip() for s in segments),
                   time.perf_counter() - t0)

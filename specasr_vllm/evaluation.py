"""Word error rate on a manifest, with Whisper's text normalisation (whisper-normalizer) and jiwer.

English uses Whisper's English normaliser (spellings, numbers, contractions); other languages its
basic normaliser (case and punctuation), as in the Whisper paper.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jiwer
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

from specasr_vllm.errors import InvalidRequestError


@dataclass
class ManifestEntry:
    id: str
    audio: Path
    text: str
    language: str
    duration: float


def read_manifest(path: Path, language: str | None = None, max_duration: float | None = None) -> list[ManifestEntry]:
    """Entries of a JSONL manifest (``id``, ``audio`` relative to the manifest, ``text``, ``language``, ``duration_s``)."""
    if not path.is_file():
        raise InvalidRequestError(f"manifest {path} does not exist")
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            entry = ManifestEntry(row["id"], path.parent / row["audio"], row["text"], row.get("language", "en"),
                                  float(row.get("duration_s", 0.0)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InvalidRequestError(f"{path}:{n}: not a manifest line ({exc})") from exc
        if (language is None or entry.language == language) and (max_duration is None or entry.duration <= max_duration):
            entries.append(entry)
    return entries


@cache
def _normalizer(language: str):
    return EnglishTextNormalizer() if language == "en" else BasicTextNormalizer()


def normalize(text: str, language: str) -> str:
    return " ".join(_normalizer(language)(text).split())


@dataclass
class WER:
    errors: int
    words: int

    @property
    def rate(self) -> float:
        return self.errors / self.words if self.words else 0.0


def word_errors(reference: str, hypothesis: str, language: str) -> WER:
    ref, hyp = normalize(reference, language), normalize(hypothesis, language)
    if not ref:
        return WER(len(hyp.split()), 0)
    out = jiwer.process_words(ref, hyp)
    return WER(out.substitutions + out.deletions + out.insertions, len(ref.split()))


def total(wers: list[WER]) -> WER:
    return WER(sum(w.errors for w in wers), sum(w.words for w in wers))

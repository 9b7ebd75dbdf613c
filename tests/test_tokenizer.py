"""Whisper's special tokens and forced prefixes, for the multilingual and the English-only vocabulary."""

from __future__ import annotations

import pytest

from specasr_vllm.errors import InvalidRequestError
from specasr_vllm.models.tokenizer import WhisperTokenizer


@pytest.fixture(scope="module")
def multi(base_dir):
    return WhisperTokenizer.from_dir(base_dir, 51865)


@pytest.fixture(scope="module")
def english(tiny_en_dir):
    return WhisperTokenizer.from_dir(tiny_en_dir, 51864)


def test_multilingual_special_ids(multi):
    assert (multi.eot, multi.sot, multi.translate, multi.transcribe, multi.no_timestamps) == (50257, 50258, 50358, 50359, 50363)
    assert multi.timestamp_begin == 50364
    assert len(multi.language_ids) == 99 and multi.language_ids["en"] == 50259 and multi.language_ids["de"] == 50261


def test_english_only_special_ids(english):
    assert (english.eot, english.sot, english.transcribe, english.no_timestamps) == (50256, 50257, 50358, 50362)
    assert english.prefix(None) == [50257, 50362]


def test_prefixes(multi):
    assert multi.prefix("en") == [50258, 50259, 50359, 50363]
    assert multi.prefix("German", "translate") == [50258, 50261, 50358, 50363]


def test_which_prompts_ask_for_timestamps(multi, english):
    for tok, langs in ((multi, ["en", "de"]), (english, ["en"])):
        for lang in langs:
            for task in ("transcribe", "translate") if tok.multilingual else ("transcribe",):
                assert tok.asks_for_timestamps(tok.prefix(lang, task, True, prompt="earlier words"))
                assert not tok.asks_for_timestamps(tok.prefix(lang, task, False))
    assert not multi.asks_for_timestamps([multi.sot])  # language detection
    assert not multi.asks_for_timestamps([])


@pytest.mark.parametrize("language", ["xx", "klingon", ""])
def test_bad_language(multi, language):
    with pytest.raises(InvalidRequestError, match="unsupported language"):
        multi.prefix(language)


def test_english_only_rejects_other_languages(english):
    with pytest.raises(InvalidRequestError, match="English-only"):
        english.language_code("de")


def test_round_trip_and_special_tokens_dropped(multi, english):
    for tok in (multi, english):
        ids = tok.encode(" Hello, world! Grüße.")
        assert tok.decode(ids + [tok.eot]) == " Hello, world! Grüße."
        assert b"".join(tok.token_bytes[i] for i in ids).decode() == " Hello, world! Grüße."


def test_vocabularies_differ(multi, english):
    """The reason a tiny.en draft needs a bridge for a base target: most ids mean different strings."""
    same = sum(a == b for a, b in zip(multi.token_bytes, english.token_bytes))
    assert same < 1000

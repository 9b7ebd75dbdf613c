"""Whisper's timestamp grammar: hand-made logits, segment splitting, and real-speech parity.

Timestamp decoding must match transformers' reference decoder, and speculative decoding with
timestamps must stay token-identical to autoregressive decoding (the rules are applied per tree node).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_random_hf_dir
from transformers import WhisperForConditionalGeneration

from specasr_vllm.audio import log_mel_spectrogram
from specasr_vllm.config import EngineConfig, SpecConfig
from specasr_vllm.engine import Transcriber
from specasr_vllm.engine.decoded import Decoded
from specasr_vllm.engine.segments import window_segments
from specasr_vllm.models.registry import load_model
from specasr_vllm.models.rules import WhisperRules


@pytest.fixture(scope="module")
def small(tmp_path_factory, base_dir):
    return load_model(str(make_random_hf_dir(tmp_path_factory.mktemp("ts"), base_dir)))


def _logits(vocab: int, values: dict[int, float]) -> torch.Tensor:
    logits = torch.full((1, vocab), -30.0)
    for token, value in values.items():
        logits[0, token] = value
    return logits


def test_timestamp_grammar_on_hand_made_logits(small):
    rules = WhisperRules(small)
    vocab, ts, word = small.model.dims.vocab_size, small.tokenizer.timestamp_begin, 1000

    def pick(context, values):
        return rules.pick(_logits(vocab, values), contexts=[context])[0][0]

    # the first token is a timestamp no later than 1 s, even when text and late timestamps score higher
    assert pick([], {word: 10.0, ts + 70: 20.0, ts + 3: 5.0}) == ts + 3
    # an open segment that just ended on a timestamp: another timestamp (not earlier) or the end
    assert pick([ts + 3, word, ts + 10], {word: 10.0, ts + 12: 1.0}) == ts + 12
    assert pick([ts + 3, word, ts + 10], {word: 10.0, ts + 9: 5.0, small.tokenizer.eot: 1.0}) == small.tokenizer.eot
    # a closed pair: text follows, never a third timestamp
    assert pick([ts + 3, word, ts + 10, ts + 10], {ts + 11: 10.0, word + 1: 1.0}) == word + 1
    # never back in time: ts+2 is masked, and the remaining timestamp mass still beats the best word
    assert pick([ts + 3, word], {ts + 2: 5.0, ts + 20: 4.0, word + 1: 3.0}) == ts + 20
    # many plausible timestamps together outweigh the single best word
    stamps = {ts + k: 1.0 for k in range(5, 15)}
    assert pick([ts + 3, word], {word + 1: 2.0, **stamps}) in set(stamps)
    assert pick([ts + 3, word], {word + 1: 4.0, **stamps}) == word + 1
    # <|notimestamps|> is never chosen in timestamp mode
    assert pick([ts + 3, word], {small.tokenizer.no_timestamps: 50.0, word + 1: 1.0}) == word + 1


def test_window_segments_split_at_timestamp_pairs(small):
    tok = small.tokenizer
    ts, hello, world = tok.timestamp_begin, tok.encode(" hello"), tok.encode(" world")
    tokens = [ts, *hello, ts + 50, ts + 50, *world, ts + 100, ts + 120, *hello]  # the last segment is unclosed
    decoded = Decoded(tokens, [-0.5] * len(tokens), no_speech_prob=0.25)
    segments = window_segments(decoded, tok, start=30.0, end=58.0)
    assert [(s.start, s.end, s.text) for s in segments] == [
        (30.0, 31.0, "hello"), (31.0, 32.0, "world"), (32.4, 58.0, "hello"),
    ]
    assert segments[0].tokens == [ts, *hello, ts + 50]
    # every segment reports its window's decode: mean log-probability with the end of text (0 here, cut off)
    assert decoded.avg_logprob == -0.5 * len(tokens) / (len(tokens) + 1)
    assert all(s.avg_logprob == decoded.avg_logprob and s.compression_ratio > 0 for s in segments)
    assert all(s.no_speech_prob == 0.25 and s.window_start == 30.0 for s in segments)
    # no timestamps: the window is one segment
    plain = window_segments(Decoded([*hello, *world], [0.0] * 2), tok, start=0.0, end=4.0)
    assert [(s.start, s.end, s.text) for s in plain] == [(0.0, 4.0, "hello world")]


real = pytest.mark.real


@pytest.fixture(scope="module")
def english(manifest):
    """Short and long English files: single windows and multi-window sonnets."""
    en = [e for e in manifest if e.language == "en"]
    return en[:3] + [e for e in en if e.id.startswith("long-")][:1]


@real
def test_timestamps_match_transformers(base, base_dir, english, dev_audio):
    hf = WhisperForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32).eval()
    short = [e for e in english if not e.id.startswith("long-")]
    results = Transcriber(target=base).transcribe([dev_audio[e.id] for e in short], language="en", timestamps=True)
    for e, result in zip(short, results):
        with torch.no_grad():
            ref = hf.generate(log_mel_spectrogram(dev_audio[e.id])[None], language="en", task="transcribe",
                              return_timestamps=True)[0].tolist()
        ref = [t for t in ref if t != base.tokenizer.eot]
        assert result.tokens == ref, e.id
        assert len(result.segments) >= 1 and all(s.start < s.end <= result.duration + 1e-6 for s in result.segments)


@real
def test_speculative_timestamps_identical_to_ar(base, tiny_en, english, dev_audio):
    audios = [dev_audio[e.id] for e in english]
    ar = Transcriber(target=base).transcribe(audios, language="en", timestamps=True)
    spec = Transcriber(EngineConfig(method="specasr", spec=SpecConfig(max_batch=8, tree=True)), target=base,
                       draft=tiny_en).transcribe(
        audios, language="en", timestamps=True)
    for e, a, s in zip(english, ar, spec):
        assert s.tokens == a.tokens, e.id
        assert [(x.start, x.end, x.text) for x in s.segments] == [(x.start, x.end, x.text) for x in a.segments]
        assert [x.avg_logprob for x in s.segments] == pytest.approx([x.avg_logprob for x in a.segments], abs=1e-3)
    # the draft (a text bridge to tiny.en) drafts text only, so acceptance is lower than without timestamps
    assert sum(s.stats.accepted_tokens for s in spec) > 0.2 * sum(len(s.tokens) for s in spec)


@real
def test_a_closing_timestamp_is_proposed_again_before_the_drafted_text(base, tiny_en, dev_audio):
    """tiny.en drafts text only (another vocabulary); Whisper opens a segment where the last one closed,
    so the drafter repeats the closing timestamp and hangs its drafted text below it."""
    from specasr_vllm.config import SpecConfig
    from specasr_vllm.speculation import Drafter

    tok, audio = base.tokenizer, dev_audio["ls-1089-134686-0000"]
    ts = tok.timestamp_begin
    drafter = Drafter.build(tiny_en, tok, SpecConfig())
    drafter.start("k", "en", "transcribe", True, None, mel=log_mel_spectrogram(audio), audio=audio)
    output = [ts, *tok.encode(" He hoped there would be stew for dinner,"), ts + 120]
    tree = drafter.propose({"k": output}, {"k": 20})["k"]
    assert tree.tokens[0] == ts + 120 and tree.parents[0] == -1 and len(tree) > 1
    assert all(parent != -1 for parent in tree.parents[1:])  # every drafted token follows the repeat
    drafter.feedback({"k": [ts + 120, tree.tokens[1], tok.eot]})
    assert drafter.stats("k").accepted_tokens == 2
    opened = drafter.propose({"k": [*output, ts + 120]}, {"k": 20})["k"]  # a pair is complete: text follows
    assert opened.tokens and all(t < tok.eot for t in opened.tokens)
    drafter.release(["k"])

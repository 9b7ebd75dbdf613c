"""Word timestamps from cross-attention alignment heads and DTW (``engine/alignment.py``).

Hand-made: the vectorised DTW against transformers' scalar one (ties included), word grouping and
punctuation merging. Real speech: the token times equal an independent openai-whisper-style reference
built from transformers' own attention, median filter and DTW, and transformers' ``return_token_timestamps``
is reproduced exactly from our building blocks under its convention.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from transformers import WhisperForConditionalGeneration
from transformers.models.whisper.generation_whisper import _dynamic_time_warping, _median_filter

from specasr_vllm.audio import log_mel_spectrogram
from specasr_vllm.config import HOP_LENGTH
from specasr_vllm.engine.alignment import (
    TokenTiming,
    Word,
    align_windows,
    align_words,
    alignment_matrix,
    attention_pass,
    dtw,
    jump_times,
    merge_punctuations,
    split_words,
    timing_words,
    token_timings,
)
from specasr_vllm.models.registry import alignment_heads
from specasr_vllm.models.tokenizer import WhisperTokenizer


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    return WhisperTokenizer.from_dir(base_dir, 51865)


def test_alignment_heads_from_generation_config_or_config(base_dir, tmp_path):
    assert alignment_heads(base_dir)[:2] == [(3, 1), (4, 2)]
    (tmp_path / "config.json").write_text(json.dumps({"alignment_heads": [[1, 0], [2, 5]]}))
    assert alignment_heads(tmp_path) == [(1, 0), (2, 5)]
    (tmp_path / "generation_config.json").write_text(json.dumps({"alignment_heads": [[0, 3]]}))
    assert alignment_heads(tmp_path) == [(0, 3)]
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "generation_config.json").write_text("{}")
    assert alignment_heads(tmp_path) == []


def test_dtw_known_path_and_transformers_tie_breaking():
    cost = np.array([[0, 1, 1, 1], [1, 0, 0, 1], [1, 1, 1, 0]], dtype=np.float64)
    text, time = dtw(cost)
    assert text.tolist() == [0, 1, 1, 2] and time.tolist() == [0, 1, 2, 3]
    assert jump_times(text, time) == pytest.approx([0.0, 0.02, 0.06])
    rng = np.random.default_rng(0)
    cases = [rng.standard_normal((n, m)) for n, m in [(1, 1), (1, 9), (9, 1), (7, 40), (30, 200)]]
    cases += [rng.integers(0, 3, (n, m)).astype(np.float64) for n, m in [(6, 6), (12, 50), (25, 90)]]  # many ties
    for matrix in cases:
        ours, ref = dtw(matrix), _dynamic_time_warping(matrix)
        assert ours[0].tolist() == ref[0].tolist() and ours[1].tolist() == ref[1].tolist(), matrix.shape


def test_words_grouped_and_punctuation_merged(tokenizer):
    tokens = tokenizer.encode(' "Hello, world!" she said. (Yes) half-century')
    pieces = [tokenizer.decode([t]) for t in tokens]
    assert pieces == [' "', "Hello", ",", " world", '!"', " she", " said", ".", " (", "Yes", ")", " half", "-",
                      "century"]
    timing = TokenTiming(tokens, np.arange(len(tokens) + 1) * 0.5, np.linspace(0.5, 1.0, len(tokens)), "en")
    words = timing_words(tokenizer, timing, time_offset=10.0)
    # openai-whisper's rules: a merged word keeps its own times and probability; '!"' is punctuation
    # (a substring of string.punctuation) but not one appended mark, so it stays a word
    assert [(w.word, w.start, w.end) for w in words] == [
        (' "Hello,', 10.0, 11.0), (" world", 11.5, 12.0), ('!"', 12.0, 12.5), (" she", 12.5, 13.0),
        (" said.", 13.0, 13.5), (" (Yes)", 14.0, 15.0), (" half", 15.5, 16.0), ("-century", 16.0, 17.0),
    ]
    assert words[0].probability == pytest.approx(np.mean(timing.probabilities[:2]))
    assert [t for w in words for t in w.tokens] == tokens
    # unspaced languages split where characters end; a character split across tokens stays whole
    ja = tokenizer.encode("こんにちは、世界。")
    assert [tokenizer.decode(g) for g in split_words(tokenizer, ja, "ja")] == ["こんにちは", "、", "世界", "。"]
    de = tokenizer.encode(" Grüße, 東京!")
    assert [tokenizer.decode(g) for g in split_words(tokenizer, de, "de")] == [" Grüße", ",", " 東京", "!"]


def test_merge_punctuations_and_sentence_end_guard(tokenizer):
    words = [Word(0, 1, " (", 0.1), Word(1, 2, " a", 0.2), Word(2, 3, ",", 0.3), Word(3, 4, " b", 0.4),
             Word(4, 5, " ¿", 0.5), Word(5, 6, "c", 0.6), Word(6, 7, "?", 0.7)]
    assert [(w.word, w.start, w.end, w.probability) for w in merge_punctuations(words)] == [
        (" ( a,", 1, 2, 0.2), (" b", 3, 4, 0.4), (" ¿c?", 5, 6, 0.6),
    ]
    # a word after a sentence end that swallowed a pause is cut to twice the median word (0.3 s here)
    tokens = tokenizer.encode(" Hi. There")
    assert [tokenizer.decode([t]) for t in tokens] == [" Hi", ".", " There"]
    timing = TokenTiming(tokens, np.array([0.0, 0.3, 0.4, 3.0]), np.ones(3), "en")
    assert [(w.word, w.start, w.end) for w in timing_words(tokenizer, timing)] == [(" Hi.", 0.0, 0.3),
                                                                                   (" There", 2.4, 3.0)]


real = pytest.mark.real


@pytest.fixture(scope="module")
def hf_base(base_dir):
    """transformers' Whisper with eager attention, so it can return its attention weights."""
    return WhisperForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32,
                                                           attn_implementation="eager").eval()


def _openai_reference(hf, base, mel, prefix, tokens, num_frames) -> tuple[np.ndarray, np.ndarray]:
    """openai-whisper's find_alignment token starts and probabilities, from transformers' model and helpers.

    Its attention is softmaxed over every frame; renormalising the kept frames equals openai-whisper's
    softmax over the cropped scores.
    """
    tok = base.tokenizer
    sot = [t for t in prefix if t != tok.no_timestamps]
    with torch.no_grad():
        out = hf(mel[None], decoder_input_ids=torch.tensor([[*sot, tok.no_timestamps, *tokens, tok.eot]]),
                 output_attentions=True)
    weights = torch.stack([out.cross_attentions[layer][0, head] for layer, head in base.alignment_heads])
    weights = weights[..., : num_frames // 2]
    weights = weights / weights.sum(-1, keepdim=True)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    matrix = _median_filter((weights - mean) / std, 7).mean(0)[len(sot) : -1]
    text, time = _dynamic_time_warping(-matrix.double().numpy())
    probs = out.logits[0, len(sot) : len(sot) + len(tokens), : tok.eot].softmax(-1)[torch.arange(len(tokens)), tokens]
    return jump_times(text, time), probs.numpy()


@real
def test_token_times_match_references(base, hf_base, manifest, dev_audio):
    """Three English files of 5-9 s, transcribed by transformers with ``return_token_timestamps`` and an
    attention mask over the real audio (so both crop the attention to the same frames)."""
    tok = base.tokenizer
    prefix = tok.prefix("en")
    entries = [e for e in manifest if e.language == "en" and 5 <= e.duration <= 9][:3]
    shifted = []
    windows = []
    for e in entries:
        audio = dev_audio[e.id]
        num_frames = len(audio) // HOP_LENGTH
        mel = log_mel_spectrogram(audio)
        mask = (torch.arange(mel.shape[-1]) < num_frames).long()[None]
        with torch.no_grad():
            out = hf_base.generate(mel[None], attention_mask=mask, language="en", task="transcribe",
                                   return_token_timestamps=True)
        tokens = out["sequences"][0].tolist()  # no prefix, no <|endoftext|>
        hf_times = out["token_timestamps"][0].double().numpy()
        features = base.model.encode(mel[None])[0]

        # transformers' convention from our parts: rows where the generated tokens are input, scores
        # softmaxed over all frames then cropped, normalised over those rows only
        _, scores = attention_pass(base, features[None], [[*prefix, *tokens, tok.eot]])
        weights = scores[0].softmax(-1)[..., : num_frames // 2][:, len(prefix) : -1]
        assert jump_times(*dtw(-alignment_matrix(weights).double().numpy())) == pytest.approx(hf_times, abs=1e-6)

        # openai-whisper's convention (what align_words uses), against the independent reference
        timing = token_timings(base, features[None], [prefix], [tokens], [num_frames])[0]
        ref_starts, ref_probs = _openai_reference(hf_base, base, mel, prefix, tokens, num_frames)
        assert timing.tokens == tokens
        assert timing.starts == pytest.approx(ref_starts, abs=1e-6)
        assert timing.probabilities == pytest.approx(ref_probs, abs=1e-4)
        # the two conventions on the same rows (openai-whisper's start of token k + 1 is transformers'
        # time of token k); the first differs by design (transformers puts token 0 at 0.0)
        shifted.append(np.abs(timing.starts[2:] - hf_times[1:]))

        words = align_words(base, features, prefix, tokens, num_frames, time_offset=5.0)
        assert "".join(w.word for w in words) == tok.decode(tokens)
        assert [t for w in words for t in w.tokens] == tokens
        starts = [w.start for w in words]
        assert starts == sorted(starts) and starts[0] >= 5.0
        assert all(w.start <= w.end <= 5.0 + len(audio) / 16000 for w in words)
        assert all(0.0 < w.probability <= 1.0 for w in words)
        # timestamp tokens and a prompt do not change the alignment pass
        stamped = [tok.timestamp_begin, *tokens, tok.timestamp_begin + 100]
        assert align_words(base, features, tok.prefix("en", timestamps=True, prompt="Hysterical."), stamped,
                           num_frames, time_offset=5.0) == words
        windows.append((features, tokens, num_frames, words))

    # one batched pass (rows of different lengths) gives each window's words
    batched = align_windows(base, torch.stack([w[0] for w in windows]), [prefix] * len(windows),
                            [w[1] for w in windows], [w[2] for w in windows], [5.0] * len(windows))
    for (*_, words), got in zip(windows, batched):
        assert [(w.word, w.start, w.end) for w in got] == [(w.word, w.start, w.end) for w in words]
        assert [w.probability for w in got] == pytest.approx([w.probability for w in words], abs=1e-4)

    # a window that filled all 448 positions: <|endoftext|> no longer fits the pass, every token still gets a time
    features, tokens, num_frames, _ = windows[0]
    full = (tokens * 448)[: base.model.dims.max_target_positions - len(prefix)]
    timing = token_timings(base, features[None], [prefix], [full], [num_frames])[0]
    assert len(timing.starts) == len(full) + 1 and np.all(np.diff(timing.starts) >= 0)

    diff = np.concatenate(shifted)
    print(f"openai-whisper vs transformers convention, same rows: max {diff.max():.2f} s, mean {diff.mean():.4f} s, "
          f"{(diff > 0.021).sum()} of {len(diff)} tokens apart by more than one frame")
    assert np.median(diff) < 0.01 and (diff <= 0.021).mean() > 0.85


def test_words_are_assigned_to_their_segments_and_kept_inside_them(tokenizer):
    from specasr_vllm.engine.alignment import assign_words
    from specasr_vllm.engine.segments import Segment

    ts = tokenizer.timestamp_begin
    one, two = tokenizer.encode(" one two"), tokenizer.encode(" three")
    segments = [Segment(1.0, 2.0, "one two", [ts + 50, *one, ts + 100]), Segment(2.0, 3.0, "three", [ts + 100, *two, ts + 150])]
    words = [Word(0.0, 1.4, " one", 0.9, one[:1]), Word(1.4, 1.9, " two", 0.9, one[1:]), Word(2.1, 4.5, " three", 0.8, two)]
    assign_words(tokenizer, segments, words)
    assert [[w.word for w in s.words] for s in segments] == [[" one", " two"], [" three"]]
    # the pause before the segment is not the first word's: it starts one median word (at most 0.7 s) before its end
    assert segments[0].words[0].start == pytest.approx(0.7)
    assert segments[1].words[-1].end == 3.0  # nor the silence after it the last word's


@real
def test_transcripts_carry_words_for_every_method(base, tiny_en, manifest, dev_audio):
    from specasr_vllm.config import EngineConfig, SpecConfig
    from specasr_vllm.engine import Transcriber
    from specasr_vllm.formats import to_verbose_json

    ids = ["ls-1089-134686-0000", "long-shakespeare-sonnet-002"]
    audios = [dev_audio[i] for i in ids]
    spec = SpecConfig(max_batch=8)  # the two windows decode together and still draft
    results = {method: Transcriber(EngineConfig(method=method, spec=spec), target=base, draft=tiny_en).transcribe(
        audios, language="en", timestamps=True, word_timestamps=True) for method in ("ar", "specasr")}
    for ar, spec in zip(results["ar"], results["specasr"]):
        words = [w for s in ar.segments for w in s.words]
        assert [(w.word, w.start, w.end) for w in words] == [(w.word, w.start, w.end) for s in spec.segments
                                                              for w in s.words]  # same tokens, same words
        assert "".join(w.word for w in words).split() == ar.text.split()
        assert all(a.start <= b.start for a, b in itertools.pairwise(words)) and words[-1].end <= ar.duration + 0.5
        for s in ar.segments:
            assert all(s.start - 0.5 <= w.start <= w.end <= s.end + 0.5 for w in s.words), s.text
        assert [w["word"] for w in to_verbose_json(ar)["words"]] == [w.word.strip() for w in words]
    assert results["ar"][1].segments[-1].words[-1].start > 45  # the long file's last window is aligned too

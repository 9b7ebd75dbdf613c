"""Long audio as Whisper decodes it: seek-based windows, token-identical to transformers' long-form generate.

Hand-made token sequences pin down the seek arithmetic (each case of the reference's rule); real
long dev files check the whole loop against transformers, for every decoding method.
"""

from __future__ import annotations

import pytest
import torch
from transformers import WhisperForConditionalGeneration

from specasr_vllm.audio import log_mel_spectrogram
from specasr_vllm.config import EngineConfig, SpecConfig
from specasr_vllm.engine import Transcriber
from specasr_vllm.engine.decoded import Decoded
from specasr_vllm.engine.longform import is_long, seek_segments, window_features
from specasr_vllm.evaluation import total, word_errors

# transformers' long-form defaults: no fallback, no silence skip
REFERENCE = {"temperature_increment_on_fallback": None, "compression_ratio_threshold": None,
             "logprob_threshold": None, "no_speech_threshold": None}


def _decoded(tokens: list[int]) -> Decoded:
    return Decoded(tokens, [-0.1] * len(tokens))


def test_seek_follows_the_last_complete_segment(base):
    tok = base.tokenizer
    ts, hello, world = tok.timestamp_begin, tok.encode(" hello"), tok.encode(" world")
    # two closed segments, then text cut by the window's edge: it is dropped, seek moves to 26.00 s
    tokens = [ts, *hello, ts + 500, ts + 500, *world, ts + 1300, ts + 1300, *hello]
    segments, advance = seek_segments(_decoded(tokens), tok, seek=1000, frames=3000, duration=100.0)
    assert [(s.start, s.end, s.text) for s in segments] == [(10.0, 20.0, "hello"), (20.0, 36.0, "world")]
    assert segments[-1].tokens == [ts + 500, *world, ts + 1300, ts + 1300]  # both tokens of the closing pair
    assert advance == 1300 * 2 and all(s.window_start == 10.0 for s in segments)
    # a single timestamp at the end: nothing more is said in this window, the whole window is done
    tokens = [ts, *hello, ts + 500, ts + 500, *world, ts + 900]
    segments, advance = seek_segments(_decoded(tokens), tok, seek=0, frames=2400, duration=100.0)
    assert [(s.start, s.end) for s in segments] == [(0.0, 10.0), (10.0, 18.0)] and advance == 2400
    # no pair: one segment up to the last timestamp, then the next window
    segments, advance = seek_segments(_decoded([ts + 50, *hello, ts + 400]), tok, seek=0, frames=3000, duration=60.0)
    assert [(s.start, s.end, s.text) for s in segments] == [(0.0, 8.0, "hello")] and advance == 3000
    segments, advance = seek_segments(_decoded([]), tok, seek=0, frames=3000, duration=60.0)
    assert segments == [] and advance == 3000


def test_windows_are_cut_from_whole_recording_features():
    mel = torch.arange(2 * 4500, dtype=torch.float32).reshape(2, 4500)
    window, frames = window_features(mel, 2000)
    assert frames == 2500 and window.shape == (2, 3000)
    assert torch.equal(window[:, :2500], mel[:, 2000:]) and not window[:, 2500:].any()  # zeros past the end
    assert not is_long(30 * 16000 + 159) and is_long(30 * 16000 + 160)


real = pytest.mark.real


@pytest.fixture(scope="module")
def long_files(manifest):
    return [e for e in manifest if e.id.startswith("long-")]


@pytest.fixture(scope="module")
def hf(base_dir):
    return WhisperForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32).eval()


def _reference(hf, audio, language: str, eot: int, **kwargs) -> list[int]:
    with torch.no_grad():
        out = hf.generate(log_mel_spectrogram(audio, pad=False)[None], language=language, task="transcribe",
                          return_timestamps=True, **kwargs)[0].tolist()
    return [t for t in out if t != eot]


@pytest.fixture(scope="module")
def references(hf, base, long_files, dev_audio) -> dict[str, list[int]]:
    """transformers' sequential long-form greedy decoding of every long dev file."""
    return {e.id: _reference(hf, dev_audio[e.id], e.language, base.tokenizer.eot) for e in long_files}


@real
def test_long_files_match_transformers_long_form(base_ar, references, long_files):
    """``base_ar`` decoded every dev file with the defaults users get (fallback and silence checks on: none
    trips here), long files in batches with short ones."""
    for e in long_files:
        ours = base_ar[e.id]
        assert ours.tokens == references[e.id], e.id
        starts = [s.start for s in ours.segments]
        assert starts == sorted(starts) and ours.segments[-1].end <= ours.duration
        assert len({s.window_start for s in ours.segments}) >= 2


@real
@pytest.mark.parametrize("method", ["sd", "specasr"])
def test_speculative_long_form_matches_transformers(method, base, tiny_en, references, long_files, dev_audio):
    # max_batch 8: the files' windows decode together and still draft (the default decodes such batches as AR)
    config = EngineConfig(method=method, spec=SpecConfig.for_method(method, max_batch=8))
    transcriber = Transcriber(config, target=base, draft=tiny_en)
    for language in sorted({e.language for e in long_files}):
        files = [e for e in long_files if e.language == language]
        for e, ours in zip(files, transcriber.transcribe([dev_audio[e.id] for e in files], language=language)):
            assert ours.tokens == references[e.id], e.id


@real
def test_conditioning_on_previous_text_matches_transformers(base, hf, long_files, dev_audio):
    e = long_files[0]
    ours = Transcriber(target=base).transcribe([dev_audio[e.id]], language=e.language,
                                               condition_on_previous_text=True, **REFERENCE)[0]
    ref = _reference(hf, dev_audio[e.id], e.language, base.tokenizer.eot, condition_on_prev_tokens=True)
    assert ours.tokens == ref


@real
def test_timestamped_and_plain_output_of_long_audio_have_the_same_words(base, base_ar, long_files, dev_audio):
    """One algorithm for every format: the words of srt and of text are the same, and no speech between
    windows is lost (cutting the audio before decoding gave srt 20.3% WER on these files, text 11.0%)."""
    timed = Transcriber(target=base).transcribe([dev_audio[e.id] for e in long_files],
                                                language=[e.language for e in long_files], timestamps=True)
    for e, t in zip(long_files, timed):
        assert base_ar[e.id].text == " ".join(s.text for s in t.segments if s.text), e.id
    wer = total([word_errors(e.text, base_ar[e.id].text, e.language) for e in long_files])
    assert wer.rate < 0.16, wer.rate  # 13.6% (47 errors in 345 words)

"""Audio front end: every container users send, clear errors, log-mel parity, long-audio windows."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from specasr_vllm.audio import decode_audio, log_mel_spectrogram
from specasr_vllm.config import SAMPLE_RATE
from specasr_vllm.errors import AudioDecodeError, AudioTooLongError

SAMPLE = "ls-1089-134686-0000.flac"


def encode(audio: np.ndarray, rate: int, container: str, codec: str, channels: int = 2) -> bytes:
    """Encode float mono ``audio`` with PyAV into ``container``/``codec`` as ``channels`` channels."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo" if channels == 2 else "mono")
        frame_size = stream.codec_context.frame_size or 1024
        planar = np.repeat(audio[None].astype(np.float32), channels, axis=0)
        fmt = stream.codec_context.format.name
        for i in range(0, planar.shape[1], frame_size):
            chunk = planar[:, i : i + frame_size]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp",
                                               layout="stereo" if channels == 2 else "mono")
            frame.sample_rate = rate
            frame.pts = i
            for f in av.AudioResampler(format=fmt, layout=frame.layout.name, rate=rate).resample(frame):
                out.mux(stream.encode(f))
        out.mux(stream.encode(None))
    return buf.getvalue()


def tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.mark.parametrize(
    "container,codec",
    [("wav", "pcm_s16le"), ("flac", "flac"), ("mp3", "libmp3lame"), ("ogg", "libopus"), ("ipod", "aac"),
     ("webm", "libopus")],
    ids=["wav", "flac", "mp3", "opus", "m4a", "webm"],
)
def test_decodes_every_container_to_16k_mono(container, codec):
    rate = 48000 if codec == "libopus" else 44100
    data = encode(tone(2.0, rate), rate, container, codec, channels=2)
    audio = decode_audio(data)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) / SAMPLE_RATE - 2.0) < 0.1  # codec priming may add a few ms
    # the 440 Hz tone survives downmix and resampling: it is the strongest frequency
    spectrum = np.abs(np.fft.rfft(audio[1000:17000]))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / 16000 - 440) < 5
    assert 0.2 < np.abs(audio[1000:17000]).max() < 0.4


def test_decodes_path_and_bytes_identically(speech_dir):
    path = speech_dir / SAMPLE
    assert np.array_equal(decode_audio(path), decode_audio(path.read_bytes()))


def test_resamples_to_16k(speech_dir):
    audio = decode_audio(speech_dir / SAMPLE)
    data = encode(np.interp(np.arange(0, len(audio), 16000 / 44100), np.arange(len(audio)), audio), 44100, "wav", "pcm_s16le", 1)
    back = decode_audio(data)
    assert abs(len(back) - len(audio)) <= 2
    n = min(len(back), len(audio))
    assert np.corrcoef(back[:n], audio[:n])[0, 1] > 0.99


@pytest.mark.parametrize(
    "data,message",
    [(b"", "not a decodable audio file"), (b"hello, I am a text file posing as audio\n" * 20, "not a decodable audio file"),
     (b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(40), "not a decodable audio file")],
    ids=["empty", "text", "corrupt-wav"],
)
def test_bad_bytes_raise_audio_error(data, message):
    with pytest.raises(AudioDecodeError, match=message):
        decode_audio(data)


def test_truncated_flac_raises_or_decodes_the_prefix(speech_dir):
    data = (speech_dir / SAMPLE).read_bytes()
    with pytest.raises(AudioDecodeError):
        decode_audio(data[:100])  # header only: no samples


def test_zero_length_wav_is_an_error():
    with pytest.raises(AudioDecodeError, match="no audio samples|not a decodable audio file"):
        decode_audio(encode(np.zeros(0, np.float32), 16000, "wav", "pcm_s16le", 1))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_an_error(bad):
    audio = tone(1.0, 16000)
    audio[100:110] = bad
    with pytest.raises(AudioDecodeError, match="10 NaN or infinite samples"):
        decode_audio(encode(audio, 16000, "wav", "pcm_f32le", 1), name="up.wav")


def test_missing_file(tmp_path):
    with pytest.raises(AudioDecodeError, match="no such file"):
        decode_audio(tmp_path / "nope.wav")


def test_max_seconds_stops_early(speech_dir):
    with pytest.raises(AudioTooLongError, match="longer than the limit of 5 s"):
        decode_audio(speech_dir / SAMPLE, max_seconds=5)
    assert len(decode_audio(speech_dir / SAMPLE, max_seconds=60)) > 0


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_transformers(speech_dir, n_mels):
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    for audio in [decode_audio(speech_dir / SAMPLE), np.random.default_rng(0).normal(0, 0.1, 50_000).astype(np.float32),
                  decode_audio(speech_dir / "long-shakespeare-sonnet-001.flac")]:
        ref = fe(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
        ours = log_mel_spectrogram(audio, n_mels).numpy()
        assert ours.shape == (n_mels, 3000)
        assert np.abs(ours - ref).max() < 1e-4


def test_whole_recording_features_match_transformers_long_form(speech_dir):
    """Long audio is decoded from features of the whole recording, as transformers' long-form input."""
    fe = WhisperFeatureExtractor()
    audio = decode_audio(speech_dir / "long-shakespeare-sonnet-001.flac")
    ref = fe(audio, sampling_rate=SAMPLE_RATE, return_tensors="np", truncation=False, padding="longest").input_features[0]
    ours = log_mel_spectrogram(audio, pad=False).numpy()
    assert ours.shape == ref.shape == (80, len(audio) // 160)
    assert np.abs(ours - ref).max() < 1e-4

"""Audio uploads of any container, rate and channel count → 16 kHz mono float32."""

from __future__ import annotations

import io
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import soxr

from musetalk_warm.media.audio import load_audio, resample
from musetalk_warm.errors import AudioError


def tone(rate: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def encode_audio(fmt: str, codec: str, rate: int, channels: np.ndarray, layout: str | None = None) -> bytes:
    """``channels`` ``[C,N]`` float32 encoded with PyAV into an in-memory file."""
    buf = io.BytesIO()
    layout = layout or ("stereo" if len(channels) == 2 else "mono")
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        size = stream.codec_context.frame_size or 1024
        for start in range(0, channels.shape[1], size):
            # Packed: PyAV's planar frames are what crash at 8 channels.
            block = np.ascontiguousarray(channels[:, start : start + size].T).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(block, format="flt", layout=layout)
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        container.mux(stream.encode(None))
    return buf.getvalue()


CASES = [
    ("wav", "pcm_f32le", 22050, 2),
    ("mp3", "libmp3lame", 44100, 1),
    ("ogg", "libopus", 48000, 2),
    ("mp4", "aac", 32000, 2),
    ("webm", "libopus", 24000, 1),
    ("flac", "flac", 8000, 1),
    ("adts", "aac", 44100, 2),
    ("aiff", "pcm_s16be", 16000, 1),
    ("caf", "pcm_s16le", 22050, 2),
    ("matroska", "libopus", 48000, 2),
]


@pytest.mark.parametrize(("fmt", "codec", "rate", "n_channels"), CASES)
def test_formats_rates_and_channels(fmt: str, codec: str, rate: int, n_channels: int) -> None:
    # Left carries the tone, right (if any) silence: averaging halves the amplitude.
    left = tone(rate, 0.6, 440.0)
    channels = np.stack([left, np.zeros_like(left)][:n_channels])
    audio = load_audio(encode_audio(fmt, codec, rate, channels))
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 9600) <= 1024  # 0.6 s, give or take one codec frame of padding
    expected_peak = 0.5 / n_channels
    amplitude = np.sqrt(2 * np.mean(audio[1600:8000] ** 2))  # a sine's peak from its RMS
    assert amplitude == pytest.approx(expected_peak, rel=0.08)
    spectrum = np.abs(np.fft.rfft(audio[1600:8000] * np.hanning(6400)))
    assert np.fft.rfftfreq(6400, 1 / 16000)[spectrum.argmax()] == pytest.approx(440, abs=5)


def test_lossless_wav_equals_soxr_resampling(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    stereo = rng.uniform(-0.5, 0.5, (2, 44100)).astype(np.float32)
    path = tmp_path / "noise.wav"
    path.write_bytes(encode_audio("wav", "pcm_f32le", 44100, stereo))
    expected = soxr.resample(stereo.mean(axis=0), 44100, 16000, quality="HQ")
    np.testing.assert_allclose(load_audio(path), expected, atol=1e-6)
    np.testing.assert_allclose(load_audio(str(path), rate=44100), stereo.mean(axis=0), atol=1e-7)


def test_silence_is_valid_audio() -> None:
    audio = load_audio(encode_audio("wav", "pcm_s16le", 16000, np.zeros((1, 8000), np.float32)))
    assert len(audio) == 8000 and not audio.any()


def test_empty_random_text_and_image_uploads_are_refused() -> None:
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"")
    with pytest.raises(AudioError, match="not an audio file in a supported format"):
        load_audio(np.random.default_rng(1).bytes(20000))
    with pytest.raises(AudioError, match="not an audio file in a supported format"):
        load_audio(b"Hello, this is a text file and not audio.\n" * 40)
    ok, png = cv2.imencode(".png", np.full((32, 32, 3), 200, np.uint8))
    assert ok
    with pytest.raises(AudioError, match="not an audio file in a supported format") as err:
        load_audio(png.tobytes())
    assert err.value.status_code == 422


def test_truncated_file_is_reported_or_decoded_in_part() -> None:
    data = encode_audio("mp3", "libmp3lame", 44100, tone(44100, 1.0)[None])
    audio = load_audio(data[: len(data) // 2])  # a cut upload still decodes its first half
    assert 0.3 < len(audio) / 16000 < 0.7


def test_too_short_and_too_long(tmp_path: Path) -> None:
    short = encode_audio("wav", "pcm_s16le", 16000, tone(16000, 0.02)[None])
    with pytest.raises(AudioError, match="20 ms long; the minimum is 100 ms"):
        load_audio(short)
    assert len(load_audio(short, min_seconds=0.01)) == 320
    long = encode_audio("wav", "pcm_s16le", 16000, tone(16000, 3.0)[None])
    with pytest.raises(AudioError, match="maximum of 2 s"):
        load_audio(long, max_seconds=2)
    assert len(load_audio(long, max_seconds=3)) == 48000


def test_missing_path_does_not_leak_the_directory(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="not found: gone.wav") as err:
        load_audio(tmp_path / "gone.wav")
    assert str(tmp_path) not in str(err.value)
    text = tmp_path / "notes.wav"
    text.write_text("not audio\n" * 100)
    with pytest.raises(AudioError) as err:
        load_audio(text)
    assert str(tmp_path) not in str(err.value) and "notes.wav" in str(err.value)


def test_resample_keeps_length_ratio_and_pitch() -> None:
    src = tone(16000, 1.0, 1000.0)
    up = resample(src, 16000, 48000)
    assert up.dtype == np.float32 and len(up) == 48000
    spectrum = np.abs(np.fft.rfft(up))
    assert np.fft.rfftfreq(48000, 1 / 48000)[spectrum.argmax()] == pytest.approx(1000, abs=1)
    same = resample(src, 16000, 16000)
    assert np.array_equal(same, src) and same is not src
    assert len(resample(tone(22050, 1.0), 22050, 16000)) == 16000

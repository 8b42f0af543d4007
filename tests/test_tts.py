"""TTS engines: real espeak-ng speech, an OpenAI-compatible endpoint over HTTP, failures."""

from __future__ import annotations

import io
import json
import threading

import httpx
import numpy as np
import pytest
import soundfile as sf

from musetalk_warm.config import TTSSettings
from musetalk_warm.errors import ConfigError, DependencyMissing, TextError, TTSError
from musetalk_warm.server import speaking
from musetalk_warm.voice import phonemes
from musetalk_warm.voice.tts import (
    TTS,
    EspeakTTS,
    OpenAITTS,
    check_text,
    load_tts,
    openai_endpoint,
)


@pytest.fixture(scope="module")
def espeak() -> EspeakTTS:
    return EspeakTTS()


def _voiced_seconds(samples: np.ndarray, rate: int) -> float:
    """Seconds of 20 ms windows whose RMS is above 1% of full scale."""
    win = rate // 50
    frames = samples[: len(samples) // win * win].reshape(-1, win)
    return float((np.sqrt((frames**2).mean(axis=1)) > 0.01).sum() * 0.02)


def test_espeak_speaks_plausible_duration(espeak: EspeakTTS) -> None:
    short, rate = espeak.synthesize("Hello.")
    text = "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest."
    long, rate_long = espeak.synthesize(text)
    assert rate == rate_long == 22050
    assert short.dtype == np.float32 and short.ndim == 1
    assert np.abs(long).max() <= 1.0
    # 18 words at 165 wpm is ~6.5 s of speech; allow a wide band for pauses.
    assert 3.0 < len(long) / rate < 12.0
    assert len(short) / rate < 2.0
    assert _voiced_seconds(long, rate) > 2.0
    assert isinstance(espeak, TTS)


def test_espeak_speed_changes_duration() -> None:
    text = "Speaking faster makes the same sentence take less time."
    slow, rate = EspeakTTS(speed_wpm=120).synthesize(text)
    fast, _ = EspeakTTS(speed_wpm=300).synthesize(text)
    assert len(slow) > 1.8 * len(fast)


def test_espeak_text_starting_with_dash_is_spoken(espeak: EspeakTTS) -> None:
    samples, rate = espeak.synthesize("-v is not an option here")
    assert _voiced_seconds(samples, rate) > 0.5


def test_espeak_empty_text(espeak: EspeakTTS) -> None:
    with pytest.raises(TextError):
        espeak.synthesize("   \n")


def test_espeak_missing_library(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    # The loader itself, uncached: the library may start only once per process.
    monkeypatch.setattr(phonemes.ctypes, "CDLL", missing)
    with pytest.raises(DependencyMissing, match="apt-get install espeak-ng"):
        phonemes._library.__wrapped__()
    monkeypatch.setattr(phonemes, "_library", phonemes._library.__wrapped__)
    with pytest.raises(DependencyMissing, match="espeak-ng is not installed"):
        EspeakTTS()


def test_espeak_reports_the_phonemes_of_its_audio(espeak: EspeakTTS) -> None:
    speech = espeak.synthesize_timed("Bob moved the blue boots.")
    assert speech.phones is not None and [p.symbol for p in speech.phones[:3]] == ["b", "0", "b"]
    assert speech.phones[-1].end == pytest.approx(len(speech.samples) / speech.rate)
    # The configured speed is the library's too: slower speech, later phones.
    slow = EspeakTTS(speed_wpm=120).synthesize_timed("Bob moved the blue boots.")
    assert slow.phones is not None and slow.phones[-1].end > 1.2 * speech.phones[-1].end


def test_espeak_unknown_voice() -> None:
    with pytest.raises(TTSError, match="voice 'xx-nonexistent'"):
        EspeakTTS(voice="xx-nonexistent")


def _wav_bytes(seconds: float, rate: int = 24000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def _endpoint(handler) -> httpx.MockTransport:
    return httpx.MockTransport(handler)


def test_openai_engine_posts_request_and_decodes_wav() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=_wav_bytes(1.5))

    tts = OpenAITTS("http://tts.local/v1", "tts-x", "nova", api_key="k", transport=_endpoint(handler))
    samples, rate = tts.synthesize("Hi there")
    assert rate == 24000 and len(samples) == 36000
    assert tts.synthesize_timed("Hi there").phones is None  # an endpoint reports no phoneme timings
    assert str(seen[0].url) == "http://tts.local/v1/audio/speech"
    assert seen[0].headers["authorization"] == "Bearer k"
    assert json.loads(seen[0].read()) == {
        "model": "tts-x", "input": "Hi there", "voice": "nova", "response_format": "wav"
    }


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (httpx.Response(500, text="boom"), "HTTP 500"),
        (httpx.Response(200, content=b"<html>not audio</html>"), "cannot be decoded"),
        (httpx.Response(200, content=_wav_bytes(0.5)[:44] + bytes(8000)), "silence"),
    ],
)
def test_openai_engine_failures(response: httpx.Response, message: str) -> None:
    tts = OpenAITTS("http://tts.local", transport=_endpoint(lambda request: response))
    with pytest.raises(TTSError, match=message):
        tts.synthesize("Hi")


def test_openai_engine_timeout_and_unreachable() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(TTSError, match="timed out"):
        OpenAITTS("http://tts.local", transport=_endpoint(timeout)).synthesize("Hi")
    # A real refused connection: a port nobody listens on.
    with pytest.raises(TTSError, match="cannot be reached"):
        OpenAITTS("http://127.0.0.1:9", timeout_s=2).synthesize("Hi")


def test_load_tts_selects_engine() -> None:
    assert isinstance(load_tts(TTSSettings()), EspeakTTS)
    assert isinstance(load_tts(TTSSettings(engine="openai", openai_url="http://x")), OpenAITTS)
    with pytest.raises(ConfigError, match="openai_url"):
        load_tts(TTSSettings(engine="openai"))


def test_espeak_concurrent_calls_are_independent(espeak: EspeakTTS) -> None:
    results: dict[int, int] = {}

    def speak(i: int) -> None:
        results[i] = len(espeak.synthesize("one two three " * (i + 1))[0])

    threads = [threading.Thread(target=speak, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] < results[1] < results[2]


def test_one_text_check_for_engines_and_server() -> None:
    """The server and the engines share tts.check_text: one place says what text is acceptable."""
    assert speaking.check_text is check_text
    assert check_text("  hi \n") == "hi" and check_text("x" * 10, 10) == "x" * 10
    with pytest.raises(TextError, match="empty"):
        check_text(" \t ")
    with pytest.raises(TextError, match="limit of 10"):
        check_text("x" * 11, 10)


@pytest.mark.parametrize("url", ["http://api.local", "http://api.local/", "http://api.local/v1", "http://api.local/v1/"])
def test_openai_endpoint_accepts_root_or_v1(url: str) -> None:
    assert openai_endpoint(url, "chat/completions") == "http://api.local/v1/chat/completions"
    assert openai_endpoint(url, "audio/speech") == "http://api.local/v1/audio/speech"

"""Text to speech, loaded once: espeak-ng (default, offline) or an OpenAI-compatible endpoint.

Engines return :class:`Speech`: mono float32 in [-1, 1] at the engine's own
rate, and the phonemes spoken with their spans where the engine reports them
(espeak-ng does; an endpoint does not). The caller resamples to whatever the
renderer needs; phone spans are in seconds, so resampling keeps them.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
import unicodedata
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import httpx
import numpy as np
import soundfile as sf

from ..config import TTSSettings
from ..errors import ConfigError, TextError, TTSError
from .phonemes import Phone, speak_with_phones

# Below this peak the engine produced silence, which would render a still mouth.
_SILENCE_PEAK = 1e-3


@dataclass(frozen=True)
class Speech:
    """Synthesised speech and, when known, its phonemes (spans in seconds from the first sample)."""

    samples: np.ndarray
    rate: int
    phones: tuple[Phone, ...] | None = None


@runtime_checkable
class TTS(Protocol):
    """A speech engine: text in, mono float32 samples (and phoneme timings where known) out."""

    name: str

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        """Speech for ``text`` as ``(float32 [n], sample rate)``; raises TTSError."""
        ...

    def synthesize_timed(self, text: str) -> Speech:
        """Speech for ``text`` with its phonemes (None when the engine cannot tell); raises TTSError."""
        ...


class _Engine(ABC):
    """``synthesize`` in terms of ``synthesize_timed``."""

    @abstractmethod
    def synthesize_timed(self, text: str) -> Speech: ...

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        speech = self.synthesize_timed(text)
        return speech.samples, speech.rate


def check_text(text: str, max_chars: int | None = None) -> str:
    """The stripped text, or TextError when empty, holding control characters (NUL and the
    like; tab and line breaks are fine) or over ``max_chars`` (no limit when None).

    The one text check: engines call it, and the server calls it with its limit
    before any work is queued.
    """
    text = text.strip()
    if not text:
        raise TextError("text is empty", hint='send {"text": "something to say"}')
    control = next((c for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n\r"), None)
    if control is not None:
        raise TextError(
            f"text holds the control character U+{ord(control):04X} at position {text.index(control)}",
            hint="send plain text; tabs and line breaks are fine",
        )
    if max_chars is not None and len(text) > max_chars:
        raise TextError(
            f"text is {len(text)} characters, more than the limit of {max_chars}",
            hint="split it into several /speak calls",
        )
    return text


def openai_endpoint(url: str, path: str) -> str:
    """``path`` (e.g. ``audio/speech``) on an OpenAI-compatible server.

    ``url`` may be the server root or its ``/v1`` base, as OpenAI clients accept.
    """
    base = url.rstrip("/")
    return f"{base}/{path}" if base.endswith("/v1") else f"{base}/v1/{path}"


class _Silence(TTSError):
    """The engine answered with no samples or only silence."""


def _decode_wav(data: bytes, engine: str) -> tuple[np.ndarray, int]:
    """Decode engine output (wav or any libsndfile format) and check it holds speech."""
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise TTSError(f"{engine} returned audio that cannot be decoded ({exc})") from exc
    if rate <= 0:
        raise TTSError(f"{engine} returned audio without a sample rate")
    return _check_speech(np.ascontiguousarray(samples.mean(axis=1), dtype=np.float32), int(rate), engine)


def _check_speech(mono: np.ndarray, rate: int, engine: str) -> tuple[np.ndarray, int]:
    """``(mono, rate)`` when it holds speech; TTSError (``_Silence`` for none) otherwise."""
    if mono.size == 0:
        raise _Silence(f"{engine} returned no audio")
    if not np.isfinite(mono).all():
        raise TTSError(f"{engine} returned invalid samples (NaN or infinity)")
    if float(np.abs(mono).max()) < _SILENCE_PEAK:
        raise _Silence(f"{engine} returned silence")
    return mono, rate


class EspeakTTS(_Engine):
    """The offline espeak-ng synthesiser, through its library: the phoneme events of
    one synthesis run give exact timings for its audio. Voice and library are checked
    once, here; the library keeps one synthesiser, so concurrent calls take turns.
    """

    name = "espeak-ng"

    def __init__(self, voice: str = "en-us", speed_wpm: int = 165) -> None:
        self.voice = voice
        self.speed_wpm = speed_wpm
        # A first synthesis proves the voice exists and warms espeak's data files.
        try:
            self._speak(check_text("ready"))
        except TTSError as exc:
            raise TTSError(
                f"espeak-ng cannot speak with voice {voice!r}: {exc.message}",
                hint="list voices with `espeak-ng --voices`",
            ) from exc

    def synthesize_timed(self, text: str) -> Speech:
        """Speak ``text``; raises TextError for text it cannot speak, TTSError when espeak fails."""
        try:
            return self._speak(check_text(text))
        except _Silence as exc:
            # The voice spoke at start-up, so silence now comes from the text: only
            # punctuation or symbols espeak does not read out (".", ")", "¡").
            raise TextError(
                "espeak-ng finds nothing to say in this text", hint="send words, not only punctuation"
            ) from exc

    def _speak(self, text: str) -> Speech:
        samples, rate, phones = speak_with_phones(text, self.voice, self.speed_wpm)
        return Speech(*_check_speech(samples, rate, "espeak-ng"), tuple(phones))


class OpenAITTS(_Engine):
    """An OpenAI-compatible ``POST {url}/v1/audio/speech`` endpoint, asked for wav."""

    name = "openai"

    def __init__(
        self,
        url: str,
        model: str = "tts-1",
        voice: str = "alloy",
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._endpoint = openai_endpoint(url, "audio/speech")
        self.model = model
        self.voice = voice
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout_s, headers=headers, transport=transport)

    def synthesize_timed(self, text: str) -> Speech:
        """Speak ``text`` via the endpoint (no phoneme timings); network, HTTP and decoding
        failures raise TTSError."""
        text = check_text(text)
        body = {"model": self.model, "input": text, "voice": self.voice, "response_format": "wav"}
        try:
            response = self._client.post(self._endpoint, json=body)
        except httpx.TimeoutException as exc:
            raise TTSError("the speech endpoint timed out") from exc
        except httpx.HTTPError as exc:
            raise TTSError(f"the speech endpoint cannot be reached ({type(exc).__name__})") from exc
        if response.status_code != 200:
            raise TTSError(f"the speech endpoint answered HTTP {response.status_code}")
        return Speech(*_decode_wav(response.content, "the speech endpoint"))

    def close(self) -> None:
        """Release the HTTP connection pool."""
        self._client.close()


def load_tts(settings: TTSSettings) -> TTS:
    """The engine named by ``settings.engine``, ready to speak (built once at startup)."""
    if settings.engine == "openai":
        if not settings.openai_url:
            raise ConfigError(
                "tts.engine is 'openai' but tts.openai_url is not set",
                hint="set tts.openai_url or use tts.engine=espeak",
            )
        return OpenAITTS(
            settings.openai_url, settings.openai_model, settings.openai_voice, api_key=settings.openai_api_key
        )
    return EspeakTTS(settings.voice, settings.speed_wpm)

"""espeak-ng speech with the phonemes it spoke and when: the library's phoneme events.

The espeak-ng command line cannot report phoneme timing without mbrola voices,
but its library emits a phoneme event, with the sample it starts at, for every
phoneme it synthesises. Those events and the samples come from one synthesis
run, so the timings are exact for the returned audio.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np

from ..errors import DependencyMissing, TTSError

_RETRIEVAL = 1  # AUDIO_OUTPUT_RETRIEVAL: samples come to the callback
_PHONEME_EVENTS = 0x0001  # espeakINITIALIZE_PHONEME_EVENTS
_EVENT_LIST_TERMINATED, _EVENT_PHONEME = 0, 7
_RATE = 1  # espeakRATE: words per minute
_lock = threading.Lock()  # the library keeps one global synthesiser


@dataclass(frozen=True)
class Phone:
    """One phoneme (espeak mnemonic, e.g. ``m``, ``u:``, ``_`` for a pause) and its span in seconds."""

    symbol: str
    start: float
    end: float


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
        ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8),
    ]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@functools.lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL, int]:
    try:
        lib = ctypes.CDLL("libespeak-ng.so.1")
    except OSError as exc:
        raise DependencyMissing("espeak-ng is not installed",
                                hint="apt-get install espeak-ng, or set tts.engine") from exc
    rate = lib.espeak_Initialize(_RETRIEVAL, 0, None, _PHONEME_EVENTS)
    if rate <= 0:
        raise TTSError("espeak-ng failed to start")
    return lib, rate


def shifted(phones: Iterable[Phone], seconds: float) -> tuple[Phone, ...]:
    """``phones`` moved ``seconds`` later (earlier when negative), e.g. into a longer track."""
    return tuple(replace(p, start=p.start + seconds, end=p.end + seconds) for p in phones)


def speak_with_phones(text: str, voice: str = "en-us", speed_wpm: int = 175) -> tuple[np.ndarray, int, list[Phone]]:
    """``(float32 samples, rate, phones)`` for ``text``; phone spans tile the speech in order."""
    lib, rate = _library()
    samples: list[np.ndarray] = []
    starts: list[tuple[int, str]] = []

    def receive(wav: ctypes.Array, count: int, events: ctypes.Array) -> int:
        if count > 0:
            samples.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            if events[i].type == _EVENT_PHONEME:
                starts.append((events[i].sample, events[i].id.decode("ascii", "replace")))
            i += 1
        return 0

    callback = _Callback(receive)
    data = text.encode("utf-8")
    with _lock:
        lib.espeak_SetSynthCallback(callback)
        if lib.espeak_SetVoiceByName(voice.encode("ascii")) != 0:
            raise TTSError(f"espeak-ng has no voice {voice!r}")
        lib.espeak_SetParameter(_RATE, speed_wpm, 0)
        if lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None) != 0:
            raise TTSError("espeak-ng could not synthesise the text")
        lib.espeak_Synchronize()
    audio = (np.concatenate(samples) if samples else np.zeros(0, np.int16)).astype(np.float32) / 32768.0
    end = len(audio) / rate
    phones = [Phone(symbol, at / rate, (starts[k + 1][0] / rate if k + 1 < len(starts) else end))
              for k, (at, symbol) in enumerate(starts)]
    return audio, rate, [p for p in phones if p.end > p.start]

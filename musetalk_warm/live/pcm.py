"""Streamed speech in: int16 mono PCM chunks → the same speech at 16 kHz and the output rate.

Resampling is stateful (soxr streams), so chunk boundaries leave no clicks and the
result matches resampling the whole stream, up to the resampler's delay.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import soxr

from ..errors import BadInput
from ..media.audio import SAMPLE_RATE

MAX_RATE = 192000


class PcmSink(Protocol):
    """Where a PCM stream's speech goes (a live session)."""

    def pcm_start(self) -> object: ...

    def pcm_audio(self, key: object, speech16k: np.ndarray, track: np.ndarray) -> None: ...

    def pcm_end(self, key: object) -> None: ...


class _Resampler:
    def __init__(self, src: int, dst: int) -> None:
        self._stream = None if src == dst else soxr.ResampleStream(src, dst, 1, dtype="float32", quality="HQ")

    def __call__(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return samples
        return np.asarray(self._stream.resample_chunk(samples, last=last), np.float32)


class PcmInput:
    """One speaker's streamed speech: each run of ``feed`` calls up to ``end`` is one utterance."""

    def __init__(self, sink: PcmSink, rate: int, audio_rate: int) -> None:
        if not 8000 <= rate <= MAX_RATE:
            raise BadInput(f"PCM rate must be 8000..{MAX_RATE} Hz, got {rate}")
        self._sink = sink
        self.rate = rate
        self.audio_rate = audio_rate
        self._key: object | None = None
        self._to16k = self._toout = None
        self.closed = False

    def feed(self, samples: np.ndarray) -> None:
        """Add int16 mono samples at the input rate (starts an utterance when none is open)."""
        if self.closed:
            return
        pcm = np.asarray(samples)
        if pcm.dtype != np.int16:
            raise BadInput(f"PCM must be int16 samples, got {pcm.dtype}")
        audio = pcm.reshape(-1).astype(np.float32) / 32768.0
        if self._key is None:
            self._key = self._sink.pcm_start()
            self._to16k, self._toout = _Resampler(self.rate, SAMPLE_RATE), _Resampler(self.rate, self.audio_rate)
        assert self._to16k is not None and self._toout is not None
        self._sink.pcm_audio(self._key, self._to16k(audio), self._toout(audio))

    def end(self) -> None:
        """End the current utterance (a no-op when none is open)."""
        if self._key is None or self._to16k is None or self._toout is None:
            return
        empty = np.zeros(0, np.float32)
        self._sink.pcm_audio(self._key, self._to16k(empty, True), self._toout(empty, True))
        self._sink.pcm_end(self._key)
        self._key = None

    def close(self) -> None:
        """End the open utterance and ignore later audio."""
        self.end()
        self.closed = True

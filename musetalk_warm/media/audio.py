"""Any audio upload (bytes or a path, any container/codec FFmpeg reads) → validated
mono float32 at a requested rate.

Decoding goes through PyAV (:func:`musetalk_warm.media.decode.decode_audio`) in a
short-lived child process (:mod:`musetalk_warm.media.isolate`), so a crash in native
code refuses the upload instead of ending the server. Resampling uses soxr at HQ quality: it is what upstream
MuseTalk's ``librosa.load(sr=16000)`` applies by default (``res_type="soxr_hq"``), so
the Whisper features match upstream; PyAV's swresample would differ slightly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soxr

from ..errors import AudioError

from .isolate import decode_audio_isolated

SAMPLE_RATE = 16000  # what Whisper and the renderers take
# Shorter is no speech (a syllable lasts ~0.1 s); the server also needs one video frame.
MIN_SECONDS = 0.1


def load_audio(
    source: bytes | str | Path,
    rate: int = 16000,
    *,
    min_seconds: float = MIN_SECONDS,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode ``source`` to mono float32 at ``rate``; channels are averaged.

    Raises :class:`AudioError` for empty, unreadable, non-audio or corrupt input, and
    for audio shorter than ``min_seconds`` or longer than ``max_seconds``.
    """
    mono, native = load_audio_native(source, min_seconds=min_seconds, max_seconds=max_seconds)
    return resample(mono, native, rate)


def load_audio_native(
    source: bytes | str | Path,
    *,
    min_seconds: float = MIN_SECONDS,
    max_seconds: float | None = None,
) -> tuple[np.ndarray, int]:
    """Like :func:`load_audio` at the file's own rate: ``(mono float32, rate)``.

    Resampling once from the native rate to each target keeps the 16 kHz features
    identical to upstream's ``librosa.load(path, sr=16000)``.
    """
    mono, native = decode_audio_isolated(source, max_seconds)
    seconds = len(mono) / native
    if seconds < min_seconds:
        raise AudioError(f"audio is {seconds * 1000:.0f} ms long; the minimum is {min_seconds * 1000:.0f} ms")
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"audio is {seconds:.1f} s long; the maximum is {max_seconds:g} s")
    if not np.isfinite(mono).all():
        raise AudioError("audio holds invalid (NaN or infinite) samples")
    return mono, native


def resample(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Mono float32 ``audio`` from ``src_rate`` to ``dst_rate`` (soxr HQ)."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if src_rate == dst_rate:
        return audio.copy()
    return soxr.resample(audio, src_rate, dst_rate, quality="HQ").astype(np.float32, copy=False)


def num_frames(n_samples: int, fps: int, rate: int = SAMPLE_RATE) -> int:
    """Video frames for ``n_samples`` of audio: ``floor(n·fps/rate)``, in exact integer arithmetic.

    Upstream computes ``floor(n/rate*fps)`` in floats, which loses the last frame
    when the product is a whole number that floats round down (9.28 s at 25 fps).
    """
    return n_samples * fps // rate


def speech_tracks(samples: np.ndarray, rate: int, out_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """The same speech for the models (16 kHz) and for the output track, each resampled once."""
    return resample(samples, rate, SAMPLE_RATE), resample(samples, rate, out_rate)

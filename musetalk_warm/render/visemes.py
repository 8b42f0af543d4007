"""Mouth-shape targets per video frame: from phoneme timings, or from the spectrum.

A shape is ``(open, round, close)``: jaw opening in ``[0, 1]``, lip rounding in
``[-1, 1]`` (+1 rounded and narrow as in "who", -1 spread and wide as in "see")
and bilabial closure in ``[0, 1]`` (1: the lips pressed together, m/b/p).
"""

from __future__ import annotations

from typing import Iterable, Protocol

import numpy as np

from ..media.audio import SAMPLE_RATE

SHAPE_CHANNELS = 3
_BILABIAL = {"p", "b", "m"}
_ROUNDED = {"u:", "U", "u", "oU", "o:", "o", "O:", "O", "OI", "w", "aU", "0", "3:"}
_SPREAD = {"i:", "i", "I", "I#", "I2", "eI", "e", "E", "j", "aI", "a", "S", "s", "z", "Z"}
_WIDE_OPEN = {"a", "a#", "aa", "A:", "A", "aI", "aU", "0", "O:", "V"}
_MID_OPEN = {"E", "e", "eI", "@", "@2", "@5", "3", "3:", "O", "oU", "OI", "a2"}
_CLOSE_VOWEL = {"i:", "i", "I", "I#", "I2", "u:", "U", "u"}
_LABIODENTAL = {"f", "v"}
_NASAL_SPAN = (0.3, 0.0, 0.0)  # around an m's closed frame: a half-open, neutral mouth


class Timed(Protocol):
    symbol: str
    start: float
    end: float


def phone_shape(symbol: str) -> tuple[float, float, float]:
    """Target ``(open, round, close)`` of one espeak phoneme mnemonic; pauses are at rest."""
    s = symbol.strip("'\",%=")
    if not s or s.startswith("_"):
        return 0.0, 0.0, 0.0
    if s in _BILABIAL:
        return 0.0, 0.0, 1.0
    rounding = 1.0 if s in _ROUNDED else -1.0 if s in _SPREAD else 0.0
    if s in _WIDE_OPEN:
        return 1.0, 0.5 * rounding, 0.0
    if s in _MID_OPEN:
        return 0.65, rounding, 0.0
    if s in _CLOSE_VOWEL:
        return 0.4, rounding, 0.0
    if s in _LABIODENTAL:
        return 0.1, 0.0, 0.4
    return 0.3, 0.6 * rounding, 0.0  # other consonants: a half-open, neutral mouth


def shapes_from_phones(phones: Iterable[Timed], fps: int, count: int, lead_s: float = 0.04) -> np.ndarray:
    """``float32 [count, 3]`` shapes: each frame shows the phone sounding ``lead_s`` after it.

    Every bilabial gets at least one fully closed frame, even when shorter than a frame.
    """
    out = np.zeros((count, SHAPE_CHANNELS), np.float32)
    times = (np.arange(count) + 0.5) / fps + lead_s
    closures: list[int] = []
    for phone in phones:
        inside = (times >= phone.start) & (times < phone.end)
        shape = phone_shape(phone.symbol)
        # b and p are silent closures, shut throughout; an m hums through closed lips, so
        # they meet on one frame of it and the rest stays half-open, following the sound
        # (a second closed frame under the hum costs the mouth its match with the energy).
        nasal = phone.symbol.strip("'\",%=") == "m"
        out[inside] = _NASAL_SPAN if nasal else shape
        if shape[2] == 1.0 and count:
            middle = round((phone.start + phone.end) / 2 * fps - 0.5 - lead_s * fps)
            closures.append(int(np.clip(middle, 0, count - 1)))
    # After every span is painted, so a neighbouring phone cannot take the frame back
    # (a bilabial at the very start leads into frame 0, which the next phone covers).
    out[closures] = (0.0, 0.0, 1.0)
    return out


def band_levels_db(audio: np.ndarray, fps: int, count: int, window_s: float,
                   bands: Iterable[tuple[float, float]]) -> np.ndarray:
    """``[count, len(bands)]`` RMS level (dBFS) per band of a Hann window centred on each frame."""
    width = int(round(window_s * SAMPLE_RATE))
    half = width // 2
    centres = np.round((np.arange(count) + 0.5) / fps * SAMPLE_RATE).astype(np.int64)
    padded = np.pad(np.asarray(audio, np.float64), (half, width))
    hann = np.hanning(width)
    power = np.abs(np.fft.rfft(padded[centres[:, None] + np.arange(width)[None, :]] * hann, axis=1)) ** 2
    freqs = np.fft.rfftfreq(width, 1.0 / SAMPLE_RATE)
    # Parseval: one-sided band power over the window's energy = mean square.
    scale = 2.0 / (width * np.sum(hann**2))
    levels = [scale * power[:, (freqs >= lo) & (freqs < hi)].sum(axis=1) for lo, hi in bands]
    return 10.0 * np.log10(np.stack(levels, axis=1) + 1e-20)


def _ramp(x: np.ndarray, at0: float, at1: float) -> np.ndarray:
    return np.clip((x - at0) / (at1 - at0), 0.0, 1.0)


def spectral_rounding(levels: np.ndarray, voiced: np.ndarray) -> np.ndarray:
    """Lip rounding from ``[T,3]`` levels of the low (80–400 Hz), F1 (400–1200 Hz)
    and F2 (1500–3500 Hz) bands, for frames flagged ``voiced``.

    A strong second formant (energy above 1.5 kHz near the F1 band's) spreads
    the lips; low first and second formants together (energy under 400 Hz, little
    above 1.5 kHz: "oo", "w") round them, while open vowels (strong F1) stay
    neutral. Closure is left to phoneme timings: the spectrum cannot tell m from
    n, and closing on every nasal or level dip decouples the mouth from the
    speech energy.
    """
    low, mid, high = levels[:, 0], levels[:, 1], levels[:, 2]
    rounded = _ramp(low - mid, 2.0, 7.0) * (1.0 - _ramp(high - mid, 2.0, 10.0))
    return np.where(voiced, rounded - _ramp(high - mid, 5.0, 12.0), 0.0).astype(np.float32)

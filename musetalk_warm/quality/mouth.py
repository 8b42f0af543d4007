"""Mouth opening from iBUG-68 landmarks, and how it follows the audio.

Opening is the mean gap between the inner lips (points 61–63 above, 67–65
below) over the face height, the nose bridge (27) to the chin (8).
"""

from __future__ import annotations

import numpy as np

from ..media.audio import SAMPLE_RATE

_UPPER, _LOWER = [61, 62, 63], [67, 66, 65]


def face_height(lm: np.ndarray) -> np.ndarray:
    """``[...]`` nose-bridge-to-chin distance of ``[..., 68, 2]`` landmarks."""
    return np.linalg.norm(lm[..., 8, :] - lm[..., 27, :], axis=-1)


def mouth_opening(lm: np.ndarray, height: np.ndarray | None = None) -> np.ndarray:
    """``[...]`` inner-lip gap over the face height (``height`` overrides it, e.g. the source's)."""
    gap = np.maximum(lm[..., _LOWER, 1] - lm[..., _UPPER, 1], 0.0).mean(axis=-1)
    return gap / (face_height(lm) if height is None else height)


def frame_rms(audio16k: np.ndarray, fps: int, count: int) -> np.ndarray:
    """RMS of the samples each of ``count`` video frames spans."""
    bounds = (np.arange(count + 1) * SAMPLE_RATE / fps).astype(np.int64)
    audio = np.pad(np.asarray(audio16k, np.float64), (0, max(0, bounds[-1] - len(audio16k))))
    return np.array([np.sqrt(np.mean(audio[a:b] ** 2)) if b > a else 0.0 for a, b in zip(bounds[:-1], bounds[1:])])


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation, NaN entries dropped; 0 for a constant series."""
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])

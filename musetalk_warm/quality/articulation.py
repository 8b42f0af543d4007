"""Lip articulation measured on rendered frames against the phonemes spoken.

Landmarks (iBUG-68, e.g. mediapipe's mapped points on the output) give the
mouth width (outer corners 48–54) and opening (:func:`.mouth.mouth_opening`),
both in face heights. Each phone is judged on the frames whose centres fall in
its span (the nearest frame when it is shorter than one).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..render.visemes import Timed, phone_shape
from .mouth import face_height, mouth_opening

CLOSED = 0.02  # lips closed: opening under 2 % of the face height


def mouth_width(lm: np.ndarray) -> np.ndarray:
    """``[...]`` outer lip-corner distance over the face height."""
    return np.linalg.norm(lm[..., 54, :] - lm[..., 48, :], axis=-1) / face_height(lm)


def _frames(phone: Timed, fps: int, count: int) -> np.ndarray:
    centres = (np.arange(count) + 0.5) / fps
    inside = np.flatnonzero((centres >= phone.start) & (centres < phone.end))
    if inside.size:
        return inside
    return np.array([int(np.clip(round((phone.start + phone.end) / 2 * fps - 0.5), 0, count - 1))])


def _reach(frames: np.ndarray, count: int) -> np.ndarray:
    """A bilabial's frames and the one before (the lips lead the sound by up to a frame)."""
    return np.unique(np.clip(np.concatenate([frames - 1, frames]), 0, count - 1))


def closure_frames(phones: Iterable[Timed], fps: int, count: int) -> np.ndarray:
    """Indices of the frames on which the lips may be closed for an m, b or p."""
    spans = [_reach(_frames(p, fps, count), count) for p in phones if phone_shape(p.symbol)[2] == 1.0]
    return np.unique(np.concatenate(spans)) if spans else np.zeros(0, np.int64)


def articulation(lm: np.ndarray, phones: Iterable[Timed], fps: int) -> dict[str, float | int]:
    """Width on rounded vs spread vowels and closure on bilabials, from ``[T,68,2]`` landmarks.

    ``rounded_narrower``: share of rounded vowels whose mean width is under the
    median spread vowel's; ``spread_wider`` the converse; ``bilabial_closed``:
    share of m/b/p whose smallest opening (up to one frame after, as the lips
    lead the sound by that much at most) is under :data:`CLOSED`.
    """
    width, opening = mouth_width(lm), mouth_opening(lm)
    rounded: list[float] = []
    spread: list[float] = []
    closures: list[float] = []
    for phone in phones:
        frames = _frames(phone, fps, len(lm))
        open_, rounding, close = phone_shape(phone.symbol)
        if close == 1.0:
            closures.append(float(np.nanmin(opening[_reach(frames, len(lm))])))
        elif open_ >= 0.4 and rounding != 0 and not np.all(np.isnan(width[frames])):
            (rounded if rounding > 0 else spread).append(float(np.nanmean(width[frames])))
    r, s, c = np.array(rounded), np.array(spread), np.array(closures)
    return {
        "rounded_vowels": len(r), "spread_vowels": len(s), "bilabials": len(c),
        "rounded_width_mean": round(float(r.mean()), 4) if len(r) else float("nan"),
        "spread_width_mean": round(float(s.mean()), 4) if len(s) else float("nan"),
        "rounded_narrower": _share(r < np.median(s)) if len(s) else float("nan"),
        "spread_wider": _share(s > np.median(r)) if len(r) else float("nan"),
        "bilabial_closed": _share(c < CLOSED),
        "bilabial_opening_median": round(float(np.median(c)), 4) if len(c) else float("nan"),
    }


def _share(hits: np.ndarray) -> float:
    return round(float(hits.mean()), 3) if hits.size else float("nan")

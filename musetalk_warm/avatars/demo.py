"""The built-in demo avatar: a real face photo with gentle, looping head motion.

The photo is scikit-image's public-domain astronaut portrait (NASA), shipped
inside the scikit-image wheel, so the demo works offline and without any
avatar video. The motion is a slow sway (a few pixels of translation, +-2 deg
roll, +-1.5 % scale) along smooth periodic paths whose period divides the clip,
so the last frame leads back into the first.
"""

from __future__ import annotations

import hashlib
import math

import cv2
import numpy as np

DEMO_SOURCE_ID = "skimage.data.astronaut/sway-v1"
# The sway pivots about the neck, below the chin of the 512x512 portrait.
_PIVOT = (224.0, 235.0)
_SWAY_PERIOD_S = 6.0


def demo_source_sha256(seconds: float, fps: int, size: int | None = None) -> str:
    """A stable id of the demo frames for these arguments (the cache's source hash)."""
    return hashlib.sha256(f"{DEMO_SOURCE_ID}:{seconds}:{fps}:{size}".encode()).hexdigest()


def _portrait_bgr() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])


def demo_motion(num_frames: int, seconds: float) -> np.ndarray:
    """``[N,4]`` (dx px, dy px, roll deg, scale) per frame, periodic over ``num_frames``."""
    cycles = max(1, round(seconds / _SWAY_PERIOD_S))
    phase = 2 * math.pi * cycles * np.arange(num_frames) / num_frames
    dx = 3.0 * np.sin(phase) + 1.0 * np.sin(2 * phase + 0.7)
    dy = 1.5 * np.sin(2 * phase + 1.3)
    roll = 2.0 * np.sin(phase + 0.4)
    scale = 1.0 + 0.015 * np.sin(phase + 2.1)
    return np.stack([dx, dy, roll, scale], axis=1)


def demo_frames(seconds: float, fps: int, size: int | None = None) -> np.ndarray:
    """``[N,H,W,3]`` uint8 BGR demo frames, ``N = round(seconds * fps)``.

    512x512 by default, ``size`` x ``size`` when given. Deterministic. Borders
    are reflected, so the small motion never shows black edges.
    """
    num = max(1, round(seconds * fps))
    portrait = _portrait_bgr()
    if size is not None and size != portrait.shape[0]:
        portrait = cv2.resize(portrait, (size, size), interpolation=cv2.INTER_AREA)
    height, width = portrait.shape[:2]
    factor = width / 512.0
    pivot = (_PIVOT[0] * factor, _PIVOT[1] * factor)
    out = np.empty((num, height, width, 3), dtype=np.uint8)
    for i, (dx, dy, roll, scale) in enumerate(demo_motion(num, seconds)):
        matrix = cv2.getRotationMatrix2D(pivot, float(roll), float(scale))
        matrix[:, 2] += (dx * factor, dy * factor)
        out[i] = cv2.warpAffine(
            portrait, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
        )
    return out

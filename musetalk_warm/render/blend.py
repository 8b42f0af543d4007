"""Paste a generated 256² face back into its frame: upstream, feather or Poisson.

All three work on the crop-box region only and return a new frame (the input
may be a read-only memmap). Nothing here keeps state, so batches can be
composited from worker threads.

* ``upstream``: MuseTalk's ``get_image_blending``: the face, resized into its box,
  is hard-pasted over the crop, then blended with the mask using PIL's integer
  alpha. The blurred mask is still about half on at the box edge, so the hard
  paste leaves a visible step there.
* ``feather``: the mask is cut to the generated pixels shrunk by a 9×9 window,
  eroded 3×3 and its edge blurred with σ = 2, so alpha reaches zero before the
  generated pixels end.
* ``poisson``: gradient-domain paste equivalent to ``cv2.seamlessClone``
  (NORMAL_CLONE, centred on the mask's bounding rectangle), solved with a fast
  sine transform on a rectangle sized for the FFT.
"""

from __future__ import annotations

from typing import get_args

import cv2
import numpy as np
import scipy.fft

from ..avatars.cache import CROP_SIZE, Avatar
from ..config import BlendMode, RenderSettings
from ..avatars.stabilise import snap, upright_box

BLEND_MODES: tuple[str, ...] = get_args(BlendMode)

_FOOTPRINT_MARGIN = np.ones((9, 9), np.uint8)
_ERODE = np.ones((3, 3), np.uint8)
_FEATHER_SIGMA = 2.0
_CLONE_ERODE_ITERATIONS = 3  # as seamlessClone
_SX = np.array([[0, -1, 1]], np.float32)  # forward difference, anchored at the centre
_BX = np.array([[-1, 1, 0]], np.float32)  # backward difference


def _region(crop_box: np.ndarray | tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (int(v) for v in crop_box)
    return max(x1, 0), max(y1, 0), min(x2, shape[1]), min(y2, shape[0])


def _place(
    face: np.ndarray, t: np.ndarray, origin: tuple[int, int], size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The face warped into a ``size`` (w, h) region at ``origin``: (premultiplied BGR, alpha).

    A 256² face on an upright whole-pixel box goes through ``cv2.resize``
    (INTER_LINEAR), exactly as upstream; anything else (another face size, such
    as an enhanced 512² crop) through ``cv2.warpAffine`` with an alpha channel.
    """
    w, h = size
    if face.shape[:2] == (CROP_SIZE, CROP_SIZE) and upright_box(t) is not None:
        bw, bh = int(round(t[0, 0] * CROP_SIZE)), int(round(t[1, 1] * CROP_SIZE))
        bx = int(round(t[0, 2] - 0.5 * t[0, 0] + 0.5)) - origin[0]
        by = int(round(t[1, 2] - 0.5 * t[1, 1] + 0.5)) - origin[1]
        patch = np.zeros((h, w, 3), np.uint8)
        alpha = np.zeros((h, w), np.uint8)
        ys, xs = slice(max(by, 0), min(by + bh, h)), slice(max(bx, 0), min(bx + bw, w))
        if ys.start < ys.stop and xs.start < xs.stop and bw > 0 and bh > 0:
            resized = cv2.resize(face, (bw, bh), interpolation=cv2.INTER_LINEAR)
            patch[ys, xs] = resized[ys.start - by : ys.stop - by, xs.start - bx : xs.stop - bx]
            alpha[ys, xs] = 255
        return patch, alpha
    shifted = np.array(t, dtype=np.float64)
    shifted[:, 2] -= origin
    rgba = cv2.cvtColor(face, cv2.COLOR_BGR2BGRA)
    warped = cv2.warpAffine(rgba, shifted, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return cv2.cvtColor(warped, cv2.COLOR_BGRA2BGR), cv2.extractChannel(warped, 3)


def _mix(top: np.ndarray, bottom: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """PIL's integer alpha ``(top·w + bottom·(255-w)) / 255`` (``Image.paste`` with an L mask).

    PIL rounds with ``((v+128)>>8 + v+128)>>8``, which equals ``round(v/255)`` on
    ``0..255²``; ``convertScaleAbs`` rounds the same way (no ties: 255 is odd).
    """
    w = cv2.cvtColor(weight, cv2.COLOR_GRAY2BGR)
    total = cv2.add(
        cv2.multiply(top, w, dtype=cv2.CV_16U),
        cv2.multiply(bottom, cv2.bitwise_not(w), dtype=cv2.CV_16U),
    )
    return cv2.convertScaleAbs(total, alpha=1.0 / 255.0)


def _upstream(dst: np.ndarray, patch: np.ndarray, alpha: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # Hard paste of the generated box, then PIL's blend with the mask. ``patch`` is
    # premultiplied by ``alpha``: a whole-pixel box is copied exactly, a fractional
    # placement gets antialiased edges.
    large = cv2.add(patch, _mix(np.zeros_like(dst), dst, alpha))
    return _mix(large, dst, mask)


def feather_alpha(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Feathered uint8 alpha: ``mask`` cut to the generated ``footprint`` (both uint8)."""
    inside = cv2.erode((footprint == 255).astype(np.uint8) * 255, _FOOTPRINT_MARGIN)
    core = cv2.erode(np.minimum(mask, inside), _ERODE)
    return cv2.GaussianBlur(core, (0, 0), _FEATHER_SIGMA)


def _feather(dst: np.ndarray, patch: np.ndarray, alpha: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weight = feather_alpha(mask, alpha).astype(np.float32) * np.float32(1.0 / 255.0)
    return cv2.blendLinear(patch, dst, weight, np.float32(1.0) - weight)


def _fast_span(lo: int, hi: int, limit: int) -> tuple[int, int]:
    """Grow ``[lo, hi)`` within ``[0, limit)`` so its length minus one is FFT-friendly."""
    want = scipy.fft.next_fast_len(hi - lo - 1, real=True) + 1
    if want > limit:
        return lo, hi
    grow = want - (hi - lo)
    lo = max(0, lo - grow // 2)
    return min(lo, limit - want), min(lo, limit - want) + want


def poisson_solve(dst: np.ndarray, src: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Gradient-domain clone of ``src`` into ``dst`` where ``inside`` (uint8 0/255) is set.

    Same equations as ``cv2.seamlessClone(src, dst, inside, centre, NORMAL_CLONE)``
    with ``centre`` at the middle of ``inside``'s bounding rectangle (so nothing
    moves): guidance from ``src`` inside the 3×-eroded mask and from ``dst``
    elsewhere, Dirichlet boundary from ``dst`` on the rectangle, solved with DST-I.
    The rectangle is widened to FFT-friendly sides, which changes the result by
    well under a grey level.
    """
    out = dst.copy()
    x, y, w, h = cv2.boundingRect(inside)
    if w < 3 or h < 3:
        return out
    x0, x1 = _fast_span(x, x + w, dst.shape[1])
    y0, y1 = _fast_span(y, y + h, dst.shape[0])
    d = dst[y0:y1, x0:x1].astype(np.float32)
    s = src[y0:y1, x0:x1].astype(np.float32)
    # Outside the rectangle counts as outside the mask, as in seamlessClone.
    keep = cv2.erode(
        inside[y0:y1, x0:x1], _ERODE, iterations=_CLONE_ERODE_ITERATIONS,
        borderType=cv2.BORDER_CONSTANT, borderValue=0,
    )
    k = (keep.astype(np.float32) * (1.0 / 255.0))[:, :, None]
    gx = cv2.filter2D(s, -1, _SX) * k + cv2.filter2D(d, -1, _SX) * (1.0 - k)
    gy = cv2.filter2D(s, -1, _SX.T) * k + cv2.filter2D(d, -1, _SX.T) * (1.0 - k)
    div = cv2.filter2D(gx, -1, _BX) + cv2.filter2D(gy, -1, _BX.T)
    # Move the known boundary values to the right-hand side, then solve with zero boundary.
    rhs = div[1:-1, 1:-1].copy()
    rhs[0] -= d[0, 1:-1]
    rhs[-1] -= d[-1, 1:-1]
    rhs[:, 0] -= d[1:-1, 0]
    rhs[:, -1] -= d[1:-1, -1]
    ny, nx = rhs.shape[:2]
    lam_x = 2.0 * np.cos(np.pi * np.arange(1, nx + 1) / (nx + 1))
    lam_y = 2.0 * np.cos(np.pi * np.arange(1, ny + 1) / (ny + 1))
    denom = (lam_y[:, None] + lam_x[None, :] - 4.0).astype(np.float32)[:, :, None]
    coef = scipy.fft.dstn(rhs, type=1, axes=(0, 1), workers=1) / denom
    solved = scipy.fft.idstn(coef, type=1, axes=(0, 1), workers=1)
    out[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] = np.clip(solved, 0, 255).astype(np.uint8)
    return out


def _poisson(dst: np.ndarray, patch: np.ndarray, alpha: np.ndarray, mask: np.ndarray) -> np.ndarray:
    inside_fp = cv2.erode((alpha == 255).astype(np.uint8) * 255, _FOOTPRINT_MARGIN)
    inside = np.where((mask >= 128) & (inside_fp > 0), 255, 0).astype(np.uint8)
    return poisson_solve(dst, patch, inside)


_MODES = {"upstream": _upstream, "feather": _feather, "poisson": _poisson}


def composite(
    frame: np.ndarray,
    face: np.ndarray,
    transform: np.ndarray,
    mask: np.ndarray,
    crop_box: np.ndarray | tuple[int, ...],
    mode: str,
    *,
    subpixel: bool = True,
) -> np.ndarray:
    """A copy of ``frame`` with the generated ``face`` pasted by ``transform``.

    Args:
        frame: ``[H,W,3]`` uint8 BGR (not modified).
        face: ``[256,256,3]`` uint8 BGR generated face crop (any square size for
            ``feather``, ``poisson`` and a ``transform`` made for that size).
        transform: ``[2,3]`` face-crop → frame map (:mod:`musetalk_warm.avatars.stabilise`).
        mask: uint8 ``[2s,2s]`` blend mask over ``crop_box``.
        crop_box: ``x1,y1,x2,y2`` of the mask (may leave the frame).
        mode: ``upstream``, ``feather`` or ``poisson``.
        subpixel: keep a fractional placement; otherwise round it to whole pixels.
    """
    if mode not in _MODES:
        raise ValueError(f"unknown blend mode {mode!r}; choose one of {', '.join(BLEND_MODES)}")
    out = np.array(frame, dtype=np.uint8, copy=True)
    x1, y1, x2, y2 = _region(crop_box, frame.shape)
    if x2 <= x1 or y2 <= y1:
        return out
    cx, cy = int(crop_box[0]), int(crop_box[1])
    t = np.asarray(transform, dtype=np.float64) if subpixel else snap(transform)
    patch, alpha = _place(face, t, (x1, y1), (x2 - x1, y2 - y1))
    m = np.ascontiguousarray(mask[y1 - cy : y2 - cy, x1 - cx : x2 - cx])
    out[y1:y2, x1:x2] = _MODES[mode](out[y1:y2, x1:x2], patch, alpha, m)
    return out


def faceless_frames(avatar: Avatar) -> frozenset[int]:
    """Source frames in which prep found no face; they are shown as they are, untouched."""
    return frozenset(int(i) for i in avatar.manifest.get("faceless_frames", ()))


def composite_face(avatar: Avatar, face: np.ndarray, source: int, settings: RenderSettings) -> np.ndarray:
    """``face`` pasted back into source frame ``source`` at the placement its crop was cut with.

    A frame in which prep found no face (its box is a neighbour's) comes back untouched:
    a mouth there would be drawn on the background.
    """
    if source in faceless_frames(avatar):
        return np.array(avatar.frames[source])
    return composite(
        avatar.frames[source],
        face,
        avatar.placements[source],
        avatar.masks[source],
        avatar.crop_boxes[source],
        settings.blend_mode,
        subpixel=settings.subpixel_enabled,
    )

"""Blend-mask geometry of upstream MuseTalk (``musetalk/utils/blending.py``).

``crop_box`` and ``blend_mask`` reproduce ``get_crop_box`` and
``get_image_prepare_material``; the face-region map they restrict and blur comes
either from BiSeNet face parsing (when its weights exist) or, offline, from
:func:`landmark_segment`, a filled polygon of the lower face.
"""

from __future__ import annotations

import cv2
import numpy as np

Box = tuple[int, int, int, int]

# Jaw points 2..14 run from the left cheek round the chin to the right cheek;
# the nostril base 31..35 closes the polygon under the nose.
_JAW = list(range(2, 15))
_NOSE_BASE = [35, 34, 33, 32, 31]
# Fixed-point bits for sub-pixel polygon vertices (cv2.fillPoly ``shift``).
_SHIFT = 4


def crop_box(face_box: Box, expand: float = 1.5) -> Box:
    """The square paste region around ``face_box`` (upstream ``get_crop_box``).

    Side ``2s`` with ``s = int(max(w, h) // 2 * expand)`` (floor-divide first);
    the box may extend beyond the frame.
    """
    x1, y1, x2, y2 = (int(v) for v in face_box)
    x_c, y_c = (x1 + x2) // 2, (y1 + y2) // 2
    s = int(max(x2 - x1, y2 - y1) // 2 * expand)
    return (x_c - s, y_c - s, x_c + s, y_c + s)


def blend_mask(
    frame_shape: tuple[int, ...],
    face_box: Box,
    segment: np.ndarray,
    *,
    upper_boundary_ratio: float = 0.5,
    expand: float = 1.5,
    blur_ratio: float = 0.1,
) -> tuple[np.ndarray, Box]:
    """The uint8 ``[2s,2s]`` paste mask over ``crop_box(face_box)`` and that box.

    ``segment`` is a face-region map (255 = replace) covering the crop box, as
    BiSeNet 'jaw' parsing or :func:`landmark_segment` gives. As upstream: only
    its part inside ``face_box`` is kept, rows above ``int(2s * ratio)`` are
    cleared, then a Gaussian blur of odd size ``int(blur_ratio * 2s // 2 * 2) + 1``.
    Parts of the crop box outside the frame are cleared too: upstream parses a
    crop that is black there, which never reads as face.
    """
    box = crop_box(face_box, expand)
    x_s, y_s, x_e, y_e = box
    side = x_e - x_s
    if segment.shape[:2] != (side, side):
        raise ValueError(f"segment is {segment.shape[:2]}, the crop box is {side}x{side}")
    x1, y1, x2, y2 = (int(v) for v in face_box)
    mask = np.zeros((side, side), dtype=np.uint8)
    inner = (slice(y1 - y_s, y2 - y_s), slice(x1 - x_s, x2 - x_s))
    mask[inner] = segment[inner]
    mask[: int(side * upper_boundary_ratio)] = 0
    height, width = frame_shape[:2]
    mask[: max(0, -y_s)] = 0
    mask[max(0, height - y_s) :] = 0
    mask[:, : max(0, -x_s)] = 0
    mask[:, max(0, width - x_s) :] = 0
    kernel = int(blur_ratio * side // 2 * 2) + 1
    return cv2.GaussianBlur(mask, (kernel, kernel), 0), box


def landmark_segment(landmarks: np.ndarray, box: Box) -> np.ndarray:
    """A lower-face map (255 inside) over ``box``, from iBUG-68 landmarks.

    The offline stand-in for BiSeNet's 'jaw' result: cheeks, lips, mouth and
    chin below the nostrils, bounded by the jaw line 2..14; the nose stays out.
    At the cheeks the outline rises to the nostril-base height.
    """
    lm = np.asarray(landmarks, dtype=np.float64) - (box[0], box[1])
    side = int(box[2] - box[0])
    nose_y = lm[_NOSE_BASE, 1].mean()
    right_cheek = (lm[14, 0], min(lm[14, 1], nose_y))
    left_cheek = (lm[2, 0], min(lm[2, 1], nose_y))
    outline = np.vstack([lm[_JAW], right_cheek, lm[_NOSE_BASE], left_cheek])
    mask = np.zeros((side, side), dtype=np.uint8)
    points = np.round(outline * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(mask, [points], 255, lineType=cv2.LINE_8, shift=_SHIFT)
    return mask

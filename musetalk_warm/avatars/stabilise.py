"""Where each 256² face crop is cut and pasted back: One-Euro, scale lock, affine tracking.

Placements are computed once at prep, one per source frame: prep cuts each
frame's face crop with its placement and the engine pastes the generated face
with the same one, so the face goes back exactly where its input came from. A
placement is a ``[2,3]`` affine map from face-crop pixel coordinates to frame
pixel coordinates (pixel-centre convention, as ``cv2.warpAffine``); for an
upright box it equals upstream's ``cv2.resize(face, (w, h))`` into that box.

Stabilisers (each toggled in :class:`~musetalk_warm.config.RenderSettings`):

* affine tracking: stable features (brows, eyes, nose bridge) of the avatar's
  reference frame (frame 0) followed into every frame with pyramidal LK and fitted
  with a RANSAC similarity, always against the reference (chaining frame to frame
  drifts). Boxes are then smoothed in reference coordinates, where a rigidly
  moving head holds still, and carried back by the measured motion: no lag.
* One-Euro filter on box centre and size, reset on a jump of the raw centre.
* scale lock: box size fixed to the median of the first frames.
* sub-pixel placement: fractional placements are kept (otherwise rounded to
  whole pixels at prep, as upstream's integer boxes).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .cache import CROP_SIZE
from ..config import OneEuroSettings, RenderSettings

# iBUG-68 points whose neighbourhood moves rigidly with the skull: brows 17..26,
# nose bridge 27..30, eyes 36..47. The mouth and jaw are excluded on purpose.
_STABLE_POINTS = list(range(17, 31)) + list(range(36, 48))
_LK = dict(
    winSize=(21, 21),
    maxLevel=3,
    criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01),
)
_MIN_TRACKED = 8
_FB_MAX_ERR = 1.0  # px: forward-backward LK disagreement above this drops a point


class OneEuroFilter:
    """One-Euro low-pass filter (Casiez et al., CHI 2012) on a vector signal.

    The speed is the low-passed raw difference (as the authors' reference code);
    the cutoff rises with it (``min_cutoff + beta·|ẋ|``, the vector norm), so a still signal is smoothed hard and a moving one follows
    with little lag. A raw step larger than ``jump`` restarts the filter there.
    """

    def __init__(self, params: OneEuroSettings, dt: float, jump: float = math.inf) -> None:
        self.params = params
        self.dt = dt
        self.jump = jump
        self._raw: np.ndarray | None = None
        self._value: np.ndarray | None = None
        self._speed: np.ndarray | None = None
        self.restarted = False  # whether the last sample restarted the filter on a jump

    def _alpha(self, cutoff: float) -> float:
        tau = 1.0 / (2.0 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / self.dt)

    def reset(self) -> None:
        """Forget the history; the next sample passes unchanged."""
        self._raw = self._value = self._speed = None

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        self.restarted = self._raw is not None and float(np.linalg.norm(x - self._raw)) > self.jump
        if self.restarted:
            self.reset()
        if self._raw is None or self._value is None or self._speed is None:
            self._raw, self._value, self._speed = x, x.copy(), np.zeros_like(x)
            return x.copy()
        a_d = self._alpha(self.params.d_cutoff)
        self._speed = a_d * (x - self._raw) / self.dt + (1.0 - a_d) * self._speed
        cutoff = self.params.min_cutoff + self.params.beta * float(np.linalg.norm(self._speed))
        a = self._alpha(cutoff)
        self._value = a * x + (1.0 - a) * self._value
        self._raw = x
        return self._value.copy()


class ScaleLock:
    """Passes sizes through for the first ``frames`` samples, then holds their median."""

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self._seen: list[np.ndarray] = []
        self._locked: np.ndarray | None = None

    @property
    def locked(self) -> bool:
        return self._locked is not None

    def __call__(self, size: np.ndarray) -> np.ndarray:
        if self._locked is not None:
            return self._locked.copy()
        size = np.asarray(size, dtype=np.float64)
        self._seen.append(size)
        if len(self._seen) >= self.frames:
            self._locked = np.median(np.stack(self._seen), axis=0)
        return size.copy()


def box_transform(center: np.ndarray, size: np.ndarray) -> np.ndarray:
    """The face-crop → frame map of an upright box of ``size`` (w, h) at ``center``.

    Matches ``cv2.resize(face, (w, h))`` pasted at ``x1 = cx - w/2``:
    ``x = x1 + (u + 0.5)·w/256 - 0.5``.
    """
    (cx, cy), (w, h) = np.asarray(center, np.float64), np.asarray(size, np.float64)
    sx, sy = w / CROP_SIZE, h / CROP_SIZE
    return np.array(
        [[sx, 0.0, cx - w / 2 + 0.5 * sx - 0.5], [0.0, sy, cy - h / 2 + 0.5 * sy - 0.5]]
    )


def boxes_center_size(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[N,4]`` x1,y1,x2,y2 boxes → centres ``[N,2]`` and sizes ``[N,2]`` (float64)."""
    b = np.asarray(boxes, dtype=np.float64)
    return (b[:, :2] + b[:, 2:]) / 2.0, b[:, 2:] - b[:, :2]


def upright_box(transform: np.ndarray) -> tuple[int, int, int, int] | None:
    """The whole-pixel box ``x1,y1,x2,y2`` that ``transform`` places; ``None`` if rotated or fractional."""
    t = np.asarray(transform, dtype=np.float64)
    if t[0, 1] != 0.0 or t[1, 0] != 0.0 or not np.allclose(snap(t), t, atol=1e-9, rtol=0):
        return None
    return placed_box(t)


def placed_box(transform: np.ndarray) -> tuple[int, int, int, int]:
    """Whole-pixel bounding box ``x1,y1,x2,y2`` of the 256² square under ``transform``.

    The crop's outer pixel edges (``-0.5`` and ``255.5`` in pixel-centre
    coordinates) are mapped to the frame; for :func:`box_transform` of a
    whole-pixel box this gives that box back.
    """
    t = np.asarray(transform, dtype=np.float64)
    lo, hi = -0.5, CROP_SIZE - 0.5
    corners = np.array([[lo, lo], [hi, lo], [lo, hi], [hi, hi]]) @ t[:, :2].T + t[:, 2] + 0.5
    x1, y1 = np.rint(corners.min(axis=0))
    x2, y2 = np.rint(corners.max(axis=0))
    return int(x1), int(y1), int(x2), int(y2)


def crop_face(frame: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """The 256² face crop that ``transform`` places: what the generated face should replace.

    A whole-pixel upright box inside the frame is cut exactly as upstream,
    ``cv2.resize(frame[y1:y2, x1:x2], (256, 256), INTER_LANCZOS4)``; any other
    placement is sampled with ``cv2.warpAffine`` (LANCZOS4, edges replicated).
    """
    box = upright_box(transform)
    height, width = frame.shape[:2]
    if box is not None and box[0] >= 0 and box[1] >= 0 and box[2] <= width and box[3] <= height:
        x1, y1, x2, y2 = box
        return cv2.resize(frame[y1:y2, x1:x2], (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LANCZOS4)
    flags = cv2.INTER_LANCZOS4 | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(frame, transform, (CROP_SIZE, CROP_SIZE), flags=flags, borderMode=cv2.BORDER_REPLICATE)


def cut_crops(frames: np.ndarray, transforms: np.ndarray) -> np.ndarray:
    """``[N,256,256,3]``: :func:`crop_face` of each frame at its transform."""
    return np.stack([crop_face(frame, t) for frame, t in zip(frames, transforms, strict=True)])


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The ``[2,3]`` affine ``outer ∘ inner``."""
    return outer[:, :2] @ inner + np.concatenate([np.zeros((2, 2)), outer[:, 2:]], axis=1)


def invert(affine: np.ndarray) -> np.ndarray:
    """Inverse of a ``[2,3]`` affine."""
    return cv2.invertAffineTransform(np.asarray(affine, dtype=np.float64))


def _similarity_scale(affine: np.ndarray) -> float:
    return float(math.sqrt(abs(np.linalg.det(affine[:, :2]))))


def snap(transform: np.ndarray) -> np.ndarray:
    """Round a placement to whole pixels: the crop's corners (upright) or its origin."""
    t = np.array(transform, dtype=np.float64)
    if t[0, 1] == 0.0 and t[1, 0] == 0.0:
        sx, sy = t[0, 0], t[1, 1]
        x1, y1 = t[0, 2] - 0.5 * sx + 0.5, t[1, 2] - 0.5 * sy + 0.5
        x2, y2 = x1 + sx * CROP_SIZE, y1 + sy * CROP_SIZE
        box = np.rint([x1, y1, x2, y2])
        center, size = (box[:2] + box[2:]) / 2.0, box[2:] - box[:2]
        return box_transform(center, size)
    corner = t[:, :2] @ np.array([-0.5, -0.5]) + t[:, 2] + 0.5
    t[:, 2] += np.rint(corner) - corner
    return t


def _tracking_roi(crop_boxes: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    height, width = shape[:2]
    x1, y1 = np.maximum(crop_boxes[:, :2].min(axis=0), 0)
    x2, y2 = crop_boxes[:, 2:].max(axis=0)
    return int(x1), int(y1), int(min(x2, width)), int(min(y2, height))


def _reference_features(gray: np.ndarray, landmarks: np.ndarray) -> np.ndarray | None:
    hull = cv2.convexHull(np.round(landmarks[_STABLE_POINTS]).astype(np.int32))
    mask = np.zeros(gray.shape, dtype=np.uint8)
    cv2.fillConvexPoly(mask, hull, 255)
    mask = cv2.dilate(mask, np.ones((9, 9), np.uint8))
    points = cv2.goodFeaturesToTrack(
        gray, maxCorners=150, qualityLevel=0.01, minDistance=5, mask=mask, blockSize=5
    )
    return None if points is None or len(points) < _MIN_TRACKED else points.astype(np.float32)


def track_affines(
    frames: np.ndarray,
    landmarks: np.ndarray,
    boxes: np.ndarray,
    crop_boxes: np.ndarray,
    reference: int = 0,
) -> np.ndarray:
    """``[N,2,3]`` float64 similarity maps from the reference frame to each frame.

    Features on the reference frame's brows, eyes and nose bridge are tracked
    into each frame directly (LK seeded with the box motion, forward-backward
    checked) and fitted with ``estimateAffinePartial2D`` (RANSAC). A frame that
    cannot be tracked falls back to the motion of its face box. This is the
    expensive step of :func:`plan` (about 1.5 ms per frame of a 512² video).
    """
    count = len(frames)
    x1, y1, x2, y2 = _tracking_roi(np.asarray(crop_boxes), frames.shape[1:])
    offset = np.array([x1, y1], dtype=np.float64)
    gray = [cv2.cvtColor(np.ascontiguousarray(f[y1:y2, x1:x2]), cv2.COLOR_BGR2GRAY) for f in frames]
    centers, sizes = boxes_center_size(boxes)
    box_maps = [box_transform(c, s) for c, s in zip(centers, sizes)]
    to_ref_box = invert(box_maps[reference])
    fallback = [compose(m, to_ref_box) for m in box_maps]
    points0 = _reference_features(gray[reference], np.asarray(landmarks[reference]) - offset)
    result = np.empty((count, 2, 3))
    for i in range(count):
        result[i] = fallback[i]
        if i == reference:
            result[i] = np.eye(2, 3)
            continue
        if points0 is None:
            continue
        # Seed with the box motion (in ROI coordinates) so large moves stay in LK's range.
        seed = cv2.transform(points0 + offset.astype(np.float32), fallback[i]) - offset
        seed = seed.astype(np.float32)
        moved, ok, _ = cv2.calcOpticalFlowPyrLK(
            gray[reference], gray[i], points0, seed.copy(), flags=cv2.OPTFLOW_USE_INITIAL_FLOW, **_LK
        )
        back, ok_back, _ = cv2.calcOpticalFlowPyrLK(
            gray[i], gray[reference], moved, points0.copy(), flags=cv2.OPTFLOW_USE_INITIAL_FLOW, **_LK
        )
        err = np.linalg.norm((back - points0).reshape(-1, 2), axis=1)
        keep = (ok.ravel() == 1) & (ok_back.ravel() == 1) & (err < _FB_MAX_ERR)
        if keep.sum() < _MIN_TRACKED:
            continue
        src = points0[keep].reshape(-1, 2) + offset
        dst = moved[keep].reshape(-1, 2) + offset
        affine, inliers = cv2.estimateAffinePartial2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=1.0, refineIters=20
        )
        if affine is not None and int(inliers.sum()) >= _MIN_TRACKED:
            result[i] = affine
    return result


def _filter_cycle(
    centers: np.ndarray, sizes: np.ndarray, settings: RenderSettings, dt: float
) -> tuple[np.ndarray, np.ndarray]:
    """Scale lock and One-Euro over the ping-pong cycle, made zero-phase per source frame.

    The filters run over the cycle 0..N-1, N-1..0 twice and the second (periodic)
    pass is kept, so there is no start-up transient. Frame ``i`` is visited once
    going forward (position ``i``) and once going back (``2N-1-i``); the two
    outputs lag in opposite directions, and their mean has no lag (as filtfilt).
    """
    n = len(centers)
    source = np.r_[np.arange(n), np.arange(n)[::-1]]
    smooth_center = OneEuroFilter(settings.one_euro_center, dt, settings.jump_reset_px)
    smooth_size = OneEuroFilter(settings.one_euro_size, dt)
    lock = ScaleLock(min(settings.scale_lock_frames, n))
    for size in sizes[: lock.frames]:
        lock(size)  # all frames are known at prep: lock before the first position
    out_center = np.empty((2 * n, 2))
    out_size = np.empty((2 * n, 2))
    for _ in range(2):
        for p, i in enumerate(source):
            c, s = centers[i], sizes[i]
            if settings.scale_lock_enabled:
                s = lock(s)
            if settings.one_euro_enabled:
                c = smooth_center(c)
                if smooth_center.restarted:
                    smooth_size.reset()
                s = smooth_size(s)
            out_center[p], out_size[p] = c, s
    return (out_center[:n] + out_center[n:][::-1]) / 2.0, (out_size[:n] + out_size[n:][::-1]) / 2.0


def plan(
    frames: np.ndarray,
    landmarks: np.ndarray,
    boxes: np.ndarray,
    crop_boxes: np.ndarray,
    fps: float,
    settings: RenderSettings,
    *,
    affines: np.ndarray | None = None,
) -> np.ndarray:
    """``[N,2,3]`` float64 placements (face crop → frame), one per source frame.

    Inputs are prep's per-frame arrays: ``boxes`` the raw upstream face boxes,
    ``crop_boxes`` their expanded crop boxes (the tracking region). ``affines``
    are :func:`track_affines` results; they are computed here when affine
    tracking is on and none are given.

    With affine tracking the face box is fixed in the reference frame (median
    centre; median size of the first ``scale_lock_frames`` frames with scale lock,
    of all frames without) and moved by each frame's tracked motion. Without it,
    scale lock and One-Euro run on the raw boxes over the ping-pong cycle and
    each frame gets the mean of its forward and backward filtered values (no
    lag). With every stabiliser off a placement is the raw box itself. Without
    sub-pixel placement, placements are rounded to whole pixels (:func:`snap`).
    """
    n = len(boxes)
    if settings.affine_enabled:
        if affines is None:
            affines = track_affines(frames, landmarks, boxes, crop_boxes)
        motion = np.asarray(affines, dtype=np.float64)
    else:
        motion = np.repeat(np.eye(2, 3)[None], n, axis=0)
    centers, sizes = boxes_center_size(boxes)
    # Boxes in reference coordinates: a rigid head motion cancels out.
    ref_centers = np.array([cv2.transform(c[None, None], invert(m))[0, 0] for c, m in zip(centers, motion)])
    ref_sizes = sizes / np.array([_similarity_scale(m) for m in motion])[:, None]

    if settings.affine_enabled:
        # The placement is rigid with the tracked head: one reference box (robust
        # over all frames) carried by each frame's measured motion. Nothing is left
        # to filter, and no filter lag is added.
        lock = min(settings.scale_lock_frames, n) if settings.scale_lock_enabled else n
        out_center = np.repeat(np.median(ref_centers, axis=0)[None], n, axis=0)
        out_size = np.repeat(np.median(ref_sizes[:lock], axis=0)[None], n, axis=0)
    else:
        out_center, out_size = _filter_cycle(ref_centers, ref_sizes, settings, 1.0 / fps)
    placements = np.stack([compose(m, box_transform(c, s)) for m, c, s in zip(motion, out_center, out_size)])
    if not settings.subpixel_enabled:
        placements = np.stack([snap(t) for t in placements])
    return placements

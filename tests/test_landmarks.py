"""Landmarks: mediapipe FaceMesh mapped to iBUG-68 on a real face photo, small faces included."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import PORTRAIT_FACE_WIDTH, face_in_frame
from musetalk_warm.avatars.landmarks import (
    MEDIAPIPE_TO_IBUG68,
    MediapipeDetector,
    detect_landmarks,
)

JAW, BROWS, NOSE_BRIDGE, NOSE_BASE = range(0, 17), range(17, 27), range(27, 31), range(31, 36)
EYES, MOUTH = range(36, 48), range(48, 68)


@pytest.fixture(scope="module")
def astronaut_lm(face_bgr: np.ndarray) -> np.ndarray:
    lm = detect_landmarks(face_bgr)
    assert lm is not None
    return lm


def _haar_face(image_bgr: np.ndarray) -> tuple[int, int, int, int]:
    """An independent face box (OpenCV's Haar cascade shipped with opencv)."""
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    faces = cascade.detectMultiScale(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY), 1.1, 5)
    assert len(faces) == 1
    x, y, w, h = (int(v) for v in faces[0])
    return x, y, w, h


def test_mapping_table_is_68_distinct_mesh_points() -> None:
    assert len(MEDIAPIPE_TO_IBUG68) == 68
    assert len(set(MEDIAPIPE_TO_IBUG68)) == 68
    assert all(0 <= i < 468 for i in MEDIAPIPE_TO_IBUG68)  # no iris points needed
    assert MEDIAPIPE_TO_IBUG68[8] == 152  # chin
    assert MEDIAPIPE_TO_IBUG68[33] == 2  # subnasale


def test_points_lie_on_the_face(face_bgr: np.ndarray, astronaut_lm: np.ndarray) -> None:
    assert astronaut_lm.shape == (68, 2) and astronaut_lm.dtype == np.float32
    x, y, w, h = _haar_face(face_bgr)
    # The Haar box stops above the chin: allow a 25 % margin around it.
    inside_x = (astronaut_lm[:, 0] > x - 0.25 * w) & (astronaut_lm[:, 0] < x + 1.25 * w)
    inside_y = (astronaut_lm[:, 1] > y - 0.25 * h) & (astronaut_lm[:, 1] < y + 1.25 * h)
    assert inside_x.all() and inside_y.all()
    # The face is about as wide as the Haar box.
    assert 0.8 * w < np.ptp(astronaut_lm[JAW, 0]) < 1.3 * w


def test_point_order_is_ibug(astronaut_lm: np.ndarray) -> None:
    lm = astronaut_lm
    jaw = lm[list(JAW)]
    # Left ear -> chin -> right ear: the angle seen from the face centre sweeps one way
    # (x barely changes between the two top points, where the jaw line is vertical).
    centre = lm.mean(axis=0)
    angle = np.unwrap(np.arctan2(jaw[:, 1] - centre[1], jaw[:, 0] - centre[0]))
    assert (np.diff(angle) < 0).all()
    assert (np.diff(jaw[:, 0]) > -1.0).all() and jaw[0, 0] < jaw[8, 0] < jaw[16, 0]
    assert (np.diff(jaw[:9, 1]) > 0).all() and (np.diff(jaw[8:, 1]) < 0).all()
    assert int(np.argmax(lm[:, 1])) in (7, 8, 9)  # the chin is the lowest point

    def mean_y(idx: range) -> float:
        return float(lm[list(idx), 1].mean())

    assert mean_y(BROWS) < mean_y(EYES) < mean_y(NOSE_BASE) < mean_y(MOUTH)
    assert (np.diff(lm[list(NOSE_BRIDGE), 1]) > 0).all()  # 27 -> 30 down the nose
    assert mean_y(EYES) < lm[29, 1] < mean_y(MOUTH)
    assert lm[29, 1] < lm[33, 1]
    # Left/right: eye 36-41 and mouth corner 48 on the image's left.
    assert lm[36:42, 0].mean() < lm[42:48, 0].mean()
    assert lm[36, 0] < lm[39, 0] < lm[42, 0] < lm[45, 0]
    assert lm[48, 0] < lm[51, 0] < lm[54, 0] and lm[60, 0] < lm[62, 0] < lm[64, 0]
    # Inner lip inside the outer lip; upper lip above lower lip.
    assert lm[48, 0] <= lm[60, 0] and lm[64, 0] <= lm[54, 0]
    assert lm[51, 1] < lm[62, 1] < lm[66, 1] < lm[57, 1]


def test_no_face_gives_none() -> None:
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), (9, 9), 3)
    assert detect_landmarks(noise) is None


def test_video_tracking_follows_a_shift(face_bgr: np.ndarray) -> None:
    detector = MediapipeDetector(video=True)
    try:
        first = detector.detect(face_bgr)
        moved = detector.detect(np.roll(face_bgr, (6, -9), axis=(0, 1)))
    finally:
        detector.close()
    assert first is not None and moved is not None
    shift = np.median(moved.landmarks - first.landmarks, axis=0)
    np.testing.assert_allclose(shift, (-9, 6), atol=1.0)
    x1, y1, x2, y2 = first.box
    lm = first.landmarks
    assert x1 <= lm[:, 0].min() and lm[:, 0].max() <= x2 and y1 < lm[:, 1].min() and lm[:, 1].max() <= y2


# --- small faces: full-range search, FaceMesh on an enlarged window ------------------

FULL_HD = (1920, 1080)


@pytest.fixture(scope="module")
def large_face_lm(face_bgr: np.ndarray) -> np.ndarray:
    """Landmarks of the portrait at twice its size (a 185 px face), in portrait pixels."""
    lm = detect_landmarks(cv2.resize(face_bgr, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC))
    assert lm is not None
    np.testing.assert_allclose(np.ptp(lm[JAW, 0]) / 2, PORTRAIT_FACE_WIDTH, atol=0.5)
    return lm / 2


def _errors(found: np.ndarray, large_face_lm: np.ndarray, scale: float, at: tuple[int, int]) -> np.ndarray:
    """Per-point distance to the large face's landmarks scaled into the frame, in px."""
    return np.linalg.norm(found - (large_face_lm * scale + at), axis=1)


@pytest.mark.parametrize(("face_width", "size", "at"),
                         [(80, FULL_HD, (1100, 500)), (100, FULL_HD, (150, 60)), (100, (1280, 720), (500, 150))])
def test_small_face_matches_the_large_face(
    face_bgr: np.ndarray, large_face_lm: np.ndarray, face_width: int, size: tuple[int, int], at: tuple[int, int]
) -> None:
    from mediapipe.python.solutions import face_mesh

    frame, scale = face_in_frame(face_bgr, face_width, size, at)
    with face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True) as mesh:
        rgb = np.ascontiguousarray(frame[:, :, ::-1])
        assert mesh.process(rgb).multi_face_landmarks is None  # FaceMesh alone misses it
    lm = detect_landmarks(frame)
    assert lm is not None
    err = _errors(lm, large_face_lm, scale, at)
    # As accurate, relative to the face, as FaceMesh on large faces (~1 % mean, ~3 % worst here).
    assert err.mean() < 0.02 * face_width and err.max() < 0.05 * face_width


def test_small_face_is_tracked_and_found_again_after_a_jump(
    face_bgr: np.ndarray, large_face_lm: np.ndarray
) -> None:
    frame, scale = face_in_frame(face_bgr, 90, FULL_HD, (700, 300))
    # Drift 0..56 px right (past the window's margin, so it is moved once), then a jump across the frame.
    shifts = [*range(0, 60, 8), -600]
    detector = MediapipeDetector(video=True)
    try:
        found = [detector.detect(np.roll(frame, dx, axis=1)) for dx in shifts]
    finally:
        detector.close()
    for dx, det in zip(shifts, found):
        assert det is not None
        err = _errors(det.landmarks, large_face_lm, scale, (700 + dx, 300))
        assert err.mean() < 0.02 * 90, dx
        x1, y1, x2, y2 = det.box
        assert x1 <= det.landmarks[:, 0].min() and det.landmarks[:, 0].max() <= x2 and y2 - y1 > 90


def test_tiles_cover_the_frame_with_overlap() -> None:
    from musetalk_warm.avatars.landmarks import _tile_starts

    assert _tile_starts(720, 720) == [0] and _tile_starts(500, 720) == [0]
    starts = _tile_starts(1920, 720)
    assert starts[0] == 0 and starts[-1] == 1920 - 720
    assert all(720 - (b - a) >= 0.25 * 720 for a, b in zip(starts, starts[1:]))

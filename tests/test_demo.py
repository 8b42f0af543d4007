"""The built-in demo avatar: real face, smooth looping motion, deterministic."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from musetalk_warm.avatars.demo import demo_frames, demo_motion, demo_source_sha256
from musetalk_warm.avatars.landmarks import MediapipeDetector

SECONDS, FPS = 2.0, 25


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return demo_frames(SECONDS, FPS)


def _shift(a: np.ndarray, b: np.ndarray) -> float:
    """Translation (px) between two frames by phase correlation on the face region."""
    ga, gb = (np.float32(cv2.cvtColor(f[40:260, 140:320], cv2.COLOR_BGR2GRAY)) for f in (a, b))
    (dx, dy), _ = cv2.phaseCorrelate(ga, gb)
    return float(np.hypot(dx, dy))


def test_shape_and_determinism(frames: np.ndarray, face_bgr: np.ndarray) -> None:
    assert frames.shape == (50, 512, 512, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, demo_frames(SECONDS, FPS))
    small = demo_frames(0.4, 25, size=256)
    assert small.shape == (10, 256, 256, 3)
    # Frames are the portrait moved by a few pixels, never equal to each other.
    assert max(_shift(face_bgr, f) for f in frames) < 6.0
    assert len({f.tobytes() for f in frames}) == len(frames)
    assert demo_source_sha256(SECONDS, FPS) == demo_source_sha256(SECONDS, FPS)
    assert demo_source_sha256(SECONDS, FPS) != demo_source_sha256(SECONDS + 1, FPS)


def test_motion_is_small_smooth_and_loops(frames: np.ndarray) -> None:
    steps = [_shift(frames[i], frames[i + 1]) for i in range(len(frames) - 1)]
    wrap = _shift(frames[-1], frames[0])
    assert max(steps) < 1.0 and wrap < 1.0  # sub-pixel per frame, also across the loop
    assert max(_shift(frames[0], f) for f in frames) > 2.0  # yet it does move
    motion = demo_motion(len(frames), SECONDS)
    assert np.abs(motion[:, 2]).max() <= 2.0 and np.abs(motion[:, 3] - 1).max() <= 0.02
    # The path is periodic: the step from the last to the first frame is an ordinary step.
    deltas = np.diff(np.vstack([motion, motion[:1]]), axis=0)
    assert np.abs(deltas[-1]).max() <= np.abs(deltas).max() + 1e-9


def test_no_black_borders(frames: np.ndarray, face_bgr: np.ndarray) -> None:
    # The portrait's top and left edges are light (its suit is black at the bottom right).
    def black(f: np.ndarray) -> int:
        edges = np.concatenate([f[:4].reshape(-1, 3), f[:, :4].reshape(-1, 3)])
        return int((edges.max(axis=1) < 8).sum())

    assert black(face_bgr) <= 10
    assert max(black(f) for f in frames) <= 20


def test_a_face_is_found_in_every_frame(frames: np.ndarray) -> None:
    detector = MediapipeDetector(video=False)  # each frame on its own, no tracking
    try:
        found = [detector.detect(f) for f in frames]
    finally:
        detector.close()
    assert all(d is not None for d in found)
    centres = np.array([d.landmarks.mean(axis=0) for d in found if d is not None])
    assert np.linalg.norm(np.diff(centres, axis=0), axis=1).max() < 1.5
    assert np.ptp(centres, axis=0).max() > 2.0

"""Stabilisers: One-Euro, scale lock, reference-frame affine tracking, placement plan."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from musetalk_warm.config import OneEuroSettings, RenderSettings
from musetalk_warm.avatars.landmarks import detect_landmarks
from musetalk_warm.avatars.masks import crop_box
from musetalk_warm.avatars.stabilise import (
    OneEuroFilter,
    ScaleLock,
    box_transform,
    compose,
    crop_face,
    placed_box,
    plan,
    snap,
    track_affines,
    upright_box,
)


def _alpha(cutoff: float, dt: float) -> float:
    return 1.0 / (1.0 + 1.0 / (2.0 * math.pi * cutoff * dt))


def test_one_euro_matches_hand_computed_sequence() -> None:
    dt, min_cutoff, beta, d_cutoff = 0.04, 1.0, 0.5, 1.0
    f = OneEuroFilter(OneEuroSettings(min_cutoff=min_cutoff, beta=beta, d_cutoff=d_cutoff), dt)
    xs = [0.0, 1.0, 1.0, 3.0]
    got = [float(f(x)[0]) for x in xs]
    # By hand: the first sample passes; then speed = low-passed raw difference / dt,
    # cutoff = min_cutoff + beta·|speed|, output = a·x + (1-a)·previous output.
    a_d = _alpha(d_cutoff, dt)  # 1 / (1 + 1 / (2π·0.04)) = 0.200849
    assert a_d == pytest.approx(0.2008486, abs=1e-6)
    s1 = a_d * 25.0
    y1 = _alpha(min_cutoff + beta * s1, dt) * 1.0
    s2 = a_d * 0.0 + (1 - a_d) * s1
    a2 = _alpha(min_cutoff + beta * s2, dt)
    y2 = a2 * 1.0 + (1 - a2) * y1
    s3 = a_d * 50.0 + (1 - a_d) * s2
    a3 = _alpha(min_cutoff + beta * s3, dt)
    y3 = a3 * 3.0 + (1 - a3) * y2
    assert y1 == pytest.approx(0.4687, abs=1e-3)  # cutoff 3.5106 → a 0.4687
    assert got == pytest.approx([0.0, y1, y2, y3], abs=1e-12)


def test_one_euro_restarts_on_a_jump() -> None:
    f = OneEuroFilter(OneEuroSettings(min_cutoff=1.0, beta=0.0), 0.04, jump=12.0)
    for _ in range(10):
        f(np.array([100.0, 50.0]))
    near = f(np.array([110.0, 50.0]))  # a 10 px step is filtered
    assert 100.0 < near[0] < 105.0 and not f.restarted
    far = f(np.array([140.0, 50.0]))  # a 30 px step restarts the filter there
    assert f.restarted and far.tolist() == [140.0, 50.0]


def test_scale_lock_freezes_after_n_frames() -> None:
    lock = ScaleLock(5)
    sizes = [[100, 120], [104, 118], [98, 125], [101, 121], [130, 119]]
    passed = [lock(np.array(s, float)).tolist() for s in sizes]
    assert passed == [[float(a), float(b)] for a, b in sizes] and lock.locked
    for later in ([80, 90], [150, 170], [101, 121]):
        assert lock(np.array(later, float)).tolist() == [101.0, 120.0]  # per-axis median


def test_box_transform_matches_cv2_resize_and_snap_keeps_whole_boxes(face_bgr: np.ndarray) -> None:
    face = cv2.resize(face_bgr, (256, 256), interpolation=cv2.INTER_AREA)
    box = (37, 52, 37 + 171, 52 + 203)
    t = box_transform(np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]), np.array([171.0, 203.0]))
    warped = cv2.warpAffine(face, t, (300, 300), flags=cv2.INTER_LINEAR)
    resized = cv2.resize(face, (171, 203), interpolation=cv2.INTER_LINEAR)
    inner = (slice(box[1] + 2, box[3] - 2), slice(box[0] + 2, box[2] - 2))
    # Same sample positions; only the interpolation weights' fixed-point precision differs.
    diff = np.abs(warped[inner].astype(int) - resized[2:-2, 2:-2])
    assert diff.mean() < 0.3 and diff.max() <= 4
    np.testing.assert_array_equal(snap(t), t)
    shifted = t.copy()
    shifted[:, 2] += (0.3, -0.4)
    np.testing.assert_allclose(snap(shifted), t, atol=1e-12)


@pytest.fixture(scope="module")
def face_landmarks(face_bgr: np.ndarray) -> np.ndarray:
    found = detect_landmarks(face_bgr)
    assert found is not None
    return found


def _box_of(landmarks: np.ndarray) -> np.ndarray:
    lm = landmarks.astype(np.int32)
    y29, y2 = lm[29, 1], lm[:, 1].max()
    return np.array([lm[:, 0].min(), max(0, 2 * y29 - y2), lm[:, 0].max(), y2], dtype=np.int32)


def test_affine_recovers_a_known_rotation(face_bgr: np.ndarray, face_landmarks: np.ndarray) -> None:
    box = _box_of(face_landmarks)
    center = ((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0)
    truth = cv2.getRotationMatrix2D(center, 4.0, 1.03)
    truth[:, 2] += (6.5, -3.25)
    moved = cv2.warpAffine(face_bgr, truth, (512, 512), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    frames = np.stack([face_bgr, moved])
    boxes = np.stack([box, box + np.array([6, -3, 6, -3])])
    crops = np.array([crop_box(tuple(b)) for b in boxes])
    affines = track_affines(frames, np.stack([face_landmarks] * 2), boxes, crops)
    np.testing.assert_allclose(affines[0], np.eye(2, 3))
    angle = math.degrees(math.atan2(affines[1, 1, 0], affines[1, 0, 0]))
    assert abs(angle - math.degrees(math.atan2(truth[1, 0], truth[0, 0]))) < 0.5  # truth: -4°
    assert math.hypot(*affines[1, :, 0]) == pytest.approx(1.03, abs=0.005)
    corners = np.array([[box[0], box[1]], [box[2], box[3]]], np.float64)
    err = cv2.transform(corners[None], affines[1])[0] - cv2.transform(corners[None], truth)[0]
    assert np.abs(err).max() < 0.5


def test_no_drift_on_a_static_noisy_head(face_bgr: np.ndarray, face_landmarks: np.ndarray) -> None:
    # 500 frames of one still photo with sensor noise and detector noise on the boxes:
    # each frame is measured against frame 0, so errors cannot accumulate.
    rng = np.random.default_rng(1)
    box = _box_of(face_landmarks)
    x0, y0 = max(0, box[0] - 40), max(0, box[1] - 40)
    still = face_bgr[y0 : box[3] + 40, x0 : box[2] + 40]
    count = 500
    frames = np.empty((count, *still.shape), np.uint8)
    for frame in frames:
        frame[:] = np.clip(still + rng.normal(0.0, 3.0, still.shape), 0, 255)
    boxes = (box - np.array([x0, y0, x0, y0]))[None] + rng.normal(0, 1.5, (count, 4)).round().astype(np.int32)
    landmarks = np.repeat((face_landmarks - (x0, y0))[None], count, axis=0)
    crops = np.array([crop_box(tuple(b)) for b in boxes])
    affines = track_affines(frames, landmarks, boxes, crops)
    corners = np.array([[[0, 0], [still.shape[1], 0], [0, still.shape[0]], [still.shape[1], still.shape[0]]]], float)
    drift = np.array([np.abs(cv2.transform(corners, a)[0] - corners[0]).max() for a in affines])
    assert drift.max() < 0.5


def _plan(frames: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray, settings: RenderSettings,
          affines: np.ndarray | None = None) -> np.ndarray:
    crops = np.array([crop_box(tuple(b)) for b in boxes], dtype=np.int32)
    return plan(frames, landmarks, boxes, crops, 25, settings, affines=affines)


OFF = RenderSettings(one_euro_enabled=False, scale_lock_enabled=False, affine_enabled=False)


def test_plan_off_is_the_raw_box_and_on_smooths(face_bgr: np.ndarray, face_landmarks: np.ndarray) -> None:
    rng = np.random.default_rng(2)
    count = 30
    box = _box_of(face_landmarks)
    boxes = box[None] + rng.normal(0, 2.0, (count, 4)).round().astype(np.int32)
    frames = np.repeat(face_bgr[None], count, axis=0)
    landmarks = np.repeat(face_landmarks[None], count, axis=0)
    placed = _plan(frames, boxes, landmarks, OFF)
    assert placed.shape == (count, 2, 3)
    for t, b in zip(placed, boxes.astype(float)):
        np.testing.assert_array_equal(t, box_transform((b[:2] + b[2:]) / 2, b[2:] - b[:2]))
        assert upright_box(t) == placed_box(t) == tuple(int(v) for v in b)
    still = np.repeat(np.eye(2, 3)[None], count, axis=0)
    on = _plan(frames, boxes, landmarks, RenderSettings(scale_lock_frames=10), affines=still)
    sizes = on[:, [0, 1], [0, 1]] * 256
    np.testing.assert_allclose(sizes, np.broadcast_to(np.median(boxes[:10, 2:] - boxes[:10, :2], axis=0), sizes.shape))
    # With tracking the box is rigid with the head: a still head gets one placement.
    np.testing.assert_allclose(on, np.broadcast_to(on[0], on.shape))
    filtered = _plan(frames, boxes, landmarks, RenderSettings(affine_enabled=False, scale_lock_frames=10))
    np.testing.assert_allclose(filtered[:, [0, 1], [0, 1]] * 256, sizes)
    raw_x = placed[:, 0, 2]
    assert np.std(np.diff(filtered[:, 0, 2])) < 0.5 * np.std(np.diff(raw_x))
    # Without sub-pixel placement every placement is a whole-pixel box.
    whole = _plan(frames, boxes, landmarks, RenderSettings(affine_enabled=False, subpixel_enabled=False))
    assert all(upright_box(t) is not None for t in whole)
    assert np.abs(whole - filtered).max() > 0.01


def _lag_frames(estimate: np.ndarray, truth: np.ndarray, speed: float) -> np.ndarray:
    """Per-frame lag (frames) of ``estimate`` behind ``truth`` moving at ``speed`` px/frame."""
    return (truth - estimate) / speed


def test_one_euro_placements_are_zero_phase(face_bgr: np.ndarray, face_landmarks: np.ndarray) -> None:
    # A head still for 40 frames, gliding right at 0.6 px/frame for 80, still again.
    rng = np.random.default_rng(5)
    speed = 0.6
    x = np.r_[np.zeros(40), speed * np.arange(1, 81), np.full(40, 80 * speed)]
    box = _box_of(face_landmarks).astype(np.float64)
    truth = (box[0] + box[2]) / 2 + x
    boxes = np.rint(box[None] + x[:, None] * [1, 0, 1, 0] + rng.normal(0, 0.7, (len(x), 4))).astype(np.int32)
    count = len(x)
    frames = np.repeat(face_bgr[None], count, axis=0)
    settings = RenderSettings(affine_enabled=False, scale_lock_enabled=False)
    placed = _plan(frames, boxes, np.repeat(face_landmarks[None], count, axis=0), settings)
    centre = placed[:, 0, 2] + 127.5 * placed[:, 0, 0] + 0.5  # crop centre, in box coordinates
    gliding = slice(60, 100)  # inside the moving segment, away from its ends
    lag = _lag_frames(centre[gliding], truth[gliding], speed).mean()
    assert abs(lag) < 0.25  # measured 0.02
    # A causal One-Euro filter over the same boxes trails the motion by more than a frame.
    causal = OneEuroFilter(settings.one_euro_center, 1 / 25, settings.jump_reset_px)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    forward = np.array([causal(c)[0] for c in centres])
    assert _lag_frames(forward[gliding], truth[gliding], speed).mean() > 1.0
    # And the zero-phase placement is still smooth.
    assert np.std(np.diff(centre[gliding])) < 0.5 * np.std(np.diff(centres[gliding, 0]))


def test_placed_box_bounds_a_rotated_placement() -> None:
    t = box_transform(np.array([200.0, 220.0]), np.array([160.0, 180.0]))
    turn = cv2.getRotationMatrix2D((200.0, 220.0), 10.0, 1.0)
    rotated = compose(turn, t)
    assert upright_box(rotated) is None
    x1, y1, x2, y2 = placed_box(rotated)
    # The box's outer edges, in the pixel-centre coordinates the maps use.
    edges = np.array([[[120.0, 130.0], [280.0, 130.0], [120.0, 310.0], [280.0, 310.0]]]) - 0.5
    corners = cv2.transform(edges, turn)[0] + 0.5
    np.testing.assert_allclose([x1, y1], corners.min(axis=0), atol=0.5)
    np.testing.assert_allclose([x2, y2], corners.max(axis=0), atol=0.5)


def test_crop_face_is_upstreams_crop(face_bgr: np.ndarray) -> None:
    box = (180, 190, 352, 400)
    t = box_transform(np.array([266.0, 295.0]), np.array([172.0, 210.0]))
    upstream = cv2.resize(face_bgr[box[1] : box[3], box[0] : box[2]], (256, 256), interpolation=cv2.INTER_LANCZOS4)
    np.testing.assert_array_equal(crop_face(face_bgr, t), upstream)  # bit-identical


def test_crop_face_off_the_frame_replicates_the_edge(face_bgr: np.ndarray) -> None:
    # A box leaving the frame on the left: sampled as upstream would on an edge-padded frame.
    t = box_transform(np.array([70.0, 295.0]), np.array([172.0, 210.0]))
    padded = cv2.copyMakeBorder(face_bgr, 0, 0, 40, 0, cv2.BORDER_REPLICATE)
    upstream = cv2.resize(padded[190:400, 24:196], (256, 256), interpolation=cv2.INTER_LANCZOS4)  # x -16..156
    diff = np.abs(crop_face(face_bgr, t)[4:-4, 4:-4].astype(int) - upstream[4:-4, 4:-4])
    assert diff.mean() < 1.0

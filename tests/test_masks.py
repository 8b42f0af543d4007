"""Upstream crop-box and blend-mask geometry, and the landmark lower-face mask."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from musetalk_warm.avatars.landmarks import detect_landmarks
from musetalk_warm.avatars.masks import blend_mask, crop_box, landmark_segment

# Face box 100 wide, 142 tall: s = int(142 // 2 * 1.5) = int(106.5) = 106, side 212.
FACE = (200, 200, 300, 342)
CROP = (250 - 106, 271 - 106, 250 + 106, 271 + 106)


def test_crop_box_matches_hand_computed() -> None:
    assert crop_box(FACE) == CROP
    # w 106, h 130: 130 // 2 * 1.5 = 97.5 -> 97 around (153, 115).
    assert crop_box((100, 50, 206, 180)) == (56, 18, 250, 212)
    # Odd sizes floor-divide before scaling: 101 // 2 = 50 -> 75; the box may leave the frame.
    assert crop_box((10, 20, 111, 120)) == (-15, -5, 135, 145)
    assert crop_box((10, 20, 111, 120), expand=2.0) == (-40, -30, 160, 170)


def test_blend_mask_raw_geometry() -> None:
    # blur_ratio small enough for a 1x1 kernel (an identity blur) shows the raw mask.
    segment = np.full((212, 212), 255, np.uint8)
    mask, box = blend_mask((600, 600, 3), FACE, segment, blur_ratio=0.001)
    assert box == CROP and mask.shape == (212, 212) and mask.dtype == np.uint8
    x1, y1 = FACE[0] - CROP[0], FACE[1] - CROP[1]  # face box inside the crop: (56, 35)
    x2, y2 = FACE[2] - CROP[0], FACE[3] - CROP[1]  # (156, 177)
    expected = np.zeros((212, 212), np.uint8)
    expected[106:y2, x1:x2] = 255  # face box rows below int(212 * 0.5) = 106
    np.testing.assert_array_equal(mask, expected)
    assert (x1, y1, x2, y2) == (56, 35, 156, 177)


def test_blend_mask_keeps_the_segment_and_blurs_with_kernel_21() -> None:
    rng = np.random.default_rng(1)
    segment = (rng.random((212, 212)) > 0.3).astype(np.uint8) * 255
    mask, _ = blend_mask((600, 600, 3), FACE, segment)
    raw = np.zeros((212, 212), np.uint8)
    raw[106:177, 56:156] = segment[106:177, 56:156]
    # k = int(0.1 * 212 // 2 * 2) + 1 = int(21.2 // 2 * 2) + 1 = 21
    np.testing.assert_array_equal(mask, cv2.GaussianBlur(raw, (21, 21), 0))
    assert not np.array_equal(mask, cv2.GaussianBlur(raw, (19, 19), 0))
    assert not mask[: 106 - 10].any()  # the blur reaches at most k // 2 = 10 rows up
    assert mask[106 - 10 :].any()


def test_blend_mask_upper_boundary_ratio() -> None:
    segment = np.full((212, 212), 255, np.uint8)
    mask, _ = blend_mask((600, 600, 3), FACE, segment, upper_boundary_ratio=0.75, blur_ratio=0.001)
    assert not mask[:159].any() and mask[159:177, 56:156].all()  # int(212 * 0.75) = 159


def test_blend_mask_is_empty_outside_the_frame() -> None:
    segment = np.full((212, 212), 255, np.uint8)
    # Frame 330 high and 280 wide: the crop box (144..356, 165..377) sticks out right and below.
    mask, _ = blend_mask((330, 280, 3), FACE, segment, blur_ratio=0.001)
    assert not mask[330 - 165 :].any() and not mask[:, 280 - 144 :].any()
    assert mask[106:165, 56:136].all()


def test_blend_mask_refuses_a_wrong_segment_size() -> None:
    with pytest.raises(ValueError, match="212x212"):
        blend_mask((600, 600, 3), FACE, np.zeros((200, 200), np.uint8))


def test_landmark_segment_covers_the_lower_face(face_bgr: np.ndarray) -> None:
    lm = detect_landmarks(face_bgr)
    assert lm is not None
    box = crop_box((int(lm[:, 0].min()), 60, int(lm[:, 0].max()), int(lm[:, 1].max())))
    seg = landmark_segment(lm, box)
    side = box[2] - box[0]
    assert seg.shape == (side, side) and seg.dtype == np.uint8 and set(np.unique(seg)) == {0, 255}

    def at(point: np.ndarray) -> int:
        x, y = np.round(point - box[:2]).astype(int)
        return int(seg[y, x])

    lips_centre = lm[[51, 57]].mean(axis=0)
    assert at(lips_centre) == 255 and at(lm[[62, 66]].mean(axis=0)) == 255  # lips and mouth
    assert at(lm[[8, 57]].mean(axis=0)) == 255  # chin
    cheek = lm[[3, 48]].mean(axis=0)
    assert at(cheek) == 255
    for outside in (lm[30], lm[27], lm[36], lm[45], lm[19]):  # nose tip, bridge, eyes, brow
        assert at(outside) == 0
    assert at(lm[8] + (0, 6)) == 0  # below the chin
    assert at(lm[4] - (6, 0)) == 0 and at(lm[12] + (6, 0)) == 0  # beyond the jaw line
    # Every mouth landmark is inside (up to the 1-px polygon edge).
    assert all(at(p) == 255 for p in lm[60:68])

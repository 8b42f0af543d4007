"""Paste-back: upstream's PIL paste exactly, feather edges, Poisson vs seamlessClone, sub-pixel."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from PIL import Image

from musetalk_warm.render.blend import composite, feather_alpha, poisson_solve
from musetalk_warm.avatars.masks import blend_mask, crop_box
from musetalk_warm.avatars.stabilise import box_transform


def _upstream_reference(frame: np.ndarray, face: np.ndarray, box: tuple, mask: np.ndarray, cbox: tuple) -> np.ndarray:
    """UPSTREAM_NOTES §29/§32, step by step with PIL as upstream does."""
    x, y, x1, y1 = box
    res = cv2.resize(face, (x1 - x, y1 - y))
    body = Image.fromarray(frame[:, :, ::-1])
    face_pil = Image.fromarray(res[:, :, ::-1])
    x_s, y_s, _, _ = cbox
    face_large = body.crop(cbox)
    face_large.paste(face_pil, (x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    body.paste(face_large, cbox[:2], Image.fromarray(mask).convert("L"))
    return np.asarray(body)[:, :, ::-1]


def _case(face_bgr: np.ndarray, box: tuple[int, int, int, int]) -> tuple:
    side = crop_box(box)[2] - crop_box(box)[0]
    segment = np.zeros((side, side), np.uint8)
    cv2.ellipse(segment, (side // 2, side // 2 + side // 6), (side // 3, side // 4), 0, 0, 360, 255, -1)
    mask, cbox = blend_mask(face_bgr.shape, box, segment)
    face = cv2.resize(np.roll(face_bgr, 7, axis=0)[box[1] : box[3], box[0] : box[2]], (256, 256))
    b = np.array(box, float)
    return face, mask, cbox, box_transform((b[:2] + b[2:]) / 2, b[2:] - b[:2])


@pytest.mark.parametrize("box", [(180, 190, 352, 400), (2, 300, 170, 505)])  # the second leaves the frame
def test_upstream_mode_reproduces_upstream_exactly(face_bgr: np.ndarray, box: tuple) -> None:
    face, mask, cbox, t = _case(face_bgr, box)
    frame = face_bgr.copy()
    frame.setflags(write=False)
    for subpixel in (False, True):
        got = composite(frame, face, t, mask, cbox, "upstream", subpixel=subpixel)
        np.testing.assert_array_equal(got, _upstream_reference(face_bgr, face, box, mask, cbox))
    np.testing.assert_array_equal(frame, face_bgr)


def test_feather_alpha_ends_inside_the_generated_pixels(face_bgr: np.ndarray) -> None:
    face, mask, cbox, t = _case(face_bgr, (180, 190, 352, 400))
    footprint = np.zeros(mask.shape, np.uint8)
    x, y = 180 - cbox[0], 190 - cbox[1]
    footprint[y : y + 210, x : x + 172] = 255
    full = np.full(mask.shape, 255, np.uint8)
    alpha = feather_alpha(full, footprint)
    assert alpha[footprint == 0].max() <= 3  # upstream's mask is ~half on at the box edge
    assert alpha[y + 105, x + 86] == 255
    ramp = alpha[y + 105, x - 2 : x + 12].astype(int)
    assert (np.diff(ramp) >= 0).all() and ramp[-1] > 240


def test_poisson_matches_seamless_clone(face_bgr: np.ndarray) -> None:
    dst = face_bgr.copy()
    src = np.clip(np.roll(face_bgr, 3, axis=1).astype(int) + (20, -10, 15), 0, 255).astype(np.uint8)
    # The first bounding box is already FFT-sized; the second is widened by the solver,
    # which lets the membrane reach a few pixels past seamlessClone's rectangle.
    for axes, worst, typical in (((80, 60), 2, 0.01), ((83, 57), 20, 0.05)):
        inside = np.zeros(dst.shape[:2], np.uint8)
        cv2.ellipse(inside, (250, 300), axes, 0, 0, 360, 255, -1)
        x, y, w, h = cv2.boundingRect(inside)
        ours = poisson_solve(dst, src, inside)
        # seamlessClone (OpenCV 4.11) erodes and inverts its mask argument in place: pass a copy.
        ref = cv2.seamlessClone(src, dst, inside.copy(), (x + w // 2, y + h // 2), cv2.NORMAL_CLONE)
        diff = np.abs(ref.astype(int) - ours.astype(int))
        assert diff.max() <= worst and np.percentile(diff, 99.9) <= 3 and diff.mean() < typical
        changed = np.abs(ours.astype(int) - dst.astype(int)).max(axis=2) > 0
        assert changed.sum() > 0.5 * (inside > 0).sum()
    np.testing.assert_array_equal(poisson_solve(dst, src, inside), ours)


def test_subpixel_paste_follows_a_fractional_shift() -> None:
    # A smooth analytic face shifted by a fractional offset: warpAffine samples it
    # at the true positions, rounding the offset would be up to half a pixel off.
    u = np.arange(256, dtype=np.float64)
    def pattern(xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        v = 127 + 60 * np.sin(xx / 9.0) + 50 * np.cos(yy / 7.0)
        return np.repeat(v[..., None], 3, axis=2)
    face = np.rint(pattern(*np.meshgrid(u, u))).astype(np.uint8)
    frame = np.zeros((400, 400, 3), np.uint8)
    shift = np.array([70.4, 60.6])
    t = np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]]])
    mask = np.full((300, 300), 255, np.uint8)
    cbox = (50, 40, 350, 340)
    xx, yy = np.meshgrid(np.arange(400.0), np.arange(400.0))
    truth = pattern(xx - shift[0], yy - shift[1])
    inner = (slice(100, 280), slice(110, 290))
    for mode in ("feather", "upstream"):
        fine = composite(frame, face, t, mask, cbox, mode, subpixel=True)[inner].astype(float)
        coarse = composite(frame, face, t, mask, cbox, mode, subpixel=False)[inner].astype(float)
        err_fine = np.abs(fine - truth[inner]).mean()
        err_coarse = np.abs(coarse - truth[inner]).mean()
        assert err_fine < 1.0 < err_coarse


def test_composite_is_thread_safe_and_leaves_input_alone(face_bgr: np.ndarray) -> None:
    face, mask, cbox, t = _case(face_bgr, (180, 190, 352, 400))
    frame = face_bgr.copy()
    frame.setflags(write=False)
    shifts = [np.array([[0, 0, dx], [0, 0, dy]]) for dx, dy in np.random.default_rng(0).normal(0, 2, (12, 2))]
    jobs = [(mode, t + s) for mode in ("feather", "poisson", "upstream") for s in shifts]
    serial = [composite(frame, face, tt, mask, cbox, mode) for mode, tt in jobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda job: composite(frame, face, job[1], mask, cbox, job[0]), jobs))
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(frame, face_bgr)
    outside = np.ones(frame.shape[:2], bool)
    outside[cbox[1] : cbox[3], cbox[0] : cbox[2]] = False
    assert all((out[outside] == face_bgr[outside]).all() for out in serial)

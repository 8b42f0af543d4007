"""Measure each stabiliser and blend mode on a synthetic avatar with known motion.

A real face photo (scikit-image's astronaut) is moved, scaled and rotated along
smooth paths with still and moving segments; its face boxes come from the
upstream box rule on the exactly transformed landmarks plus detector-like noise.

Jitter, lag and error are those of the placement: a mouth point fixed in crop
coordinates (a generator drawing the mouth at a canonical crop position) against
its true position. For the seams the generated face is what prep feeds the
generator, the crop cut at the placement, with a slight tone shift (as a VAE
gives), and the mask is built on the placed box as prep does; the "ideal" seam
pastes the ground-truth crop at the true placement. Writes
``results/eval_stability.json`` and prints a markdown table.

    python -m scripts.eval_stability [--frames 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from scipy.signal import butter, filtfilt
from skimage import data

from musetalk_warm.avatars.cache import Avatar
from musetalk_warm.render.blend import composite
from musetalk_warm.config import RenderSettings
from musetalk_warm.avatars.landmarks import detect_landmarks
from musetalk_warm.avatars.masks import blend_mask, crop_box, landmark_segment
from musetalk_warm.avatars.stabilise import (
    box_transform,
    boxes_center_size,
    compose,
    crop_face,
    invert,
    placed_box,
    plan,
    track_affines,
)

FPS = 25
MOUTH = slice(48, 68)
TONE = np.array([14.0, 12.0, 8.0])  # BGR offset of the "generated" face (a VAE-like tone shift)
OFF = dict(one_euro_enabled=False, scale_lock_enabled=False, affine_enabled=False, subpixel_enabled=False)
CONFIGS: dict[str, tuple[dict[str, bool], str]] = {
    "raw (upstream paste)": ({}, "upstream"),
    "one-euro only": ({"one_euro_enabled": True}, "upstream"),
    "scale lock only": ({"scale_lock_enabled": True}, "upstream"),
    "affine only": ({"affine_enabled": True}, "upstream"),
    "sub-pixel only": ({"subpixel_enabled": True}, "upstream"),
    "all but sub-pixel": ({**{k: True for k in OFF}, "subpixel_enabled": False}, "upstream"),
    "all + upstream paste": ({k: True for k in OFF}, "upstream"),
    "all + feather": ({k: True for k in OFF}, "feather"),
    "all + poisson": ({k: True for k in OFF}, "poisson"),
}


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def head_motion(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (dx, dy, degrees, scale) and a moving flag: still, move, still, move back."""
    t = np.arange(count) / count
    go = _smoothstep((t - 0.15) / 0.3) - _smoothstep((t - 0.6) / 0.3)
    wobble = np.sin(2 * np.pi * 3 * t) * (go > 0.05)
    params = np.stack([28 * go + 4 * wobble, -12 * go, 5 * go, 1 + 0.07 * go], axis=1)
    speed = np.r_[0, np.abs(np.diff(params, axis=0)).max(axis=1)]
    return params, speed > 1e-3


def _upstream_box(lm: np.ndarray, height: int, margin: int = 10) -> np.ndarray:
    pts = lm.astype(np.int32)  # upstream truncates landmarks
    y29, y2 = pts[29, 1], pts[:, 1].max()
    return np.array([pts[:, 0].min(), max(0, 2 * y29 - y2), pts[:, 0].max(), min(y2 + margin, height)])


def synthetic_avatar(count: int, seed: int) -> tuple[Avatar, np.ndarray, np.ndarray]:
    """The avatar (noisy boxes), ground-truth face placements ``[N,2,3]`` and moving flags."""
    still = np.ascontiguousarray(data.astronaut()[:, :, ::-1])
    lm0 = detect_landmarks(still)
    if lm0 is None:
        raise RuntimeError("no face found on the test photo")
    params, moving = head_motion(count)
    box0 = _upstream_box(lm0, still.shape[0]).astype(np.float64)
    truth0 = box_transform((box0[:2] + box0[2:]) / 2, box0[2:] - box0[:2])
    centre = tuple(map(float, (box0[:2] + box0[2:]) / 2))
    rng = np.random.default_rng(seed)
    frames, boxes, landmarks, truths = [], [], [], []
    for dx, dy, deg, scale in params:
        m = cv2.getRotationMatrix2D(centre, deg, scale)
        m[:, 2] += (dx, dy)
        frames.append(cv2.warpAffine(still, m, still.shape[1::-1], flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT))
        lm = cv2.transform(lm0[None].astype(np.float64), m)[0]
        landmarks.append(lm + rng.normal(0, 0.7, lm.shape))
        boxes.append(_upstream_box(lm, still.shape[0]) + np.rint(rng.normal(0, 1.5, 4)).astype(int))
        truths.append(compose(m, truth0))
    boxes_a = np.array(boxes, dtype=np.int32)
    crops = np.array([crop_box(tuple(b)) for b in boxes_a], dtype=np.int32)
    masks = tuple(
        blend_mask(still.shape, tuple(b), landmark_segment(lm, tuple(c)))[0]
        for b, c, lm in zip(boxes_a, crops, landmarks)
    )
    centers, sizes = boxes_center_size(boxes_a)
    avatar = Avatar(
        avatar_id="synthetic", fps=FPS, frames=np.stack(frames), boxes=boxes_a,
        landmarks=np.array(landmarks, np.float32), crops=np.zeros((count, 256, 256, 3), np.uint8),
        latents=None, masks=masks, crop_boxes=crops,
        placements=np.stack([box_transform(c, s) for c, s in zip(centers, sizes)]),
    )
    return avatar, np.array(truths), moving


def _periodic_highpass(x: np.ndarray, cutoff_hz: float = 2.0) -> np.ndarray:
    b, a = butter(2, cutoff_hz / (FPS / 2), btype="high")
    n = len(x)
    return filtfilt(b, a, np.concatenate([x, x, x]), axis=0)[n : 2 * n]


def _lag(est: np.ndarray, truth: np.ndarray, moving: np.ndarray) -> float:
    """Shift (frames) of ``truth`` that best explains ``est`` on moving positions; > 0 = late."""
    n = len(truth)
    grid = np.arange(n, dtype=np.float64)
    best, best_err = 0.0, np.inf
    for tau in np.arange(-4.0, 4.0001, 0.05):
        shifted = np.stack([np.interp(grid - tau, grid, truth[:, k], period=n) for k in range(2)], axis=1)
        err = float(((est - shifted)[moving] ** 2).sum())
        if err < best_err:
            best, best_err = float(tau), err
    return best


def _seam(out: np.ndarray, ideal: np.ndarray, mask: np.ndarray, cbox: np.ndarray) -> float:
    """p99 gradient (grey levels/px) of the paste error across the mask's soft edge."""
    h, w = out.shape[:2]
    x1, y1, x2, y2 = max(cbox[0], 0), max(cbox[1], 0), min(cbox[2], w), min(cbox[3], h)
    m = mask[y1 - cbox[1] : y2 - cbox[1], x1 - cbox[0] : x2 - cbox[0]]
    band = cv2.dilate(((m > 0) & (m < 255)).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    diff = cv2.cvtColor(out[y1:y2, x1:x2], cv2.COLOR_BGR2GRAY).astype(np.float32) - cv2.cvtColor(
        ideal[y1:y2, x1:x2], cv2.COLOR_BGR2GRAY
    ).astype(np.float32)
    grad = np.hypot(cv2.Sobel(diff, cv2.CV_32F, 1, 0), cv2.Sobel(diff, cv2.CV_32F, 0, 1)) / 8.0
    return float(np.percentile(grad[band], 99))


def _toned(face: np.ndarray) -> np.ndarray:
    return np.clip(face.astype(np.float64) + TONE, 0, 255).astype(np.uint8)


def _placed_mask(shape: tuple[int, ...], placement: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The landmark blend mask on the box ``placement`` covers, as prep builds it."""
    box = placed_box(placement)
    return blend_mask(shape, box, landmark_segment(landmarks, crop_box(box)))


def evaluate(avatar: Avatar, truths: np.ndarray, moving: np.ndarray, affines: np.ndarray, seam_frames: int) -> dict[str, Any]:
    """Jitter, lag and seam per configuration."""
    lm0 = avatar.landmarks[0].astype(np.float64)
    mouth_crop = cv2.transform(lm0[None, MOUTH], invert(truths[0]))  # fixed in crop coords
    source = avatar.source_index(np.arange(2 * len(avatar)))
    truth_pts = np.stack([cv2.transform(mouth_crop, truths[i])[0] for i in source])
    moving_pos = moving[source]
    truth_faces = [_toned(cv2.warpAffine(f, invert(t), (256, 256), flags=cv2.INTER_CUBIC))
                   for f, t in zip(avatar.frames, truths)]
    seam_at = np.linspace(0, 2 * len(avatar) - 1, seam_frames).astype(int)
    rows: dict[str, Any] = {}
    for name, (flags, mode) in CONFIGS.items():
        settings = RenderSettings(**{**OFF, **flags}, blend_mode=mode)
        placements = plan(avatar.frames, avatar.landmarks, avatar.boxes, avatar.crop_boxes, FPS, settings,
                          affines=affines)
        eff = placements[source]
        pts = np.stack([cv2.transform(mouth_crop, t)[0] for t in eff])
        err = pts - truth_pts
        jitter = float(np.sqrt((_periodic_highpass(err.reshape(len(err), -1)) ** 2).mean() * 2))
        lag = _lag(pts.mean(axis=1), truth_pts.mean(axis=1), moving_pos)
        seams, ideal_seams = [], []
        for p in seam_at:
            i, frame = source[p], avatar.frames[source[p]]
            face = _toned(crop_face(frame, eff[p]))  # as prep cuts it
            mask, cbox = _placed_mask(frame.shape, eff[p], avatar.landmarks[i])
            out = composite(frame, face, eff[p], mask, cbox, mode, subpixel=settings.subpixel_enabled)
            seams.append(_seam(out, frame, mask, np.array(cbox)))
            args = (avatar.masks[i], avatar.crop_boxes[i], mode)
            ideal = composite(avatar.frames[i], truth_faces[i], truths[i], *args)
            ideal_seams.append(_seam(ideal, avatar.frames[i], avatar.masks[i], avatar.crop_boxes[i]))
        rows[name] = {
            "settings": {**OFF, **flags},
            "blend_mode": mode,
            "jitter_hf_rms_px": round(jitter, 4),
            "lag_frames": round(lag, 2) + 0.0,  # no "-0.0"
            "mean_abs_error_px": round(float(np.linalg.norm(err, axis=2).mean()), 3),
            "seam_p99": round(float(np.mean(seams)), 3),
            "seam_p99_ideal_placement": round(float(np.mean(ideal_seams)), 3),
        }
    return rows


def time_blends(reps: int) -> dict[str, float]:
    """Median ms per composite on one core, the face's crop box scaled to about 256²."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    still = np.ascontiguousarray(data.astronaut()[:, :, ::-1])
    lm0 = detect_landmarks(still)
    if lm0 is None:
        raise RuntimeError("no face found on the test photo")
    x1, _, x2, _ = crop_box(tuple(_upstream_box(lm0, still.shape[0])))
    side0 = x2 - x1
    scale = 256.0 / side0  # the photo scaled so the face's crop box is about 256²
    frame = cv2.resize(still, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    lm = lm0 * scale
    box = tuple(int(v) for v in _upstream_box(lm, frame.shape[0]))
    cbox = crop_box(box)
    mask, _ = blend_mask(frame.shape, box, landmark_segment(lm, cbox))
    face = cv2.resize(frame[box[1] : box[3], box[0] : box[2]], (256, 256))
    c, s = boxes_center_size(np.array([box]))
    whole = box_transform(c[0], s[0])
    t = box_transform(c[0] + (0.3, 0.6), s[0] + (0.4, -0.2))

    def clock(fn: Any) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return round(float(np.median(times)) * 1e3, 3)

    result = {f"{mode}_subpixel_ms": clock(lambda m=mode: composite(frame, face, t, mask, cbox, m)) for mode in ("upstream", "feather", "poisson")}
    result.update({f"{mode}_whole_pixel_ms": clock(lambda m=mode: composite(frame, face, whole, mask, cbox, m)) for mode in ("upstream", "feather", "poisson")})
    region = (slice(cbox[1], cbox[3]), slice(cbox[0], cbox[2]))
    patch = frame.copy()
    patch[box[1] : box[3], box[0] : box[2]] = cv2.resize(face, (box[2] - box[0], box[3] - box[1]))

    def plain() -> np.ndarray:  # reference: a float alpha blend with a blurred mask
        a = cv2.GaussianBlur(mask, (0, 0), 2).astype(np.float32)[:, :, None] / 255.0
        out = frame.copy()
        out[region] = (patch[region] * a + frame[region] * (1 - a)).astype(np.uint8)
        return out

    inside = np.where(mask >= 128, 255, 0).astype(np.uint8)
    x, y, w, h = cv2.boundingRect(inside)
    centre = (cbox[0] + x + w // 2, cbox[1] + y + h // 2)
    full_inside = np.zeros(frame.shape[:2], np.uint8)
    full_inside[region] = inside
    result["reference_plain_alpha_ms"] = clock(plain)
    result["reference_cv2_seamlessclone_ms"] = clock(
        lambda: cv2.seamlessClone(patch[region].copy(), frame, inside.copy(), centre, cv2.NORMAL_CLONE)
    )
    result["crop_side_px"] = int(cbox[2] - cbox[0])
    return result


def table(rows: dict[str, Any]) -> str:
    """The results as a markdown table."""
    head = "| configuration | blend | jitter HF RMS (px) | lag (frames) | mean error (px) | seam p99 | seam p99, ideal placement |\n|---|---|---|---|---|---|---|\n"
    return head + "".join(
        f"| {name} | {r['blend_mode']} | {r['jitter_hf_rms_px']:.3f} | {r['lag_frames']:+.2f} | {r['mean_abs_error_px']:.2f} | {r['seam_p99']:.2f} | {r['seam_p99_ideal_placement']:.2f} |\n"
        for name, r in rows.items()
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seam-frames", type=int, default=16)
    parser.add_argument("--timing-reps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("results/eval_stability.json"))
    args = parser.parse_args(argv)

    avatar, truths, moving = synthetic_avatar(args.frames, args.seed)
    start = time.perf_counter()
    affines = track_affines(avatar.frames, avatar.landmarks, avatar.boxes, avatar.crop_boxes)
    track_s = time.perf_counter() - start
    start = time.perf_counter()
    plan(avatar.frames, avatar.landmarks, avatar.boxes, avatar.crop_boxes, FPS, RenderSettings(), affines=affines)
    plan_s = time.perf_counter() - start
    rows = evaluate(avatar, truths, moving, affines, args.seam_frames)
    raw, best = rows["raw (upstream paste)"], rows["all + feather"]
    report = {
        "frames": args.frames,
        "fps": FPS,
        "seed": args.seed,
        "moving_fraction": round(float(moving.mean()), 3),
        "box_noise_px_sigma": 1.5,
        "configs": rows,
        "jitter_reduction_all_vs_raw": round(raw["jitter_hf_rms_px"] / max(best["jitter_hf_rms_px"], 1e-9), 2),
        "prep_seconds": {"track_affines": round(track_s, 3), "plan_with_cached_affines": round(plan_s, 3)},
        "blend_ms_one_core": time_blends(args.timing_reps),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    print(json.dumps({k: report[k] for k in ("jitter_reduction_all_vs_raw", "prep_seconds", "blend_ms_one_core")}, indent=2))


if __name__ == "__main__":
    main()

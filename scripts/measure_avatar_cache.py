"""Avatar cache size, load time and fidelity, before (format 2) and after (format 3).

``python -m scripts.measure_avatar_cache [--seconds 10] [--sources demo 720p 1080p]
[--crfs 2 3 4 6] [--out results/avatar_cache.json]``

Each source is prepared for real (mediapipe landmarks, landmark masks, a seeded
tiny VAE for latents of the official shape) from an H.264 file, as an upload
would be. ``demo`` is the built-in demo avatar (512x512); ``720p`` / ``1080p``
put the same swaying portrait on a photo background with mild sensor noise and
code it at CRF 23, like a phone video. For each source: bytes on disk in
format 2 (raw frames and crops, as the format before) and format 3, load time,
PSNR and largest error of the frames read back against those prep saw, and the
memory a loaded avatar holds. ``--crfs`` sweeps the frame codec on the 720p
source (the measurement behind ``avatar.cache_crf``).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from safetensors import numpy as st_numpy

from musetalk_warm.avatars.cache import MANIFEST, Avatar, cache_bytes, load_avatar
from musetalk_warm.avatars.demo import demo_motion
from musetalk_warm.avatars.prep import describe_source, prepare_avatar, read_frames
from musetalk_warm.config import load_settings
from musetalk_warm.media.framepack import read_frames as decode_pack
from musetalk_warm.media.framepack import write_frames
from musetalk_warm.models.musetalk import encode_latents, tiny_models

SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}


def scene_frames(width: int, height: int, seconds: float, fps: int, seed: int = 0) -> np.ndarray:
    """The demo portrait swaying on a photo background, with mild per-frame noise."""
    from skimage import data

    rng = np.random.default_rng(seed)
    background = cv2.resize(data.coffee()[:, :, ::-1], (width, height), interpolation=cv2.INTER_AREA)
    side = height
    face = cv2.resize(data.astronaut()[:, :, ::-1], (side, side), interpolation=cv2.INTER_AREA)
    y0, x0 = (height - side) // 2, (width - side) // 2
    background[y0 : y0 + side, x0 : x0 + side] = face
    num = max(1, round(seconds * fps))
    out = np.empty((num, height, width, 3), np.uint8)
    for i, (dx, dy, roll, scale) in enumerate(demo_motion(num, seconds)):
        matrix = cv2.getRotationMatrix2D((width / 2, y0 + side * 0.9), float(roll), float(scale))
        matrix[:, 2] += (dx * height / 512, dy * height / 512)
        frame = cv2.warpAffine(background, matrix, (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT_101)
        out[i] = np.clip(frame + rng.normal(0, 1.5, frame.shape), 0, 255).astype(np.uint8)
    return out


def write_source(path: Path, frames: np.ndarray, fps: int) -> None:
    """An H.264 yuv420p MP4 at CRF 23, as a camera or phone would hand it over."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "23", "preset": "medium"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_format2(avatar: Avatar, root: Path) -> Path:
    """``avatar`` in the previous cache layout (raw npy frames and crops, one tensor per mask)."""
    folder = root / avatar.avatar_id
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "frames.npy", np.asarray(avatar.frames), allow_pickle=False)
    np.save(folder / "crops.npy", np.asarray(avatar.crops), allow_pickle=False)
    arrays = {"boxes": avatar.boxes, "landmarks": avatar.landmarks, "crop_boxes": avatar.crop_boxes,
              "placements": avatar.placements}
    if avatar.latents is not None:
        arrays["latents"] = avatar.latents
    st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(folder / "arrays.safetensors"))
    st_numpy.save_file({f"mask_{i:06d}": np.ascontiguousarray(m) for i, m in enumerate(avatar.masks)},
                       str(folder / "masks.safetensors"))
    manifest = {k: v for k, v in avatar.manifest.items() if k != "frames_codec"}
    manifest.update(format_version=2, avatar_id=avatar.avatar_id, fps=avatar.fps, num_frames=len(avatar),
                    frame_size=[int(avatar.frames.shape[2]), int(avatar.frames.shape[1])],
                    has_latents=avatar.latents is not None)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def fidelity(decoded: np.ndarray, seen: np.ndarray) -> dict[str, float]:
    diff = np.abs(decoded.astype(np.int16) - seen.astype(np.int16))
    return {"psnr_db": round(psnr(decoded, seen), 2), "max_abs_error": int(diff.max()),
            "share_within_1_level": round(float(np.mean(diff <= 1)), 4)}


def loaded_bytes(avatar: Avatar) -> int:
    arrays = [avatar.frames, avatar.crops, avatar.boxes, avatar.landmarks, avatar.crop_boxes, avatar.placements,
              *avatar.masks]
    if avatar.latents is not None:
        arrays.append(avatar.latents)
    return int(sum(np.asarray(a).nbytes for a in arrays))


def measure_source(name: str, seconds: float, work: Path, models: Any) -> tuple[dict[str, Any], np.ndarray]:
    fps = 25
    overrides: dict[str, Any] = {"avatar_id": name, "cache_dir": str(work / "v3"), "mask_source": "landmarks",
                                 "demo_seconds": seconds, "fps": fps}
    if name != "demo":
        source = work / f"{name}.mp4"
        write_source(source, scene_frames(*SIZES[name], seconds, fps), fps)
        overrides["video_path"] = str(source)
    settings = load_settings(None, {"avatar": overrides, "models": {"renderer": "tiny"}})
    seen = read_frames(describe_source(settings), settings)
    t0 = time.perf_counter()
    prepare_avatar(settings, encoder=partial(encode_latents, models, batch_size=16), vae_id=models.vae_id,
                   progress=False)
    prep_s = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        avatar = load_avatar(name, work / "v3")
        times.append(time.perf_counter() - t0)
    after = cache_bytes(name, work / "v3")
    before_avatar = replace(avatar, frames=seen)
    write_format2(before_avatar, work / "v2")
    before = cache_bytes(name, work / "v2")
    n = len(avatar)
    height, width = seen.shape[1:3]
    return {
        "source": name, "frame_size": [width, height], "frames": n, "seconds": n / fps,
        "format2_bytes": before, "format3_bytes": after,
        "format2_mb_per_frame": round(before / n / 1e6, 4), "format3_mb_per_frame": round(after / n / 1e6, 4),
        "ratio": round(before / after, 1),
        "load_s_median": round(statistics.median(times), 3),
        "prep_s": round(prep_s, 2), "prep_frames_per_s": round(n / prep_s, 1),
        "loaded_mb": round(loaded_bytes(avatar) / 1e6, 1),
        **fidelity(avatar.frames, seen),
    }, seen


def crf_sweep(frames: np.ndarray, crfs: list[int]) -> list[dict[str, Any]]:
    rows = []
    n, height, width = frames.shape[:3]
    for crf in crfs:
        buf = io.BytesIO()
        t0 = time.perf_counter()
        write_frames(buf, frames, 25, crf)
        encode_s = time.perf_counter() - t0
        with tempfile.NamedTemporaryFile(suffix=".mkv") as tmp:
            tmp.write(buf.getvalue())
            tmp.flush()
            t0 = time.perf_counter()
            decoded = decode_pack(Path(tmp.name), n, height, width)
            decode_s = time.perf_counter() - t0
        rows.append({"crf": crf, "mb_per_frame": round(len(buf.getvalue()) / n / 1e6, 4),
                     "encode_fps": round(n / encode_s, 1), "decode_fps": round(n / decode_s, 1),
                     **fidelity(decoded, frames)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.measure_avatar_cache", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sources", nargs="+", default=["demo", "720p", "1080p"], choices=["demo", *SIZES])
    parser.add_argument("--crfs", nargs="*", type=int, default=[2, 3, 4, 6])
    parser.add_argument("--out", default="results/avatar_cache.json")
    args = parser.parse_args(argv)
    models = tiny_models(0)
    rows, sweep = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sources:
            row, seen = measure_source(name, args.seconds, Path(tmp), models)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if name == "720p" and args.crfs:
                sweep = crf_sweep(seen, args.crfs)
                print(json.dumps(sweep), flush=True)
    result = {"machine": {"platform": platform.platform(), "cpu_count": __import__("os").cpu_count()},
              "seconds": args.seconds, "sources": rows, "crf_sweep_720p": sweep}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Avatar cache size, load time and fidelity of the current cache format.

``python -m scripts.measure_avatar_cache [--seconds 10] [--sources demo 720p 1080p]
[--crfs 4 6 8] [--work DIR] [--before FILE] [--out results/avatar_cache.json]``

Each source is prepared for real (mediapipe landmarks, landmark masks, a seeded
tiny VAE for latents of the official shape) from an H.264 file, as an upload
would be. ``demo`` is the built-in demo avatar (512x512); ``720p`` / ``1080p``
put the same swaying portrait on a photo background with mild sensor noise and
code it at CRF 23, like a phone video. For each source: bytes on disk by file
and by array, and three timings of a load: until :func:`load_avatar` returns,
until frame 0 (frame, crop, mask) can be read, and until every frame is
decoded; PSNR and largest error of the frames read back against those prep
saw; the memory a loaded avatar holds. ``--work`` keeps sources and caches
between runs (prep is then a no-op load); ``--before`` adds the rows of an
earlier measurement to the output; ``--crfs`` sweeps the frame codec on the
720p source (the measurement behind ``avatar.cache_crf``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
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


def fidelity(decoded: np.ndarray, seen: np.ndarray) -> dict[str, float]:
    """PSNR, largest error and share within 1 level of ``decoded`` against ``seen`` (frame by frame:
    a float copy of 10 s of 1080p would take gigabytes)."""
    squared, worst, within = 0.0, 0, 0
    for a, b in zip(decoded, seen, strict=True):
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        squared += float(np.sum(diff.astype(np.float64) ** 2))
        worst, within = max(worst, int(diff.max())), within + int(np.count_nonzero(diff <= 1))
    size = seen.size
    mse = squared / size
    return {"psnr_db": round(float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse), 2),
            "max_abs_error": worst, "share_within_1_level": round(within / size, 4)}


def loaded_bytes(avatar: Avatar) -> dict[str, float]:
    """MB a loaded avatar holds, by array (all decoded)."""
    parts = {"frames": [avatar.frames], "crops": [avatar.crops], "masks": list(avatar.masks),
             "latents": [] if avatar.latents is None else [avatar.latents],
             "other": [avatar.boxes, avatar.landmarks, avatar.crop_boxes, avatar.placements]}
    sizes = {k: sum(np.asarray(a).nbytes for a in arrays) / 1e6 for k, arrays in parts.items()}
    return {k: round(v, 1) for k, v in {**sizes, "total": sum(sizes.values())}.items()}


def timed_load(name: str, root: Path) -> tuple[Avatar, dict[str, float]]:
    """Load, then wait for frame 0 and for all frames: the three moments a caller can see."""
    t0 = time.perf_counter()
    avatar = load_avatar(name, root)
    returned = time.perf_counter() - t0
    _ = avatar.frames[0], avatar.crops[0], avatar.masks[0]
    first = time.perf_counter() - t0
    _ = np.asarray(avatar.frames), np.asarray(avatar.crops), avatar.masks[-1]
    return avatar, {"load_s": returned, "first_frame_s": first, "all_decoded_s": time.perf_counter() - t0}


def measure_source(name: str, seconds: float, work: Path, models: Any) -> tuple[dict[str, Any], np.ndarray]:
    fps = 25
    root = work / "caches"
    overrides: dict[str, Any] = {"avatar_id": name, "cache_dir": str(root), "mask_source": "landmarks",
                                 "demo_seconds": seconds, "fps": fps}
    if name != "demo":
        source = work / f"{name}-{seconds:g}s.mp4"
        if not source.is_file():
            write_source(source, scene_frames(*SIZES[name], seconds, fps), fps)
        overrides["video_path"] = str(source)
    settings = load_settings(None, {"avatar": overrides, "models": {"renderer": "tiny"}})
    seen = read_frames(describe_source(settings), settings)
    manifest = root / name / MANIFEST
    written = manifest.stat().st_mtime_ns if manifest.is_file() else None
    t0 = time.perf_counter()
    prepare_avatar(settings, encoder=partial(encode_latents, models, batch_size=16), vae_id=models.vae_id,
                   progress=False)
    prep_s = time.perf_counter() - t0
    reused = manifest.stat().st_mtime_ns == written  # a current cache in --work: prep only loaded it
    runs = [timed_load(name, root) for _ in range(3)]
    avatar = runs[-1][0]
    timings = {k: round(statistics.median(r[1][k] for r in runs), 3) for k in runs[0][1]}
    n = len(avatar)
    folder = root / name
    arrays = st_numpy.load_file(str(folder / "arrays.safetensors"))
    total = cache_bytes(name, root)
    return {
        "source": name, "frame_size": [seen.shape[2], seen.shape[1]], "frames": n, "seconds": n / fps,
        "format_version": avatar.manifest["format_version"], "frames_codec": avatar.manifest["frames_codec"],
        "bytes": total, "mb_per_frame": round(total / n / 1e6, 4),
        "files": {p.name: p.stat().st_size for p in sorted(folder.iterdir())},
        "array_bytes": {k: int(v.nbytes) for k, v in sorted(arrays.items())},
        **timings,
        "prep_s": None if reused else round(prep_s, 2),
        "loaded_mb": loaded_bytes(avatar),
        "loadavg_1m": round(os.getloadavg()[0], 1),
        **fidelity(np.asarray(avatar.frames), seen),
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
    parser.add_argument("--crfs", nargs="*", type=int, default=[4, 6, 8])
    parser.add_argument("--work", help="folder kept between runs (default: a temporary one)")
    parser.add_argument("--before", help="JSON rows of an earlier measurement to include")
    parser.add_argument("--machine", default="", help="a description of the machine, for the output")
    parser.add_argument("--out", default="results/avatar_cache.json")
    args = parser.parse_args(argv)
    models = tiny_models(0)
    rows, sweep = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.sources:
            row, seen = measure_source(name, args.seconds, work, models)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if name == "720p" and args.crfs:
                sweep = crf_sweep(seen, args.crfs)
                print(json.dumps(sweep), flush=True)
    result = {"machine": {"description": args.machine, "platform": platform.platform(), "cpu_count": os.cpu_count()},
              "seconds": args.seconds, "sources": rows, "crf_sweep_720p": sweep}
    if args.before:
        result["before"] = json.loads(Path(args.before).read_text())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Avatar prep throughput, by stage: frames/s of reading, landmarks, placements, masks, latents, saving.

A swaying portrait on a photo background, coded as a phone would (H.264, CRF 23;
``scripts.measure_avatar_cache``'s source), is prepared for real with the chosen
face backend and a VAE encoder of the chosen preset (``tiny``, or ``official``
shapes with random weights) on the chosen device. Writes ``results/bench_prep.json``.

    .venv/bin/python -m scripts.bench_prep --size 1280x720 --seconds 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from musetalk_warm.avatars.prep import prepare_avatar
from musetalk_warm.config import load_settings
from musetalk_warm.models.musetalk import encode_latents, resolve_device, resolve_dtype
from scripts.report import device_name, write_report
from scripts.bench_engine import build_models
from scripts.measure_avatar_cache import scene_frames, write_source


def random_dwpose(models_dir: Path) -> Path:
    """A seeded random-init DWPose checkpoint where the dwpose backend looks under ``models_dir``."""
    import torch

    from musetalk_warm.avatars.dwpose_net import DWPoseNet
    from musetalk_warm.config import ModelSettings

    path = models_dir / ModelSettings().dwpose_weights
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save({"state_dict": DWPoseNet().state_dict()}, path)
    return path


def accelerator_stages(args: argparse.Namespace, frames: np.ndarray) -> dict[str, Any]:
    """The stages that can run on the accelerator, alone: DWPose keypoints per frame (random weights
    in the official layout) and batched VAE encoding of 256² crops."""
    from musetalk_warm.avatars.dwpose import DWPoseDetector

    device = resolve_device(args.device)
    weights = random_dwpose(Path(tempfile.mkdtemp(prefix="dwpose-")))
    out: dict[str, Any] = {"device": device_name(device)}
    for flip in (True, False):
        detector = DWPoseDetector(weights, str(device), flip_test=flip)
        name = f"dwpose_{'flip' if flip else 'plain'}"
        for batch in sorted({1, detector.batch_frames}):
            detector.keypoints_many(frames[:batch])
            t0 = time.perf_counter()
            for start in range(0, len(frames), batch):
                detector.keypoints_many(frames[start : start + batch])
            fps = round(len(frames) / (time.perf_counter() - t0), 1)
            out[f"{name}_frames_per_s" if batch == 1 else f"{name}_batch{batch}_frames_per_s"] = fps
    models = build_models(args.preset, device, resolve_dtype("auto", device))
    crops = np.random.default_rng(0).integers(0, 256, (64, 256, 256, 3), dtype=np.uint8)
    encode_latents(models, crops[: args.batch_size], batch_size=args.batch_size)
    t0 = time.perf_counter()
    encode_latents(models, crops, batch_size=args.batch_size)
    out[f"vae_encode_{args.preset}_frames_per_s"] = round(len(crops) / (time.perf_counter() - t0), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--face-backend", default="mediapipe")
    parser.add_argument("--preset", choices=["tiny", "official"], default="tiny", help="the VAE encoder's shapes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16, help="crops per VAE encoder call")
    parser.add_argument("--accelerator-only", action="store_true",
                        help="only DWPose keypoints and VAE encoding, each alone (no mediapipe needed)")
    parser.add_argument("--out", default="results/bench_prep.json")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    fps = 25
    frames = scene_frames(width, height, args.seconds, fps)
    if args.accelerator_only:
        report = accelerator_stages(args, frames)
        print(json.dumps(report))
        write_report(args.out, report)
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-prep-"))
    source = work / "source.mp4"
    write_source(source, frames, fps)
    device = resolve_device(args.device)
    models = build_models(args.preset, device, resolve_dtype("auto", device))
    settings = load_settings(None, {
        "avatar": {"avatar_id": "bench", "cache_dir": str(work / "caches"), "video_path": str(source),
                   "face_backend": args.face_backend, "mask_source": "landmarks", "fps": fps},
        # The dwpose backend runs seeded random weights (the official layout) when none are here.
        "models": {"renderer": "tiny", "device": str(device), "models_dir": str(work / "models")},
        "render": {"batch_size": args.batch_size},
    })
    if args.face_backend == "dwpose":
        random_dwpose(work / "models")
    marks: list[tuple[str, float]] = []
    encode_s = 0.0

    def on_progress(stage: str, done: int, total: int) -> None:
        if not marks or marks[-1][0] != stage:
            marks.append((stage, time.perf_counter()))

    def encoder(crops: np.ndarray) -> np.ndarray:
        nonlocal encode_s
        t0 = time.perf_counter()
        out = encode_latents(models, crops, batch_size=args.batch_size)
        encode_s += time.perf_counter() - t0
        return out

    t0 = time.perf_counter()
    avatar = prepare_avatar(settings, encoder=encoder, vae_id=models.vae_id, force=True, progress=False,
                            on_progress=on_progress)
    total_s = time.perf_counter() - t0
    n = len(avatar.frames)
    # Stage spans from one reported start to the next; latents run inside "masks" → "saving".
    bounds = [("reading", t0)] + marks + [("end", t0 + total_s)]
    spans = {name: end - start for (name, start), (_, end) in zip(bounds, bounds[1:])}
    if "masks" in spans:
        spans["masks"] -= encode_s
    spans["latents"] = encode_s
    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_1m": round(os.getloadavg()[0], 2), "device": device_name(device)},
        "source": {"size": [width, height], "frames": n, "fps": fps},
        "face_backend": args.face_backend, "vae": f"{args.preset} ({models.dtype})".replace("torch.", ""),
        "total_s": round(total_s, 2), "frames_per_s": round(n / total_s, 1),
        "stages": {k: {"s": round(v, 3), "frames_per_s": round(n / v, 1) if v > 0 else None}
                   for k, v in spans.items()},
    }
    print(json.dumps(report, indent=1))
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

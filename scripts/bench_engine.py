"""Engine benchmark: frames/s of each render stage, then whole clips.

    python -m scripts.bench_engine [--preset official|tiny] [--device auto]
        [--batch-sizes 1 4 16 32] [--width 1280 --height 720] [--out results/bench_engine.json]

Random weights of the chosen architecture (``official`` = MuseTalk v1.5's real
sizes, from configs/models/musetalkV15_shapes.json). Stages are timed
separately (UNet step, VAE decode to uint8 on the host, paste-back per blend
mode, H.264+AAC encode), then a whole clip through the render engine: time to
first frame, end-to-end frames/s without and with encoding, and several
sessions rendering at once on one device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from musetalk_warm.avatars.cache import Avatar
from musetalk_warm.render.blend import BLEND_MODES, composite
from musetalk_warm.config import MediaSettings, RenderSettings
from musetalk_warm.render.engine import MuseTalkRenderer, RenderEngine
from musetalk_warm.avatars.masks import blend_mask, crop_box
from musetalk_warm.config import clip_quantum
from musetalk_warm.media.encode import ClipEncoder, pad_to_quantum
from musetalk_warm.models.musetalk import (
    Models,
    decode_latents,
    encode_latents,
    random_models,
    resolve_device,
    resolve_dtype,
    tiny_models,
    unet_step,
)
from musetalk_warm.avatars.stabilise import box_transform, boxes_center_size

SHAPES = Path(__file__).resolve().parent.parent / "configs" / "models" / "musetalkV15_shapes.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn: Callable[[], Any], frames_per_call: int, device: torch.device, min_s: float = 1.0) -> float:
    """Frames/s of ``fn`` after a warm-up, timed for at least ``min_s``."""
    fn()
    fn()
    _sync(device)
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        _sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s and calls >= 3:
            return calls * frames_per_call / elapsed


def build_models(preset: str, device: torch.device, dtype: torch.dtype) -> Models:
    """Random models of the preset's architecture."""
    if preset == "tiny":
        return tiny_models(0, device, dtype=dtype)
    shapes = json.loads(SHAPES.read_text())
    return random_models(shapes["unet"], shapes["vae"], shapes["whisper"], 0, device, dtype=dtype,
                         name="official-shapes")


def synthetic_avatar(models: Models, width: int, height: int, frames: int) -> Avatar:
    """A real face photo on a ``width``×``height`` canvas, drifting slowly; a fixed-size face box."""
    from skimage import data

    face = cv2.resize(data.astronaut()[:, :, ::-1], (height * 2 // 3, height * 2 // 3))
    canvas = np.full((height, width, 3), 90, np.uint8)
    y0, x0 = (height - face.shape[0]) // 2, (width - face.shape[1]) // 2
    canvas[y0 : y0 + face.shape[0], x0 : x0 + face.shape[1]] = face
    # The astronaut's face sits in the upper-middle of the photo.
    fx1, fy1 = x0 + int(face.shape[1] * 0.33), y0 + int(face.shape[0] * 0.12)
    side = int(face.shape[1] * 0.24)
    shifts = np.round(3 * np.sin(np.linspace(0, 2 * np.pi, frames, endpoint=False))).astype(int)
    all_frames = np.stack([np.roll(canvas, s, axis=1) for s in shifts])
    boxes = np.array([[fx1 + s, fy1, fx1 + s + side, fy1 + int(side * 1.2)] for s in shifts], np.int32)
    crops = np.stack([cv2.resize(f[b[1] : b[3], b[0] : b[2]], (256, 256), interpolation=cv2.INTER_LANCZOS4)
                      for f, b in zip(all_frames, boxes, strict=True)])
    masks, crop_boxes = [], []
    for b in boxes:
        cb = crop_box(tuple(b))
        seg = np.zeros((cb[3] - cb[1], cb[2] - cb[0]), np.uint8)
        cv2.ellipse(seg, ((b[0] + b[2]) // 2 - cb[0], int(b[1] + 0.7 * (b[3] - b[1])) - cb[1]),
                    ((b[2] - b[0]) // 2, int(0.3 * (b[3] - b[1]))), 0, 0, 360, 255, -1)
        mask, cb = blend_mask(all_frames[0].shape, tuple(b), seg)
        masks.append(mask)
        crop_boxes.append(cb)
    centers, sizes = boxes_center_size(boxes)
    return Avatar(
        avatar_id="bench",
        fps=25,
        frames=all_frames,
        boxes=boxes,
        landmarks=np.zeros((frames, 68, 2), np.float32),
        crops=crops,
        latents=encode_latents(models, crops, batch_size=16),
        masks=tuple(masks),
        crop_boxes=np.asarray(crop_boxes, np.int32),
        placements=np.stack([box_transform(c, s) for c, s in zip(centers, sizes, strict=True)]),
    )


def stage_rates(models: Models, avatar: Avatar, batch_sizes: list[int]) -> list[dict[str, Any]]:
    """UNet and VAE-decode frames/s per batch size."""
    rows = []
    dim = models.audio_dim
    for bs in batch_sizes:
        latents = torch.randn(bs, 8, 32, 32, device=models.device, dtype=models.dtype)
        prompts = torch.randn(bs, 50, dim, device=models.device, dtype=models.dtype)
        out = unet_step(models, latents, prompts)
        rows.append({
            "batch_size": bs,
            "unet_fps": round(_rate(lambda: unet_step(models, latents, prompts), bs, models.device), 1),
            "vae_decode_fps": round(_rate(lambda: decode_latents(models, out), bs, models.device), 1),
        })
        print(rows[-1], flush=True)
    return rows


def paste_rates(avatar: Avatar) -> dict[str, float]:
    """Compositing frames/s per blend mode, one thread."""
    cv2.setNumThreads(1)
    face = avatar.crops[0]
    out = {}
    for mode in BLEND_MODES:
        out[mode] = round(_rate(lambda: composite(avatar.frames[0], face, avatar.placements[0], avatar.masks[0],
                                                   avatar.crop_boxes[0], mode), 1, torch.device("cpu")), 1)
    cv2.setNumThreads(0)
    return out


def encode_rate(avatar: Avatar, frames: int = 96) -> float:
    """H.264 + AAC encode frames/s at the avatar's resolution."""
    settings = MediaSettings()
    audio = np.zeros(frames * settings.audio_rate // 25, np.float32)
    height, width = avatar.frames.shape[1:3]

    def run() -> None:
        enc = ClipEncoder(width, height, 25, settings, audio)
        for i in range(frames):
            enc.add_frame(avatar.frames[i % len(avatar)])
        enc.finish()

    return round(_rate(run, frames, torch.device("cpu"), min_s=2.0), 1)


def clip_run(engine: RenderEngine, avatar: Avatar, audio: np.ndarray, encode: bool) -> dict[str, float]:
    """One clip: time to first frame and frames/s, optionally encoding as frames arrive."""
    t0 = time.perf_counter()
    first = None
    enc = ClipEncoder(avatar.frames.shape[2], avatar.frames.shape[1], 25, MediaSettings(),
                      np.zeros(len(audio) * 3, np.float32)) if encode else None
    n = 0
    for frame in engine.render(audio, avatar, 0):
        if first is None:
            first = time.perf_counter() - t0
        if enc is not None:
            enc.add_frame(frame)
        n += 1
    if enc is not None:
        enc.finish()
    total = time.perf_counter() - t0
    return {"frames": n, "first_frame_s": round(first or 0.0, 4), "fps": round(n / total, 1)}


def concurrent_sessions(engine: RenderEngine, avatar: Avatar, audio: np.ndarray, sessions: int) -> dict[str, float]:
    """``sessions`` clips rendered at once from threads sharing the engine: aggregate frames/s."""
    results: list[dict[str, float]] = []
    lock = threading.Lock()

    def one() -> None:
        r = clip_run(engine, avatar, audio, encode=True)
        with lock:
            results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = time.perf_counter() - t0
    frames = sum(r["frames"] for r in results)
    return {
        "sessions": sessions,
        "aggregate_fps": round(frames / total, 1),
        "per_session_fps": round(frames / total / sessions, 1),
        "realtime_sessions": round(frames / total / 25, 2),
        "worst_first_frame_s": max(r["first_frame_s"] for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["official", "tiny"], default="official")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--clip-seconds", type=float, default=8.0)
    parser.add_argument("--sessions", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--out", default="results/bench_engine.json")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    models = build_models(args.preset, device, dtype)
    avatar = synthetic_avatar(models, args.width, args.height, frames=50)
    report: dict[str, Any] = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "resolution": f"{args.width}x{args.height}",
        "stages": stage_rates(models, avatar, args.batch_sizes),
        "paste_fps_one_thread": paste_rates(avatar),
        "encode_fps": encode_rate(avatar),
    }
    print({k: report[k] for k in ("paste_fps_one_thread", "encode_fps")}, flush=True)
    rng = np.random.default_rng(0)
    # Whole 320 ms quanta, as the runtime pads every clip, so the encoder gets whole AAC frames.
    audio = pad_to_quantum((0.1 * rng.standard_normal(int(args.clip_seconds * 16000))).astype(np.float32),
                           clip_quantum(25, 16000))
    clips = []
    for bs in args.batch_sizes:
        engine = RenderEngine(MuseTalkRenderer(models), RenderSettings(batch_size=bs))
        clip_run(engine, avatar, audio[: bs * 640], encode=False)  # warm-up: one full batch
        row = {"batch_size": bs, "render_only": clip_run(engine, avatar, audio, encode=False),
               "render_encode": clip_run(engine, avatar, audio, encode=True)}
        clips.append(row)
        print(row, flush=True)
        engine.close()
    report["clips"] = clips
    best = max(clips, key=lambda r: r["render_encode"]["fps"])["batch_size"]
    engine = RenderEngine(MuseTalkRenderer(models), RenderSettings(batch_size=best))
    report["concurrent"] = [concurrent_sessions(engine, avatar, audio, n) for n in args.sessions]
    engine.close()
    print(report["concurrent"], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

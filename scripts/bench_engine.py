"""Engine benchmark: the model path per batch bucket, each render stage, then whole clips and sessions.

    python -m scripts.bench_engine [--preset official|tiny] [--device auto] [--parts model composite encode
        compile clips] [--accelerate compile] [--width 1280 --height 720] [--out results/bench_engine.json]

Random weights of the chosen architecture (``official`` = MuseTalk v1.5's real
sizes, from configs/models/musetalkV15_shapes.json). Parts (each merged into the
JSON as it finishes, so a partial run keeps what it measured):

* ``model``: UNet alone and UNet + VAE decode (to uint8 on the device) at each bucket,
  eager / CUDA graphs, fp16 vs bf16, and how far graphs differ from eager;
* ``composite``: paste-back ms/frame on the CPU (per blend mode) and on the device,
  device → host copy through pinned memory, device memory per avatar;
* ``encode``: H.264 + AAC, N parallel encoders in threads per preset and x264 threads;
* ``compile``: a fresh process compiling every bucket (first-ever, empty cache), then a
  second one with the cache (warm restart), each with its per-bucket frames/s;
* ``clips``: whole clips and concurrent sessions through the engine: time to first
  frame, frames/s, a per-stage ms/frame table at each load, peak device memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from musetalk_warm.avatars.cache import Avatar
from musetalk_warm.render.blend import BLEND_MODES, composite
from musetalk_warm.config import MediaSettings, RenderSettings
from musetalk_warm.render.accelerator import Accelerator
from musetalk_warm.render.buckets import BUCKETS
from musetalk_warm.render.engine import MuseTalkRenderer, RenderEngine, RenderStats
from musetalk_warm.render.gpu_composite import GpuCompositor
from musetalk_warm.avatars.masks import blend_mask, crop_box
from musetalk_warm.config import clip_quantum
from musetalk_warm.media.encode import ClipEncoder, pad_to_quantum
from musetalk_warm.models.musetalk import (
    Models,
    decode_latents,
    encode_latents,
    random_models,
    use_fast_kernels,
    resolve_device,
    resolve_dtype,
    tiny_models,
    unet_step,
)
from musetalk_warm.avatars.stabilise import box_transform, boxes_center_size
from scripts.report import device_name

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


def _inputs(models: Models, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=models.device).manual_seed(bs)
    return (torch.randn(bs, 8, 32, 32, device=models.device, generator=gen).to(models.dtype),
            torch.randn(bs, 50, models.audio_dim, device=models.device, generator=gen).to(models.dtype))


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    d = (a.int() - b.int()).abs()
    return {"max": int(d.max()), "mean": round(float(d.float().mean()), 4)}


def model_part(models: Models, buckets: list[int]) -> dict[str, Any]:
    """UNet alone (eager) and UNet + decode per bucket, eager and CUDA-graphed; fp16 vs bf16."""
    eager = Accelerator(models, mode="eager")
    graphs = Accelerator(models, mode="graphs", buckets=buckets) if models.device.type == "cuda" else None
    rows = []
    for bs in buckets:
        latents, prompts = _inputs(models, bs)
        row: dict[str, Any] = {
            "batch_size": bs,
            "unet_fps": round(_rate(lambda: unet_step(models, latents, prompts), bs, models.device), 1),
            "eager_fps": round(_rate(lambda: eager.faces(latents, prompts), bs, models.device), 1),
        }
        out = unet_step(models, latents, prompts)
        row["vae_decode_fps"] = round(_rate(lambda: decode_latents(models, out), bs, models.device), 1)
        if graphs is not None:
            row["graphs_fps"] = round(_rate(lambda: graphs.faces(latents, prompts), bs, models.device), 1)
            row["graphs_vs_eager"] = _diff(graphs.faces(latents, prompts), eager.faces(latents, prompts))
        rows.append(row)
        print(row, flush=True)
    report: dict[str, Any] = {"buckets": rows}
    if graphs is not None:
        report["policy_graphs"] = graphs.measure().as_dict()
    if models.device.type == "cuda" and models.dtype == torch.float16:
        bf = build_models("official" if models.unet.config.cross_attention_dim == 384 else "tiny",
                          models.device, torch.bfloat16)
        use_fast_kernels(bf)
        bs = 32
        latents, prompts = _inputs(bf, bs)
        acc = Accelerator(bf, mode="graphs", buckets=[bs])
        report["bf16_graphs_fps_b32"] = round(_rate(lambda: acc.faces(latents, prompts), bs, bf.device), 1)
        del bf, acc
        torch.cuda.empty_cache()
    return report


def composite_part(models: Models, avatar: Avatar, bs: int = 32) -> dict[str, Any]:
    """Paste-back ms/frame on the CPU and on the device, pinned copy to the host, memory per avatar."""
    cv2.setNumThreads(1)
    face = avatar.crops[0]
    cpu = {}
    for mode in BLEND_MODES:
        fps = _rate(lambda: composite(avatar.frames[0], face, avatar.placements[0], avatar.masks[0],
                                      avatar.crop_boxes[0], mode), 1, torch.device("cpu"))
        cpu[mode] = round(1000 / fps, 3)
    cv2.setNumThreads(0)
    report: dict[str, Any] = {"cpu_ms_per_frame_one_thread": cpu}
    if models.device.type != "cuda":
        return report
    compositor = GpuCompositor(models.device, models.dtype)
    before = torch.cuda.memory_allocated(models.device)
    state = compositor.prepare(avatar)
    report["device_avatar_mib"] = round(state.nbytes / 2**20, 1)
    report["device_avatar_frames"] = len(avatar.frames)
    report["device_avatar_mib_per_frame"] = round(state.nbytes / 2**20 / len(avatar.frames), 2)
    report["device_avatar_allocated_mib"] = round((torch.cuda.memory_allocated(models.device) - before) / 2**20, 1)
    src = np.arange(bs) % len(avatar.frames)
    index = torch.from_numpy(src).to(models.device)
    faces = torch.from_numpy(avatar.crops[src]).to(models.device)
    with torch.inference_mode():
        paste_fps = _rate(lambda: compositor.paste(state, faces, index), bs, models.device)
        frames = compositor.paste(state, faces, index)
        copy_fps = _rate(lambda: compositor.to_host(frames).frames(), bs, models.device)
        full_fps = _rate(lambda: compositor.composite(state, faces, src).frames(), bs, models.device)
    got = compositor.composite(state, faces, src).frames()
    want = [composite(avatar.frames[i], avatar.crops[i], avatar.placements[i], avatar.masks[i],
                      avatar.crop_boxes[i], "feather") for i in src]
    d = np.abs(np.stack(got).astype(int) - np.stack(want))
    report.update({
        "gpu_feather_ms_per_frame": round(1000 / paste_fps, 4),
        "device_to_host_ms_per_frame": round(1000 / copy_fps, 4),
        "gpu_composite_and_copy_ms_per_frame": round(1000 / full_fps, 4),
        "gpu_vs_cpu_feather": {"max": int(d.max()), "mean": round(float(d.mean()), 5)},
        "batch_size": bs,
    })
    return report


def encode_part(avatar: Avatar, streams: list[int], presets: list[str], frames: int = 96) -> list[dict[str, Any]]:
    """N encoders at once in threads (PyAV encodes without the GIL): aggregate and slowest-stream fps."""
    height, width = avatar.frames.shape[1:3]
    rows = []
    for preset in presets:
        for threads in (1, 0):
            for n in streams if threads else streams[:1]:
                settings = MediaSettings(preset=preset, encoder_threads=threads)
                audio = np.zeros(frames * settings.audio_rate // 25, np.float32)

                def one(_: int) -> float:
                    t0 = time.perf_counter()
                    enc = ClipEncoder(width, height, 25, settings, audio)
                    for i in range(frames):
                        enc.add_frame(avatar.frames[i % len(avatar.frames)])
                    enc.finish()
                    return time.perf_counter() - t0

                t0 = time.perf_counter()
                with ThreadPoolExecutor(n) as pool:
                    times = list(pool.map(one, range(n)))
                total = time.perf_counter() - t0
                rows.append({"preset": preset, "x264_threads": threads or "auto", "streams": n,
                             "aggregate_fps": round(n * frames / total, 1),
                             "slowest_stream_fps": round(frames / max(times), 1)})
                print(rows[-1], flush=True)
    return rows


def compile_probe(args: argparse.Namespace) -> int:
    """One process: build models, compile + capture every bucket with the cache, measure, print JSON."""
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    models = build_models(args.preset, device, dtype)
    t_models = time.perf_counter() - t_start
    accel = Accelerator(models, mode="compile", buckets=args.buckets, cache_dir=Path(args.cache_dir))
    spent = accel.warmup()
    ready = time.perf_counter() - t_start
    eager = Accelerator(models, mode="eager")
    latents, prompts = _inputs(models, 8)
    equal = _diff(accel.faces(latents, prompts), eager.faces(latents, prompts))
    policy = accel.measure()
    print("PROBE " + json.dumps({"models_s": round(t_models, 1), "compile_s": round(sum(spent.values()), 1),
                                 "per_bucket_s": spent, "ready_s": round(ready, 1),
                                 "compiled_vs_eager_fp16_b8": equal, "policy": policy.as_dict()}), flush=True)
    return 0


def compile_part(args: argparse.Namespace, timeout_s: float) -> dict[str, Any]:
    """First-ever compile (empty cache) and a warm restart, each in a fresh process."""
    report: dict[str, Any] = {"cache_dir": args.cache_dir}
    cmd = [sys.executable, "-m", "scripts.bench_engine", "--probe", "--preset", args.preset, "--device", args.device,
           "--dtype", args.dtype, "--cache-dir", args.cache_dir, "--buckets", *map(str, args.buckets)]
    for name, limit in (("cold", timeout_s), ("warm", timeout_s / 2)):
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, check=False)
        except subprocess.TimeoutExpired:
            report[name] = {"error": f"timed out after {limit:.0f} s"}
            break
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("PROBE ")]
        if not lines:
            report[name] = {"error": done.stderr[-2000:]}
            break
        report[name] = json.loads(lines[-1][6:]) | {"process_s": round(time.perf_counter() - t0, 1)}
        print(name, report[name], flush=True)
    return report


def clip_run(engine: RenderEngine, avatar: Avatar, audio: np.ndarray, encode: bool,
             media: MediaSettings | None = None) -> dict[str, Any]:
    """One clip: time to first frame and frames/s, optionally encoding as frames arrive; stage seconds."""
    stats = RenderStats()
    t0 = time.perf_counter()
    first = None
    enc = ClipEncoder(avatar.frames.shape[2], avatar.frames.shape[1], 25, media or MediaSettings(),
                      np.zeros(len(audio) * 3, np.float32)) if encode else None
    n, encode_s = 0, 0.0
    for frame in engine.render(audio, avatar, 0, stats=stats):
        if first is None:
            first = time.perf_counter() - t0
        if enc is not None:
            t1 = time.perf_counter()
            enc.add_frame(frame)
            encode_s += time.perf_counter() - t1
        n += 1
    if enc is not None:
        t1 = time.perf_counter()
        enc.finish()
        encode_s += time.perf_counter() - t1
    total = time.perf_counter() - t0
    return {"frames": n, "first_frame_s": round(first or 0.0, 4), "fps": round(n / total, 1),
            "stages_s": stats.as_dict() | {"encode": round(encode_s, 4)}}


def concurrent_sessions(engine: RenderEngine, avatar: Avatar, audio: np.ndarray, sessions: int,
                        media: MediaSettings) -> dict[str, Any]:
    """``sessions`` clips rendered and encoded at once from threads sharing the engine."""
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def one() -> None:
        r = clip_run(engine, avatar, audio, encode=True, media=media)
        with lock:
            results.append(r)

    if engine.renderer.models.device.type == "cuda":  # type: ignore[attr-defined]
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = time.perf_counter() - t0
    frames = sum(r["frames"] for r in results)
    # Stage seconds summed over sessions, per frame: where each frame's time went (stages overlap).
    stages = {k: round(1000 * sum(r["stages_s"][k] for r in results) / frames, 3) for k in results[0]["stages_s"]}
    row: dict[str, Any] = {
        "sessions": sessions,
        "aggregate_fps": round(frames / total, 1),
        "per_session_fps": round(frames / total / sessions, 1),
        "realtime_sessions": round(frames / total / 25, 2),
        "worst_first_frame_s": max(r["first_frame_s"] for r in results),
        "stage_ms_per_frame": stages,
    }
    if engine.renderer.models.device.type == "cuda":  # type: ignore[attr-defined]
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def clips_part(models: Models, avatar: Avatar, args: argparse.Namespace) -> dict[str, Any]:
    """Whole clips per batch size and concurrent sessions, through the accelerated engine."""
    from musetalk_warm.render.accelerator import resolve_mode

    mode = resolve_mode(args.accelerate, models.device)
    accel = Accelerator(models, mode=mode, buckets=args.buckets if mode != "eager" else None,
                        cache_dir=Path(args.cache_dir))
    t0 = time.perf_counter()
    accel.warmup()
    compositor = GpuCompositor(models.device, models.dtype) if models.device.type == "cuda" else None
    renderer = MuseTalkRenderer(models, accel, compositor)
    report: dict[str, Any] = {"accelerate": mode, "warmup_s": round(time.perf_counter() - t0, 1),
                              "gpu_composite": compositor is not None}
    rng = np.random.default_rng(0)
    # Whole 320 ms quanta, as the runtime pads every clip, so the encoder gets whole AAC frames.
    audio = pad_to_quantum((0.1 * rng.standard_normal(int(args.clip_seconds * 16000))).astype(np.float32),
                           clip_quantum(25, 16000))
    media = MediaSettings(preset=args.preset_x264, encoder_threads=args.x264_threads)
    clips = []
    for bs in args.batch_sizes:
        engine = RenderEngine(renderer, RenderSettings(batch_size=bs))
        clip_run(engine, avatar, audio[: bs * 640], encode=False)  # warm-up: one full batch
        row = {"batch_size": bs, "render_only": clip_run(engine, avatar, audio, encode=False),
               "render_encode": clip_run(engine, avatar, audio, encode=True, media=media)}
        clips.append(row)
        print(row, flush=True)
        engine.close()
    report["clips"] = clips
    best = max(clips, key=lambda r: r["render_encode"]["fps"])["batch_size"]
    engine = RenderEngine(renderer, RenderSettings(batch_size=best))
    report["concurrent_batch_size"] = best
    report["concurrent"] = []
    for n in args.sessions:
        report["concurrent"].append(concurrent_sessions(engine, avatar, audio, n, media))
        print(report["concurrent"][-1], flush=True)
    engine.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["official", "tiny"], default="official")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--parts", nargs="+", default=["model", "composite", "encode", "compile", "clips"])
    parser.add_argument("--buckets", type=int, nargs="+", default=list(BUCKETS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--accelerate", default="auto", help="model path for the clips part")
    parser.add_argument("--cache-dir", default="models/.compile-cache")
    parser.add_argument("--compile-timeout", type=float, default=240.0)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--clip-seconds", type=float, default=6.0)
    parser.add_argument("--sessions", type=int, nargs="*", default=[1, 4, 8, 16])
    parser.add_argument("--encode-streams", type=int, nargs="*", default=[1, 8, 16, 20])
    parser.add_argument("--encode-presets", nargs="*", default=["veryfast", "superfast", "ultrafast"])
    parser.add_argument("--preset-x264", default="veryfast", help="x264 preset for the clips part")
    parser.add_argument("--x264-threads", type=int, default=1, help="x264 threads per stream for the clips part")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="results/bench_engine.json")
    args = parser.parse_args(argv)
    if args.probe:
        return compile_probe(args)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    out = Path(args.out)
    report: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    if report.get("preset") != args.preset or report.get("resolution") != f"{args.width}x{args.height}":
        report = {}
    report.update({
        "preset": args.preset,
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "resolution": f"{args.width}x{args.height}",
    })

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")

    models = build_models(args.preset, device, dtype)
    avatar = synthetic_avatar(models, args.width, args.height, frames=50)
    if device.type == "cuda":
        use_fast_kernels(models)
    for part in args.parts:
        try:
            run_part(part, report, models, avatar, args)
        except Exception as exc:  # one failing part must not lose the others' numbers
            report[f"{part}_error"] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"{part} failed: {exc!r}", flush=True)
        save()
        print(f"{part} done; wrote {out}", flush=True)
    return 0


def run_part(part: str, report: dict[str, Any], models: Models, avatar: Avatar, args: argparse.Namespace) -> None:
    """Measure one part into ``report``."""
    if part == "clips" and args.accelerate == "auto" and "error" in str(report.get("compile", {}).get("cold", "")):
        args.accelerate = "graphs"  # compiling did not finish here: measure the graphed path
    if part == "model":
        report["model"] = model_part(models, args.buckets)
    elif part == "composite":
        report["composite"] = composite_part(models, avatar)
    elif part == "encode":
        report["encode"] = encode_part(avatar, args.encode_streams, args.encode_presets)
    elif part == "compile":
        report["compile"] = compile_part(args, args.compile_timeout)
    elif part == "clips":
        report["engine"] = clips_part(models, avatar, args)
    else:
        raise ValueError(f"unknown part {part!r}")


if __name__ == "__main__":
    raise SystemExit(main())

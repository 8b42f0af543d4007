"""Benchmark live sessions → results/bench_live.json.

For N live sessions (1, 2, 4, … until deadlines fail) each speaking recorded
speech (espeak, synthesised once up front) with pauses, one reply in three cut off
by an interrupt (a level stops the series when it misses deadlines or admission
refuses speech with 503): per-session delivered fps, p50/p95 tick lateness, deadline-miss
rate, utterance received → first speech frame sent, interrupt → first idle frame.
Then 8 sessions with only one speaking at a time, a text message → first speech
frame (TTS included), and whether idle sessions used the accelerator.

    python -m scripts.bench_live                                  # CPU, lite renderer
    python -m scripts.bench_live --renderer musetalk --device cuda  # official shapes, random weights
    python -m scripts.bench_live --encode --encoder-processes 8     # MSE viewers' encoders in 8 processes

Without espeak-ng (a GPU box), record the sentences elsewhere with ``--write-speech
speech.npz`` and replay them with ``--speech speech.npz`` (the text → first frame
figure then excludes TTS time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np

from musetalk_warm.config import Settings, apply_assignments, load_settings
from musetalk_warm.errors import Overloaded
from musetalk_warm.live.registry import LiveRegistry
from musetalk_warm.live.scheduler import BucketBatchPolicy
from musetalk_warm.live.session import LiveFrame, LiveSession, SessionClosed
from musetalk_warm.live.transports.encoders import Fmp4Stream
from musetalk_warm.live.transports.mse import LiveFmp4
from musetalk_warm.render.runtime import Runtime
from musetalk_warm.sessions.store import SessionStore
from musetalk_warm.voice.tts import Speech, load_tts
from scripts.report import write_report

SENTENCES = [
    "Hello, and welcome back.",
    "The weather today is mild, with a light breeze from the west.",
    "I can repeat that if you like, slowly and clearly.",
    "Our next appointment is on Tuesday at half past three in the afternoon.",
    "Thank you for waiting.",
]
MAX_MISS_RATE = 0.01


def _held(level: dict[str, Any], settings: Settings) -> bool:
    """Whether every session of a level held real time: few misses, no 503, full frame rate."""
    return (level["miss_rate"] <= MAX_MISS_RATE and not level["refused_503"]
            and level["delivered_fps_min"] >= 0.95 * settings.avatar.fps)


def _gpu_peak_gib(reset: bool = False) -> float | None:
    """Peak GPU memory allocated since the last reset (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def _accelerator(runtime: Runtime, policy: Any) -> dict[str, Any] | None:
    """The model path's mode, warm-up seconds and bucket costs (as the scheduler's ``policy``
    measured them at start); the avatar's device memory."""
    renderer = runtime.renderer
    accel = getattr(renderer, "accelerator", None)
    if accel is None:
        return None
    compositor = getattr(renderer, "compositor", None)
    avatar = runtime.avatar(None)
    return {"mode": accel.mode, "warmup_s": round(accel.compile_s, 1),
            "buckets": policy.buckets.as_dict() if isinstance(policy, BucketBatchPolicy) else None,
            "avatar_device_mib": (round(compositor.prepare(avatar).nbytes / 2**20, 1)
                                  if compositor is not None else None),
            "avatar_frames": len(avatar.frames)}


def _ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


class Watcher:
    """Reads one session's frames and events, stamping when speech starts and idle returns."""

    def __init__(self, session: LiveSession, encoder: Fmp4Stream | None = None) -> None:
        self.session = session
        self.frames = 0
        self.encode_s = 0.0
        # As an MSE viewer (with an encoder): every frame H.264 + AAC encoded into fMP4, off the event loop.
        self._encoder = encoder
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.first_idle_after: list[tuple[float, float]] = []
        self._interrupt_at: float | None = None
        self._tasks = [asyncio.create_task(self._frames()), asyncio.create_task(self._events())]

    async def _frames(self) -> None:
        sub = self.session.subscribe()
        try:
            while True:
                frame = await sub.get()
                if self._encoder is not None:
                    t0 = time.perf_counter()
                    # Shielded from cancellation: the encoder must not close under a running add.
                    await anyio.to_thread.run_sync(self._encoder.add, frame)
                    self.encode_s += time.perf_counter() - t0
                self.frames += 1
                if self._interrupt_at is not None and not frame.speaking:
                    self.first_idle_after.append((self._interrupt_at, time.perf_counter()))
                    self._interrupt_at = None
        except SessionClosed:
            pass

    async def _events(self) -> None:
        feed = self.session.events()
        try:
            while True:
                event = await feed.get()
                if event["type"] == "utterance":
                    stamp = self.started if event["event"] == "started" else self.ended
                    stamp[event["utterance_id"]] = time.perf_counter()
        except SessionClosed:
            pass

    def interrupt(self) -> None:
        self._interrupt_at = time.perf_counter()
        self.session.interrupt()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._encoder is not None:
            self._encoder.close()


async def _speaker(watcher: Watcher, clips: list[tuple[np.ndarray, int]], until: float, rng: random.Random,
                   first_frame: list[float], interrupts: list[float], refused: list[int],
                   duty: float | None) -> None:
    """Speak clips with pauses until ``until``; every third one is interrupted after a second.

    Pauses last 0.3–1.2 s, or, with ``duty``, long enough that the session speaks that
    share of the time.
    """
    k = 0
    while time.perf_counter() < until:
        samples, rate = clips[k % len(clips)]
        t0 = time.perf_counter()
        try:
            watcher.session.speak_audio(samples, rate)
        except Overloaded as exc:  # admission said no: what a client sees as 503 + Retry-After
            refused.append(exc.retry_after)
            await asyncio.sleep(min(exc.retry_after, 1.0))
            continue
        # The utterance id is only known from its started event: the newest one after t0.
        while not any(t >= t0 for t in watcher.started.values()):
            await asyncio.sleep(0.005)
            if time.perf_counter() > t0 + 10:
                return
        uid, started = max(watcher.started.items(), key=lambda kv: kv[1])
        first_frame.append(started - t0)
        if k % 3 == 2:
            await asyncio.sleep(1.0)
            watcher.interrupt()
            while not watcher.first_idle_after:
                await asyncio.sleep(0.005)
            at, idle = watcher.first_idle_after.pop()
            interrupts.append(idle - at)
        else:
            while uid not in watcher.ended:
                await asyncio.sleep(0.01)
        spoken = len(samples) / rate
        pause = spoken * (1 - duty) / duty if duty else 0.75
        await asyncio.sleep(rng.uniform(0.4, 1.6) * pause)
        k += 1


async def run_level(registry: LiveRegistry, n: int, speakers: int, seconds: float,
                    clips: list[tuple[np.ndarray, int]], *, encode: bool = False,
                    duty: float | None = None) -> dict[str, Any]:
    """``n`` live sessions, ``speakers`` of them speaking, for ``seconds``."""
    _gpu_peak_gib(reset=True)
    sessions = [await registry.attach(f"bench{n}-{i}") for i in range(n)]
    for s in sessions:
        s._keep_lateness = True
    watchers = [Watcher(s, registry.open_fmp4(s) if encode else None) for s in sessions]
    await asyncio.sleep(0.5)
    before = [(s.stats.ticks, s.stats.misses, s.stats.speech_frames, len(s.stats.lateness)) for s in sessions]
    frames_before = [w.frames for w in watchers]
    first_frame: list[float] = []
    interrupts: list[float] = []
    refused: list[int] = []
    rng = random.Random(n)
    scheduler = registry.scheduler
    batches0, frames0 = scheduler.batches, scheduler.batched_frames
    encode0 = [w.encode_s for w in watchers]
    t0 = time.perf_counter()
    await asyncio.gather(*(
        _speaker(w, clips, t0 + seconds, rng, first_frame, interrupts, refused, duty)
        for w in watchers[:speakers]
    ))
    elapsed = time.perf_counter() - t0
    batches = scheduler.batches - batches0
    encoded = sum(w.frames for w in watchers) - sum(frames_before)
    fps, misses, speech, lateness = [], 0, 0, []
    for s, w, (ticks0, miss0, speech0, late0), f0 in zip(sessions, watchers, before, frames_before):
        fps.append((w.frames - f0) / elapsed)
        misses += s.stats.misses - miss0
        speech += s.stats.speech_frames - speech0
        lateness += s.stats.lateness[late0:]
    for w in watchers:
        await w.close()
    for s in sessions:
        await registry.stop(s.id)
    planned = speech + misses
    return {
        "sessions": n,
        "speaking": speakers,
        "seconds": round(elapsed, 2),
        "delivered_fps_min": round(min(fps), 2),
        "delivered_fps_mean": round(float(np.mean(fps)), 2),
        "lateness_p50_ms": _ms(lateness, 50),
        "lateness_p95_ms": _ms(lateness, 95),
        "speech_frames": planned,
        "deadline_misses": misses,
        "miss_rate": round(misses / planned, 4) if planned else 0.0,
        "first_speech_frame_p50_ms": _ms(first_frame, 50),
        "first_speech_frame_p95_ms": _ms(first_frame, 95),
        "interrupt_to_idle_p50_ms": _ms(interrupts, 50),
        "interrupt_to_idle_max_ms": round(max(interrupts) * 1000, 1) if interrupts else None,
        "utterances": len(first_frame),
        "refused_503": len(refused),
        "mean_batch": round((scheduler.batched_frames - frames0) / batches, 1) if batches else None,
        "gpu_peak_gib": _gpu_peak_gib(),
        **({"encode_ms_per_frame": round(1000 * sum(w.encode_s - e for w, e in zip(watchers, encode0))
                                         / max(encoded, 1), 2)} if encode else {}),
    }


async def text_to_first_frame(registry: LiveRegistry, rounds: int = 5) -> dict[str, Any]:
    """A one-sentence text message → its first speech frame sent (TTS included)."""
    session = await registry.attach("bench-text")
    watcher = Watcher(session)
    latencies = []
    for i in range(rounds):
        t0 = time.perf_counter()
        await session.say(SENTENCES[i % len(SENTENCES)])
        while not any(t >= t0 for t in watcher.started.values()):
            await asyncio.sleep(0.005)
        latencies.append(max(watcher.started.values()) - t0)
        while session.busy:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
    await watcher.close()
    await registry.stop(session.id)
    return {"p50_ms": _ms(latencies, 50), "max_ms": round(max(latencies) * 1000, 1), "rounds": rounds}


async def idle_cost(registry: LiveRegistry, n: int = 8, seconds: float = 3.0) -> dict[str, Any]:
    """Batches the scheduler ran while ``n`` sessions only idled (should be none)."""
    sessions = [await registry.attach(f"bench-idle-{i}") for i in range(n)]
    batches = registry.scheduler.batches
    await asyncio.sleep(seconds)
    used = registry.scheduler.batches - batches
    for s in sessions:
        await registry.stop(s.id)
    return {"sessions": n, "seconds": seconds, "accelerator_batches": used}


def _timed(fn: Any, sync: Any, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` (after one warm call), ``sync()`` closing each timing."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def stage_profile(runtime: Runtime, batches: list[int]) -> tuple[list[dict[str, Any]], list[LiveFrame]]:
    """Milliseconds per frame of each stage of a live batch, at each batch size: audio features,
    faces (UNet + VAE decode, or the lite warps), paste-back, device → host copy, and one
    viewer's encode (H.264 + AAC fMP4, one thread)."""
    import torch

    from musetalk_warm.render.blend import composite_face
    from musetalk_warm.render.mixed import FrameJob, generate_faces, stack_conditioning

    renderer, settings, avatar = runtime.renderer, runtime.settings.render, runtime.avatar(None)
    fps = avatar.fps
    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    cuda = runtime.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    compositor = getattr(renderer, "compositor", None)
    features_s = _timed(lambda: renderer.condition(audio, fps), sync) / fps
    cond = renderer.condition(audio, fps)
    rows = []
    for b in batches:
        src = np.array([int(avatar.source_index(i)) for i in range(b)])
        jobs = [FrameJob(avatar, int(i), cond[k % len(cond)]) for k, i in enumerate(src)]
        row: dict[str, Any] = {"batch": b, "features_ms": round(1000 * features_s, 3)}
        if compositor is not None:
            state = compositor.prepare(avatar, settings.subpixel_enabled)
            index = torch.from_numpy(src).to(compositor.device)
            prompts = stack_conditioning([j.cond for j in jobs])
            with torch.inference_mode():
                faces = renderer.accelerator.faces(state.latents[index], prompts)
                frames = compositor.paste(state, faces, index)
                row["faces_ms"] = _timed(lambda: renderer.accelerator.faces(state.latents[index], prompts), sync)
                row["composite_ms"] = _timed(lambda: compositor.paste(state, faces, index), sync)
                row["to_host_ms"] = _timed(lambda: compositor.to_host(frames).frames(), sync)
            host_frames = compositor.to_host(frames).frames()
        else:
            faces_np = generate_faces(renderer, jobs)
            row["faces_ms"] = _timed(lambda: generate_faces(renderer, jobs), sync)
            row["composite_ms"] = _timed(lambda: [composite_face(avatar, f, int(i), settings)
                                                  for f, i in zip(faces_np, src)], sync)
            row["to_host_ms"] = 0.0
            host_frames = [composite_face(avatar, f, int(i), settings) for f, i in zip(faces_np, src)]
        encoder = LiveFmp4(avatar.frames.shape[2], avatar.frames.shape[1], fps, 48000)
        silence = np.zeros(48000 // fps, np.int16)
        frames_in = [LiveFrame(k, f, silence, True) for k, f in enumerate(host_frames)]
        encode_s = _timed(lambda: [encoder.add(f) for f in frames_in], sync, repeats=3)
        encoder.close()
        for key in ("faces_ms", "composite_ms", "to_host_ms"):
            row[key] = round(1000 * row[key] / b, 3)
        row["encode_ms"] = round(1000 * encode_s / b, 3)
        rows.append(row)
        print(json.dumps(row))
    return rows, frames_in


def encoder_scaling(frames: list[LiveFrame], open_stream: Callable[[], Fmp4Stream],
                    streams: list[int], per_stream: int = 50) -> list[dict[str, Any]]:
    """Aggregate frames/s of ``n`` viewer encoders from ``open_stream`` fed at once from threads:
    whether encodes run in parallel or queue on the interpreter lock."""
    from concurrent.futures import ThreadPoolExecutor

    def one() -> None:
        encoder = open_stream()
        for k in range(per_stream):
            encoder.add(frames[k % len(frames)])
        encoder.close()

    rows = []
    for n in streams:
        with ThreadPoolExecutor(n) as pool:
            t0 = time.perf_counter()
            list(pool.map(lambda _: one(), range(n)))
            seconds = time.perf_counter() - t0
        rows.append({"streams": n, "fps_total": round(n * per_stream / seconds, 1),
                     "fps_per_stream": round(per_stream / seconds, 1)})
        print(json.dumps(rows[-1]))
    return rows


class RecordedTTS:
    """The benchmark's sentences as recorded with espeak-ng elsewhere (``--write-speech``)."""

    name = "recorded"

    def __init__(self, path: Path) -> None:
        with np.load(path, allow_pickle=False) as data:
            self._clips = {text: (data[f"s{i}"], int(data["rates"][i])) for i, text in enumerate(SENTENCES)}

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        return self._clips[text]

    def synthesize_timed(self, text: str) -> Speech:
        return Speech(*self._clips[text])


def write_speech(path: Path) -> None:
    """Record the benchmark's sentences with the configured TTS into ``path`` (npz, no pickle)."""
    tts = load_tts(load_settings(None, {}).tts)
    clips = [tts.synthesize(text) for text in SENTENCES]
    np.savez(path, rates=np.array([rate for _, rate in clips]), **{f"s{i}": a for i, (a, _) in enumerate(clips)})


def build_runtime(args: argparse.Namespace, settings: Settings) -> Runtime:
    if args.renderer == "lite":
        return Runtime.load(settings)
    import torch

    from musetalk_warm.models.musetalk import resolve_device, resolve_dtype
    from musetalk_warm.render.runtime import accelerated_renderer
    from scripts.bench_engine import build_models, synthetic_avatar

    device = resolve_device(args.device)
    models = build_models("official", device, resolve_dtype("auto", device))
    width, height = (int(v) for v in args.size.split("x"))
    with torch.inference_mode():
        avatar = synthetic_avatar(models, width, height, 50)
        renderer = accelerated_renderer(models, settings)  # models.accelerate: CUDA graphs at the buckets
        renderer.prepare()
    runtime = Runtime(settings, renderer, models)
    runtime.library.add(avatar, pin=True)
    return runtime


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-live-"))
    overrides: dict[str, Any] = {
        "models": {"renderer": "lite" if args.renderer == "lite" else "musetalk", "device": args.device},
        "avatar": {"cache_dir": str(root / "avatars"), "demo_seconds": 4.0,
                   **({} if args.renderer == "lite" else {"avatar_id": "bench"})},
        "server": {"sessions_dir": str(root / "sessions")},
        "live": {"record": args.record, "max_sessions": 64, "idle_timeout_s": 0,
                 "encoder_processes": args.encoder_processes},
    }
    settings = load_settings(None, apply_assignments(overrides, args.set))
    t0 = time.perf_counter()
    runtime = await asyncio.to_thread(build_runtime, args, settings)
    ready_s = time.perf_counter() - t0
    tts = RecordedTTS(Path(args.speech)) if args.speech else load_tts(settings.tts)
    clips = [tts.synthesize(text) for text in SENTENCES]
    registry = LiveRegistry(settings, runtime, tts, SessionStore(settings))
    await registry.start()
    accel = await asyncio.wrap_future(runtime.engine.submit(_accelerator, runtime, registry.scheduler.policy))
    levels = []
    try:
        for n in [int(v) for v in args.sessions.split(",")]:
            level = await run_level(registry, n, n, args.seconds, clips, encode=args.encode)
            levels.append(level)
            print(json.dumps(level))
            if not _held(level, settings):
                break
        duty_levels = []
        for n in [int(v) for v in args.duty_sessions.split(",") if v]:
            level = await run_level(registry, n, n, args.seconds, clips, encode=args.encode, duty=0.5)
            duty_levels.append(level)
            print(json.dumps(level))
            if not _held(level, settings):
                break
        one = await run_level(registry, 8, 1, args.seconds, clips, encode=args.encode)
        print(json.dumps(one))
        text = await text_to_first_frame(registry)
        idle = await idle_cost(registry)
        stages, frames = await asyncio.wrap_future(runtime.engine.submit(
            stage_profile, runtime, [int(v) for v in args.stage_batches.split(",")]))
        height, width = runtime.avatar(None).frames.shape[1:3]
        fps, counts = settings.avatar.fps, [int(v) for v in args.encoder_streams.split(",")]
        # One x264 thread each, in threads of this process and (with --encoder-processes) in the workers.
        scaling = await asyncio.to_thread(
            encoder_scaling, frames, lambda: LiveFmp4(width, height, fps, 48000, threads=1), counts)
        pool = registry.encoders
        pooled = [] if pool is None else await asyncio.to_thread(
            encoder_scaling, frames, lambda: pool.open(width, height, fps, 48000, threads=1), counts)
    finally:
        await registry.close()
        runtime.close()
    return {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "renderer": args.renderer,
                    "load_average_1m": round(os.getloadavg()[0], 2),
                    "device": runtime.device, "frame": list(runtime.avatar(None).frames.shape[1:3][::-1])},
        "settings": settings.live.model_dump(),
        "models": settings.models.model_dump(mode="json", include={"accelerate", "batch_buckets", "compile_modules",
                                                                   "memory_format"}),
        "accelerator": accel,
        "ready_s": round(ready_s, 1),
        "measured_frame_cost_ms": round((registry.scheduler.cost.per_frame_s or 0) * 1000, 3),
        "encoded": args.encode,
        "all_speaking": levels,
        "half_duty": duty_levels,
        "eight_sessions_one_speaking": one,
        "text_to_first_speech_frame": text,
        "idle": idle,
        "stages_ms_per_frame": stages,
        "encoders_in_parallel": scaling,
        "encoders_in_processes": pooled,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--renderer", choices=["lite", "musetalk"], default="lite",
                        help="musetalk: MuseTalk v1.5's official shapes with random weights")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", default="1280x720", help="frame size of the synthetic avatar (musetalk)")
    parser.add_argument("--sessions", default="1,2,4,8,16,32", help="session counts, in order, until one fails")
    parser.add_argument("--seconds", type=float, default=12.0, help="seconds per level")
    parser.add_argument("--record", action="store_true", help="also encode each utterance into the record")
    parser.add_argument("--encode", action="store_true",
                        help="encode every frame of every session as an MSE viewer does (H.264 + AAC fMP4)")
    parser.add_argument("--encoder-streams", default="1,2", help="viewer encoders run at once (threads)")
    parser.add_argument("--encoder-processes", type=int, default=0, metavar="K",
                        help="encode viewers' streams in K worker processes (live.encoder_processes)")
    parser.add_argument("--stage-batches", default="1,4,8,16,32", help="batch sizes of the per-stage profile")
    parser.add_argument("--duty-sessions", default="",
                        help="session counts, in order, speaking half of the time (e.g. 16,24,32)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--speech", metavar="NPZ", help="replay sentences recorded with --write-speech (no TTS)")
    parser.add_argument("--write-speech", metavar="NPZ", help="record the sentences with the TTS, then exit")
    parser.add_argument("--out", default="results/bench_live.json")
    args = parser.parse_args(argv)
    if args.write_speech:
        write_speech(Path(args.write_speech))
        return 0
    result = asyncio.run(bench(args))
    write_report(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

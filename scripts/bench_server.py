"""Benchmark the warm server → results/bench_server.json.

1. /speak latency over HTTP against a real uvicorn server (p50/p95, split by stage).
2. Session-video append time at session lengths of 1, 10 and 60 minutes: one
   encoded clip is appended over and over through the session video class, so
   long sessions are built in seconds; then appends to the three sessions are
   timed in turn.

    python -m scripts.bench_server [--requests 12] [--renderer lite] [--out results/bench_server.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn

from musetalk_warm.media.audio import SAMPLE_RATE, load_audio, resample
from musetalk_warm.config import Settings, apply_assignments, load_settings
from musetalk_warm.media.session_video import SessionVideo
from musetalk_warm.render.runtime import Runtime
from musetalk_warm.server import create_app
from musetalk_warm.voice.tts import load_tts

SENTENCES = [
    "Hello, and welcome back.",
    "The weather today is mild, with a light breeze from the west.",
    "Yes.",
    "I can repeat that if you like, slowly and clearly.",
    "Our next appointment is on Tuesday at half past three in the afternoon.",
    "Thank you for waiting.",
]
MARKS_MIN = (1, 10, 60)
TIMED_ROUNDS = 15


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 2)


def _summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": _pct(values, 50), "p95_ms": _pct(values, 95), "mean_ms": round(statistics.fmean(values) * 1000, 2)}


def _serve(settings: Settings) -> tuple[uvicorn.Server, threading.Thread, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{url}/health")
            if health.status_code == 200:
                return server, thread, url
            if health.json().get("status") == "error":
                raise SystemExit(f"server failed to start: {health.json()['error']}")
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become ready")


def _request(speech: list[Path], i: int) -> dict[str, Any]:
    """Keyword arguments of the i-th /speak request: text, or an uploaded file when ``speech`` is given."""
    if speech:
        path = speech[i % len(speech)]
        return {"data": {"session_id": "bench"}, "files": {"audio": (path.name, path.read_bytes(), "audio/wav")}}
    return {"json": {"text": SENTENCES[i % len(SENTENCES)], "session_id": "bench"}}


def bench_speak(settings: Settings, requests: int, speech: list[Path]) -> dict[str, Any]:
    """/speak latency over HTTP (the first request is a warm-up, not counted), then the
    same requests through /speak/stream: time to the first bytes and to the end."""
    server, thread, url = _serve(settings)
    walls: list[float] = []
    first_bytes: list[float] = []
    stream_walls: list[float] = []
    stages: dict[str, list[float]] = {}
    durations: list[float] = []
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            health = client.get("/health").json()
            client.post("/reset", json={"session_id": "bench"}).raise_for_status()
            for i in range(requests + 1):
                t0 = time.perf_counter()
                response = client.post("/speak", **_request(speech, i))
                wall = time.perf_counter() - t0
                response.raise_for_status()
                if i == 0:
                    continue
                body = response.json()
                walls.append(wall)
                durations.append(body["duration"])
                for stage, seconds in body["timings"].items():
                    stages.setdefault(stage, []).append(seconds)
            # The same requests through /speak/stream: when the first bytes (init segment and
            # first one-second fragment) arrive, and when the last one does.
            for i in range(1, requests + 1):
                t0 = time.perf_counter()
                with client.stream("POST", "/speak/stream", **_request(speech, i)) as response:
                    response.raise_for_status()
                    chunks = response.iter_raw()
                    next(chunks)
                    first_bytes.append(time.perf_counter() - t0)
                    for _ in chunks:
                        pass
                stream_walls.append(time.perf_counter() - t0)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    return {
        "renderer": health["renderer"],
        "device": health["device"],
        "requests": requests,
        "clip_seconds_mean": round(statistics.fmean(durations), 3),
        "http_latency": _summary(walls),
        "realtime_factor_p50": round(float(np.percentile(walls, 50)) / statistics.fmean(durations), 3),
        "stages": {stage: _summary(values) for stage, values in sorted(stages.items())},
        "stream_first_bytes": _summary(first_bytes),
        "stream_total": _summary(stream_walls),
    }


def bench_append(settings: Settings, workdir: Path, clip_seconds: float, speech_files: list[Path]) -> dict[str, Any]:
    """Append time of one clip at several session lengths (same encoded clip appended repeatedly)."""
    runtime = Runtime.load(settings)
    try:
        if speech_files:
            voice = np.concatenate([load_audio(p, SAMPLE_RATE) for p in speech_files])
            rate = SAMPLE_RATE
        else:
            voice, rate = load_tts(settings.tts).synthesize(" ".join(SENTENCES))
        speech = resample(voice, rate, SAMPLE_RATE)[: int(clip_seconds * SAMPLE_RATE)]
        clip = runtime.render_clip(speech, None, 0).clip
    finally:
        runtime.close()
    # One session per mark, timed round-robin, so a drift in machine load hits every mark alike.
    videos = {minutes: SessionVideo(workdir / f"session_{minutes}min.mp4") for minutes in MARKS_MIN}
    for minutes, video in videos.items():
        while video.duration < minutes * 60:
            video.append(clip)
    samples: dict[int, list[float]] = {minutes: [] for minutes in MARKS_MIN}
    for _ in range(TIMED_ROUNDS):
        for minutes, video in videos.items():
            t0 = time.perf_counter()
            video.append(clip)
            samples[minutes].append(time.perf_counter() - t0)
    timings = {
        str(minutes): {
            "median_ms": round(statistics.median(samples[minutes]) * 1000, 3),
            "p95_ms": _pct(samples[minutes], 95),
            "file_mb": round(video.path.stat().st_size / 1e6, 1),
        }
        for minutes, video in videos.items()
    }
    longest = videos[MARKS_MIN[-1]]
    t0 = time.perf_counter()
    longest.export_plain(workdir / "full_conversation.mp4")
    export_s = time.perf_counter() - t0
    first, last = timings[str(MARKS_MIN[0])]["median_ms"], timings[str(MARKS_MIN[-1])]["median_ms"]
    return {
        "clip_seconds": round(clip.duration, 3),
        "clip_bytes": sum(len(f.data) for f in clip.fragments),
        "timed_rounds": TIMED_ROUNDS,
        "append_at_minutes": timings,
        "ratio_60_over_1": round(last / first, 3),
        "export_plain_60min_s": round(export_s, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML settings file")
    parser.add_argument("--renderer", default="lite", help="models.renderer (lite, musetalk, tiny, auto)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--demo-seconds", type=float, default=2.0, help="length of the demo avatar loop")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--clip-seconds", type=float, default=10.0, help="length of the clip appended repeatedly")
    parser.add_argument("--speech-dir", help="upload the .wav files here instead of sending text (no TTS needed)")
    parser.add_argument("--cache-dir", help="avatar cache folder to use (default: a fresh one)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any other setting (repeatable)")
    parser.add_argument("--out", default="results/bench_server.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_server_") as tmp:
        work = Path(tmp)
        overrides: dict[str, dict[str, Any]] = {
            "models": {"renderer": args.renderer, "device": args.device},
            "avatar": {"demo_seconds": args.demo_seconds, "cache_dir": args.cache_dir or str(work / "avatars")},
            "server": {"sessions_dir": str(work / "sessions")},
        }
        settings = load_settings(args.config, apply_assignments(overrides, args.set))
        speech = sorted(Path(args.speech_dir).glob("*.wav")) if args.speech_dir else []
        result = {
            "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": len(os.sched_getaffinity(0))},
            "speak": bench_speak(settings, args.requests, speech),
            "append": bench_append(settings, work, args.clip_seconds, speech),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

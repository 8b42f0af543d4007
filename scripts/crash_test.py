"""Crash safety of session appends → results/crash_test.json.

A real server process (``musetalk-warm serve``, lite renderer) is SIGKILLed at
each stage of an append, N times per stage, through the ``MUSETALK_WARM_CRASH_AT``
crash point (see ``musetalk_warm/faults.py``; unset, it does nothing). After
each kill a clean server is started on the same folders and every session must:

- decode cleanly from start to end (PyAV), with audio and video within one frame;
- hold exactly the clips its state lists (no stray clip, no temp file left);
- serve no orphan: a clip file the state did not own answers 404, also after
  the next clip is appended (its URL never serves other bytes);
- take the next clip (200) and still decode.

    .venv/bin/python scripts/crash_test.py [--trials 2] [--out results/crash_test.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from musetalk_warm.faults import ENV, STAGES  # noqa: E402
from musetalk_warm.sessions.store import CLIPS_DIR, STATE_FILE, VIDEO_FILE, SessionState  # noqa: E402

FPS = 25
START_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _speech_wav(seconds: float, seed: int) -> bytes:
    """A voice-like test signal: a pitched buzz whose loudness comes and goes like syllables."""
    rate = 16000
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, np.pi)), 0, None)
    signal_ = envelope * (0.4 * np.sign(np.sin(2 * np.pi * 140 * t)) + 0.05 * rng.standard_normal(t.size))
    out = io.BytesIO()
    sf.write(out, signal_.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


class Server:
    """One ``musetalk-warm serve`` process on a free port."""

    def __init__(self, work: Path, crash_at: str | None = None) -> None:
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if k != ENV}
        if crash_at:
            env[ENV] = crash_at
        env["PYTHONPATH"] = str(ROOT)
        self.log = open(work / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "musetalk_warm.cli", "serve", "--renderer", "lite", "--port", str(self.port),
             "--sessions-dir", str(work / "sessions"), "--set", f"avatar.cache_dir={work / 'avatars'}",
             "--set", "avatar.demo_seconds=1.0"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60.0)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} at start-up (see server.log)")
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server not ready in time")

    def speak(self, session_id: str, wav: bytes) -> httpx.Response:
        return self.client.post("/speak", data={"session_id": session_id}, files={"audio": ("a.wav", wav)})

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _state(folder: Path) -> SessionState:
    return SessionState.from_json(json.loads((folder / STATE_FILE).read_text()))


def _unowned(folder: Path) -> list[str]:
    owned = _state(folder).clip_names()
    return sorted(p.name for p in (folder / CLIPS_DIR).iterdir() if p.name not in owned)


def _decode(path: Path) -> tuple[int, int, int]:
    """(video frames, audio samples, audio rate) of a whole decode; raises on any error."""
    frames = samples = rate = 0
    with av.open(str(path)) as container:
        container.streams.video[0].thread_type = "AUTO"
        for frame in container.decode(*container.streams):
            if isinstance(frame, av.AudioFrame):
                samples += frame.samples
                rate = frame.sample_rate
            else:
                frames += 1
    return frames, samples, rate


def _check(folder: Path, server: Server, session_id: str, present: list[str]) -> tuple[int, list[str], list[str]]:
    """Every guarantee for one session after a restart: (clips kept, clips discarded by recovery, failures).

    ``present`` are the clip files the kill left; those the recovered state does
    not own must answer 404, before and after the next clip.
    """
    problems: list[str] = []
    orphans: list[str] = []

    def orphan_urls_404() -> None:
        for name in orphans:
            _, generation, index = Path(name).stem.split("_")
            status = server.client.get(f"/sessions/{session_id}/clips/{generation}/{int(index)}").status_code
            if status != 404:
                problems.append(f"orphan {name} answered {status}")

    if server.client.get(f"/sessions/{session_id}").status_code != 200:  # opens (and recovers) it
        problems.append("session not readable")
        return 0, orphans, problems
    kept = _state(folder).clips
    orphans = [n for n in present if n.startswith("clip_") and n not in _state(folder).clip_names()]
    orphan_urls_404()
    stray = _unowned(folder) + sorted(p.name for p in folder.rglob(".*.tmp"))
    if stray:
        problems.append(f"files the state does not own: {stray}")
    if server.speak(session_id, _speech_wav(1.3, 99)).status_code != 200:
        problems.append("the next clip was refused")
    orphan_urls_404()
    state = _state(folder)
    if sorted(p.name for p in (folder / CLIPS_DIR).iterdir()) != sorted(state.clip_names()):
        problems.append("clips differ from the state's list")
    try:
        frames, samples, rate = _decode(folder / VIDEO_FILE)
    except av.FFmpegError as exc:
        return kept, orphans, [*problems, f"session video does not decode: {exc}"]
    if frames != state.frames:
        problems.append(f"video has {frames} frames, the state {state.frames}")
    drift = abs(samples / rate - frames / FPS)
    if drift > 1 / FPS:
        problems.append(f"audio and video differ by {drift * 1000:.1f} ms")
    for name in state.clip_names():
        try:
            _decode(folder / CLIPS_DIR / name)
        except av.FFmpegError as exc:
            problems.append(f"clip {name} does not decode: {exc}")
    return kept, orphans, problems


def run(trials: int, work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    server = Server(work)
    try:
        for stage in STAGES:  # each stage's session starts with two good clips
            session_id = f"s-{stage.replace('_', '-')}"
            server.client.post("/reset", json={"session_id": session_id})
            for seed in (1, 2):
                assert server.speak(session_id, _speech_wav(1.1, seed)).status_code == 200
    finally:
        server.stop()
    for stage in STAGES:
        session_id = f"s-{stage.replace('_', '-')}"
        folder = work / "sessions" / session_id
        rows = []
        for trial in range(trials):
            clips_before = _state(folder).clips
            doomed = Server(work, crash_at=stage)
            try:
                doomed.speak(session_id, _speech_wav(1.0 + 0.2 * trial, 10 + trial))
                killed = False
            except httpx.TransportError:
                killed = True
            doomed.proc.wait(30)
            killed = killed and doomed.proc.returncode == -signal.SIGKILL
            doomed.stop()
            unowned = _unowned(folder)
            temps = sorted(p.name for p in folder.rglob(".*.tmp"))
            present = sorted(p.name for p in (folder / CLIPS_DIR).iterdir())
            server = Server(work)
            try:
                kept, discarded, problems = _check(folder, server, session_id, present)
            finally:
                server.stop()
            rows.append({
                "killed": killed, "clips_before": clips_before, "clips_after_recovery": kept,
                "unowned_files_left": unowned, "temp_files_left": temps, "clips_discarded": discarded,
                "problems": problems,
            })
            print(f"{stage} trial {trial + 1}: killed={killed} discarded={discarded} temps={len(temps)} "
                  f"problems={problems}", flush=True)
        results[stage] = {
            "trials": trials,
            "killed": sum(r["killed"] for r in rows),
            "failures": sum(bool(r["problems"]) or not r["killed"] for r in rows),
            "unowned_files_left_by_kill": sum(len(r["unowned_files_left"]) for r in rows),
            "clips_discarded_by_recovery": sum(len(r["clips_discarded"]) for r in rows),
            "in_flight_clip_kept": sum(r["clips_after_recovery"] > r["clips_before"] for r in rows),
            "runs": rows,
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2, help="kills per stage (default 2)")
    parser.add_argument("--out", default=str(ROOT / "results" / "crash_test.json"), help="result JSON")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="crash-test-") as tmp:
        stages = run(args.trials, Path(tmp))
    report = {
        "what": "SIGKILL of a real lite-renderer server at each append stage, then restart and check",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "trials_per_stage": args.trials,
        "total_trials": sum(s["trials"] for s in stages.values()),
        "total_failures": sum(s["failures"] for s in stages.values()),
        "seconds": round(time.perf_counter() - started, 1),
        "stages": stages,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "stages"}))
    return 1 if report["total_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Lip-sync quality of both renderers on espeak speech with pauses.

Renders five espeak-ng sentences joined by 1.2 s silences (each sentence's
phoneme timings moved to where it lands) with the lite renderer and with
seeded random-init ("tiny") MuseTalk on the built-in demo avatar, through
``Runtime.render_clip`` as text is rendered, writes the clips, and scores each: SyncNet offset / LSE-D / LSE-C
(official LatentSync weights when ``MODELS_DIR/syncnet/latentsync_syncnet.pt``
exists, else the random-init tiny SyncNet, labelled), mouth opening vs frame
energy, and the mouth opening during the pauses against the source frames, in
face heights. Measures the lite renderer's articulation on espeak-ng
sentences rich in rounded and spread vowels and m/b/p, from landmarks on the
composited frames of ``RenderEngine.render`` against espeak-ng's phoneme
timings, with the phonemes passed (text) and without (spectral cues, as for
uploaded audio). Also times the lite
renderer at 512² on one CPU core. Writes ``results/eval_lipsync.json``.

    python -m scripts.eval_lipsync [--models-dir models] [--out results/eval_lipsync.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from musetalk_warm.config import Settings, load_settings
from musetalk_warm.media.audio import resample
from musetalk_warm.media.encode import write_clip_mp4
from musetalk_warm.quality.articulation import articulation, closure_frames
from musetalk_warm.quality.clip import score_clip, track_faces
from musetalk_warm.quality.mouth import face_height, frame_rms, mouth_opening, pearson
from musetalk_warm.quality.syncnet import WEIGHTS_PATH, load_syncnet, tiny_syncnet
from musetalk_warm.render.lite import LiteRenderer
from musetalk_warm.render.runtime import Runtime
from musetalk_warm.voice.phonemes import Phone, shifted
from musetalk_warm.voice.tts import EspeakTTS

FPS, SR = 25, 16000
SENTENCES = (  # 15 s, 384 frames: a steadier correlation than two sentences' 104 frames
    "Good morning, everyone.", "Let us begin the meeting.", "The first item is the budget for next year.",
    "After that, we will hear from the design team.", "Please keep your questions until the end.",
)
PAUSE_S = 1.2
ARTICULATION_TEXT = (
    "Bob moved the blue boots. We keep the peace. My mom bought a map. "
    "Who knew the moon was so big? People see the sheep. Put the spoon back."
)


def paused_speech(tts: EspeakTTS, sentences: Sequence[str] = SENTENCES,
                  ) -> tuple[np.ndarray, tuple[Phone, ...], np.ndarray]:
    """The espeak sentences with pauses between them (16 kHz), their phones, and the pauses'
    inner frames (past the voice-activity hangover and the blend ramp at each end)."""
    parts: list[np.ndarray] = []
    phones: tuple[Phone, ...] = ()
    pauses: list[np.ndarray] = []
    at = 0.0  # where the next sentence starts, in seconds
    for i, text in enumerate(sentences):
        if i:
            parts.append(np.zeros(int(PAUSE_S * SR), np.float32))
            pauses.append(np.arange(int(at * FPS) + 8, int((at + PAUSE_S) * FPS) - 8))
            at += PAUSE_S
        speech = tts.synthesize_timed(text)
        parts.append(resample(speech.samples, speech.rate, SR))
        phones += shifted(speech.phones or (), at)
        at += len(speech.samples) / speech.rate
    return np.concatenate(parts), phones, np.concatenate(pauses)


def _settings(folder: Path, renderer: str) -> Settings:
    return load_settings(None, {
        "avatar": {"cache_dir": str(folder / "avatars")},
        "models": {"renderer": renderer, "models_dir": str(folder / "models")},
    })


def evaluate(renderer: str, audio: np.ndarray, phones: tuple[Phone, ...], pause: np.ndarray, folder: Path,
             model: Any) -> dict[str, Any]:
    runtime = Runtime.load(_settings(folder, renderer))
    try:
        result = runtime.render_clip(audio, None, 0, phones=phones)
        avatar = runtime.avatar(None)
    finally:
        runtime.close()
    clip = write_clip_mp4(result.clip, folder / f"{renderer}.mp4")
    scores = score_clip(clip, model, vshift=15)
    # The pauses against the source frames the avatar shows there.
    frames = np.stack([f for f in _decode(clip)])
    out_lm = track_faces(frames[pause])
    src_lm = track_faces(avatar.frames[avatar.source_index(pause)])
    height = face_height(src_lm)
    diff = np.abs(mouth_opening(out_lm, height) - mouth_opening(src_lm, height))
    # The lips close on each m/b/p, voiced or not: the same correlation without those frames.
    keep = np.ones(len(frames), bool)
    keep[closure_frames(phones, FPS, len(frames))] = False
    opening = mouth_opening(track_faces(frames))
    scores["mouth"]["opening_energy_r_outside_closures"] = round(
        pearson(opening[keep], frame_rms(audio, FPS, len(frames))[keep]), 4)
    scores["mouth"]["pause_vs_source_max"] = round(float(np.nanmax(diff)), 4)
    scores["mouth"]["pause_vs_source_mean"] = round(float(np.nanmean(diff)), 4)
    scores["renderer"] = renderer
    return scores


def _decode(path: Path) -> list[np.ndarray]:
    from musetalk_warm.media.decode import iter_video_frames

    return list(iter_video_frames(path))


def _demo_avatar(folder: Path) -> Any:
    runtime = Runtime.load(_settings(folder, "lite"))
    try:
        return runtime.avatar(None)
    finally:
        runtime.close()


def _render_lite(avatar: Any, cond: np.ndarray, batch: int = 16) -> np.ndarray:
    src = avatar.source_index(np.arange(len(cond)))
    renderer = LiteRenderer()
    return np.concatenate([renderer.generate(avatar, cond[i : i + batch], src[i : i + batch])
                           for i in range(0, len(cond), batch)])


def lite_articulation(folder: Path, tts: EspeakTTS) -> dict[str, Any]:
    """Width on rounded vs spread vowels and closure on m/b/p, from landmarks on the composited
    frames the render engine makes of the TTS's speech, with its phones passed and without."""
    speech = tts.synthesize_timed(ARTICULATION_TEXT)
    assert speech.phones is not None
    audio = resample(speech.samples, speech.rate, SR)
    report: dict[str, Any] = {"text": ARTICULATION_TEXT, "path": "RenderEngine.render, composited frames"}
    runtime = Runtime.load(_settings(folder, "lite"))
    try:
        avatar = runtime.avatar(None)
        for name, phones in (("phonemes", speech.phones), ("spectral", None)):
            frames = np.stack(list(runtime.engine.render(audio, avatar, 0, phones=phones)))
            report[name] = articulation(track_faces(frames), speech.phones, avatar.fps)
    finally:
        runtime.close()
    return report


def lite_speed(folder: Path, frames: int = 100) -> dict[str, float]:
    """Lite ``generate`` on one core: the 256² mouth work per frame of the demo avatar (paste excluded).

    The shapes sweep opening, rounding and closure, so every warp runs.
    """
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    avatar = _demo_avatar(folder)
    t = np.linspace(0.0, 1.0, frames)
    cond = np.stack([0.05 + 0.95 * t, np.sin(7 * t), (np.sin(11 * t) > 0.8) * 1.0], axis=1).astype(np.float32)
    # A first pass reads the avatar's frames from its cache (lazily, on first use) and warms OpenCV.
    _render_lite(avatar, cond)
    t0 = time.perf_counter()
    _render_lite(avatar, cond)
    generate = (time.perf_counter() - t0) / frames
    return {"generate_ms_per_frame": round(1000 * generate, 2), "frame_size": list(avatar.frames.shape[1:3])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("results/eval_lipsync.json"))
    args = parser.parse_args()
    weights = args.models_dir / WEIGHTS_PATH
    model, label = (load_syncnet(weights), weights.name) if weights.is_file() else (tiny_syncnet(), "tiny (random)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tts = EspeakTTS()
        audio, phones, pause = paused_speech(tts)
        rows = [evaluate(name, audio, phones, pause, folder, model) for name in ("lite", "tiny")]
        report = {"syncnet": label, "machine": platform.processor() or platform.machine(),
                  "pause_frames": len(pause), "clips": rows,
                  "lite_articulation": lite_articulation(folder, tts), "lite_speed": lite_speed(folder)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

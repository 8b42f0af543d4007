"""Score a rendered clip: SyncNet offset and confidence, mouth opening vs the audio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import MediaError
from .mouth import frame_rms, mouth_opening, pearson
from .sync import sync_score
from .syncnet import SyncNet


def track_faces(frames_bgr: np.ndarray) -> np.ndarray:
    """``[T,68,2]`` landmarks per frame (NaN where no face), tracked across the clip."""
    from ..avatars.landmarks import MediapipeDetector

    detector = MediapipeDetector(video=True)
    out = np.full((len(frames_bgr), 68, 2), np.nan, np.float32)
    try:
        for i, frame in enumerate(frames_bgr):
            found = detector.detect(frame)
            if found is not None:
                out[i] = found.landmarks
    finally:
        detector.close()
    return out


def face_crops(frames_bgr: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    """``[T,size,size,3]`` RGB squares around each face (one box for the clip, from all
    frames' landmarks, so the crop itself does not move with the jaw)."""
    points = landmarks.reshape(-1, 2)
    points = points[np.isfinite(points).all(axis=1)]
    if len(points) == 0:
        raise MediaError("no face found in the clip")
    (x1, y1), (x2, y2) = points.min(axis=0), points.max(axis=0)
    cx, cy, side = (x1 + x2) / 2, (y1 + y2) / 2, 1.15 * max(x2 - x1, y2 - y1)
    scale = size / side
    warp = np.float32([[scale, 0, size / 2 - scale * cx], [0, scale, size / 2 - scale * cy]])
    return np.stack([
        cv2.cvtColor(cv2.warpAffine(f, warp, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE),
                     cv2.COLOR_BGR2RGB)
        for f in frames_bgr
    ])


def mouth_stats(landmarks: np.ndarray, audio16k: np.ndarray, fps: int, speech: np.ndarray) -> dict[str, Any]:
    """Opening vs frame RMS correlation, and opening in silent (``~speech``) frames."""
    opening = mouth_opening(landmarks)
    rms = frame_rms(audio16k, fps, len(landmarks))
    silent = ~speech[: len(opening)]
    return {
        "opening_energy_r": round(pearson(opening, rms), 4),
        "opening_speech_mean": round(float(np.nanmean(opening[~silent])), 4) if (~silent).any() else None,
        "opening_silence_mean": round(float(np.nanmean(opening[silent])), 4) if silent.any() else None,
        "silent_frames": int(silent.sum()),
        "frames_with_face": int(np.isfinite(opening).sum()),
    }


def score_clip(path: Path, model: SyncNet, *, vshift: int = 15, stride: int = 1) -> dict[str, Any]:
    """Every score of an mp4 (or any container FFmpeg reads with video and audio)."""
    from ..media.audio import load_audio, num_frames
    from ..media.decode import iter_video_frames, probe
    from ..render.silence import speech_frames

    info = probe(path)
    fps = int(round(info.fps)) if info.fps else 25
    frames = np.stack(list(iter_video_frames(path)))
    audio = load_audio(path)
    frames = frames[: num_frames(len(audio), fps)]
    landmarks = track_faces(frames)
    crops = face_crops(frames, landmarks, model.config.resolution)
    sync = sync_score(model, crops, audio, fps, vshift=vshift, stride=stride)
    speech = speech_frames(audio, fps, len(frames))
    return {
        "clip": path.name, "frames": len(frames), "fps": fps,
        "sync": sync.as_dict(), "mouth": mouth_stats(landmarks, audio, fps, speech),
    }

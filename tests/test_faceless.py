"""Frames in which prep finds no face are shown as the source frame, untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from musetalk_warm.avatars.landmarks import Detection, MediapipeDetector
from musetalk_warm.avatars.prep import prepare_avatar
from musetalk_warm.config import Settings
from musetalk_warm.render.engine import RenderEngine
from musetalk_warm.render.lite import LiteRenderer

FACELESS = {1, 4, 7, 10}


class BlindDetector:
    """The real detector, except that it finds nothing in the frames of ``FACELESS``."""

    name = "mediapipe"

    def __init__(self) -> None:
        self.inner = MediapipeDetector(video=True)
        self.frame = -1

    def detect(self, frame_bgr: np.ndarray) -> Detection | None:
        self.frame += 1
        found = self.inner.detect(frame_bgr)
        return None if self.frame in FACELESS else found


def test_faceless_frames_are_not_drawn_on(tmp_path: Path, speech_16k: np.ndarray) -> None:
    settings = Settings(avatar={"cache_dir": tmp_path, "demo_seconds": 1.0, "fps": 12})
    avatar = prepare_avatar(settings, detector=BlindDetector(), progress=False)
    assert set(avatar.manifest["faceless_frames"]) == FACELESS
    engine = RenderEngine(LiteRenderer(), settings.render)
    try:
        frames = list(engine.render(speech_16k, avatar, 0))
    finally:
        engine.close()
    sources = avatar.source_index(np.arange(len(frames)))
    changed = [not np.array_equal(frame, avatar.frames[src]) for frame, src in zip(frames, sources)]
    assert all(not c for c, src in zip(changed, sources) if src in FACELESS)
    assert sum(c for c, src in zip(changed, sources) if src not in FACELESS) > len(frames) // 4  # mouths move

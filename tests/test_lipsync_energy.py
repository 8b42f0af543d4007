"""The lite jaw follows the speech energy, measured from landmarks on its encoded output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from musetalk_warm.config import load_settings
from musetalk_warm.media.decode import iter_video_frames
from musetalk_warm.media.encode import write_clip_mp4
from musetalk_warm.quality.articulation import closure_frames
from musetalk_warm.quality.clip import track_faces
from musetalk_warm.quality.mouth import frame_rms, mouth_opening, pearson
from musetalk_warm.render.lite import LiteRenderer
from musetalk_warm.render.runtime import Runtime
from musetalk_warm.voice.phonemes import Phone
from musetalk_warm.voice.tts import EspeakTTS
from scripts.eval_lipsync import paused_speech

FPS = 25
SENTENCES = ("Good morning, everyone.", "Let us begin the meeting.")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, tuple[Phone, ...], float]:
    """Per-frame opening of the encoded lite clip (demo avatar, as text is rendered), the
    audio, its phones and the avatar's rest opening."""
    folder: Path = tmp_path_factory.mktemp("energy")
    settings = load_settings(None, {"avatar": {"cache_dir": str(folder / "avatars")},
                                    "models": {"renderer": "lite", "models_dir": str(folder / "models")}})
    audio, phones, _ = paused_speech(EspeakTTS(), SENTENCES)  # two sentences, 1.2 s apart
    runtime = Runtime.load(settings)
    try:
        result = runtime.render_clip(audio, None, 0, phones=phones)
        avatar = runtime.avatar(None)
        rest = float(np.nanmedian(mouth_opening(track_faces(avatar.frames[:25]))))
    finally:
        runtime.close()
    clip = write_clip_mp4(result.clip, folder / "lite.mp4")
    opening = mouth_opening(track_faces(np.stack(list(iter_video_frames(clip)))))
    return opening, audio, phones, rest


def test_opening_follows_the_frame_energy(rendered: tuple[np.ndarray, np.ndarray, tuple[Phone, ...], float]) -> None:
    """Over every frame, closures on m/b/p included, the opening correlates with the frame RMS
    (the issue's target: r >= 0.8; 0.56 when the jaw barely opened above the parted rest mouth)."""
    opening, audio, phones, rest = rendered
    rms = frame_rms(audio, FPS, len(opening))
    keep = np.ones(len(opening), bool)
    keep[closure_frames(phones, FPS, len(opening))] = False
    r, r_open = pearson(opening, rms), pearson(opening[keep], rms[keep])
    loud = rms >= np.percentile(rms[rms > 0.01], 75)
    print(f"r {r:.3f}, outside closures {r_open:.3f}; rest {rest:.4f}, loud frames {np.nanmean(opening[loud]):.4f}")
    assert r >= 0.8 and r_open >= 0.9
    # Loud speech opens well above the parted rest mouth, the closures still close.
    assert np.nanmean(opening[loud]) > rest + 0.05
    assert np.nanmin(opening[~keep]) < 0.02


def test_quiet_speech_never_closes_below_rest(avatar_lite_crops: tuple[np.ndarray, np.ndarray]) -> None:
    """Openings from slight to full, as landmarks see them: rising, none under the rest mouth
    (a thin dark line drawn across the teeth used to read as a mouth closing)."""
    levels, opening = avatar_lite_crops
    print(dict(zip(levels.round(2).tolist(), opening.round(4).tolist())))
    assert np.all(opening[1:] >= opening[0] - 0.004)
    assert np.all(np.diff(opening[[0, 2, 4, 6, 8]]) > 0)
    assert opening[-1] > opening[0] + 0.08


@pytest.fixture(scope="module")
def avatar_lite_crops(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    folder: Path = tmp_path_factory.mktemp("transfer")
    settings = load_settings(None, {"avatar": {"cache_dir": str(folder / "avatars")},
                                    "models": {"renderer": "lite", "models_dir": str(folder / "models")}})
    runtime = Runtime.load(settings)
    try:
        avatar = runtime.avatar(None)
    finally:
        runtime.close()
    levels = np.array([0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0], np.float32)
    shapes = np.stack([levels, np.zeros_like(levels), np.zeros_like(levels)], axis=1)
    faces = LiteRenderer().generate(avatar, shapes, np.zeros(len(levels), np.int64))
    # One detection per image (no tracking across levels).
    opening = np.array([mouth_opening(track_faces(face[None]))[0] for face in faces])
    return levels, opening

"""Silent frames show the source mouth: voice activity per frame, ramps, MuseTalk path."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import espeak_wav, make_settings

from musetalk_warm.render.runtime import Runtime
from musetalk_warm.render.silence import hold_source, source_weights, speech_frames

FPS = 25
SR = 16000


@pytest.fixture(scope="module")
def paused_speech(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, slice]:
    """Two espeak sentences with 1.2 s of digital silence between them; the pause's frames."""
    folder = tmp_path_factory.mktemp("paused")
    parts = []
    for i, text in enumerate(("Good morning, everyone.", "Let us begin the meeting.")):
        data, rate = sf.read(str(espeak_wav(folder / f"{i}.wav", text)), dtype="float32", always_2d=True)
        parts.append(soxr.resample(data.mean(axis=1), rate, SR).astype(np.float32))
    gap = np.zeros(int(1.2 * SR), np.float32)
    audio = np.concatenate([parts[0], gap, parts[1]])
    first = len(parts[0]) / SR * FPS
    return audio, slice(int(np.ceil(first)), int((len(parts[0]) + len(gap)) / SR * FPS))


def test_voice_activity_marks_the_pause_silent(paused_speech: tuple[np.ndarray, slice]) -> None:
    audio, pause = paused_speech
    n = len(audio) * FPS // SR
    speech = speech_frames(audio, FPS, n)
    inner = slice(pause.start + 4, pause.stop - 4)  # beyond the 0.1 s hangover
    assert not speech[inner].any()
    assert speech[: pause.start].mean() > 0.8 and speech[pause.stop :].mean() > 0.8
    assert not speech_frames(np.zeros(SR, np.float32), FPS, FPS).any()


def test_source_weights_ramp_into_and_out_of_silence() -> None:
    speech = np.array([1, 1, 0, 0, 0, 0, 0, 0, 1, 0], bool)
    np.testing.assert_allclose(source_weights(speech, 2), [0, 0, 1 / 3, 2 / 3, 1, 1, 2 / 3, 1 / 3, 0, 1 / 3], atol=1e-6)
    np.testing.assert_array_equal(source_weights(np.zeros(4, bool), 3), np.ones(4))
    faces, src = np.zeros((2, 2, 2, 3), np.uint8), np.full((2, 2, 2, 3), 200, np.uint8)
    out = hold_source(faces, src, np.array([0.0, 0.25], np.float32))
    assert out[0].max() == 0 and np.all(out[1] == 50)


def _mouth_error(runtime: Runtime, frames: list[np.ndarray], start: int) -> np.ndarray:
    avatar = runtime.avatar(None)
    out = []
    for i, frame in enumerate(frames):
        src = int(avatar.source_index(start + i))
        x1, y1, x2, y2 = avatar.boxes[src]
        mouth = (slice(int(y1 + 0.6 * (y2 - y1)), int(y2)), slice(int(x1), int(x2)))
        out.append(np.abs(frame[mouth].astype(int) - avatar.frames[src][mouth].astype(int)).mean())
    return np.array(out)


@pytest.mark.parametrize("enabled", [True, False])
def test_musetalk_pause_shows_the_source_mouth(tmp_path_factory: pytest.TempPathFactory,
                                                paused_speech: tuple[np.ndarray, slice], enabled: bool) -> None:
    audio, pause = paused_speech
    settings = make_settings(tmp_path_factory.mktemp("tiny"), models={"renderer": "tiny"},
                             render={"batch_size": 8, "silence_source_enabled": enabled})
    runtime = Runtime.load(settings)
    try:
        error = _mouth_error(runtime, list(runtime.engine.render(audio, runtime.avatar(None), 0)), 0)
    finally:
        runtime.close()
    inner = slice(pause.start + 8, pause.stop - 8)  # past hangover and ramp
    print(f"silence_source_enabled={enabled}: mouth error speech {error[:pause.start].mean():.1f}, "
          f"pause {error[inner].mean():.2f} grey levels")
    assert error[: pause.start].mean() > 2  # random weights: speech frames show a generated face
    if enabled:
        assert error[inner].max() < 1.0  # only the paste-back resampling differs from the source
    else:
        assert error[inner].min() > 2

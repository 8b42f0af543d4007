"""Render engine and runtime: prep → render → mp4, frame continuity, streaming, OOM retry."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_settings

from musetalk_warm.avatars.cache import Avatar
from musetalk_warm.config import RenderSettings
from musetalk_warm.render.engine import MuseTalkRenderer, RenderEngine, RenderStats
from musetalk_warm.errors import AudioError, AvatarCacheError, NotFound, ResourceExhausted
from musetalk_warm.render.lite import LiteRenderer
from musetalk_warm.media.decode import probe
from musetalk_warm.media.encode import write_clip_mp4
from musetalk_warm.render.runtime import Runtime
from musetalk_warm.avatars.stabilise import box_transform
from musetalk_warm.voice.phonemes import Phone


@pytest.fixture(scope="module")
def tiny_runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    root = tmp_path_factory.mktemp("tiny")
    settings = make_settings(root, models={"renderer": "tiny"}, render={"batch_size": 8})
    runtime = Runtime.load(settings)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def lite_runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    runtime = Runtime.load(make_settings(tmp_path_factory.mktemp("lite"), render={"batch_size": 4}))
    yield runtime
    runtime.close()


def _outside_crop(frame: np.ndarray, crop_box: np.ndarray) -> np.ndarray:
    """Pixels of ``frame`` outside the (clipped) crop box: blanked inside."""
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    out = frame.copy()
    out[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = 0
    return out


def test_tiny_musetalk_clip_end_to_end(tiny_runtime: Runtime, speech_16k: np.ndarray, tmp_path: Path) -> None:
    avatar = tiny_runtime.avatar(None)
    assert tiny_runtime.renderer_name == "musetalk"
    assert avatar.latents is not None and avatar.latents.shape == (len(avatar), 8, 32, 32)

    result = tiny_runtime.render_clip(speech_16k, None, 0)
    info = probe(write_clip_mp4(result.clip, tmp_path / "clip.mp4"))

    assert (info.video_codec, info.pix_fmt, round(info.fps, 3)) == ("h264", "yuv420p", 25.0)
    assert (info.width, info.height) == avatar.frames.shape[2:0:-1]
    assert info.frame_count == result.frames
    # Padded with trailing silence to a whole 320 ms quantum (8 frames at 25 fps).
    speech_frames = math.floor(len(speech_16k) / 16000 * 25)
    assert result.frames % 8 == 0 and 0 <= result.frames - speech_frames < 8
    assert info.audio_codec == "aac" and info.sample_rate == 48000
    assert abs(info.audio_duration - info.video_duration) < 1 / 25
    assert abs(info.video_duration - result.frames / 25) < 1e-6
    assert result.end_frame == result.frames % avatar.cycle_length
    assert set(result.timings) >= {"audio", "features", "generate", "composite", "render", "encode"}


def test_musetalk_frames_change_only_the_face_region(tiny_runtime: Runtime, speech_16k: np.ndarray) -> None:
    avatar = tiny_runtime.avatar(None)
    start = 7
    audio = speech_16k[: 16000]
    # Every frame generated, the speech's own onset and gaps included (no source mouth in silence).
    generated = tiny_runtime.settings.render.model_copy(update={"silence_source_enabled": False})
    frames = list(tiny_runtime.engine.render(audio, avatar, start, settings=generated))
    assert len(frames) == 25
    for i, frame in enumerate(frames):
        src = int(avatar.source_index(start + i))
        np.testing.assert_array_equal(
            _outside_crop(frame, avatar.crop_boxes[src]), _outside_crop(avatar.frames[src], avatar.crop_boxes[src])
        )
        x1, y1, x2, y2 = avatar.boxes[src]
        mouth = (slice(int(y1 + 0.6 * (y2 - y1)), int(y2)), slice(int(x1), int(x2)))
        # Random weights generate a different face: the lower face must have been replaced.
        assert np.abs(frame[mouth].astype(int) - avatar.frames[src][mouth].astype(int)).mean() > 2


def test_next_clip_continues_from_where_the_last_ended(lite_runtime: Runtime, speech_16k: np.ndarray) -> None:
    avatar = lite_runtime.avatar(None)
    first = lite_runtime.render_clip(speech_16k[:12000], None, 0)
    second_start = first.end_frame
    assert second_start == first.frames % avatar.cycle_length and second_start > 0
    silence = np.zeros(16000 * 2 // 5, np.float32)  # mouth closed: frames equal the avatar's
    frames = list(lite_runtime.engine.render(silence, avatar, second_start))
    expected = avatar.source_index(second_start + np.arange(len(frames)))
    for frame, src in zip(frames, expected, strict=True):
        # Continuity: frame i shows avatar position start+i (not frame 0 again).
        outside = _outside_crop(frame, avatar.crop_boxes[src])
        np.testing.assert_array_equal(outside, _outside_crop(avatar.frames[src], avatar.crop_boxes[src]))
    assert int(expected[0]) != 0


class _Counting:
    """Wraps a renderer, counting batches and optionally refusing big ones like an OOM GPU."""

    def __init__(self, inner: LiteRenderer, max_batch: int | None = None, max_audio: int | None = None) -> None:
        self.inner, self.max_batch, self.max_audio, self.calls, self.sizes = inner, max_batch, max_audio, 0, []
        self.attempts: list[int] = []
        self.name = inner.name

    def condition(self, audio: np.ndarray, fps: int, phones: Sequence[Phone] | None = None) -> np.ndarray:
        if self.max_audio is not None and len(audio) > self.max_audio:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner.condition(audio, fps, phones)

    def generate(self, avatar: Avatar, cond: np.ndarray, src_idx: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.attempts.append(len(src_idx))
        if self.max_batch is not None and len(src_idx) > self.max_batch:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        self.sizes.append(len(src_idx))
        return self.inner.generate(avatar, cond, src_idx)


def test_first_frames_stream_before_the_clip_is_rendered(lite_runtime: Runtime, speech_16k: np.ndarray) -> None:
    avatar = lite_runtime.avatar(None)
    counting = _Counting(LiteRenderer())
    engine = RenderEngine(counting, lite_runtime.settings.render)
    frames = engine.render(speech_16k, avatar, 0)
    next(frames)
    total_batches = math.ceil(math.floor(len(speech_16k) / 16000 * 25) / lite_runtime.settings.render.batch_size)
    assert total_batches > 10
    assert counting.calls <= 3  # the batch being composited and two in flight
    assert 1 + sum(1 for _ in frames) == math.floor(len(speech_16k) / 16000 * 25)
    engine.close()


def test_oom_halves_the_batch_then_reports(lite_runtime: Runtime, speech_16k: np.ndarray) -> None:
    avatar = lite_runtime.avatar(None)
    settings = lite_runtime.settings.render.model_copy(update={"batch_size": 8})
    counting = _Counting(LiteRenderer(), max_batch=2)
    engine = RenderEngine(counting, settings)
    stats = RenderStats()
    frames = list(engine.render(speech_16k[:16000], avatar, 0, stats=stats))
    assert len(frames) == 25 and stats.frames == 25
    assert max(counting.sizes) == 2
    # The batch that fitted is remembered: the next clip starts there, not at 8 again,
    # and tries a doubled batch only after a run of clean ones.
    before = len(counting.attempts)
    list(engine.render(speech_16k[:32000], avatar, 0))
    later = counting.attempts[before:]
    assert later[0] == 2 and 8 not in later
    grown = later.index(4)  # a doubled batch is tried after clean ones, fails, and falls back
    assert grown >= 3 and set(later[:grown]) == {2} and later[grown + 1] == 2

    long_audio = RenderEngine(_Counting(LiteRenderer(), max_audio=8000), settings)
    with pytest.raises(ResourceExhausted, match="encoding the audio"):
        list(long_audio.render(speech_16k[:16000], avatar, 0))
    long_audio.close()

    hopeless_renderer = _Counting(LiteRenderer(), max_batch=0)
    hopeless = RenderEngine(hopeless_renderer, settings)
    with pytest.raises(ResourceExhausted, match="out of memory"):
        list(hopeless.render(speech_16k[:16000], avatar, 0))
    # A clip that failed even at batch 1 does not pin later clips to batch 1.
    hopeless_renderer.max_batch = None
    list(hopeless.render(speech_16k[:16000], avatar, 0))
    assert hopeless_renderer.attempts[-4:] == [8, 8, 8, 1]
    engine.close()
    hopeless.close()


class _Echo:
    """A renderer that gives back each frame's unmodified input crop."""

    name = "echo"

    def condition(self, audio: np.ndarray, fps: int, phones: Sequence[Phone] | None = None) -> np.ndarray:
        return np.zeros(math.floor(len(audio) / 16000 * fps))

    def generate(self, avatar: Avatar, cond: np.ndarray, src_idx: np.ndarray) -> np.ndarray:
        return np.array(avatar.crops[src_idx])


def _paste_error(engine: RenderEngine, avatar: Avatar, settings: RenderSettings) -> float:
    """Mean |rendered - source| where the mask is on, over one second of frames (grey levels)."""
    frames = list(engine.render(np.zeros(16000, np.float32), avatar, 3, settings=settings))
    errors = []
    for i, frame in enumerate(frames):
        src = int(avatar.source_index(3 + i))
        x1, y1, x2, y2 = (int(v) for v in avatar.crop_boxes[src])
        assert min(x1, y1) >= 0 and x2 <= frame.shape[1] and y2 <= frame.shape[0]  # the demo face is inside
        diff = np.abs(frame[y1:y2, x1:x2].astype(np.int16) - avatar.frames[src][y1:y2, x1:x2])
        errors.append(diff[avatar.masks[src] > 0].mean())
    return float(np.mean(errors))


@pytest.mark.parametrize("mode", ["upstream", "feather", "poisson"])
def test_faces_go_back_where_their_crops_were_cut(lite_runtime: Runtime, mode: str) -> None:
    avatar = lite_runtime.avatar(None)
    settings = lite_runtime.settings.render.model_copy(update={"blend_mode": mode})
    raw = np.stack([box_transform((b[:2] + b[2:]) / 2, b[2:] - b[:2]) for b in avatar.boxes.astype(float)])
    assert np.abs(raw - avatar.placements).max() > 0.5  # the demo's placements are stabilised
    engine = RenderEngine(_Echo(), settings)
    # Pasting each unmodified crop at the avatar's placement gives the frame back.
    assert _paste_error(engine, avatar, settings) < 0.5  # measured 0.1 (upstream, feather) to 0.3 (poisson)
    # The same crops pasted at the raw boxes (the old mismatch) are visibly off.
    assert _paste_error(engine, replace(avatar, placements=raw), settings) > 2.0  # measured 2.7 to 3.6
    engine.close()


def test_musetalk_needs_latents(lite_runtime: Runtime, tiny_models) -> None:  # type: ignore[no-untyped-def]
    avatar = lite_runtime.avatar(None)
    assert avatar.latents is None
    with pytest.raises(AvatarCacheError, match="prepared without the VAE"):
        MuseTalkRenderer(tiny_models).generate(avatar, torch.zeros(1, 50, 16), np.array([0]))


def test_user_errors(lite_runtime: Runtime) -> None:
    with pytest.raises(NotFound, match="unknown avatar 'nobody'"):
        lite_runtime.render_clip(np.zeros(16000, np.float32), "nobody", 0)
    with pytest.raises(AudioError, match="shorter than one video frame"):
        lite_runtime.render_clip(np.zeros(500, np.float32), None, 0)


def test_blend_mode_is_chosen_per_render(lite_runtime: Runtime, speech_16k: np.ndarray) -> None:
    avatar = lite_runtime.avatar(None)
    audio = speech_16k[8000:16000]
    base = lite_runtime.settings.render
    by_mode = {
        mode: list(lite_runtime.engine.render(audio, avatar, 3, settings=base.model_copy(update={"blend_mode": mode})))
        for mode in ("feather", "poisson", "upstream")
    }
    for i in range(len(by_mode["feather"])):
        src = int(avatar.source_index(3 + i))
        frames = [by_mode[m][i] for m in by_mode]
        # Same pixels outside the crop box, different blending inside it.
        outside = [_outside_crop(f, avatar.crop_boxes[src]) for f in frames]
        np.testing.assert_array_equal(outside[0], outside[1])
        np.testing.assert_array_equal(outside[0], outside[2])
    assert not np.array_equal(by_mode["feather"][5], by_mode["poisson"][5])
    assert not np.array_equal(by_mode["feather"][5], by_mode["upstream"][5])


@pytest.mark.parametrize("quanta", [1, 29, 57])
def test_clip_frame_count_is_exact_for_every_length(lite_runtime: Runtime, quanta: int) -> None:
    # 29 quanta (9.28 s) is where float arithmetic, floor(n/16000*25), loses a frame.
    audio = np.zeros(5120 * quanta - 100, np.float32)
    result = lite_runtime.render_clip(audio, None, 0)
    assert result.frames == 8 * quanta == result.clip.frame_count
    assert result.clip.sample_count == 15360 * quanta


def test_thirty_fps_clips(tmp_path: Path, speech_16k: np.ndarray) -> None:
    runtime = Runtime.load(make_settings(tmp_path, avatar={"fps": 30, "demo_seconds": 1.0}))
    try:
        result = runtime.render_clip(speech_16k, None, 0)
    finally:
        runtime.close()
    # 30 fps at 48 kHz: whole quanta of 16 frames (25600 samples, 25 AAC frames).
    assert result.frames % 16 == 0 and result.frames * 1600 == result.clip.sample_count
    assert 0 <= result.frames - len(speech_16k) * 30 // 16000 < 16


def test_fragments_stream_while_the_clip_renders(
    lite_runtime: Runtime, speech_16k: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered: list[int] = []  # frames the engine had produced when each fragment arrived
    produced = 0
    render = lite_runtime.engine.render

    def counting_render(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal produced
        for frame in render(*args, **kwargs):
            produced += 1
            yield frame

    monkeypatch.setattr(lite_runtime.engine, "render", counting_render)
    chunks: list[bytes] = []

    def on_fragment(init: bytes, fragment) -> None:  # type: ignore[no-untyped-def]
        rendered.append(produced)
        chunks.append((init if not chunks else b"") + fragment.data)

    result = lite_runtime.render_clip(speech_16k, None, 0, on_fragment=on_fragment)
    assert len(chunks) == len(result.clip.fragments) >= 5
    # The first one-second fragment left while most of the clip was still to render.
    assert rendered[0] < result.frames / 2 and rendered == sorted(rendered)
    streamed = tmp_path / "streamed.mp4"
    streamed.write_bytes(b"".join(chunks))
    assert b"".join(chunks) == result.clip.init + b"".join(f.data for f in result.clip.fragments)
    info = probe(streamed)
    assert info.frame_count == result.frames and info.video_codec == "h264"


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"avatar": {"fps": 24, "demo_seconds": 0.5}}, "2.67 s"),
    ({"avatar": {"fps": 30, "demo_seconds": 0.5}, "media": {"audio_rate": 32000}}, "samples per frame"),
])
def test_fps_and_rate_that_cannot_make_gapless_clips_are_refused_at_load(
    tmp_path: Path, overrides: dict, needle: str
) -> None:
    from musetalk_warm.errors import ConfigError

    settings = make_settings(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=needle):
        Runtime.load(settings)


def test_render_clip_uses_the_requested_blend_mode(lite_runtime: Runtime, speech_16k: np.ndarray) -> None:
    audio = speech_16k[8000:24000]
    base = lite_runtime.settings.render
    clips = {
        mode: lite_runtime.render_clip(audio, None, 5, render=base.model_copy(update={"blend_mode": mode})).clip
        for mode in ("feather", "poisson")
    }
    default = lite_runtime.render_clip(audio, None, 5).clip
    data = {k: b"".join(f.data for f in c.fragments) for k, c in clips.items()}
    assert base.blend_mode == "feather"
    assert b"".join(f.data for f in default.fragments) == data["feather"]  # deterministic
    assert data["poisson"] != data["feather"]

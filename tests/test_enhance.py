"""GFPGAN face enhancement: the official checkpoint layout, the real loader, frames and clips.

``data/gfpgan_v1_clean_layout.json`` is the state-dict layout (names and shapes) of
the official ``GFPGANv1Clean`` (out_size 512, channel multiplier 2, as GFPGAN v1.3/
v1.4 are released), exported from the upstream architecture code; ``GFPGANv1.4.pth``
holds exactly these tensors under ``params_ema``.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from torch import nn

from musetalk_warm.avatars.cache import Avatar
from musetalk_warm.avatars.demo import demo_frames
from musetalk_warm.avatars.landmarks import make_detector
from musetalk_warm.avatars.prep import load_or_prepare
from musetalk_warm.cli import main
from musetalk_warm.errors import WeightsMissing
from musetalk_warm.render.enhance import (
    FaceEnhancer,
    Target,
    avatar_targets,
    detected_targets,
    enhance_frame,
    enhance_video,
    load_gfpgan,
)
from musetalk_warm.render.gfpgan import GFPGANv1Clean

from conftest import make_settings

LAYOUT = Path(__file__).parent / "data" / "gfpgan_v1_clean_layout.json"
FPS = 25


def test_the_network_has_the_official_key_layout() -> None:
    with torch.device("meta"):
        net = GFPGANv1Clean()
    layout = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert layout == json.loads(LAYOUT.read_text())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init GFPGANv1Clean saved as the official file is: ``{"params_ema": state_dict}``."""
    torch.manual_seed(0)
    state = GFPGANv1Clean(narrow=1 / 32).state_dict()  # tiny channels, the released 512² size
    path = tmp_path_factory.mktemp("models") / "GFPGANv1.4.pth"
    torch.save({"params_ema": state}, path)
    return path


def test_the_loader_reads_an_official_style_checkpoint(checkpoint: Path, face_bgr: np.ndarray) -> None:
    net = load_gfpgan(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)["params_ema"]
    assert net.out_size == 512 and not net.training
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    enhancer = FaceEnhancer(net, net.out_size)
    face = face_bgr[40:296, 130:386]  # the astronaut's face, 256²
    crops = np.stack([face.repeat(2, 0).repeat(2, 1), face_bgr])
    out = enhancer.restore(crops)
    assert out.shape == (2, 512, 512, 3) and out.dtype == np.uint8
    assert np.ptp(out) >= 5 and out.std() > 0.5  # an image (random weights: near grey), not a constant
    assert not np.array_equal(out[0], out[1])  # it depends on the input
    again = enhancer.restore(crops[:1]).astype(int)  # stored noise: the same face, no shimmer
    assert np.abs(again - out[:1]).max() <= 1  # (a batch of one rounds a few pixels differently)


def test_missing_or_wrong_weights_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(WeightsMissing, match="GFPGANv1.4.pth not found") as err:
        load_gfpgan(tmp_path / "GFPGANv1.4.pth")
    assert "--with-enhance" in str(err.value.hint)
    src = _clip(tmp_path / "in.mp4", demo_frames(0.08, FPS, size=128))
    assert main(["enhance", str(src), str(tmp_path / "out.mp4"), "--models-dir", str(tmp_path)]) == 2
    line = capsys.readouterr().err
    assert "GFPGANv1.4.pth not found" in line and str(tmp_path) not in line
    wrong = tmp_path / "GFPGANv1.4.pth"
    for content in ({"params_ema": {"conv_body_first.weight": torch.zeros(2, 3, 1, 1)}}, torch.zeros(3)):
        torch.save(content, wrong)
        with pytest.raises(WeightsMissing, match="not a GFPGAN"):
            load_gfpgan(wrong)
    wrong.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMissing, match="not a GFPGAN"):
        load_gfpgan(wrong)


def _clip(path: Path, frames: np.ndarray, audio_rate: int = 24000) -> Path:
    """H.264 frames at FPS with a 440 Hz AAC tone of the same length."""
    t = np.arange(round(len(frames) / FPS * audio_rate)) / audio_rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        audio = out.add_stream("aac", rate=audio_rate, layout="mono")
        for frame in frames:
            out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        block = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        block.sample_rate, block.pts, block.time_base = audio_rate, 0, Fraction(1, audio_rate)
        out.mux(audio.encode(block))
        out.mux(audio.encode(None))
        out.mux(video.encode(None))
    return path


def _read(path: Path) -> tuple[np.ndarray, list[int], Fraction, bytes]:
    """Frames, their timestamps, the video rate and the audio packets' bytes."""
    with av.open(str(path)) as inp:
        vin, ain = inp.streams.video[0], inp.streams.audio[0]
        frames, pts, audio = [], [], b""
        for packet in inp.demux(vin, ain):
            if packet.stream is ain:
                audio += bytes(packet)
                continue
            for frame in packet.decode():
                frames.append(frame.to_ndarray(format="bgr24"))
                pts.append(int(frame.pts))
        return np.stack(frames), pts, vin.average_rate, audio


def test_a_clip_keeps_its_frames_timing_and_audio(checkpoint: Path, tmp_path: Path) -> None:
    src = _clip(tmp_path / "in.mp4", demo_frames(0.12, FPS, size=256))
    net = load_gfpgan(checkpoint)
    detector = make_detector("mediapipe", video=True)
    found = detected_targets(detector, make_settings(tmp_path))
    seen: list[Target] = []

    def targets(i: int, frame: np.ndarray) -> Target:
        seen.append(found(i, frame))
        return seen[-1]

    try:
        result = enhance_video(src, tmp_path / "out.mp4", FaceEnhancer(net, 512), targets, progress=False)
    finally:
        detector.close()
    before, after = _read(src), _read(tmp_path / "out.mp4")
    assert result.frames == result.enhanced == len(before[0]) == len(after[0]) == 3
    assert after[1] == before[1] and after[2] == before[2] == FPS
    assert after[3] == before[3] and len(after[3]) > 100  # audio stream-copied, byte for byte
    diff = np.abs(after[0].astype(int) - before[0].astype(int)).max(axis=3)
    for i, target in enumerate(seen):
        assert target is not None
        mask = _in_frame(target[1], np.array(target[2]), diff.shape[1:])
        near = cv2.dilate(mask.astype(np.uint8), np.ones((15, 15), np.uint8)) > 0
        inside, outside = diff[i][mask], diff[i][~near]
        assert (inside > 20).mean() > 0.3  # the face is restored (random weights: changed)
        assert outside.mean() < 5.0 and np.percentile(outside, 99) < 20  # the rest only re-encoded (3.3, 10)


def _landmarks(frames: np.ndarray) -> np.ndarray:
    detector = make_detector("mediapipe", video=False)
    try:
        found = [detector.detect(f) for f in frames]
    finally:
        detector.close()
    assert all(d is not None for d in found)
    return np.stack([d.landmarks for d in found])


def _in_frame(mask: np.ndarray, box: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Where a crop-box mask is on, in frame coordinates (the box may leave the frame)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    out = np.zeros(shape, bool)
    ys, xs = slice(max(y1, 0), min(y2, shape[0])), slice(max(x1, 0), min(x2, shape[1]))
    out[ys, xs] = mask[ys.start - y1 : ys.stop - y1, xs.start - x1 : xs.stop - x1] > 0
    return out


@pytest.fixture(scope="module")
def demo_avatar(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Avatar]:
    """The built-in demo avatar, prepared (lite: no latents) into a cache folder."""
    root = tmp_path_factory.mktemp("enhance")
    avatar = load_or_prepare(make_settings(root, avatar={"demo_seconds": 0.12}), progress=False)
    return root / "avatars", avatar


def test_the_face_stays_where_it_was(demo_avatar: tuple[Path, Avatar]) -> None:
    """Crop → 512² → paste is aligned: with an identity network the frames come back as they were."""
    avatar = demo_avatar[1]
    identity = FaceEnhancer(nn.Identity(), 512)
    targets = avatar_targets(avatar)
    frames = np.stack([enhance_frame(identity, f, targets(i, f)) for i, f in enumerate(avatar.frames)])
    mask = np.stack([_in_frame(m, b, frames.shape[1:3]) for m, b in zip(avatar.masks, avatar.crop_boxes, strict=True)])
    diff = np.abs(frames.astype(int) - avatar.frames.astype(int)).max(axis=3)
    assert mask.mean() > 0.01 and diff[~mask].max() == 0  # outside the mask: untouched
    assert diff[mask].mean() < 1.0  # inside: only resampling error (0.09 levels measured)
    shift = np.linalg.norm(_landmarks(frames) - _landmarks(avatar.frames), axis=2)
    assert shift.max() < 1.0  # px (0.08 measured)


def test_the_command_enhances_a_session_video(
    checkpoint: Path, demo_avatar: tuple[Path, Avatar], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache, avatar = demo_avatar
    src = _clip(tmp_path / "session.mp4", avatar.frames[[2, 2]])  # cycle positions 2, 3 of 0 1 2 2 1 0
    out = tmp_path / "enhanced.mp4"
    args = ["enhance", str(src), str(out), "--session", "--start-frame", "2", "--models-dir",
            str(checkpoint.parent), "--device", "cpu", "--set", f"avatar.cache_dir={cache}"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frames"] == report["enhanced"] == 2 and report["audio"] and report["fps"] == FPS
    frames = _read(out)[0]
    assert len(frames) == 2 and np.abs(frames[0].astype(int) - frames[1]).mean() < 1.0  # one placement


def test_generated_crops_are_restored_at_the_network_size_and_back(checkpoint: Path, face_bgr: np.ndarray) -> None:
    identity = FaceEnhancer(nn.Identity(), 512)
    face = cv2.resize(face_bgr, (256, 256))
    round_trip = identity.restore_tensor(torch.from_numpy(face[None]))
    assert round_trip.shape == (1, 256, 256, 3) and round_trip.dtype == torch.uint8
    assert np.abs(round_trip[0].numpy().astype(int) - face).mean() < 1.5  # bicubic up, area down
    net = load_gfpgan(checkpoint)
    restored = FaceEnhancer(net, 512).restore(face[None])
    assert restored.shape == (1, 256, 256, 3) and restored.dtype == np.uint8
    assert np.abs(restored[0].astype(int) - face).mean() > 1.0  # the network changed it


def test_live_faces_are_restored_before_they_are_pasted(checkpoint: Path, tmp_path: Path) -> None:
    """With ``render.live_enhance`` the scheduler restores every generated face with GFPGAN, then
    blends silence and pastes as before; without the weights the registry names the file."""
    from dataclasses import replace

    from musetalk_warm.live.registry import live_enhancer
    from musetalk_warm.live.scheduler import FrameScheduler, MaxBatchPolicy
    from musetalk_warm.render.blend import composite_face
    from musetalk_warm.render.lite import LiteRenderer
    from musetalk_warm.render.mixed import FrameJob, generate_faces, hold_silent_faces

    settings = make_settings(tmp_path, render={"live_enhance": True},
                             models={"models_dir": str(checkpoint.parent)})
    assert live_enhancer(make_settings(tmp_path)) is None
    with pytest.raises(WeightsMissing, match="GFPGANv1.4.pth"):
        live_enhancer(make_settings(tmp_path / "none", render={"live_enhance": True}))
    enhancer = live_enhancer(settings)
    assert enhancer is not None
    avatar = load_or_prepare(settings, progress=False)
    renderer = LiteRenderer()
    cond = renderer.condition(np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.2, FPS, None)
    jobs = [FrameJob(avatar, 0, cond[2]), replace(FrameJob(avatar, 3, cond[5]), hold=0.5)]
    scheduler = FrameScheduler(renderer, lambda fn, *a: fn(*a), settings.render, None,  # type: ignore[arg-type]
                               policy=MaxBatchPolicy(8), enhancer=enhancer)
    frames = scheduler._render_batch(jobs)
    faces = hold_silent_faces(jobs, list(enhancer.restore(np.stack(generate_faces(renderer, jobs)))))
    for frame, face, job in zip(frames, faces, jobs, strict=True):  # type: ignore[arg-type]
        np.testing.assert_array_equal(frame, composite_face(avatar, face, job.source, settings.render))
    plain = FrameScheduler(renderer, lambda fn, *a: fn(*a), settings.render, None,  # type: ignore[arg-type]
                           policy=MaxBatchPolicy(8))._render_batch(jobs)
    assert np.abs(frames[0].astype(int) - plain[0]).mean() > 0.05  # type: ignore[index]

"""Clip encoding, probing, frame reading and the appended session video."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
import types
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from musetalk_warm.media import decode
from musetalk_warm.media import fmp4
from musetalk_warm.media import encode as media
from musetalk_warm.media import session_video
from musetalk_warm.config import MediaSettings, clip_quantum
from musetalk_warm.errors import ConfigError, DependencyMissing, MediaError
from musetalk_warm.media.fmp4 import iter_boxes
from musetalk_warm.media.session_video import SessionVideo

SETTINGS = MediaSettings()
RATE = SETTINGS.audio_rate
FPS = 25


def frame(i: int, width: int = 320, height: int = 240) -> np.ndarray:
    """A moving colour gradient with the frame number drawn on it."""
    y, x = np.mgrid[0:height, 0:width] / 50.0
    img = np.stack([np.sin(x + i * 0.2), np.cos(y - i * 0.1), np.sin(x + y)], -1) * 90 + 128
    img = img.astype(np.uint8)
    cv2.putText(
        img, str(i), (4, height - 8), cv2.FONT_HERSHEY_SIMPLEX, min(width, height) / 60, (255, 255, 255), 2
    )
    return img


def tone(n_frames: int, freq: float = 440.0, burst: bool = False) -> np.ndarray:
    """Audio for ``n_frames`` video frames; with ``burst``, silent first and last 40 ms."""
    n = n_frames * RATE // FPS
    audio = 0.3 * np.sin(2 * np.pi * freq * np.arange(n) / RATE)
    if burst:
        edge = RATE // 25
        audio[:edge] = audio[-edge:] = 0
    return audio.astype(np.float32)


def encode(frames: list[np.ndarray], audio: np.ndarray, **kwargs: object) -> fmp4.EncodedClip:
    height, width = frames[0].shape[:2]
    encoder = media.ClipEncoder(width, height, FPS, SETTINGS, audio, **kwargs)
    for img in frames:
        encoder.add_frame(img)
    return encoder.finish()


def ffprobe(path: Path) -> dict:
    exe = shutil.which("ffprobe")
    assert exe, "ffprobe (apt ffmpeg) is needed as an independent check"
    out = subprocess.run(
        [
            exe,
            "-v",
            "error",
            "-count_packets",
            "-show_entries",
            "stream=codec_name,codec_type,pix_fmt,profile,r_frame_rate,nb_read_packets,duration,sample_rate",
            "-show_entries",
            "format=duration",
            "-of",
            "json",
            str(path),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def decode_all(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    with av.open(str(path)) as container:
        video = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    with av.open(str(path)) as container:
        audio = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
    return video, audio


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse))


def test_clip_is_browser_h264_aac_and_decodes(tmp_path: Path) -> None:
    frames = [frame(i) for i in range(48)]
    audio = tone(48)
    clip = encode(frames, audio)
    assert (clip.frame_count, clip.sample_count, clip.duration) == (48, len(audio), 1.92)
    path = media.write_clip_mp4(clip, tmp_path / "clip.mp4")

    info = decode.probe(path)
    assert (info.video_codec, info.pix_fmt, info.profile) == ("h264", "yuv420p", "High")
    assert (info.width, info.height, info.fps, info.frame_count) == (320, 240, 25.0, 48)
    assert (info.audio_codec, info.sample_rate, info.channels) == ("aac", RATE, 1)
    assert info.audio_samples == len(audio)
    assert abs(info.audio_duration - info.video_duration) < 1 / FPS
    assert info.video_duration == pytest.approx(1.92)

    probed = ffprobe(path)
    video, sound = (next(s for s in probed["streams"] if s["codec_type"] == t) for t in ("video", "audio"))
    assert (video["codec_name"], video["pix_fmt"], video["r_frame_rate"]) == ("h264", "yuv420p", "25/1")
    assert int(video["nb_read_packets"]) == 48
    assert sound["codec_name"] == "aac" and int(sound["sample_rate"]) == RATE
    assert abs(float(video["duration"]) - float(sound["duration"])) < 1 / FPS
    assert float(probed["format"]["duration"]) == pytest.approx(1.92, abs=0.04)

    decoded, decoded_audio = decode_all(path)
    assert len(decoded) == 48
    scores = [psnr(a, b) for a, b in zip(decoded, frames, strict=True)]
    assert min(scores) > 30, scores
    # Order kept: every decoded frame is closest to its own original.
    small = np.stack(frames)[:, ::4, ::4].astype(np.float32)
    for i, img in enumerate(decoded):
        assert int(np.abs(small - img[::4, ::4]).mean(axis=(1, 2, 3)).argmin()) == i
    # Audio starts with the first video frame and matches sample for sample, but for
    # the first and last AAC frame (their MDCT overlap has no neighbour in a lone clip).
    assert len(decoded_audio) == len(audio)
    assert np.abs(decoded_audio[1024:-1024] - audio[1024:-1024]).max() < 0.02


def test_clip_fragments_are_gops_and_stream_as_they_are_made() -> None:
    seen: list[tuple[int, float]] = []
    added = 0
    encoder = media.ClipEncoder(
        64, 64, FPS, SETTINGS, tone(96), on_fragment=lambda f: seen.append((added, f.start))
    )
    for added in range(96):
        encoder.add_frame(frame(added, 64, 64))
    clip = encoder.finish()
    assert [(f.start, f.duration) for f in clip.fragments] == [
        (0.0, 1.0),
        (1.0, 1.0),
        (2.0, 1.0),
        (3.0, 0.84),
    ]
    # Fragments are handed out while later frames are still being added.
    assert [start for _, start in seen] == [0.0, 1.0, 2.0, 3.0]
    assert seen[0][0] < 50 and seen[1][0] < 75
    for frag in clip.fragments:
        assert [b.kind for b in iter_boxes(frag.data)] == [b"moof", b"mdat"]
    with av.open(io.BytesIO(clip.init + b"".join(f.data for f in clip.fragments))) as container:
        packets = [p for p in container.demux(video=0) if p.size]
    assert [i for i, p in enumerate(packets) if p.is_keyframe] == [0, 25, 50, 75]
    assert all(p.pts == p.dts for p in packets)  # no B-frames


def test_odd_frame_size_is_padded_to_even(tmp_path: Path) -> None:
    frames = [frame(i, 63, 45) for i in range(8)]
    path = media.write_clip_mp4(encode(frames, tone(8)), tmp_path / "odd.mp4")
    info = decode.probe(path)
    assert (info.width, info.height, info.frame_count) == (64, 46, 8)
    decoded, _ = decode_all(path)
    assert min(psnr(d[:45, :63], f) for d, f in zip(decoded, frames, strict=True)) > 30


def test_encoder_refuses_bad_input() -> None:
    with pytest.raises(MediaError, match="clip_quantum"):
        media.ClipEncoder(64, 64, FPS, SETTINGS, np.zeros(1000, np.float32))
    encoder = media.ClipEncoder(64, 64, FPS, SETTINGS, tone(8))
    with pytest.raises(MediaError, match="64x64x3"):
        encoder.add_frame(np.zeros((32, 64, 3), np.uint8))
    for i in range(8):
        encoder.add_frame(frame(i, 64, 64))
    with pytest.raises(MediaError, match="one more"):
        encoder.add_frame(frame(8, 64, 64))
    short = media.ClipEncoder(64, 64, FPS, SETTINGS, tone(8))
    short.add_frame(frame(0, 64, 64))
    with pytest.raises(MediaError, match="8 frames but 1"):
        short.finish()


def test_quantum_padding() -> None:
    # Whole video frames and whole 1024-sample AAC frames: 320 ms at 25 fps.
    assert clip_quantum(25, 48000) == 15360 == 15 * 1024 == 8 * 1920
    assert clip_quantum(25, 16000) == 5120 == 5 * 1024 == 8 * 640
    assert clip_quantum(30, 48000) == 25600 == 25 * 1024 == 16 * 1600
    with pytest.raises(ConfigError, match="samples per frame"):
        clip_quantum(24, 44100)
    padded = media.pad_to_quantum(np.ones(16000, np.float32), 5120)
    assert len(padded) == 20480 and padded[:16000].min() == 1 and not padded[16000:].any()
    assert len(media.pad_to_quantum(np.ones(5120, np.float32), 5120)) == 5120
    assert len(media.pad_to_quantum(np.zeros(0, np.float32), 5120)) == 5120
    exact = media.pad_to(np.ones(15361, np.float32), 15360)
    assert len(exact) == 15360 and exact.min() == 1
    assert len(media.pad_to(np.ones(100, np.float32), 30720)) == 30720


def test_missing_encoder_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = av.Codec

    def lookup(name: str, mode: str = "r") -> av.Codec:
        if name == "libx264":
            raise av.codec.codec.UnknownCodecError(name)
        return real(name, mode)

    monkeypatch.setattr(av, "Codec", lookup)
    with pytest.raises(DependencyMissing, match="libx264") as err:
        media.ClipEncoder(64, 64, FPS, SETTINGS, tone(8))
    assert "pip install" in str(err.value)


def _source_video(path: Path, n: int, rate: int) -> None:
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate, options={"crf": "10"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            img = np.repeat(np.repeat(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), 8, 0), 8, 1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                container.mux(packet)
        container.mux(stream.encode(None))


@pytest.mark.parametrize("fps", [25, 12.5, 60, 24])
def test_iter_video_frames_resamples_like_ffmpeg(tmp_path: Path, fps: float) -> None:
    src = tmp_path / "src30.mp4"
    _source_video(src, 45, 30)
    native = list(decode.iter_video_frames(src))
    assert len(native) == 45 and native[0].shape == (48, 64, 3) and native[0].dtype == np.uint8

    stack = np.stack(native).astype(np.float32)

    def which(img: np.ndarray) -> int:
        return int(np.abs(stack - img).mean(axis=(1, 2, 3)).argmin())

    ours = [which(img) for img in decode.iter_video_frames(src, fps=fps)]
    raw = subprocess.run(
        [
            shutil.which("ffmpeg") or "ffmpeg",
            "-v",
            "error",
            "-i",
            str(src),
            "-vf",
            f"fps={fps}",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "bgr24",
            "-",
        ],
        check=True,
        capture_output=True,
    ).stdout
    reference = [which(img) for img in np.frombuffer(raw, np.uint8).reshape(-1, 48, 64, 3)]
    assert ours == reference
    assert len(ours) == round(1.5 * fps)


def test_iter_video_frames_errors(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="not found: nope.mp4") as err:
        next(decode.iter_video_frames(tmp_path / "nope.mp4"))
    assert str(tmp_path) not in str(err.value)
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video at all\n" * 20)
    with pytest.raises(MediaError, match="bad.mp4 cannot be read") as err:
        next(decode.iter_video_frames(bad))
    assert str(tmp_path) not in str(err.value)
    sound = tmp_path / "sound.mp4"
    media.write_clip_mp4(encode([frame(i, 64, 64) for i in range(8)], tone(8)), sound)
    with av.open(str(sound)) as src, av.open(str(tmp_path / "audio.m4a"), "w") as out:
        stream = out.add_stream_from_template(src.streams.audio[0])
        for packet in src.demux(audio=0):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    with pytest.raises(MediaError, match="no video stream"):
        next(decode.iter_video_frames(tmp_path / "audio.m4a"))


def _clips(count: int) -> list[tuple[list[np.ndarray], np.ndarray]]:
    """Tiny clips (64x64, 8 frames = 320 ms) with tone bursts of varying pitch."""
    return [
        ([frame(k * 8 + i, 64, 64) for i in range(8)], tone(8, 300 + 7 * k, burst=True)) for k in range(count)
    ]


def _session(
    path: Path, clips: list[tuple[list[np.ndarray], np.ndarray]]
) -> tuple[SessionVideo, list[float]]:
    session = SessionVideo(path)
    times, tail = [], None
    for frames, audio in clips:
        clip = encode(frames, audio, prev_tail=tail)
        tail = audio
        start = time.perf_counter()
        result = session.append(clip)
        times.append(time.perf_counter() - start)
        assert result.duration == pytest.approx(0.32)
    return session, times


def test_hundred_appends_stay_gapless_and_flat(tmp_path: Path) -> None:
    clips = _clips(100)
    path = tmp_path / "full_session.mp4"
    session, times = _session(path, clips)
    assert (session.clip_count, session.frame_count, session.sample_count) == (100, 800, 100 * 15360)
    assert session.duration == pytest.approx(32.0)
    assert np.mean(times[-10:]) < 3 * np.mean(times[:10]) + 0.005, times

    info = decode.probe(path)
    assert info.frame_count == 800
    assert abs(info.audio_duration - info.video_duration) < 1 / FPS
    assert abs(info.duration - 32.0) < 0.04 and abs(info.video_duration - 32.0) < 0.04
    probed = ffprobe(path)
    video, sound = (next(s for s in probed["streams"] if s["codec_type"] == t) for t in ("video", "audio"))
    assert int(video["nb_read_packets"]) == 800 and int(sound["nb_read_packets"]) == 100 * 15
    assert abs(float(video["duration"]) - float(sound["duration"])) < 1 / FPS
    assert abs(float(probed["format"]["duration"]) - 32.0) < 0.04

    # Timestamps strictly increasing without gaps, on both tracks.
    for kind, step in (("video", 512), ("audio", 1024)):  # 1/25 s at 1/12800, one AAC frame
        with av.open(str(path)) as container:
            packets = [p for p in container.demux(**{kind: 0}) if p.dts is not None]
        pts = np.array([p.pts for p in packets])
        assert pts[0] == 0 and (np.diff(pts) == step).all() and {p.duration for p in packets} == {step}
    decoded, sound_out = decode_all(path)
    assert len(decoded) == 800
    sources = np.stack([f for frames, _ in clips for f in frames])[::7].astype(np.float32)
    nearest = [int(np.abs(sources - d).mean(axis=(1, 2, 3)).argmin()) for d in decoded[::7]]
    assert nearest == list(range(len(sources)))
    # Gapless: every clip's audio sits exactly where its frames are, seams included.
    reference = np.concatenate([audio for _, audio in clips])
    assert len(sound_out) == len(reference)
    assert np.abs(sound_out[1024:] - reference[1024:]).max() < 0.03

    index = session.fragments()
    assert len(index) == session.fragment_count == 100
    assert [f["offset"] for f in index[1:]] == [f["offset"] + f["size"] for f in index[:-1]]
    assert index[-1]["offset"] + index[-1]["size"] == path.stat().st_size
    assert [f["start"] for f in index] == pytest.approx([0.32 * k for k in range(100)])

    plain = session.export_plain(tmp_path / "full_conversation.mp4")
    kinds = [b.kind for b in iter_boxes(plain.read_bytes())]
    assert b"moof" not in kinds and kinds.index(b"moov") < kinds.index(b"mdat")  # faststart
    exported = decode.probe(plain)
    assert exported.frame_count == 800 and abs(exported.duration - info.duration) < 0.04
    assert abs(exported.audio_duration - exported.video_duration) < 1 / FPS
    stamp = plain.stat().st_mtime_ns
    assert session.export_plain(plain).stat().st_mtime_ns == stamp  # cached


def test_reopen_continues_and_export_refreshes(tmp_path: Path) -> None:
    path = tmp_path / "full_session.mp4"
    clips = _clips(4)
    _session(path, clips[:2])
    first = SessionVideo(path).export_plain(tmp_path / "out.mp4")
    assert decode.probe(first).frame_count == 16
    session, _ = _session(path, clips[2:])  # a new object: state comes from the index
    assert session.clip_count == 4
    assert (session.frame_count, session.duration) == (32, pytest.approx(1.28))
    assert decode.probe(session.export_plain(tmp_path / "out.mp4")).frame_count == 32
    decoded, _ = decode_all(path)
    assert len(decoded) == 32


def test_rejects_clip_with_other_encoding(tmp_path: Path) -> None:
    path = tmp_path / "full_session.mp4"
    session, _ = _session(path, _clips(1))
    before = path.read_bytes()
    other = encode([frame(i, 80, 64) for i in range(8)], tone(8))
    with pytest.raises(MediaError, match="differs"):
        session.append(other)
    assert path.read_bytes() == before and session.clip_count == 1


class _HalfWriter:
    """A file whose write stores half the bytes, then fails like a full disk."""

    def __init__(self, handle) -> None:  # noqa: ANN001
        self._handle = handle

    def write(self, data: bytes) -> int:
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        raise OSError(28, "No space left on device")

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._handle, name)

    def __enter__(self):  # noqa: ANN204
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


@pytest.mark.parametrize("target", ["full_session.mp4", "full_session.index.jsonl"])
def test_failed_append_leaves_session_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    path = tmp_path / "full_session.mp4"
    clips = _clips(3)
    session, _ = _session(path, clips[:2])
    video, index = path.read_bytes(), session.index_path.read_bytes()
    clip = encode(*clips[2], prev_tail=clips[1][1])

    def failing_open(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202
        handle = open(file, mode, *args, **kwargs)
        return _HalfWriter(handle) if Path(file).name == target and "a" in mode else handle

    monkeypatch.setattr(session_video, "open", failing_open, raising=False)
    with pytest.raises(MediaError, match="No space left") as err:
        session.append(clip)
    assert str(tmp_path) not in str(err.value)
    monkeypatch.undo()
    assert path.read_bytes() == video and session.index_path.read_bytes() == index
    reopened = SessionVideo(path)
    assert (reopened.clip_count, reopened.frame_count) == (2, 16)
    assert len(decode_all(path)[0]) == 16
    reopened.append(clip)  # the session goes on
    assert len(decode_all(path)[0]) == 24


def test_crash_tail_is_removed_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "full_session.mp4"
    clips = _clips(3)
    session, _ = _session(path, clips[:2])
    video, index = path.read_bytes(), session.index_path.read_bytes()
    torn = encode(*clips[2], prev_tail=clips[1][1]).fragments[0].data
    with open(path, "ab") as handle:  # the crash hit mid-write of the next clip
        handle.write(torn[: len(torn) // 2])
    with open(session.index_path, "ab") as handle:
        handle.write(b'{"clip": 3, "fragm')
    reopened = SessionVideo(path)
    assert path.read_bytes() == video and session.index_path.read_bytes() == index
    assert reopened.clip_count == 2 and len(decode_all(path)[0]) == 16


def test_write_clip_mp4_failure_keeps_existing_file(tmp_path: Path) -> None:
    good = encode([frame(i, 64, 64) for i in range(8)], tone(8))
    path = media.write_clip_mp4(good, tmp_path / "clip.mp4")
    before = path.read_bytes()
    broken = fmp4.EncodedClip(**{**good.__dict__, "fragments": (fmp4.Fragment(b"\0" * 64, 0.0, 0.32),)})
    with pytest.raises(MediaError, match="clip.mp4"):
        media.write_clip_mp4(broken, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_index_fsync_failure_after_full_line_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index line is written in full, then its fsync fails: the line must go too."""
    path = tmp_path / "full_session.mp4"
    clips = _clips(3)
    session, _ = _session(path, clips[:2])
    video, index = path.read_bytes(), session.index_path.read_bytes()
    clip = encode(*clips[2], prev_tail=clips[1][1])
    written: list[bool] = []

    def broken_fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".index.jsonl"):
            on_disk = session.index_path.read_bytes()
            written.append(on_disk.endswith(b"\n") and len(on_disk) > len(index))
            raise OSError(5, "Input/output error")
        os.fsync(fd)

    monkeypatch.setattr(session_video, "os", types.SimpleNamespace(**{**vars(os), "fsync": broken_fsync}))
    with pytest.raises(MediaError, match="Input/output error"):
        session.append(clip)
    monkeypatch.undo()
    assert written == [True]  # the failure hit after a complete line was on disk
    assert path.read_bytes() == video and session.index_path.read_bytes() == index
    reopened = SessionVideo(path)
    assert (reopened.clip_count, reopened.frame_count) == (2, 16)
    reopened.append(clip)  # the session goes on
    assert reopened.clip_count == 3 and len(decode_all(path)[0]) == 24

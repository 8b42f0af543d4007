"""Reading media with PyAV: video frames at a constant rate, audio samples, probing.

FFmpeg's error text is passed on without the file path it may carry.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..errors import AudioError, MediaError


def _open_input(path: str | Path, what: str) -> av.container.InputContainer:
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{what} not found: {path.name}")
    try:
        return av.open(str(path), mode="r")
    except av.error.FFmpegError as exc:
        raise MediaError(f"{what} {path.name} cannot be read: {ffmpeg_reason(exc)}") from exc


def ffmpeg_reason(exc: BaseException) -> str:
    """FFmpeg's message without the file name it may carry (could be an absolute path)."""
    return getattr(exc, "strerror", None) or type(exc).__name__


def iter_video_frames(path: str | Path, fps: float | None = None) -> Iterator[np.ndarray]:
    """Yield the video's frames as BGR uint8 ``[H,W,3]`` arrays.

    With ``fps``, frames are resampled to that constant rate the way ``ffmpeg -r``
    does: output frame ``k`` shows the last input frame whose timestamp rounds to a
    slot ``<= k``; frames are dropped or repeated, never blended.
    """
    name = Path(path).name
    container = _open_input(path, "video file")
    try:
        if not container.streams.video:
            raise MediaError(f"video file {name} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = _decode_bgr(container, stream, name)
        if fps is None:
            yield from (image for _, _, image in frames)
        else:
            yield from _resample_cfr(frames, float(fps))
    finally:
        container.close()


def _decode_bgr(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, name: str
) -> Iterator[tuple[float | None, float | None, np.ndarray]]:
    """(time s, duration s, BGR frame) per decoded frame."""
    count = 0
    try:
        for frame in container.decode(stream):
            time = float(frame.time) if frame.time is not None else None
            dur = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else None
            count += 1
            yield time, dur, frame.to_ndarray(format="bgr24")
    except av.error.FFmpegError as exc:
        raise MediaError(f"video file {name} is corrupt after {count} frames: {ffmpeg_reason(exc)}") from exc
    if count == 0:
        raise MediaError(f"video file {name} holds no decodable frame")


def _round_half_up(value: float) -> int:
    # FFmpeg rounds timestamps half away from zero (Python's round() is half-even);
    # the epsilon absorbs float error in values such as 2.5000000001.
    return math.floor(value + 0.5 + 1e-9)


def _resample_cfr(
    frames: Iterator[tuple[float | None, float | None, np.ndarray]], fps: float
) -> Iterator[np.ndarray]:
    if not fps > 0:
        raise MediaError(f"fps must be positive, got {fps}")
    origin: float | None = None
    held: np.ndarray | None = None
    next_slot = 0
    end = 0.0
    for index, (time, dur, image) in enumerate(frames):
        if time is None:  # no timestamps: assume the source is already at fps
            time = index / fps
        if origin is None:
            origin = time
        slot = _round_half_up((time - origin) * fps)
        # Emit the held frame for every slot before this frame's slot.
        while held is not None and next_slot < slot:
            yield held
            next_slot += 1
        held = image
        end = max(end, time - origin + (dur if dur else 1.0 / fps))
    # The last frame lasts until the stream's end, like ffmpeg's fps filter.
    total = max(_round_half_up(end * fps), 1)
    while held is not None and next_slot < total:
        yield held
        next_slot += 1


def decode_audio(
    source: bytes | str | Path, max_seconds: float | None = None
) -> tuple[list[np.ndarray], int]:
    """Decode the first audio stream of any container FFmpeg reads.

    Returns per-frame float32 ``[channels, n]`` blocks and the sample rate. Raises
    :class:`AudioError` for empty, unreadable, non-audio or corrupt input, or when
    the audio runs longer than ``max_seconds`` (decoding stops there).
    """
    if isinstance(source, bytes | bytearray):
        if not source:
            raise AudioError("the audio upload is empty")
        name, target = "the upload", io.BytesIO(source)
    else:
        name, target = Path(source).name, str(source)
        if not Path(source).is_file():
            raise AudioError(f"audio file not found: {name}")
    try:
        container = av.open(target, mode="r")
    except av.error.FFmpegError as exc:
        raise AudioError(f"{name} is not a readable audio file ({ffmpeg_reason(exc)})") from exc
    with container:
        if not container.streams.audio:
            raise AudioError(
                f"{name} has no audio stream", hint="upload speech as wav, mp3, ogg, webm, m4a or flac"
            )
        stream = container.streams.audio[0]
        to_float = av.AudioResampler(format="fltp")  # keeps rate and layout; planar gives [ch, n]
        blocks: list[np.ndarray] = []
        total, rate = 0, 0
        try:
            for frame in container.decode(stream):
                rate = rate or frame.sample_rate
                for out in to_float.resample(frame):
                    blocks.append(out.to_ndarray())
                    total += out.samples
                if max_seconds is not None and total > max_seconds * rate:
                    raise AudioError(f"audio is longer than the maximum of {max_seconds:g} s")
        except av.error.FFmpegError as exc:
            raise AudioError(f"{name} is corrupt: {ffmpeg_reason(exc)}") from exc
    if not total:
        raise AudioError(f"{name} holds no decodable audio")
    return blocks, rate


@dataclass(frozen=True)
class MediaInfo:
    """What :func:`probe` found; durations in seconds, counts from demuxed packets."""

    duration: float | None
    video_codec: str | None
    profile: str | None
    pix_fmt: str | None
    width: int
    height: int
    fps: float
    frame_count: int
    video_duration: float
    audio_codec: str | None
    sample_rate: int
    channels: int
    audio_duration: float
    audio_samples: int


def probe(path: str | Path) -> MediaInfo:
    """Stream parameters, and frame count and durations counted by demuxing packets."""
    name = Path(path).name
    with _open_input(path, "media file") as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        spans = {s.index: _Span() for s in (video, audio) if s is not None}
        try:
            for packet in container.demux(*[s for s in (video, audio) if s is not None]):
                if packet.pts is not None:
                    spans[packet.stream.index].add(packet.pts, packet.duration or 0)
        except av.error.FFmpegError as exc:
            raise MediaError(f"media file {name} is corrupt: {ffmpeg_reason(exc)}") from exc
        vspan = spans[video.index] if video else _Span()
        aspan = spans[audio.index] if audio else _Span()
        return MediaInfo(
            duration=container.duration / av.time_base if container.duration else None,
            video_codec=video.codec_context.name if video else None,
            profile=video.codec_context.profile if video else None,
            pix_fmt=video.codec_context.pix_fmt if video else None,
            width=video.codec_context.width if video else 0,
            height=video.codec_context.height if video else 0,
            fps=float(video.average_rate or video.guessed_rate or 0) if video else 0.0,
            frame_count=vspan.count,
            video_duration=vspan.seconds(video.time_base) if video else 0.0,
            audio_codec=audio.codec_context.name if audio else None,
            sample_rate=audio.codec_context.sample_rate if audio else 0,
            channels=audio.codec_context.channels if audio else 0,
            audio_duration=aspan.seconds(audio.time_base) if audio else 0.0,
            audio_samples=(
                round(aspan.seconds(audio.time_base) * audio.codec_context.sample_rate) if audio else 0
            ),
        )


class _Span:
    """First start and last end of a stream's packets."""

    def __init__(self) -> None:
        self.count = 0
        self.start: int | None = None
        self.end = 0

    def add(self, pts: int, duration: int) -> None:
        self.count += 1
        self.start = pts if self.start is None else min(self.start, pts)
        self.end = max(self.end, pts + duration)

    def seconds(self, time_base: Fraction | None) -> float:
        if self.start is None or time_base is None:
            return 0.0
        return float((self.end - self.start) * time_base)

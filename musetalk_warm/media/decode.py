"""Reading media with PyAV: video frames at a constant rate, audio uploads, probing.

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

from ..errors import AudioError, MediaError, VideoError


def open_input(path: str | Path, what: str) -> av.container.InputContainer:
    """``path`` opened with PyAV; a missing or unreadable file is a MediaError naming ``what``."""
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
    container = open_input(path, "video file")
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


# Demuxers an upload may be read with: each reads only the bytes it is given. Left out
# on purpose: concat scripts, playlists (hls, dash), image sequences, network and device
# inputs, anything that opens other files or URLs.
AUDIO_DEMUXERS = ("wav", "mp3", "ogg", "matroska", "mov", "flac", "aac", "aiff", "caf")
_UPLOAD_OPTIONS = {"format_whitelist": ",".join(AUDIO_DEMUXERS), "protocol_whitelist": "file"}
_FORMATS_HINT = "upload speech as wav, mp3, ogg, webm, m4a, mp4, aac, flac, aiff or caf"

MIN_SAMPLE_RATE = 8000  # telephone speech; below it there is nothing to lip-sync to
MAX_SAMPLE_RATE = 192000
MAX_CHANNELS = 8  # 7.1; more is no speech recording


def _audio_source(source: bytes | str | Path) -> tuple[str, io.BytesIO | str]:
    """(name safe to show, what av.open reads) for an upload's bytes or a local file."""
    if isinstance(source, bytes | bytearray):
        if not source:
            raise AudioError("the audio upload is empty")
        return "the upload", io.BytesIO(source)
    name = Path(source).name
    if not Path(source).is_file():
        raise AudioError(f"audio file not found: {name}")
    return name, str(source)


def _check_audio_params(name: str, rate: int, channels: int) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"{name} has a sample rate of {rate} Hz; accepted rates are "
            f"{MIN_SAMPLE_RATE}–{MAX_SAMPLE_RATE} Hz"
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(
            f"{name} has {channels} audio channels; at most {MAX_CHANNELS} are accepted",
            hint="mix it down to mono or stereo",
        )


def _append_mono(blocks: list[np.ndarray], frames: list[av.AudioFrame]) -> int:
    """Append each packed frame's channel average (a matrix product: far faster than mean)."""
    count = 0
    for frame in frames:
        channels = frame.layout.nb_channels
        packed = frame.to_ndarray().reshape(frame.samples, channels)
        blocks.append(packed @ np.full(channels, 1.0 / channels, np.float32))
        count += frame.samples
    return count


def decode_audio(source: bytes | str | Path, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of an upload to mono float32 (channels averaged).

    Returns ``(samples, rate)`` at the stream's own rate. Only the demuxers in
    :data:`AUDIO_DEMUXERS` are used. Raises :class:`AudioError` for empty,
    unreadable, non-audio or corrupt input, rates outside
    ``MIN_SAMPLE_RATE..MAX_SAMPLE_RATE``, more than ``MAX_CHANNELS`` channels, or
    audio longer than ``max_seconds`` (decoding stops there).
    """
    name, target = _audio_source(source)
    try:
        container = av.open(target, mode="r", container_options=_UPLOAD_OPTIONS)
    except av.error.FFmpegError as exc:
        raise AudioError(
            f"{name} is not an audio file in a supported format ({ffmpeg_reason(exc)})", hint=_FORMATS_HINT
        ) from exc
    with container:
        # The whitelist already refused other demuxers; this keeps the rule visible here.
        if not set(container.format.name.split(",")) & set(AUDIO_DEMUXERS):
            raise AudioError(f"{name} is not an audio file in a supported format", hint=_FORMATS_HINT)
        if not container.streams.audio:
            raise AudioError(f"{name} has no audio stream", hint=_FORMATS_HINT)
        stream = container.streams.audio[0]
        if stream.codec_context.sample_rate:
            _check_audio_params(name, stream.codec_context.sample_rate, stream.codec_context.channels)
        blocks: list[np.ndarray] = []
        total, rate = 0, 0
        to_float: av.AudioResampler | None = None
        try:
            for frame in container.decode(stream):
                if frame.sample_rate != rate:
                    if rate:
                        raise AudioError(f"{name} changes its sample rate mid-stream")
                    rate = frame.sample_rate
                _check_audio_params(name, frame.sample_rate, frame.layout.nb_channels)
                if to_float is None:
                    # Packed float: PyAV's to_ndarray() crashes on planar frames of 8 or
                    # more channels. One-second frames keep the per-frame cost low.
                    to_float = av.AudioResampler(format="flt", frame_size=rate)
                total += _append_mono(blocks, to_float.resample(frame))
                if max_seconds is not None and total > max_seconds * rate:
                    raise AudioError(f"audio is longer than the maximum of {max_seconds:g} s")
            if to_float is not None:
                total += _append_mono(blocks, to_float.resample(None))
        except av.error.FFmpegError as exc:
            raise AudioError(f"{name} is corrupt: {ffmpeg_reason(exc)}") from exc
        except ValueError as exc:  # the resampler refuses frames whose layout changed
            raise AudioError(f"{name} changes its channel layout mid-stream") from exc
    if not total:
        raise AudioError(f"{name} holds no decodable audio")
    return np.concatenate(blocks), rate


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
    with open_input(path, "media file") as container:
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


# Demuxers an avatar video upload may be read with (mp4/mov/m4v; mkv/webm), by the same rule as audio.
VIDEO_DEMUXERS = ("mov", "matroska")
_VIDEO_OPTIONS = {"format_whitelist": ",".join(VIDEO_DEMUXERS), "protocol_whitelist": "file"}
VIDEO_FORMATS_HINT = "upload the avatar as an mp4, mov, m4v, mkv or webm video, or a png, jpeg or webp photo"
# 1080p in either orientation: every source frame is held decoded while an avatar is prepared.
MAX_VIDEO_PIXELS = 1920 * 1080


def check_video_upload(path: str | Path, max_seconds: float) -> float:
    """Seconds of video in an uploaded avatar source, demuxed only (nothing decoded).

    Raises :class:`VideoError` when the file is not in one of :data:`VIDEO_DEMUXERS`,
    has no video stream or no frames, is corrupt, has frames over
    :data:`MAX_VIDEO_PIXELS` or is longer than ``max_seconds``.
    """
    name = Path(path).name
    try:
        container = av.open(str(path), mode="r", container_options=_VIDEO_OPTIONS)
    except av.error.FFmpegError as exc:
        raise VideoError(
            f"{name} is not a video in a supported container ({ffmpeg_reason(exc)})", hint=VIDEO_FORMATS_HINT
        ) from exc
    with container:
        if not container.streams.video:
            raise VideoError(f"{name} has no video stream", hint=VIDEO_FORMATS_HINT)
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > MAX_VIDEO_PIXELS:
            raise VideoError(f"{name} is {width}x{height}; the largest frame accepted is 1920x1080",
                             hint="scale the video down to 1080p or less")
        span = _Span()
        try:
            for packet in container.demux(stream):
                if packet.pts is None:
                    continue
                span.add(packet.pts, packet.duration or 0)
                if span.seconds(stream.time_base) > max_seconds:
                    raise VideoError(f"{name} is longer than the maximum of {max_seconds:g} s",
                                     hint="trim the video (avatar.max_upload_seconds)")
        except av.error.FFmpegError as exc:
            raise VideoError(f"{name} is corrupt: {ffmpeg_reason(exc)}") from exc
    if span.count == 0:
        raise VideoError(f"{name} holds no video frames", hint=VIDEO_FORMATS_HINT)
    return span.seconds(stream.time_base)

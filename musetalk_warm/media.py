"""The only PyAV wrapper: decode video, probe files, encode clips as fragmented MP4.

Every clip is encoded once (H.264 yuv420p + AAC-LC) into fragmented MP4: an init
segment (``ftyp``+``moov``) and position-independent media fragments
(``moof``+``mdat``). The same fragments make the clip file (remuxed by stream copy
to a plain ``+faststart`` MP4), a live stream, and the appended session video
(:mod:`musetalk_warm.fmp4`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .config import MediaSettings
from .errors import AudioError, DependencyMissing, MediaError
from .fmp4 import EncodedClip, Fragment, Track, iter_boxes, parse_fragment, parse_init, remux_plain

_FRAGMENTED = "frag_keyframe+empty_moov+default_base_moof"


def _open_input(path: str | Path, what: str) -> av.container.InputContainer:
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{what} not found: {path.name}")
    try:
        return av.open(str(path), mode="r")
    except av.error.FFmpegError as exc:
        raise MediaError(f"{what} {path.name} cannot be read: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
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
        raise MediaError(f"video file {name} is corrupt after {count} frames: {_reason(exc)}") from exc
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
        raise AudioError(f"{name} is not a readable audio file ({_reason(exc)})") from exc
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
            raise AudioError(f"{name} is corrupt: {_reason(exc)}") from exc
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
            raise MediaError(f"media file {name} is corrupt: {_reason(exc)}") from exc
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


AAC_FRAME = 1024
# Encoder context before each clip: covers the AAC priming frame and the MDCT
# overlap, so the first kept packet was encoded with the real preceding audio.
AAC_CONTEXT_SAMPLES = 2 * AAC_FRAME


def quantum_samples(rate: int, quantum_ms: int) -> int:
    """Samples in one clip quantum at ``rate``."""
    samples = rate * quantum_ms / 1000
    if samples != int(samples) or samples <= 0:
        raise MediaError(f"clip quantum of {quantum_ms} ms is not a whole number of samples at {rate} Hz")
    return int(samples)


def pad_to_quantum(audio: np.ndarray, rate: int, quantum_ms: int, *, length: int | None = None) -> np.ndarray:
    """``audio`` with trailing silence up to a whole number of quanta (at least one).

    With ``length`` (a whole number of quanta), the result has exactly that many
    samples: padded, or trimmed when a resampler returned a few samples more.
    """
    quantum = quantum_samples(rate, quantum_ms)
    target = max(1, math.ceil(len(audio) / quantum)) * quantum if length is None else length
    if target % quantum or target <= 0:
        raise MediaError(f"length {target} is not a whole number of {quantum}-sample quanta")
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)[:target]
    return np.pad(audio, (0, target - len(audio)))


def require_encoders(settings: MediaSettings) -> None:
    """Raise :class:`DependencyMissing` unless PyAV's FFmpeg has both encoders."""
    for name in (settings.video_codec, "aac"):
        try:
            av.Codec(name, "w")
        except (av.codec.codec.UnknownCodecError, ValueError) as exc:
            raise DependencyMissing(
                f"the FFmpeg inside PyAV has no {name} encoder",
                hint="install the PyPI wheel of PyAV (pip install --force-reinstall av), which bundles libx264 and aac",
            ) from exc


class _FragmentSink:
    """The muxer's output file: splits the byte stream into init segment and fragments."""

    def __init__(self, on_fragment: Callable[[Fragment], None] | None) -> None:
        self._buffer = bytearray()
        self._on_fragment = on_fragment
        self.init: bytes | None = None
        self.tracks: dict[int, Track] = {}
        self.fragments: list[Fragment] = []
        self.track_durations: dict[int, int] = {}

    def write(self, data: bytes) -> int:
        self._buffer += data
        self._drain()
        return len(data)

    def _drain(self) -> None:
        consumed, moof = 0, None
        for box in iter_boxes(self._buffer):
            if self.init is None:
                if box.kind == b"moov":
                    self.init = bytes(self._buffer[: box.end])
                    self.tracks = parse_init(self.init)
                    consumed = box.end
            elif box.kind == b"moof":
                moof = box
            elif box.kind == b"mdat" and moof is not None:
                self._add(bytes(self._buffer[moof.start : box.end]))
                consumed, moof = box.end, None
            else:  # the closing mfra index: not needed, fragments are indexed by the session
                consumed = box.end
        del self._buffer[:consumed]

    def _add(self, data: bytes) -> None:
        _, runs = parse_fragment(data, self.tracks)
        for run in runs:
            self.track_durations[run.track_id] = self.track_durations.get(run.track_id, 0) + run.duration
        video = next(r for r in runs if self.tracks[r.track_id].handler == "vide")
        scale = self.tracks[video.track_id].timescale
        fragment = Fragment(data, video.decode_time / scale, video.duration / scale)
        self.fragments.append(fragment)
        if self._on_fragment is not None:
            self._on_fragment(fragment)


class ClipEncoder:
    """Encode one clip, frame by frame, into fragmented MP4 (H.264 + AAC-LC mono).

    The whole clip's audio is given up front (it is known before rendering starts),
    so each fragment carries its own audio and ``on_fragment`` can stream it while
    later frames are still being rendered. Video: constant frame rate, no B-frames
    (pts == dts), an IDR every ``gop_seconds`` starting at frame 0, one fragment per
    GOP; BT.709 limited range; odd sizes are padded to even by repeating the edge.

    Gapless audio: the audio must be a whole number of video frames and of 1024-sample
    AAC frames (see :func:`pad_to_quantum`). The AAC encoder first receives 2048
    samples of context (``prev_tail``, the end of the previous clip's audio, or
    silence), then the clip; the packets covering the context, including the
    encoder's priming frame, are dropped and the rest restamped from 0. Each clip so
    contributes exactly its own samples, aligned to its first video frame, and
    appended clips never accumulate priming delay. Only the MDCT overlap at a seam
    differs from a continuous encode, by an amount bounded by the audio at the seam,
    which is silence after padding.
    """

    def __init__(
        self,
        width: int,
        height: int,
        fps: float,
        settings: MediaSettings,
        audio: np.ndarray,
        *,
        prev_tail: np.ndarray | None = None,
        on_fragment: Callable[[Fragment], None] | None = None,
    ) -> None:
        require_encoders(settings)
        self._rate = settings.audio_rate
        self._fps = Fraction(fps).limit_denominator(1001)
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        frames = len(audio) * self._fps / self._rate
        if not len(audio) or frames.denominator != 1 or len(audio) % AAC_FRAME:
            raise MediaError(
                f"clip audio of {len(audio)} samples at {self._rate} Hz is not a whole number of "
                f"video frames at {float(self._fps):g} fps and of {AAC_FRAME}-sample AAC frames",
                hint="pad it with pad_to_quantum() before rendering",
            )
        self.expected_frames = int(frames)
        self._size = (width, height)
        self._count = 0
        self._sink = _FragmentSink(on_fragment)
        self._out = av.open(self._sink, mode="w", format="mp4", options={"movflags": _FRAGMENTED})
        try:
            self._video = self._add_video(width + width % 2, height + height % 2, settings)
            self._audio = self._out.add_stream("aac", rate=self._rate, layout="mono")
            self._audio.bit_rate = settings.audio_bitrate
            self._packets = self._encode_audio(audio, prev_tail)
        except av.error.FFmpegError as exc:
            self.close()
            raise MediaError(f"could not start the encoder: {_reason(exc)}") from exc
        self._next_audio = 0

    def _add_video(self, width: int, height: int, settings: MediaSettings) -> av.video.stream.VideoStream:
        gop = max(1, round(settings.gop_seconds * self._fps))
        params = f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:open-gop=0"
        options = {
            "crf": str(settings.crf),
            "preset": settings.preset,
            "profile": "high",
            "x264-params": params,
        }
        stream = self._out.add_stream(settings.video_codec, rate=self._fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        ctx = stream.codec_context
        ctx.colorspace, ctx.color_primaries, ctx.color_trc, ctx.color_range = 1, 1, 1, 1  # BT.709, limited
        return stream

    def _encode_audio(self, audio: np.ndarray, prev_tail: np.ndarray | None) -> list[av.Packet]:
        tail = np.zeros(0, np.float32) if prev_tail is None else np.asarray(prev_tail, np.float32).reshape(-1)
        context = np.pad(
            tail[-AAC_CONTEXT_SAMPLES:], (AAC_CONTEXT_SAMPLES - min(len(tail), AAC_CONTEXT_SAMPLES), 0)
        )
        signal = np.concatenate([context, audio])
        packets: list[av.Packet] = []
        for start in range(0, len(signal), AAC_FRAME):
            frame = av.AudioFrame.from_ndarray(
                signal[None, start : start + AAC_FRAME], format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = self._rate, start
            packets += self._audio.encode(frame)
        packets += self._audio.encode(None)
        kept = [p for p in packets if p.pts is not None and AAC_CONTEXT_SAMPLES <= p.pts < len(signal)]
        for packet in kept:
            packet.pts = packet.dts = packet.pts - AAC_CONTEXT_SAMPLES
        if len(kept) != len(audio) // AAC_FRAME:
            raise MediaError(f"AAC encoder returned {len(kept)} frames for {len(audio) // AAC_FRAME}")
        return kept

    def add_frame(self, bgr: np.ndarray) -> None:
        """Encode the next BGR uint8 ``[H,W,3]`` frame (of the constructor's size)."""
        if bgr.shape != (self._size[1], self._size[0], 3) or bgr.dtype != np.uint8:
            raise MediaError(
                f"frame must be uint8 {self._size[1]}x{self._size[0]}x3, got {bgr.dtype} {bgr.shape}"
            )
        if self._count >= self.expected_frames:
            raise MediaError(f"clip audio covers {self.expected_frames} frames; got one more")
        odd = (0, self._size[1] % 2), (0, self._size[0] % 2), (0, 0)
        frame = av.VideoFrame.from_ndarray(
            np.pad(bgr, odd, mode="edge") if any(map(sum, odd)) else bgr, format="bgr24"
        )
        frame = frame.reformat(format="yuv420p", dst_colorspace="itu709")
        frame.pts = self._count
        self._count += 1
        self._mux_video(self._video.encode(frame))

    def _mux_video(self, packets: list[av.Packet]) -> None:
        try:
            for packet in packets:
                packet.duration = 1
                end = (packet.pts + 1) * packet.time_base
                # Interleave: the audio that plays until this frame ends goes first.
                while (
                    self._next_audio < len(self._packets)
                    and self._packets[self._next_audio].pts < end * self._rate
                ):
                    self._out.mux(self._packets[self._next_audio])
                    self._next_audio += 1
                self._out.mux(packet)
        except av.error.FFmpegError as exc:
            self.close()
            raise MediaError(f"encoding failed: {_reason(exc)}") from exc

    def finish(self) -> EncodedClip:
        """Flush the encoders and return the clip; the encoder cannot be used after."""
        if self._count != self.expected_frames:
            self.close()
            raise MediaError(f"clip audio covers {self.expected_frames} frames but {self._count} were added")
        self._mux_video(self._video.encode(None))
        try:
            self._out.mux(self._packets[self._next_audio :])
            self._out.close()
        except av.error.FFmpegError as exc:
            raise MediaError(f"encoding failed: {_reason(exc)}") from exc
        sink = self._sink
        if sink.init is None or not sink.fragments:
            raise MediaError("the muxer produced no fragment")
        return EncodedClip(
            init=sink.init,
            fragments=tuple(sink.fragments),
            fps=float(self._fps),
            width=self._video.width,
            height=self._video.height,
            frame_count=self._count,
            sample_count=len(self._packets) * AAC_FRAME,
            sample_rate=self._rate,
            track_durations=dict(sink.track_durations),
        )

    def close(self) -> None:
        """Release the encoder without producing a clip (after an error)."""
        try:
            self._out.close()
        except av.error.FFmpegError:
            pass  # already failing; the clip is discarded

    def __enter__(self) -> ClipEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.close()


def write_clip_mp4(clip: EncodedClip, path: str | Path) -> Path:
    """The clip as a plain ``+faststart`` MP4 by stream copy, written atomically."""
    path = Path(path)
    remux_plain(io.BytesIO(clip.init + b"".join(f.data for f in clip.fragments)), path)
    return path

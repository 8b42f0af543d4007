"""Encoding with PyAV: each clip once, as H.264 (yuv420p) + AAC-LC fragmented MP4.

An init segment (``ftyp``+``moov``) and position-independent media fragments
(``moof``+``mdat``): the same fragments make the clip file (remuxed by stream copy
to a plain ``+faststart`` MP4), a live stream, and the appended session video
(:mod:`musetalk_warm.media.session_video`). Reading and probing media is in
:mod:`musetalk_warm.media.decode`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..config import AAC_FRAME, MediaSettings
from .decode import ffmpeg_reason
from ..errors import DependencyMissing, MediaError
from .fmp4 import EncodedClip, Fragment, Track, iter_boxes, parse_fragment, parse_init, remux_plain

_FRAGMENTED = "frag_keyframe+empty_moov+default_base_moof"


# Encoder context before each clip: covers the AAC priming frame and the MDCT
# overlap, so the first kept packet was encoded with the real preceding audio.
AAC_CONTEXT_SAMPLES = 2 * AAC_FRAME


def pad_to(audio: np.ndarray, length: int) -> np.ndarray:
    """Mono float32 ``audio`` with trailing silence (or trimmed) to exactly ``length`` samples."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)[:length]
    return np.pad(audio, (0, length - len(audio)))


def pad_to_quantum(audio: np.ndarray, quantum: int) -> np.ndarray:
    """``audio`` with trailing silence up to a whole number of ``quantum`` samples (at least one)."""
    return pad_to(audio, max(1, math.ceil(len(audio) / quantum)) * quantum)


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
    AAC frames (see :func:`musetalk_warm.config.clip_quantum`). The AAC encoder first receives 2048
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
                hint="pad it to a multiple of config.clip_quantum(fps, rate) before rendering",
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
            raise MediaError(f"could not start the encoder: {ffmpeg_reason(exc)}") from exc
        self._next_audio = 0

    def _add_video(self, width: int, height: int, settings: MediaSettings) -> av.video.stream.VideoStream:
        gop = max(1, round(settings.gop_seconds * self._fps))
        # No lookahead: a fragment can leave as soon as its last frame is encoded
        # (streaming), instead of ~12 frames later.
        params = f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:open-gop=0:rc-lookahead=0:sync-lookahead=0"
        options = {
            "crf": str(settings.crf),
            "preset": settings.preset,
            "profile": "high",
            "x264-params": params,
        }
        if settings.encoder_threads:
            options["threads"] = str(settings.encoder_threads)
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

    @property
    def init_segment(self) -> bytes | None:
        """``ftyp``+``moov`` once the muxer has written them (before the first fragment)."""
        return self._sink.init

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
            raise MediaError(f"encoding failed: {ffmpeg_reason(exc)}") from exc

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
            raise MediaError(f"encoding failed: {ffmpeg_reason(exc)}") from exc
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

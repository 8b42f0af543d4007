"""fMP4 for Media Source Extensions: a live session's frames as an init segment + short fragments.

The fallback where WebRTC is unavailable: H.264 constrained baseline (x264
ultrafast, zerolatency: no B-frames, no lookahead) + AAC-LC, cut into a fragment
every few frames, so a browser's ``SourceBuffer`` plays them a fraction of a second
behind the session clock. Timestamps count the frames this stream encoded: a frame
the viewer lost (a slow reader) shortens the stream instead of leaving a hole that
would stall MSE playback.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from typing import TYPE_CHECKING

import av
import numpy as np

from ...config import AAC_FRAME
from ...errors import MediaError
from ...media.fmp4 import iter_boxes

if TYPE_CHECKING:
    from ..session import LiveFrame

_MOVFLAGS = "empty_moov+default_base_moof"


def avc_codec_string(init: bytes) -> str:
    """The RFC 6381 ``avc1.PPCCLL`` name of the H.264 stream in an init segment."""
    at = init.find(b"avcC")
    if at < 0 or at + 8 > len(init):
        raise MediaError("init segment holds no H.264 configuration")
    profile, compat, level = init[at + 5 : at + 8]
    return f"avc1.{profile:02X}{compat:02X}{level:02X}"


def fmp4_mime(init: bytes | None) -> str:
    """The ``MediaSource.isTypeSupported`` type of a stream with this init segment (None: none yet)."""
    if init is None:
        raise MediaError("no frame encoded yet")
    return f'video/mp4; codecs="{avc_codec_string(init)}, mp4a.40.2"'


class _Sink:
    """The muxer's output: complete top-level boxes, as init segment and ``moof``+``mdat`` pairs."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.init: bytes | None = None
        self.ready: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._buffer += data
        consumed, moof_at = 0, None
        for box in iter_boxes(self._buffer):
            if self.init is None and box.kind == b"moov":
                self.init = bytes(self._buffer[: box.end])
                consumed = box.end
            elif box.kind == b"moof":
                moof_at = box.start
            elif box.kind == b"mdat" and moof_at is not None:
                self.ready.append(bytes(self._buffer[moof_at : box.end]))
                consumed, moof_at = box.end, None
        del self._buffer[:consumed]
        return len(data)


class SerialEncoder(ABC):
    """A viewer's encoder, fed from worker threads while a viewer leaving closes it from another:
    close waits for a running add (nothing is freed under an encode) and later adds are refused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def _serially(self) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise MediaError("the live stream's encoder is closed")
            yield

    def close(self) -> None:
        """Release the encoder (what is buffered is dropped: the viewer has gone); waits for a running add."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._release()

    @abstractmethod
    def _release(self) -> None: ...


class LiveFmp4(SerialEncoder):
    """Encode one viewer's stream of live frames into fMP4 pieces for a ``SourceBuffer``."""

    def __init__(self, width: int, height: int, fps: int, audio_rate: int, fragment_frames: int = 3,
                 threads: int = 1) -> None:
        super().__init__()
        self.fps = fps
        self.audio_rate = audio_rate
        self._size = (width + width % 2, height + height % 2)
        self._sink = _Sink()
        fragment_us = round(1e6 * fragment_frames / fps)
        self._out = av.open(
            self._sink, mode="w", format="mp4",
            options={"movflags": _MOVFLAGS, "frag_duration": str(fragment_us)},
        )
        gop = 2 * fps
        self._video = self._out.add_stream("libx264", rate=fps, options={
            "preset": "ultrafast", "tune": "zerolatency", "profile": "baseline", "crf": "23",
            "threads": str(threads),
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0",
        })
        self._video.width, self._video.height = self._size
        self._video.pix_fmt = "yuv420p"
        self._audio = self._out.add_stream("aac", rate=audio_rate, layout="mono")
        self._audio.bit_rate = 64000
        self._fifo = av.AudioFifo()
        self._frames = 0
        self._samples = 0
        self._init_sent = False

    @property
    def mime(self) -> str:
        """The ``MediaSource.isTypeSupported`` type, once the first frame was added."""
        return fmp4_mime(self._sink.init)

    def add(self, frame: LiveFrame) -> list[bytes]:
        """Encode one tick; returns what is complete: the init segment first, then fragments."""
        return self.encode(frame.image, frame.audio)

    def encode(self, image: np.ndarray, audio: np.ndarray) -> list[bytes]:
        """:meth:`add` of a tick's BGR image and int16 samples."""
        with self._serially():
            return self._encode(image, audio)

    def _encode(self, image: np.ndarray, audio: np.ndarray) -> list[bytes]:
        pad = ((0, self._size[1] - image.shape[0]), (0, self._size[0] - image.shape[1]), (0, 0))
        if any(p[1] for p in pad):
            image = np.pad(image, pad, mode="edge")
        video = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
        video.pts, video.time_base = self._frames, Fraction(1, self.fps)
        self._frames += 1
        packets = list(self._video.encode(video))
        samples = np.asarray(audio, np.int16).reshape(1, -1).astype(np.float32) / 32768.0
        sound = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        sound.sample_rate = self.audio_rate
        self._fifo.write(sound)
        while self._fifo.samples >= AAC_FRAME:
            chunk = self._fifo.read(AAC_FRAME)
            chunk.pts, chunk.time_base = self._samples, Fraction(1, self.audio_rate)
            self._samples += AAC_FRAME
            # The encoder's priming packet (negative pts) holds no input audio.
            packets += [p for p in self._audio.encode(chunk) if p.pts is not None and p.pts >= 0]
        try:
            self._out.mux(packets)
        except av.error.FFmpegError as exc:
            raise MediaError(f"live fMP4 encoding failed: {exc}") from exc
        return self._take()

    def _take(self) -> list[bytes]:
        out = []
        if not self._init_sent and self._sink.init is not None:
            out.append(self._sink.init)
            self._init_sent = True
        if self._init_sent:
            out += self._sink.ready
            self._sink.ready = []
        return out

    def _release(self) -> None:
        try:
            self._out.close()
        except av.error.FFmpegError:
            pass  # closing after a failure; nothing is kept

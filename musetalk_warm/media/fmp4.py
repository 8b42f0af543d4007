"""Fragmented MP4: encoded clips as an init segment + fragments, and the box tools.

A clip is an init segment (``ftyp``+``moov``) plus media fragments (``moof``+``mdat``)
written with ``default_base_moof``, so a fragment's sample offsets are relative to its
own ``moof`` and its bytes can be placed anywhere (see :mod:`musetalk_warm.media.session_video`).
Also: atomic file writes and the stream-copy remux to a plain ``+faststart`` MP4.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import av

from ..errors import MediaError
from ..files import atomic_write

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"mvex", b"moof", b"traf"}
_TFHD_DURATION = 0x08
_TRUN_DATA_OFFSET, _TRUN_FIRST_FLAGS, _TRUN_DURATION = 0x001, 0x004, 0x100
_TRUN_SIZE, _TRUN_FLAGS, _TRUN_CTS = 0x200, 0x400, 0x800


@dataclass(frozen=True)
class Box:
    """One ISO-BMFF box: ``start``..``end`` in the buffer, payload from ``body``."""

    kind: bytes
    start: int
    body: int
    end: int


def iter_boxes(data: bytes | bytearray, start: int = 0, end: int | None = None) -> Iterator[Box]:
    """Boxes laid end to end in ``data[start:end]``; stops before an incomplete box."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        body = pos + 8
        if size == 1:
            if pos + 16 > end:
                return
            (size,) = struct.unpack_from(">Q", data, body)
            body += 8
        elif size == 0:  # runs to the end of the file
            size = end - pos
        if size < body - pos or pos + size > end:
            return
        yield Box(kind, pos, body, pos + size)
        pos += size


def find_boxes(data: bytes | bytearray, path: list[bytes], box: Box | None = None) -> list[Box]:
    """Every box reached by following ``path`` (e.g. ``[b"moov", b"trak"]``)."""
    start, end = (box.body, box.end) if box else (0, len(data))
    found = [b for b in iter_boxes(data, start, end) if b.kind == path[0]]
    if len(path) == 1:
        return found
    return [deep for b in found if b.kind in _CONTAINERS for deep in find_boxes(data, path[1:], b)]


@dataclass(frozen=True)
class Track:
    """A track of the init segment."""

    track_id: int
    handler: str  # "vide" or "soun"
    timescale: int
    default_duration: int


def parse_init(init: bytes) -> dict[int, Track]:
    """Tracks of an init segment by track id."""
    defaults = {}
    for trex in find_boxes(init, [b"moov", b"mvex", b"trex"]):
        track_id, _, duration = struct.unpack_from(">III", init, trex.body + 4)
        defaults[track_id] = duration
    tracks = {}
    for trak in find_boxes(init, [b"moov", b"trak"]):
        tkhd = find_boxes(init, [b"tkhd"], trak)[0]
        version = init[tkhd.body]
        (track_id,) = struct.unpack_from(">I", init, tkhd.body + (20 if version else 12))
        mdhd = find_boxes(init, [b"mdia", b"mdhd"], trak)[0]
        version = init[mdhd.body]
        (timescale,) = struct.unpack_from(">I", init, mdhd.body + (20 if version else 12))
        hdlr = find_boxes(init, [b"mdia", b"hdlr"], trak)[0]
        handler = init[hdlr.body + 8 : hdlr.body + 12].decode("ascii", "replace")
        tracks[track_id] = Track(track_id, handler, timescale, defaults.get(track_id, 0))
    if not tracks:
        raise MediaError("init segment holds no track")
    return tracks


def codec_signature(init: bytes) -> bytes:
    """What must match for fragments to follow another clip's init: each track's id,
    handler and timescale, and its sample description (codec configuration)."""
    tracks = sorted((t.track_id, t.handler, t.timescale) for t in parse_init(init).values())
    stsd_path = [b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd"]
    return repr(tracks).encode() + b"".join(init[b.start : b.end] for b in find_boxes(init, stsd_path))


@dataclass(frozen=True)
class TrackRun:
    """One track's part of a fragment: where its ``tfdt`` value sits, and its timing."""

    track_id: int
    tfdt_at: int  # offset of baseMediaDecodeTime inside the fragment
    tfdt_wide: bool
    decode_time: int
    duration: int
    samples: int


def parse_fragment(data: bytes | bytearray, tracks: dict[int, Track]) -> tuple[int, list[TrackRun]]:
    """(offset of the ``mfhd`` sequence number, per-track runs) of one ``moof``+``mdat``."""
    moof = next((b for b in iter_boxes(data) if b.kind == b"moof"), None)
    if moof is None:
        raise MediaError("fragment has no moof box")
    mfhd = find_boxes(data, [b"mfhd"], moof)[0]
    runs = []
    for traf in find_boxes(data, [b"traf"], moof):
        tfhd = find_boxes(data, [b"tfhd"], traf)[0]
        (flags,) = struct.unpack_from(">I", data, tfhd.body)
        (track_id,) = struct.unpack_from(">I", data, tfhd.body + 4)
        default = tracks[track_id].default_duration
        if flags & _TFHD_DURATION:
            # tfhd fields in order: base offset (8), description index (4), duration.
            pos = tfhd.body + 8 + (8 if flags & 0x01 else 0) + (4 if flags & 0x02 else 0)
            (default,) = struct.unpack_from(">I", data, pos)
        tfdt = find_boxes(data, [b"tfdt"], traf)[0]
        wide = data[tfdt.body] == 1
        (decode_time,) = struct.unpack_from(">Q" if wide else ">I", data, tfdt.body + 4)
        duration = samples = 0
        for trun in find_boxes(data, [b"trun"], traf):
            d, n = _trun_duration(data, trun, default)
            duration += d
            samples += n
        runs.append(TrackRun(track_id, tfdt.body + 4, wide, decode_time, duration, samples))
    return mfhd.body + 4, runs


def _trun_duration(data: bytes | bytearray, trun: Box, default: int) -> tuple[int, int]:
    flags, count = struct.unpack_from(">II", data, trun.body)
    flags &= 0xFFFFFF
    pos = trun.body + 8 + (4 if flags & _TRUN_DATA_OFFSET else 0) + (4 if flags & _TRUN_FIRST_FLAGS else 0)
    if not flags & _TRUN_DURATION:
        return default * count, count
    stride = 4 * sum(bool(flags & f) for f in (_TRUN_DURATION, _TRUN_SIZE, _TRUN_FLAGS, _TRUN_CTS))
    return sum(struct.unpack_from(">I", data, pos + i * stride)[0] for i in range(count)), count


@dataclass(frozen=True)
class Fragment:
    """One ``moof``+``mdat``; ``start``/``duration`` in seconds on the video track."""

    data: bytes
    start: float
    duration: float


@dataclass(frozen=True)
class EncodedClip:
    """An encoded clip: init segment, fragments and exact sizes.

    ``track_durations`` is each track's length in its own timescale (what the next
    appended clip's decode times are shifted by).
    """

    init: bytes
    fragments: tuple[Fragment, ...]
    fps: float
    width: int
    height: int
    frame_count: int
    sample_count: int
    sample_rate: int
    track_durations: dict[int, int]

    @property
    def duration(self) -> float:
        return self.frame_count / self.fps


def remux_plain(source: str | Path | IO[bytes], dst: Path) -> None:
    """Stream-copy an MP4 (fragmented or not) to a plain ``+faststart`` MP4, atomically."""

    def write(tmp: Path) -> None:
        try:
            with (
                av.open(source, mode="r", format="mp4") as src,
                av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as out,
            ):
                mapping = {
                    s.index: out.add_stream_from_template(s)
                    for s in src.streams
                    if s.type in ("video", "audio")
                }
                copied = 0
                for packet in src.demux(*[src.streams[i] for i in mapping]):
                    if packet.dts is None:  # the demuxer's end-of-stream marker
                        continue
                    packet.stream = mapping[packet.stream.index]
                    out.mux(packet)
                    copied += 1
        except av.error.FFmpegError as exc:
            raise MediaError(f"could not write {dst.name}: {exc.strerror or type(exc).__name__}") from exc
        if not copied:
            raise MediaError(f"could not write {dst.name}: the source holds no media packets")

    atomic_write(Path(dst), write)

"""Fragmented MP4: encoded clips as init + fragments, and the append-only session video.

A clip is an init segment (``ftyp``+``moov``) plus media fragments (``moof``+``mdat``)
written with ``default_base_moof``, so a fragment's sample offsets are relative to its
own ``moof`` and its bytes can be placed anywhere. :class:`SessionVideo` grows
``full_session.mp4`` by appending each clip's fragments with the ``mfhd`` sequence
number continued and every track's ``tfdt`` shifted by the session's elapsed time in
that track's timescale: patching two integers per fragment in place, so an append
writes only the new bytes and costs the same at minute 60 as at minute 1.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import av

from .errors import MediaError

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


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then fsync and rename over ``path``; on failure
    ``path`` is untouched and the temporary file removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


@dataclass(frozen=True)
class AppendResult:
    """Where an appended clip landed in the session video (times in seconds)."""

    clip_index: int
    start: float
    duration: float
    offset: int
    size: int
    session_duration: float
    fragment_count: int


class SessionVideo:
    """``full_session.mp4`` as an append-only fragmented MP4 plus a JSON-lines index.

    Each append writes the clip's fragments after the last committed byte, fsyncs,
    then appends one index line (the clip's fragments with offset, size, start and
    duration, and the session totals) and fsyncs it. The index is append-only so an
    append never rewrites earlier bytes; a torn last line is ignored. Opening
    recovers from a crash: the index is cut after its last complete line and the
    video after the last indexed fragment, so a crash loses only the clip in flight.
    Not thread-safe: the caller serialises appends to one session.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.index_path = self.path.with_name(self.path.stem + ".index.jsonl")
        self.state: dict[str, Any] = _EMPTY_STATE
        self._tracks: dict[int, Track] = {}
        self._signature = b""
        self._recover()

    @property
    def duration(self) -> float:
        return float(self.state["duration"])

    @property
    def frame_count(self) -> int:
        return int(self.state["frame_count"])

    @property
    def sample_count(self) -> int:
        return int(self.state["sample_count"])

    @property
    def fragment_count(self) -> int:
        return int(self.state["fragment_count"])

    @property
    def clip_count(self) -> int:
        return int(self.state["clip"])

    def fragments(self) -> list[dict[str, float]]:
        """Every committed fragment: offset, size, start, duration (reads the index)."""
        return [frag for record in _read_index(self.index_path)[0] for frag in record["fragments"]]

    def append(self, clip: EncodedClip) -> AppendResult:
        """Append ``clip`` after the committed end; on any failure nothing changes."""
        if not clip.fragments:
            raise MediaError("cannot append a clip without media fragments")
        new_session = self.state["end"] == 0
        signature = codec_signature(clip.init)
        if not new_session and signature != self._signature:
            raise MediaError(
                "clip encoding differs from the session video (resolution, fps, codec or sample rate)",
                hint="every clip of a session must use one media configuration; start a new session",
            )
        tracks = parse_init(clip.init) if new_session else self._tracks
        payload, frags = self._retime(clip, tracks, len(clip.init) if new_session else 0)
        if new_session:
            payload = clip.init + payload
        state = self._next_state(clip, frags)
        self._write(payload, state)
        self._tracks, self._signature = tracks, signature
        start = self.duration
        self.state = state
        return AppendResult(
            clip_index=state["clip"],
            start=start,
            duration=clip.duration,
            offset=frags[0]["offset"],
            size=state["end"] - frags[0]["offset"],
            session_duration=self.duration,
            fragment_count=self.fragment_count,
        )

    def export_plain(self, dst: str | Path) -> Path:
        """A plain ``+faststart`` MP4 of the whole session by stream copy; reused while
        no clip was appended since (keyed by fragment count and size)."""
        dst = Path(dst)
        if self.state["end"] == 0:
            raise MediaError("the session video is empty: nothing was said yet")
        key = {"fragments": self.fragment_count, "size": self.state["end"]}
        stamp = dst.with_name(dst.name + ".json")
        if dst.is_file() and stamp.is_file() and _load_json(stamp) == key:
            return dst
        remux_plain(self.path, dst)
        atomic_write(stamp, lambda tmp: tmp.write_text(json.dumps(key)))
        return dst

    def _retime(
        self, clip: EncodedClip, tracks: dict[int, Track], base: int
    ) -> tuple[bytes, list[dict[str, Any]]]:
        """Fragments with sequence numbers and decode times continued from the session."""
        out = bytearray()
        frags = []
        elapsed = {int(k): v for k, v in self.state["elapsed"].items()}
        for number, frag in enumerate(clip.fragments, self.fragment_count + 1):
            data = bytearray(frag.data)
            seq_at, runs = parse_fragment(data, tracks)
            struct.pack_into(">I", data, seq_at, number)
            for run in runs:
                value = run.decode_time + elapsed.get(run.track_id, 0)
                if not run.tfdt_wide and value >= 1 << 32:
                    raise MediaError("session too long for a 32-bit decode time")
                struct.pack_into(">Q" if run.tfdt_wide else ">I", data, run.tfdt_at, value)
            offset = self.state["end"] + base + len(out)
            frags.append(
                {
                    "offset": offset,
                    "size": len(data),
                    "start": round(self.duration + frag.start, 6),
                    "duration": frag.duration,
                }
            )
            out += data
        return bytes(out), frags

    def _next_state(self, clip: EncodedClip, frags: list[dict[str, Any]]) -> dict[str, Any]:
        elapsed = {str(k): self.state["elapsed"].get(str(k), 0) + v for k, v in clip.track_durations.items()}
        return {
            "clip": self.state["clip"] + 1,
            "fragments": frags,
            "end": frags[-1]["offset"] + frags[-1]["size"],
            "fragment_count": self.fragment_count + len(frags),
            "duration": round(self.duration + clip.duration, 6),
            "frame_count": self.frame_count + clip.frame_count,
            "sample_count": self.sample_count + clip.sample_count,
            "elapsed": elapsed,
        }

    def _write(self, payload: bytes, state: dict[str, Any]) -> None:
        committed = self.state["end"]
        created = not self.path.exists()
        try:
            with open(self.path, "ab") as video:
                video.truncate(committed)
                video.write(payload)
                video.flush()
                os.fsync(video.fileno())
            with open(self.index_path, "ab") as index:
                index.write(json.dumps(state, separators=(",", ":")).encode() + b"\n")
                index.flush()
                os.fsync(index.fileno())
            if created:
                _fsync_dir(self.path.parent)
        except (OSError, MediaError) as exc:
            self._rollback(committed)
            raise MediaError(
                f"could not append to {self.path.name}: {getattr(exc, 'strerror', None) or exc}"
            ) from exc

    def _rollback(self, committed: int) -> None:
        """Put the files back as the last committed append left them."""
        try:
            if self.path.exists():
                os.truncate(self.path, committed)
            _truncate_index(self.index_path)
        except OSError:
            pass  # the next open recovers from the index

    def _recover(self) -> None:
        records, _ = _truncate_index(self.index_path)
        self.state = records[-1] if records else _EMPTY_STATE
        end = self.state["end"]
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < end:
            raise MediaError(
                f"{self.path.name} is shorter than its index: it was changed outside the server",
                hint="move the session folder away to start a fresh session",
            )
        if size > end:
            os.truncate(self.path, end)
        if end:
            with open(self.path, "rb") as video:
                head = video.read(min(end, 1 << 20))
            init = _init_segment(head)
            self._tracks, self._signature = parse_init(init), codec_signature(init)


_EMPTY_STATE: dict[str, Any] = {
    "clip": 0,
    "fragments": [],
    "end": 0,
    "fragment_count": 0,
    "duration": 0.0,
    "frame_count": 0,
    "sample_count": 0,
    "elapsed": {},
}


def _init_segment(data: bytes) -> bytes:
    for box in iter_boxes(data):
        if box.kind == b"moov":
            return data[: box.end]
    raise MediaError("session video has no init segment (moov box)")


def _read_index(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Complete index records and the byte length they occupy."""
    if not path.exists():
        return [], 0
    records, good = [], 0
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break
            try:
                records.append(json.loads(line))
            except ValueError:
                break
            good += len(line)
    return records, good


def _truncate_index(path: Path) -> tuple[list[dict[str, Any]], int]:
    records, good = _read_index(path)
    if path.exists() and path.stat().st_size > good:
        os.truncate(path, good)
    return records, good


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

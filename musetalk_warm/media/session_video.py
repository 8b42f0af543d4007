"""The session video: ``full_session.mp4`` grown by O(1) appends of clip fragments.

:class:`SessionVideo` appends each clip's fragments with the ``mfhd`` sequence
number continued and every track's ``tfdt`` shifted by the session's elapsed time in
that track's timescale: two integers patched per fragment, so an append writes only
the new bytes and costs the same at minute 60 as at minute 1. An append-only JSON-lines
index, fsynced after the video bytes, records every fragment; on open, anything past
the last indexed fragment (a crash mid-append) is truncated away.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MediaError
from ..faults import crash_point
from ..files import atomic_write, atomic_write_bytes, fsync_dir
from .fmp4 import (
    EncodedClip,
    Track,
    codec_signature,
    iter_boxes,
    parse_fragment,
    parse_init,
    remux_plain,
)


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
        # The index's committed length too: a line written in full before its fsync
        # failed is not torn, so only cutting back to this size removes it.
        index_size = self.index_path.stat().st_size if self.index_path.exists() else 0
        created = not self.path.exists()
        try:
            with open(self.path, "ab") as video:
                video.truncate(committed)
                video.write(payload)
                video.flush()
                os.fsync(video.fileno())
            crash_point("video_grown")
            with open(self.index_path, "ab") as index:
                index.write(json.dumps(state, separators=(",", ":")).encode() + b"\n")
                index.flush()
                os.fsync(index.fileno())
            if created:
                fsync_dir(self.path.parent)
            crash_point("index_grown")
        except (OSError, MediaError) as exc:
            self._rollback(committed, index_size)
            raise MediaError(
                f"could not append to {self.path.name}: {getattr(exc, 'strerror', None) or exc}"
            ) from exc

    def _rollback(self, committed: int, index_size: int) -> None:
        """Put the video and index back to their sizes before the failed append.

        The index goes first: should the video's truncate then fail, its extra
        bytes are past the last indexed fragment and the next open cuts them.
        An index that cannot be truncated is rewritten whole from its committed
        bytes (a rename needs no truncate), so the video's tail goes too, now.
        """
        try:
            if self.index_path.exists() and self.index_path.stat().st_size != index_size:
                try:
                    os.truncate(self.index_path, index_size)
                except OSError:
                    with open(self.index_path, "rb") as index:
                        atomic_write_bytes(self.index_path, index.read(index_size))
            if self.path.exists():
                os.truncate(self.path, committed)
        except OSError:
            pass  # the index is committed-only or untouched: the next append or open cuts the video

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

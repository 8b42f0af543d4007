"""Conversation sessions on disk: clips, the growing session video, continuity state.

Layout of ``<sessions_dir>/<session_id>/``::

    state.json          generation, next avatar frame, clip count, duration, AAC audio tail (atomic)
    full_session.mp4    fragmented MP4, appended in place (+ its index, see fmp4.py)
    clips/clip_<generation>_0001.mp4  each clip as a plain +faststart MP4
    full_conversation.mp4  plain export for download, made on demand and cached

The generation is a random id made with the session: a reset starts a new one,
so clip names and URLs of the old session never name a clip of the new one.
Discarding a clip (a failed append, or recovery after a crash) also starts a
new generation for the clips that follow, so a clip name, and its URL, always
means the same bytes or nothing: never another clip's. The state lists which
generation named which clips, and only those files are served or kept.
A reset moves the old folder to ``_<session_id>.<UTC time>`` (archive policy),
a name session-id validation refuses, so an archive cannot be spoken to.

A clip is committed by the session video's index (fmp4.py). ``state.json`` is
written just before the append and keeps the state it replaces under
``previous``: if the append fails, or the process dies before it lands, the
video has one clip fewer than the state and the state is rolled back to
``previous`` (at once, or when the session is next opened). A failed speak
therefore leaves the video, index and state as they were. When a session is
first opened, files the state does not own (a clip renamed into place just
before a crash, temp files a kill left) are removed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import RenderSettings, Settings, safe_name
from ..errors import BadInput, MediaError, NotFound
from ..faults import crash_point
from ..files import atomic_write_bytes, fsync_dir
from ..media.fmp4 import EncodedClip, Fragment
from ..media.encode import write_clip_mp4
from ..media.session_video import SessionVideo

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from ..render.runtime import Runtime
    from ..render.visemes import Timed

STATE_FILE = "state.json"
VIDEO_FILE = "full_session.mp4"
EXPORT_FILE = "full_conversation.mp4"
CLIPS_DIR = "clips"
_STATE_VERSION = 1
_TRASH_PREFIX = ".trash-"
# safe_name() requires a leading letter or digit, so archives are never session ids.
_ARCHIVE_PREFIX = "_"
# States written before generations existed all share this one.
_LEGACY_GENERATION = "0"
_GENERATION = re.compile(r"[0-9a-f]{1,32}")


def new_generation() -> str:
    """A short random id for one life of a session (between resets)."""
    return uuid.uuid4().hex[:8]


def clip_file_name(generation: str, index: int) -> str:
    """The file name of clip ``index`` (1-based) of a session generation."""
    return f"clip_{generation}_{index:04d}.mp4"


@dataclass
class SessionState:
    """What a session needs to continue: where the avatar is and what was said so far."""

    session_id: str
    avatar_id: str | None = None
    next_frame: int = 0
    clips: int = 0
    frames: int = 0
    duration_s: float = 0.0
    audio_tail: np.ndarray | None = None
    generation: str = field(default_factory=new_generation)
    # (last clip index, generation) for clips named before the current generation, ascending.
    earlier: list[tuple[int, str]] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    previous: SessionState | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["previous"] = None if self.previous is None else self.previous.to_json()
        tail = self.audio_tail
        # float32 little-endian bytes in base64: exact, compact, no pickle.
        data["audio_tail"] = None if tail is None else base64.b64encode(
            np.asarray(tail, dtype="<f4").tobytes()
        ).decode("ascii")
        data["version"] = _STATE_VERSION
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionState:
        data = dict(data)
        data.pop("version", None)
        # Not the random default: every read of an old state must agree.
        data.setdefault("generation", _LEGACY_GENERATION)
        tail = data.pop("audio_tail", None)
        previous = data.pop("previous", None)
        data["earlier"] = [(int(last), str(gen)) for last, gen in data.get("earlier", [])]
        state = cls(**data, previous=None if previous is None else cls.from_json(previous))
        if tail is not None:
            state.audio_tail = np.frombuffer(base64.b64decode(tail), dtype="<f4").astype(np.float32)
        return state

    def clip_generation(self, index: int) -> str:
        """The generation clip ``index`` (1-based) was named with."""
        for last, generation in self.earlier:
            if index <= last:
                return generation
        return self.generation

    def clip_names(self) -> set[str]:
        """The file names of the clips this state owns."""
        return {clip_file_name(self.clip_generation(i), i) for i in range(1, self.clips + 1)}

    def renamed(self) -> SessionState:
        """This state with a new generation for the clips after it (their old names are burnt)."""
        earlier = list(self.earlier)
        if self.clips > (earlier[-1][0] if earlier else 0):
            earlier.append((self.clips, self.generation))
        return replace(self, generation=new_generation(), earlier=earlier)


@dataclass
class _SessionLock:
    """A session's lock and how many threads hold or await it (dropped at zero)."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    users: int = 0


@dataclass(frozen=True)
class SpeakResult:
    """One clip added to a session."""

    session_id: str
    clip_index: int
    clip_path: Path
    video_path: Path
    frames: int
    duration_s: float
    start_frame: int
    state: SessionState
    timings: dict[str, float]


def check_session_id(session_id: str) -> str:
    """``session_id`` if it is a safe folder name, else BadInput."""
    try:
        return safe_name(session_id, "session_id")
    except ValueError as exc:
        raise BadInput(str(exc)) from None


class SessionStore:
    """All sessions under ``settings.server.sessions_dir``; thread-safe.

    Calls on one session are serialised by a per-session lock; different
    sessions proceed in parallel. Callers that need arrival order (the server)
    queue requests before they reach the store.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = Path(settings.server.sessions_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, _SessionLock] = {}
        self._locks_guard = threading.Lock()
        self._videos: dict[str, SessionVideo] = {}
        self._empty_trash()

    # -- paths and locking -------------------------------------------------
    def path(self, session_id: str) -> Path:
        """The folder of a session (which may not exist yet)."""
        return self.root / check_session_id(session_id)

    def video_path(self, session_id: str) -> Path:
        return self.path(session_id) / VIDEO_FILE

    def clip_path(self, session_id: str, generation: str, index: int) -> Path:
        """The file of clip ``index`` (1-based) of ``generation``; NotFound when absent.

        Only clips the session's state owns are found: a clip of an earlier
        generation (before a reset or a discarded clip) is absent, and its name is
        never reused, so an old URL never serves another clip.
        """
        folder = self.path(session_id)
        if index < 1 or not _GENERATION.fullmatch(generation):
            raise NotFound(f"session {session_id!r} has no clip {index} in generation {generation!r}")
        path = folder / CLIPS_DIR / clip_file_name(generation, index)
        state = self._read_state(session_id)
        if index > state.clips or state.clip_generation(index) != generation or not path.is_file():
            raise NotFound(
                f"session {session_id!r} has no clip {index} in generation {generation!r}",
                hint="the session may have been reset since; GET /sessions/{id} shows the current one",
            )
        return path

    @contextmanager
    def lock(self, session_id: str) -> Iterator[None]:
        """Hold the session's lock (re-entrant).

        A lock exists only while someone holds or awaits it, so ids that are
        merely asked about (unknown sessions included) leave nothing behind.
        """
        check_session_id(session_id)
        with self._locks_guard:
            entry = self._locks.get(session_id)
            if entry is None:
                entry = self._locks[session_id] = _SessionLock()
            entry.users += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._locks_guard:
                entry.users -= 1
                if entry.users == 0:
                    del self._locks[session_id]

    # -- state ---------------------------------------------------------------
    def exists(self, session_id: str) -> bool:
        return (self.path(session_id) / STATE_FILE).is_file()

    def require(self, session_id: str) -> None:
        """NotFound unless the session exists; never waits for the session's lock."""
        if not self.exists(session_id):
            self._read_state(session_id)

    def state(self, session_id: str) -> SessionState:
        """The committed state of a session; NotFound when it does not exist."""
        with self.lock(session_id):
            state = self._read_state(session_id)
            self._video(session_id, state)  # rolls back a state the video never got
            return self._read_state(session_id)

    def _read_state(self, session_id: str) -> SessionState:
        path = self.path(session_id) / STATE_FILE
        try:
            return SessionState.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise NotFound(
                f"session {session_id!r} does not exist",
                hint="omit session_id for the default session, or POST /reset with it to start one",
            ) from None

    def create(self, session_id: str) -> SessionState:
        """Start an empty session (no-op when it exists)."""
        with self.lock(session_id):
            if self.exists(session_id):
                return self.state(session_id)
            folder = self.path(session_id)
            (folder / CLIPS_DIR).mkdir(parents=True, exist_ok=True)
            state = SessionState(session_id)
            self._write_state(folder, state)
            return state

    def _write_state(self, folder: Path, state: SessionState) -> None:
        atomic_write_bytes(folder / STATE_FILE, json.dumps(state.to_json(), indent=1).encode())

    def _video(self, session_id: str, state: SessionState) -> SessionVideo:
        """The open session video, recovered and reconciled with the state on first use."""
        video = self._videos.get(session_id)
        if video is None:
            video = SessionVideo(self.video_path(session_id))
            if video.clip_count == state.clips - 1 and state.previous is not None:
                # The process stopped between writing the state and appending the clip.
                state = self._rollback(session_id, state.previous)
            elif video.clip_count != state.clips:
                raise MediaError(
                    f"session {session_id!r} is inconsistent: its video holds {video.clip_count} clips, "
                    f"its state {state.clips}",
                    hint="reset the session (the old one is kept as an archive)",
                )
            self._sweep(session_id, state)
            self._videos[session_id] = video
        return video

    def _rollback(self, session_id: str, restore: SessionState) -> SessionState:
        """Put ``restore`` back as the state, under a new generation, and drop the clips it does not own."""
        folder = self.path(session_id)
        restored = restore.renamed()
        self._write_state(folder, restored)
        self._sweep(session_id, restored)
        return restored

    def _sweep(self, session_id: str, state: SessionState) -> None:
        """Remove what ``state`` does not own: stray clips (renamed in just before a crash), temp files.

        A removed clip of the current generation burns its name: the state moves
        to a new generation, so the next clip is never served under that name.
        """
        folder = self.path(session_id)
        owned = state.clip_names()
        clips = folder / CLIPS_DIR
        stray = [p for p in clips.iterdir() if p.name not in owned] if clips.is_dir() else []
        stray += [p for p in folder.glob(".*.tmp") if p.is_file()]
        if not stray:
            return
        for path in stray:
            path.unlink(missing_ok=True)
        # The export may hold a clip that is gone; it is remade on demand.
        for path in (folder / EXPORT_FILE, folder / f"{EXPORT_FILE}.json"):
            path.unlink(missing_ok=True)
        fsync_dir(clips)
        if any(p.name.startswith(f"clip_{state.generation}_") for p in stray):
            self._write_state(folder, state.renamed())

    # -- the work ------------------------------------------------------------
    def speak(
        self,
        session_id: str,
        audio16k: np.ndarray,
        avatar_id: str | None,
        runtime: Runtime,
        *,
        out_audio: np.ndarray | None = None,
        create: bool = True,
        render: RenderSettings | None = None,
        on_fragment: Callable[[bytes, Fragment], None] | None = None,
        phones: Sequence[Timed] | None = None,
    ) -> SpeakResult:
        """Render speech as the session's next clip and append it, all or nothing.

        ``avatar_id`` None means the session's avatar (or the runtime's default
        for a new session). Raises NotFound for an unknown session when
        ``create`` is False, BadInput when the avatar differs from the one the
        session started with (its frames would not stream-copy together).
        ``phones``: the phonemes spoken in ``audio16k`` when it came from text.
        """
        with self.lock(session_id):
            if create:
                self.create(session_id)
            state = self.state(session_id)
            folder = self.path(session_id)
            avatar = runtime.avatar(avatar_id or state.avatar_id).avatar_id
            if state.avatar_id not in (None, avatar):
                raise BadInput(
                    f"session {session_id!r} speaks with avatar {state.avatar_id!r}, not {avatar!r}",
                    hint="use another session_id or reset this session to change avatar",
                )
            video = self._video(session_id, state)
            rendered = runtime.render_clip(
                audio16k, avatar, state.next_frame, out_audio=out_audio, prev_tail=state.audio_tail,
                render=render, on_fragment=on_fragment, phones=phones,
            )
            timings = dict(rendered.timings)
            index = state.clips + 1
            clip_path = folder / CLIPS_DIR / clip_file_name(state.generation, index)
            t0 = time.perf_counter()
            self._write_clip(rendered.clip, clip_path)
            timings["write"] = time.perf_counter() - t0
            new_state = SessionState(
                session_id=session_id,
                avatar_id=avatar,
                next_frame=rendered.end_frame,
                clips=index,
                frames=state.frames + rendered.frames,
                duration_s=state.duration_s + rendered.duration_s,
                audio_tail=rendered.audio_tail,
                generation=state.generation,
                earlier=state.earlier,
                created=state.created,
                previous=replace(state, previous=None),  # one level of history is enough
            )
            t0 = time.perf_counter()
            try:
                self._write_state(folder, new_state)
                crash_point("state_written")
                video.append(rendered.clip)
            except BaseException:
                # Reopened on next use, so the video's crash recovery runs too.
                self._videos.pop(session_id, None)
                self._rollback(session_id, state)
                raise
            timings["append"] = time.perf_counter() - t0
            return SpeakResult(
                session_id=session_id,
                clip_index=index,
                clip_path=clip_path,
                video_path=video.path,
                frames=rendered.frames,
                duration_s=rendered.duration_s,
                start_frame=state.next_frame,
                state=new_state,
                timings={k: round(v, 4) for k, v in timings.items()},
            )

    @staticmethod
    def _write_clip(clip: EncodedClip, path: Path) -> None:
        """The clip file, written under a temp name first (a kill leaves only a temp file behind)."""
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            write_clip_mp4(clip, tmp)
            crash_point("clip_temp")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
        crash_point("clip_renamed")

    def export(self, session_id: str) -> Path:
        """A plain +faststart MP4 of the whole session (stream copy, cached until the next clip)."""
        with self.lock(session_id):
            state = self.state(session_id)
            if state.clips == 0:
                raise NotFound(f"session {session_id!r} has no clips yet", hint="POST /speak first")
            video = self._video(session_id, state)
            return video.export_plain(self.path(session_id) / EXPORT_FILE)

    def reset(self, session_id: str) -> SessionState:
        """Replace the session with an empty one; the old folder is archived or deleted per config.

        The old folder is moved away with one rename first, so it is never seen
        half-deleted; an archive keeps it as ``_<id>.<UTC timestamp>``, which is
        not a valid session id, so no request can reach (or append to) it.
        """
        with self.lock(session_id):
            folder = self.path(session_id)
            self._videos.pop(session_id, None)
            if folder.exists():
                if self.settings.server.reset_policy == "archive":
                    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
                    os.rename(folder, self._free_name(f"{_ARCHIVE_PREFIX}{session_id}.{stamp}"))
                else:
                    trash = self.root / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
                    os.rename(folder, trash)
                    shutil.rmtree(trash, ignore_errors=True)
            return self.create(session_id)

    def _free_name(self, name: str) -> Path:
        candidate, n = self.root / name, 1
        while candidate.exists():
            n += 1
            candidate = self.root / f"{name}.{n}"
        return candidate

    def _empty_trash(self) -> None:
        """Finish deletions a crash interrupted."""
        for trash in self.root.glob(f"{_TRASH_PREFIX}*"):
            shutil.rmtree(trash, ignore_errors=True)

"""The record of a live session: what was shown, encoded once, appended to ``full_session.mp4``.

A clip starts at the first speaking tick and closes at the first clip-quantum
boundary (whole video and AAC frames, see :func:`~musetalk_warm.config.clip_quantum`)
where the session is idle again, or at ``live.record_clip_s``, so its padding is
the idle frames that really followed. With ``live.record_idle`` every tick is
recorded. Clips go through the session store's usual append path, in order, off
the event loop; an interrupted utterance so keeps exactly the frames shown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

from ..avatars.cache import Avatar
from ..config import LiveSettings, MediaSettings, RenderSettings, clip_quantum
from ..media import encode as media
from ..render.runtime import RenderedClip
from ..sessions.store import SessionStore

if TYPE_CHECKING:
    from .session import LiveFrame

log = logging.getLogger(__name__)


class _ShownFrames:
    """A runtime for :meth:`SessionStore.speak` whose "render" encodes frames already shown."""

    def __init__(self, avatar: Avatar, frames: list[LiveFrame], end_position: int, media_settings: MediaSettings):
        self._avatar = avatar
        self._frames = frames
        self._end = end_position
        self._media = media_settings

    def avatar(self, avatar_id: str | None) -> Avatar:
        return self._avatar

    def render_clip(self, audio16k: np.ndarray, avatar_id: str | None, start_frame: int, *,
                    out_audio: np.ndarray | None = None, prev_tail: np.ndarray | None = None,
                    render: RenderSettings | None = None, on_fragment: Any = None,
                    phones: Any = None) -> RenderedClip:
        """The shown frames and their audio as one clip (already rendered: speech and phones unused)."""
        t0 = time.perf_counter()
        track = np.concatenate([f.audio for f in self._frames]).astype(np.float32) / 32768.0
        height, width = self._frames[0].image.shape[:2]
        with media.ClipEncoder(width, height, self._avatar.fps, self._media, audio=track, prev_tail=prev_tail) as enc:
            for frame in self._frames:
                enc.add_frame(np.ascontiguousarray(frame.image))
            clip = enc.finish()
        n = len(self._frames)
        return RenderedClip(
            clip=clip, frames=n, duration_s=n / self._avatar.fps,
            end_frame=self._end % self._avatar.cycle_length,
            audio_tail=track[-media.AAC_CONTEXT_SAMPLES:].copy(),
            timings={"encode": round(time.perf_counter() - t0, 4)},
        )


class Recorder:
    """Collects a session's shown frames into clips and appends them in order."""

    def __init__(self, store: SessionStore, session_id: str, avatar: Avatar, live: LiveSettings,
                 media_settings: MediaSettings, spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]]):
        self.store = store
        self.session_id = session_id
        self.avatar = avatar
        self.media = media_settings
        self.record_idle = live.record_idle
        self.quantum_frames = clip_quantum(avatar.fps, media_settings.audio_rate) * avatar.fps // media_settings.audio_rate
        self.clip_frames = max(1, round(live.record_clip_s * avatar.fps / self.quantum_frames)) * self.quantum_frames
        self._spawn = spawn
        self._frames: list[LiveFrame] = []
        self._last: asyncio.Task[None] | None = None
        self.clips = 0
        self.errors = 0

    def add(self, frame: LiveFrame, position: int) -> None:
        """One shown tick at cycle ``position``."""
        if not self._frames and not (frame.speaking or self.record_idle):
            return
        self._frames.append(frame)
        n = len(self._frames)
        if n % self.quantum_frames == 0 and (n >= self.clip_frames or not (frame.speaking or self.record_idle)):
            self._close(position + 1)

    def flush(self, position: int) -> None:
        """Close the open clip now, padded with idle frames (the session is stopping)."""
        if not self._frames:
            return
        from .session import LiveFrame

        silence = np.zeros_like(self._frames[0].audio)
        while len(self._frames) % self.quantum_frames:
            source = int(self.avatar.source_index(position))
            self._frames.append(LiveFrame(-1, self.avatar.frames[source], silence, False))
            position += 1
        self._close(position)

    def _close(self, end_position: int) -> None:
        frames, self._frames = self._frames, []
        previous = self._last

        async def append() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            runtime = _ShownFrames(self.avatar, frames, end_position, self.media)
            try:
                await anyio.to_thread.run_sync(
                    lambda: self.store.speak(self.session_id, np.zeros(0, np.float32), self.avatar.avatar_id,
                                             runtime, create=True)  # type: ignore[arg-type]
                )
                self.clips += 1
            except Exception:
                self.errors += 1
                log.exception("could not append %d live frames to session %s", len(frames), self.session_id)

        self._last = self._spawn(append())

    async def wait(self) -> None:
        """Until every closed clip is appended."""
        if self._last is not None:
            await asyncio.wait([self._last])

"""What one server process holds: settings, the warm runtime, TTS, sessions, metrics."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..errors import MuseTalkWarmError, NotReady
from ..metrics import Metrics
from ..sessions.store import SessionStore
from .limits import Admission
from .schemas import JobStatus

if TYPE_CHECKING:
    from ..avatars.jobs import AvatarJobs
    from ..live.registry import LiveRegistry
    from ..render.runtime import Runtime
    from ..voice.tts import TTS


@dataclass
class _SessionQueue:
    """A session's asyncio lock and how many requests hold or await it (dropped at zero)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass
class Warm:
    """The app's long-lived objects; ``runtime`` and ``tts`` arrive when loading finishes."""

    settings: Settings
    store: SessionStore
    metrics: Metrics = field(default_factory=Metrics)
    runtime: Runtime | None = None
    tts: TTS | None = None
    # Live sessions and their frame scheduler; started once the runtime is loaded.
    live: LiveRegistry | None = None
    # Avatar preparation jobs (POST /avatars); started with the runtime, whose VAE fills latents.
    avatar_jobs: AvatarJobs | None = None
    load_error: MuseTalkWarmError | None = None
    load_seconds: float | None = None
    started: float = field(default_factory=time.monotonic)
    jobs: OrderedDict[str, JobStatus] = field(default_factory=OrderedDict)
    # A done job's clip file: its name carries the session generation, so after a
    # reset /video/{id} finds nothing rather than the new session's clip.
    job_clips: dict[str, Path] = field(default_factory=dict)
    # Per session, the newest /chat job: the next one speaks after it (arrival order).
    job_tails: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    admission: Admission = field(default_factory=Admission)
    _session_locks: dict[str, _SessionQueue] = field(default_factory=dict)

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` in the background; shutdown waits for it before releasing the models."""
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    @property
    def ready(self) -> bool:
        return self.runtime is not None and self.tts is not None

    def require_ready(self) -> tuple[Runtime, TTS]:
        """The runtime and TTS, or NotReady while loading / after a failed load."""
        if self.runtime is not None and self.tts is not None:
            return self.runtime, self.tts
        if self.load_error is not None:
            raise NotReady(f"the server failed to start: {self.load_error.message}", hint=self.load_error.hint)
        raise NotReady("models are still loading", hint="retry when GET /health reports ready")

    @asynccontextmanager
    async def session_lock(self, session_id: str) -> AsyncIterator[None]:
        """Hold the per-session queue: asyncio.Lock wakes waiters first-come, first-served.

        The lock lives only while someone holds or awaits it, so requests for
        unknown session ids leave nothing behind (all on the event loop: no guard).
        """
        queue = self._session_locks.get(session_id)
        if queue is None:
            queue = self._session_locks[session_id] = _SessionQueue()
        queue.users += 1
        try:
            async with queue.lock:
                yield
        finally:
            queue.users -= 1
            if queue.users == 0:
                del self._session_locks[session_id]

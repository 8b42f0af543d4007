"""What one server process holds: settings, the warm runtime, TTS, sessions, metrics."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import Settings
from ..errors import MuseTalkWarmError, NotReady
from ..metrics import Metrics
from ..session import SessionStore
from .schemas import JobStatus

if TYPE_CHECKING:
    from ..runtime import Runtime
    from ..tts import TTS


@dataclass
class Warm:
    """The app's long-lived objects; ``runtime`` and ``tts`` arrive when loading finishes."""

    settings: Settings
    store: SessionStore
    metrics: Metrics = field(default_factory=Metrics)
    runtime: Runtime | None = None
    tts: TTS | None = None
    load_error: MuseTalkWarmError | None = None
    load_seconds: float | None = None
    started: float = field(default_factory=time.monotonic)
    jobs: OrderedDict[str, JobStatus] = field(default_factory=OrderedDict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _session_locks: dict[str, asyncio.Lock] = field(default_factory=dict)

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

    def session_lock(self, session_id: str) -> asyncio.Lock:
        """The per-session queue: asyncio.Lock wakes waiters first-come, first-served."""
        return self._session_locks.setdefault(session_id, asyncio.Lock())

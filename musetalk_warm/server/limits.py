"""Caps on queued work: clips waiting or rendering, per session and overall (429 + Retry-After)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..config import ServerSettings
from ..errors import TooManyRequests


@dataclass
class Admission:
    """Counts clips admitted and not yet finished (/speak, /speak/stream, /chat jobs)."""

    pending: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.pending.values())

    def acquire(self, session_id: str, server: ServerSettings) -> None:
        """Admit one clip of ``session_id``, or raise TooManyRequests when a limit is reached."""
        if self.pending.get(session_id, 0) >= server.max_jobs_per_session:
            raise TooManyRequests(
                f"session {session_id!r} already has {server.max_jobs_per_session} clips queued or rendering",
                hint="wait for one to finish (server.max_jobs_per_session)",
                retry_after=server.retry_after_seconds,
            )
        if self.total >= server.max_jobs:
            raise TooManyRequests(
                f"the server already has {server.max_jobs} clips queued or rendering",
                hint="retry later (server.max_jobs)",
                retry_after=server.retry_after_seconds,
            )
        self.pending[session_id] = self.pending.get(session_id, 0) + 1

    def release(self, session_id: str) -> None:
        left = self.pending[session_id] - 1
        if left:
            self.pending[session_id] = left
        else:
            del self.pending[session_id]

    @contextmanager
    def hold(self, session_id: str, server: ServerSettings) -> Iterator[None]:
        self.acquire(session_id, server)
        try:
            yield
        finally:
            self.release(session_id)

"""Building blocks of the live-session tests: a real avatar, scheduler and session on a manual clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from conftest import make_settings
from musetalk_warm.avatars.cache import Avatar
from musetalk_warm.config import Settings
from musetalk_warm.live.clock import ManualClock
from musetalk_warm.live.scheduler import FrameScheduler, MaxBatchPolicy
from musetalk_warm.live.session import LiveFrame, LiveSession, Subscription
from musetalk_warm.metrics import Metrics
from musetalk_warm.render.engine import MouthRenderer
from musetalk_warm.render.lite import LiteRenderer


def live_test_settings(root: Path, **live: Any) -> Settings:
    return make_settings(root, avatar={"demo_seconds": 1.0}, live={"subscriber_frames": 2000, **live})


def build_avatar(settings: Settings) -> Avatar:
    from musetalk_warm.avatars.prep import load_or_prepare

    return load_or_prepare(settings, progress=False)


class Rig:
    """A scheduler on its own accelerator thread and sessions on one manual clock."""

    def __init__(self, settings: Settings, renderer: MouthRenderer | None = None) -> None:
        self.settings = settings
        self.clock = ManualClock()
        self.metrics = Metrics()
        self.pool = ThreadPoolExecutor(1)
        self.scheduler = FrameScheduler(
            renderer or LiteRenderer(), self.pool.submit, settings.render, self.clock,
            policy=MaxBatchPolicy(settings.live.max_batch), metrics=self.metrics,
        )
        self.scheduler.start()
        self.sessions: list[LiveSession] = []

    def session(self, session_id: str, avatar: Avatar, **kwargs: Any) -> LiveSession:
        from musetalk_warm.voice.tts import load_tts

        session = LiveSession(
            session_id, avatar, self.scheduler, self.settings.live, audio_rate=self.settings.media.audio_rate,
            clock=self.clock, tts=load_tts(self.settings.tts), metrics=self.metrics, **kwargs,
        )
        session.start()
        self.sessions.append(session)
        return session

    async def tick(self, n: int = 1, *, drain: bool = True) -> None:
        """Advance ``n`` frames; with ``drain``, every requested frame is rendered before each tick."""
        fps = self.sessions[0].fps
        for _ in range(n):
            if drain:
                await self.scheduler.drain()
            await self.clock.advance(1.0 / fps)

    async def close(self) -> None:
        for session in self.sessions:
            await session.close()
        await self.scheduler.close()
        self.pool.shutdown()


async def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait in real time (TTS and rendering run in threads) until ``check()``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


def queued(session: LiveSession) -> bool:
    return session.describe()["queued_utterances"] > 0


def drain_frames(sub: Subscription) -> list[LiveFrame]:
    frames = []
    while True:
        try:
            frames.append(sub.get_nowait())
        except LookupError:
            return frames

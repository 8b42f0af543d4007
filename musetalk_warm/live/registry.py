"""The live sessions of one process, and the frame scheduler they share."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

from ..config import Settings
from ..errors import BadInput, Overloaded
from ..media.audio import SAMPLE_RATE
from ..metrics import Metrics
from ..sessions.store import SessionStore, check_session_id
from .clock import Clock, LoopClock
from .recorder import Recorder
from .scheduler import BatchPolicy, BucketBatchPolicy, FrameScheduler, MaxBatchPolicy
from .session import LiveSession
from .transports.encoders import EncoderPool, Fmp4Stream, open_fmp4

if TYPE_CHECKING:
    from ..render.enhance import FaceEnhancer
    from ..render.runtime import Runtime
    from ..voice.tts import TTS

log = logging.getLogger(__name__)
_SWEEP_S = 5.0


def _spawn(work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.create_task(work)


def live_enhancer(settings: Settings) -> FaceEnhancer | None:
    """GFPGAN for every live face when ``render.live_enhance`` is on (raises WeightsMissing without it)."""
    if not settings.render.live_enhance:
        return None
    from ..render.enhance import FaceEnhancer

    return FaceEnhancer.load(settings)


class LiveRegistry:
    """Starts, finds and stops live sessions; refuses new ones beyond ``live.max_sessions`` or capacity."""

    def __init__(
        self,
        settings: Settings,
        runtime: Runtime,
        tts: TTS | None,
        store: SessionStore,
        *,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]] = _spawn,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.tts = tts
        self.store = store
        self.metrics = metrics
        self.clock = clock or LoopClock()
        self._spawn = spawn
        live = settings.live
        self.scheduler = FrameScheduler(
            runtime.renderer, runtime.engine.submit, settings.render, self.clock,
            policy=MaxBatchPolicy(live.max_batch), utilisation=live.utilisation,
            retry_after_s=live.retry_after_s, metrics=metrics, enhancer=live_enhancer(settings),
        )
        # Viewers' fMP4 encoders run in these processes when configured, else in threads.
        self.encoders = EncoderPool(live.encoder_processes) if live.encoder_processes else None
        self._sessions: dict[str, LiveSession] = {}
        self._lock = asyncio.Lock()
        self._sweeper: asyncio.Task[None] | None = None

    def _batch_policy(self) -> BatchPolicy:
        """Bucket-aware batches where the model path runs fixed buckets (their cost measured), else
        everything due up to ``live.max_batch``."""
        accelerator = getattr(self.runtime.renderer, "accelerator", None)
        if accelerator is None or accelerator.buckets is None:
            return MaxBatchPolicy(self.settings.live.max_batch)
        return BucketBatchPolicy(self.settings.live.max_batch, accelerator.measure())

    async def start(self) -> None:
        """Start the scheduler and the encoder processes, and measure one batch on the default avatar
        (capacity for admission)."""
        if self.encoders is not None:
            await anyio.to_thread.run_sync(self.encoders.start)
        self.scheduler.start()
        self.scheduler.policy = await asyncio.wrap_future(self.runtime.engine.submit(self._batch_policy))
        await self.scheduler.calibrate(self.runtime.avatar(None), self.settings.live.max_batch)
        # Load the voice activity model now, not on the first reply.
        await self.scheduler.pauses(np.zeros(SAMPLE_RATE // 10, np.float32), self.runtime.avatar(None).fps, 1)
        if self.settings.live.idle_timeout_s > 0:
            self._sweeper = asyncio.create_task(self._sweep())

    def get(self, session_id: str) -> LiveSession | None:
        return self._sessions.get(session_id)

    def __len__(self) -> int:
        return len(self._sessions)

    def open_fmp4(self, session: LiveSession) -> Fmp4Stream:
        """A viewer's fMP4 encoder for ``session``: in the encoder processes when there are any."""
        return open_fmp4(self.settings.live, session.width, session.height, session.fps, session.audio_rate,
                         self.encoders)

    async def attach(self, session_id: str, avatar_id: str | None = None) -> LiveSession:
        """The session's live stream, started (idling) if it is not running; Overloaded when full."""
        session_id = check_session_id(session_id)
        async with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                if avatar_id is not None and avatar_id != session.avatar_id:
                    raise BadInput(
                        f"live session {session_id!r} runs avatar {session.avatar_id!r}, not {avatar_id!r}",
                        hint="stop it (DELETE /sessions/{id}/live) or reset the session to change avatar",
                    )
                return session
            live = self.settings.live
            if len(self._sessions) >= live.max_sessions or self.scheduler.overloaded():
                raise Overloaded(
                    f"{len(self._sessions)} live sessions are running (limit {live.max_sessions})",
                    hint="retry later or stop an idle live session", retry_after=live.retry_after_s,
                )
            state = await anyio.to_thread.run_sync(self.store.create, session_id)
            avatar = self.runtime.avatar(avatar_id or state.avatar_id)
            if state.avatar_id not in (None, avatar.avatar_id):
                raise BadInput(
                    f"session {session_id!r} speaks with avatar {state.avatar_id!r}, not {avatar.avatar_id!r}",
                    hint="use another session_id or reset this session to change avatar",
                )
            # The avatar stays leased while the session runs: it is neither dropped nor deletable.
            self.runtime.library.hold(avatar.avatar_id)
            try:
                recorder = None
                if live.record:
                    recorder = Recorder(self.store, session_id, avatar, live, self.settings.media, self._spawn)
                session = LiveSession(
                    session_id, avatar, self.scheduler, live,
                    audio_rate=self.settings.media.audio_rate, clock=self.clock, tts=self.tts,
                    start_position=state.next_frame, recorder=recorder, metrics=self.metrics,
                    max_text_chars=self.settings.server.max_text_chars,
                )
                session.start()
            except BaseException:
                self.runtime.library.release(avatar.avatar_id)
                raise
            self._sessions[session_id] = session
            self._gauge()
            log.info("live session %s started (avatar %s)", session_id, avatar.avatar_id)
            return session

    async def stop(self, session_id: str) -> bool:
        """Stop a live session (its record is completed); False when it was not running."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        self._gauge()
        try:
            await session.close()
        finally:
            self.runtime.library.release(session.avatar_id)
        log.info("live session %s stopped", session_id)
        return True

    async def close(self) -> None:
        """Stop every session, then the scheduler and the encoder processes."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for session_id in list(self._sessions):
            await self.stop(session_id)
        await self.scheduler.close()
        if self.encoders is not None:
            await anyio.to_thread.run_sync(self.encoders.close)

    async def _sweep(self) -> None:
        """Stop sessions nobody has watched for ``live.idle_timeout_s`` while idle."""
        timeout = self.settings.live.idle_timeout_s
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = time.monotonic()
            for session_id, session in list(self._sessions.items()):
                if not session.viewers and not session.busy and now - session.last_viewed > timeout:
                    await self.stop(session_id)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.live_sessions.set(len(self._sessions))

"""A live session: one avatar stream paced by its own clock, whatever happens upstream.

Every tick (``1/fps`` s, deadlines computed from the start time, so the clock
never slips) emits exactly one :class:`LiveFrame`: the avatar's own frame at the
cycle position with silence while idle (no accelerator work), or the speech frame
planned for that tick with its audio. Speech frames are requested from the
:class:`~musetalk_warm.live.scheduler.FrameScheduler` ahead of their ticks; one
that is not back in time is a counted deadline miss and the idle frame is shown
instead. Idle and speech share the cycle position, and the mouth region blends
in and out over ``live.blend_frames`` ticks, so the picture never jumps.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import anyio
import numpy as np

from ..avatars.cache import Avatar
from ..config import LiveSettings
from ..errors import MuseTalkWarmError
from ..media.audio import speech_tracks
from ..metrics import Metrics
from ..render.mixed import FrameJob, face_region, mix_frames
from ..voice.sentences import SentenceSplitter
from ..voice.tts import TTS, Speech, check_text
from .clock import Clock
from .pcm import PcmInput
from .scheduler import FrameRequest, FrameScheduler
from .utterance import Utterance

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class LiveFrame:
    """One tick of a live session."""

    index: int  # tick number since the session started (pts = index / fps)
    image: np.ndarray  # H x W x 3 BGR uint8, full avatar frame
    audio: np.ndarray  # int16 mono, exactly audio_rate // fps samples
    speaking: bool


class SessionClosed(Exception):
    """The live session has stopped; its subscriptions get nothing more."""


class Feed(Generic[T]):
    """A bounded in-order queue from a session to one reader; a slow reader loses the oldest items."""

    def __init__(self, owner: set[Feed[T]], size: int) -> None:
        self._owner = owner
        self._queue: deque[T] = deque(maxlen=size)
        self._ready = asyncio.Event()
        self.dropped = 0
        self.closed = False
        owner.add(self)

    def put(self, item: T) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(item)
        self._ready.set()

    async def get(self) -> T:
        """The next item; raises SessionClosed once the session (or this feed) has closed."""
        while not self._queue:
            if self.closed:
                raise SessionClosed("the live session has stopped")
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    def get_nowait(self) -> T:
        """The next item without waiting; IndexError when none is queued."""
        return self._queue.popleft()

    def close(self) -> None:
        """Stop receiving (the session keeps running)."""
        self.closed = True
        self._owner.discard(self)
        self._ready.set()


Subscription = Feed[LiveFrame]
EventFeed = Feed[dict[str, Any]]


@dataclass
class _Plan:
    utterance: Utterance
    frame: int
    alpha: float
    request: FrameRequest
    audio: Literal["speech", "fade", "mute"] = "speech"


@dataclass(frozen=True)
class Reply:
    """A reply accepted for speaking (its sentences are spoken as they are synthesised)."""

    reply_id: str


@dataclass
class LiveStats:
    """What a session has emitted so far."""

    ticks: int = 0
    speech_frames: int = 0
    misses: int = 0
    lateness: list[float] = field(default_factory=list)


class LiveSession:
    """One conversation's continuous A/V stream (see the module docstring)."""

    def __init__(
        self,
        session_id: str,
        avatar: Avatar,
        scheduler: FrameScheduler,
        settings: LiveSettings,
        *,
        audio_rate: int,
        clock: Clock,
        tts: TTS | None = None,
        start_position: int = 0,
        recorder: Any = None,
        metrics: Metrics | None = None,
        max_text_chars: int | None = None,
        keep_lateness: bool = False,
    ) -> None:
        self.id = session_id
        self.avatar = avatar
        self.avatar_id = avatar.avatar_id
        self.fps = avatar.fps
        self.audio_rate = audio_rate
        self.height, self.width = (int(v) for v in avatar.frames.shape[1:3])
        self.samples_per_frame = audio_rate // self.fps
        self.scheduler = scheduler
        self.settings = settings
        self.clock = clock
        self.tts = tts
        self.recorder = recorder
        self.metrics = metrics
        self.max_text_chars = max_text_chars
        self.start_position = start_position
        self.stats = LiveStats()
        self._keep_lateness = keep_lateness
        self._step = 1.0 / settings.blend_frames
        self._silence = np.zeros(self.samples_per_frame, np.int16)
        self._subs: set[Feed[LiveFrame]] = set()
        self._event_feeds: set[Feed[dict[str, Any]]] = set()
        self._queue: deque[Utterance] = deque()
        self._current: Utterance | None = None
        self._cursor = 0
        self._planned: dict[int, _Plan] = {}
        self._next_plan_tick = 0
        self._plan_alpha = 0.0
        self._tick = 0
        self._t0 = 0.0
        self._speaking = False
        self._epoch = 0
        self._replies: set[asyncio.Task[Any]] = set()
        self._streams: dict[int, tuple[Utterance, asyncio.Event, asyncio.Task[None]]] = {}
        self._pcm_inputs: set[PcmInput] = set()
        self._task: asyncio.Task[None] | None = None
        self.last_viewed = time.monotonic()

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        """Start the clock: tick 0 is now."""
        self._t0 = self.clock.now()
        self._task = asyncio.create_task(self._run(), name=f"live-{self.id}")

    async def close(self) -> None:
        """Stop the clock, drop pending speech, finish the record and end every feed."""
        self.interrupt(notify=False)
        for task in [*self._replies, *(s[2] for s in self._streams.values())]:
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, *self._replies, return_exceptions=True)
        self.scheduler.release(self.id)
        if self.recorder is not None:
            self.recorder.flush(self.start_position + self._tick)
            await self.recorder.wait()
        for feed in [*self._subs, *self._event_feeds]:
            feed.close()

    @property
    def state(self) -> str:
        return "speaking" if self._speaking else "idle"

    @property
    def tick(self) -> int:
        """The next tick to emit."""
        return self._tick

    @property
    def busy(self) -> bool:
        """Speech is planned, queued or being prepared."""
        return bool(self._planned or self._queue or self._current or self._replies or self._streams)

    @property
    def viewers(self) -> int:
        return len(self._subs)

    def subscribe(self) -> Subscription:
        """A viewer attaches: it gets every frame from the next tick on."""
        return Feed(self._subs, self.settings.subscriber_frames)

    def events(self) -> EventFeed:
        """JSON-ready events: state changes, utterances started/ended, errors."""
        feed: EventFeed = Feed(self._event_feeds, 256)
        feed.put({"type": "state", "state": self.state, "tick": self._tick})
        return feed

    def _event(self, kind: str, **data: Any) -> None:
        event = {"type": kind, "tick": self._tick, **data}
        for feed in list(self._event_feeds):
            feed.put(event)

    # -- the clock -----------------------------------------------------------
    async def _run(self) -> None:
        while True:
            deadline = self._t0 + self._tick / self.fps
            await self.clock.sleep_until(deadline)
            lateness = max(0.0, self.clock.now() - deadline)
            self._plan()
            frame = self._emit(self._tick)
            for sub in list(self._subs):
                sub.put(frame)
            if self._subs:
                self.last_viewed = time.monotonic()
            if self.recorder is not None:
                self.recorder.add(frame, self.start_position + self._tick)
            self.stats.ticks += 1
            if self._keep_lateness:
                self.stats.lateness.append(lateness)
            if self.metrics is not None:
                self.metrics.live_lateness.observe(lateness)
                self.metrics.live_frames.labels("speech" if frame.speaking else "idle").inc()
            self._tick += 1

    def _emit(self, tick: int) -> LiveFrame:
        plan = self._planned.pop(tick, None)
        source = int(self.avatar.source_index(self.start_position + tick))
        idle = self.avatar.frames[source]
        if plan is None:
            self._set_speaking(False)
            if not self.busy:
                self.scheduler.release(self.id)
            return LiveFrame(tick, idle, self._silence, False)
        self._set_speaking(True)
        utt = plan.utterance
        if plan.frame == 0 and not utt.started:
            utt.started = True
            self._event("utterance", event="started", utterance_id=utt.id, text=utt.text)
        future = plan.request.future
        if future.done() and not future.cancelled() and future.exception() is None:
            image = mix_frames(idle, future.result(), plan.alpha, face_region(self.avatar, source))
            self.stats.speech_frames += 1
        else:
            self.stats.misses += 1
            if self.metrics is not None:
                self.metrics.live_misses.inc()
            if future.done() and not future.cancelled() and future.exception() is not None:
                self._event("error", error="render_failed", message="a speech frame failed to render")
            self.scheduler.cancel([plan.request])
            image = idle
        audio = self._silence if plan.audio == "mute" else utt.frame_audio(plan.frame)
        if plan.audio == "fade":
            audio = (audio * np.linspace(1.0, 0.0, audio.size, dtype=np.float32)).astype(np.int16)
        if not utt.finished and utt.ended and plan.frame == (utt.total_frames or 0) - 1:
            self._finish(utt, interrupted=False)
        return LiveFrame(tick, image, audio, True)

    def _set_speaking(self, speaking: bool) -> None:
        if speaking != self._speaking:
            self._speaking = speaking
            self._event("state", state=self.state)

    def _finish(self, utt: Utterance, *, interrupted: bool) -> None:
        utt.finished = True
        if utt.started:
            self._event("utterance", event="ended", utterance_id=utt.id, text=utt.text, interrupted=interrupted)

    # -- planning ------------------------------------------------------------
    def _first_tick(self, frames: int) -> int:
        """A new segment's first tick: the earliest not yet due (``live.start_lead_frames`` on) that
        leaves room for the queue and its first batch of ``frames``."""
        # Twice the measured cost, and a frame period at least: batches slow down when the CPU is shared.
        need = max(2.0 * self.scheduler.cost.batch_s(self.scheduler.pending + frames), 1.0 / self.fps)
        now = self.clock.now()
        tick = self._tick + self.settings.start_lead_frames - 1
        while self._t0 + tick / self.fps - now <= need:
            tick += 1
        return tick

    def _next_ready(self) -> bool:
        return bool(self._queue) and self._queue[0].ready_frames > 0

    def _plan(self) -> None:
        """Request speech frames for the ticks ahead, up to ``live.lead_frames`` ahead of the clock."""
        lead = self.settings.lead_frames
        ahead = self._next_plan_tick - self._tick
        if ahead > lead // 2:
            return  # enough is requested; top up in chunks so batches stay full
        requests: list[FrameRequest] = []
        while True:
            if self._current is None:
                if not self._queue:
                    break
                self._current, self._cursor = self._queue.popleft(), 0
            utt = self._current
            if utt.planned_all and self._cursor >= utt.ready_frames:
                self._current = None
                continue
            available = utt.ready_frames - self._cursor
            if available <= 0:
                break
            tick, limit = self._next_plan_tick, self._tick + lead
            if tick <= self._tick:  # nothing left in flight: a new segment, blending in
                # Only the first few frames must be back by the first tick: the scheduler's
                # deadline-bounded batches take the rest after them.
                tick = self._first_tick(min(available, self.settings.start_lead_frames + 1) + len(requests))
                if not utt.ended:  # streamed audio is conditioned in hops: keep one hop in hand
                    tick += self.settings.pcm_hop_frames
                limit = tick + lead
                self._plan_alpha = 0.0
            count = min(available, limit - tick)
            if count <= 0:
                break
            loop = asyncio.get_running_loop()
            for k in range(count):
                j = self._cursor + k
                fading = utt.is_tail(j) and not self._next_ready()
                target = 0.0 if fading else 1.0
                self._plan_alpha += max(-self._step, min(self._step, target - self._plan_alpha))
                source = int(self.avatar.source_index(self.start_position + tick + k))
                request = FrameRequest(
                    self.id, tick + k, FrameJob(self.avatar, source, utt.cond[j], utt.hold_at(j)),
                    self._t0 + (tick + k) / self.fps, loop.create_future(),
                )
                self._planned[tick + k] = _Plan(utt, j, self._plan_alpha, request)
                requests.append(request)
            self._cursor += count
            self._next_plan_tick = tick + count
        if requests:
            self.scheduler.submit(requests)

    def _enqueue(self, utt: Utterance) -> None:
        self._queue.append(utt)
        self._plan()

    # -- speech in -----------------------------------------------------------
    async def say(self, text: str, *, interrupt: bool = False) -> Reply:
        """Speak ``text`` sentence by sentence; returns once accepted (raises Overloaded, TextError)."""
        text = check_text(text, self.max_text_chars)

        async def once() -> AsyncIterator[str]:
            yield text

        return self.say_stream(once(), interrupt=interrupt)

    def say_stream(self, chunks: AsyncIterator[str], *, interrupt: bool = False) -> Reply:
        """Speak text that arrives in pieces (an LLM's streamed reply): each sentence as soon as it is complete."""
        if self.tts is None:
            raise MuseTalkWarmError("this live session has no speech engine")
        self.scheduler.book(self.id, self.fps)
        if interrupt:
            self.interrupt()
        reply = Reply(uuid.uuid4().hex[:12])
        self._spawn(self._speak(chunks, reply, self._epoch))
        return reply

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` as part of a reply: the session is busy until it ends, and closing cancels it."""
        task = asyncio.create_task(work)
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    async def _speak(self, chunks: AsyncIterator[str], reply: Reply, epoch: int) -> None:
        sentences: asyncio.Queue[str | None] = asyncio.Queue()

        async def split() -> None:
            splitter = SentenceSplitter()
            try:
                async for chunk in chunks:
                    for sentence in splitter.feed(chunk):
                        sentences.put_nowait(sentence)
                for sentence in splitter.flush():
                    sentences.put_nowait(sentence)
            finally:
                sentences.put_nowait(None)

        reader = asyncio.create_task(split())
        try:
            while (sentence := await sentences.get()) is not None and epoch == self._epoch:
                utt = await self._synthesise(sentence)
                if epoch != self._epoch:
                    break
                self._enqueue(utt)
            await reader
        except asyncio.CancelledError:
            raise
        except MuseTalkWarmError as exc:
            self._event("error", error=exc.code, message=exc.message, reply_id=reply.reply_id)
        except Exception:
            log.exception("reply %s of live session %s failed", reply.reply_id, self.id)
            self._event("error", error="internal_error", message="the reply failed; see the server log")
        finally:
            reader.cancel()

    async def _synthesise(self, sentence: str) -> Utterance:
        assert self.tts is not None
        speech = await anyio.to_thread.run_sync(self.tts.synthesize_timed, sentence)
        return await self._prepare(speech, sentence)

    async def _prepare(self, speech: Speech, text: str | None) -> Utterance:
        """One utterance of ``speech``, conditioned whole (with its phonemes, when from text)."""
        speech16k, track = await anyio.to_thread.run_sync(speech_tracks, speech.samples, speech.rate,
                                                          self.audio_rate)
        utt = self._utterance(text)
        utt.add_audio(speech16k, track, speech.phones)
        utt.end()
        # Pauses are read while the reply starts (a frame not read yet keeps the rendered mouth):
        # a reply's first frame waits for its audio features only.
        self._spawn(self._read_pauses(utt))
        await utt.update_conditioning(self.scheduler.condition)
        return utt

    async def _read_pauses(self, utt: Utterance) -> None:
        """The first frames' pauses (a short read, usually back before they are planned), then, once the
        utterance is on screen, the rest (so the long read does not slow its first batch)."""
        await utt.update_pauses(self.scheduler.pauses, self.settings.lead_frames)
        while not (utt.started or utt.finished):
            await asyncio.sleep(1.0 / self.fps)
        await utt.update_pauses(self.scheduler.pauses)

    def speak_audio(self, samples: np.ndarray, rate: int, *, text: str | None = None,
                    interrupt: bool = False) -> Reply:
        """Speak recorded speech (mono float32 at ``rate``) as one utterance; raises Overloaded."""
        self.scheduler.book(self.id, self.fps)
        if interrupt:
            self.interrupt()
        reply, epoch = Reply(uuid.uuid4().hex[:12]), self._epoch

        async def run() -> None:
            utt = await self._prepare(Speech(samples, rate), text)
            if epoch == self._epoch:
                self._enqueue(utt)

        self._spawn(run())
        return reply

    def _utterance(self, text: str | None) -> Utterance:
        return Utterance(self.fps, self.audio_rate, text=text, tail_frames=self.settings.blend_frames - 1)

    def open_pcm_input(self, rate: int = 16000) -> PcmInput:
        """Streamed speech in (int16 mono at ``rate``); each ``feed``…``end`` run is one utterance."""
        pcm = PcmInput(self, rate, self.audio_rate)
        self._pcm_inputs.add(pcm)
        return pcm

    def pcm_start(self) -> object:
        self.scheduler.book(self.id, self.fps)
        utt = self._utterance(None)
        wake = asyncio.Event()
        key = id(utt)
        task = asyncio.create_task(self._condition_stream(utt, wake, self._epoch))
        self._streams[key] = (utt, wake, task)
        self._enqueue(utt)
        return key

    def pcm_audio(self, key: object, speech16k: np.ndarray, track: np.ndarray) -> None:
        entry = self._streams.get(key)  # type: ignore[arg-type]
        if entry is None:
            return  # interrupted
        utt, wake, _ = entry
        utt.add_audio(speech16k, track)
        if utt.audio_frames - utt.ready_frames >= self.settings.pcm_hop_frames + 2:
            wake.set()

    def pcm_end(self, key: object) -> None:
        entry = self._streams.get(key)  # type: ignore[arg-type]
        if entry is not None:
            entry[0].end()
            entry[1].set()

    async def _condition_stream(self, utt: Utterance, wake: asyncio.Event, epoch: int) -> None:
        try:
            while epoch == self._epoch:
                await wake.wait()
                wake.clear()
                if epoch != self._epoch:
                    break
                if any(await asyncio.gather(utt.update_conditioning(self.scheduler.condition),
                                            utt.update_pauses(self.scheduler.pauses))):
                    self._plan()
                if utt.planned_all:
                    break
        except MuseTalkWarmError as exc:
            self._event("error", error=exc.code, message=exc.message)
        finally:
            self._streams.pop(id(utt), None)

    # -- barge-in ------------------------------------------------------------
    def interrupt(self, *, notify: bool = True) -> None:
        """Drop queued speech and frames not yet started, and blend back to idle.

        Frames already requested for the next ``blend_frames - 1`` ticks stay, fading
        out (audio fades over the first of them, then silence); the rest are cancelled.
        """
        self._epoch += 1
        for pcm in self._pcm_inputs:
            pcm.end()
        for utt, wake, _ in self._streams.values():
            wake.set()
        self._streams.clear()
        dropped = list(self._queue)
        self._queue.clear()
        alpha = self._plan_alpha if not self._planned else self._planned[min(self._planned)].alpha
        kept: dict[int, _Plan] = {}
        cancel: list[FrameRequest] = []
        interrupted: list[Utterance] = []
        for tick in sorted(self._planned):
            plan = self._planned[tick]
            if plan.utterance not in interrupted:
                interrupted.append(plan.utterance)
            alpha -= self._step
            if alpha > 1e-6 and tick < self._tick + self.settings.blend_frames:
                plan.alpha = alpha
                plan.audio = "fade" if not kept else "mute"
                kept[tick] = plan
            else:
                cancel.append(plan.request)
        self.scheduler.cancel(cancel)
        self._planned = kept
        self._next_plan_tick = max(kept) + 1 if kept else self._tick
        self._plan_alpha = 0.0
        if self._current is not None and self._current not in interrupted:
            interrupted.append(self._current)
        self._current, self._cursor = None, 0
        for utt in interrupted + dropped:
            if not utt.finished:
                if notify:
                    self._finish(utt, interrupted=True)
                else:
                    utt.finished = True
        if notify:
            self._event("interrupted")

    def describe(self) -> dict[str, Any]:
        """The session's live state, for the API."""
        return {
            "session_id": self.id,
            "avatar_id": self.avatar_id,
            "state": self.state,
            "fps": self.fps,
            "audio_rate": self.audio_rate,
            "width": self.width,
            "height": self.height,
            "tick": self._tick,
            "viewers": self.viewers,
            "queued_utterances": len(self._queue) + (self._current is not None),
            "deadline_misses": self.stats.misses,
        }

"""The frame scheduler: one per device, shared by every live session on it.

Sessions post speech-frame requests ahead of their ticks; the scheduler runs them
on the accelerator thread in batches mixed across sessions and avatars, earliest
deadline first, and resolves each request's future with its composited frame.
It measures what a frame costs and refuses speech that the device cannot keep up
with (:class:`~musetalk_warm.errors.Overloaded`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..avatars.cache import Avatar
from ..config import RenderSettings
from ..errors import MuseTalkWarmError, Overloaded
from ..media.audio import SAMPLE_RATE
from ..metrics import Metrics
from ..render.buckets import BucketPolicy, bucket_for
from ..render.engine import MouthRenderer
from ..render.blend import composite_face
from ..render import silence
from ..render.mixed import DeviceFrames, FrameJob, generate_faces, hold_silent_faces, render_on_device
from ..render.visemes import Timed
from .clock import Clock

if TYPE_CHECKING:
    from ..render.enhance import FaceEnhancer

log = logging.getLogger(__name__)

RunOn = Callable[..., "Future[Any]"]

_IN_FLIGHT = 2  # batches whose frames are still landing on the host while the next one renders


@dataclass(eq=False)
class FrameRequest:
    """One speech frame a session needs by ``deadline`` (its tick's time on the session clock)."""

    session_id: str
    tick: int
    job: FrameJob
    deadline: float
    future: asyncio.Future[np.ndarray] = field(repr=False)
    started: bool = False


# A batch planned close to its deadline keeps this much of the measured cost in hand: batches
# slow down when the CPU is shared.
DEADLINE_MARGIN = 1.5


class BatchPolicy(Protocol):
    """How many of the pending frames the next batch takes (the one place batch sizes are chosen).

    ``cost`` is what batches measured so far and ``slack_s`` the time left until the
    earliest pending deadline.
    """

    def batch_size(self, pending: int, cost: CostModel, slack_s: float) -> int: ...


@dataclass(frozen=True)
class MaxBatchPolicy:
    """Everything pending up to ``limit`` frames, but no more than finish before the earliest deadline."""

    limit: int

    def batch_size(self, pending: int, cost: CostModel, slack_s: float) -> int:
        size = max(1, min(pending, self.limit))
        if cost.per_frame_s:
            while size > 1 and DEADLINE_MARGIN * cost.batch_s(size) > slack_s:
                size -= 1
        return size


@dataclass(frozen=True)
class BucketBatchPolicy:
    """Up to ``limit`` frames, as many as are back in time and run fastest on the model path's buckets.

    A batch is padded up to its bucket, so 10 frames cost as much as 16: the batch is
    no larger than the biggest bucket that is back before the earliest deadline (from
    the buckets' measured costs, :meth:`BucketPolicy.choose`), and of the bucket at or
    below that size and the one covering it, it takes whichever renders more frames per
    second (the rest join the next batch).
    """

    limit: int
    buckets: BucketPolicy

    def batch_size(self, pending: int, cost: CostModel, slack_s: float) -> int:
        costs = self.buckets.costs_s
        # The buckets' costs are the model path alone; a live frame also costs its paste and copy.
        best = min(c / b for b, c in costs.items())
        scale = max(1.0, cost.per_frame_s / best) if cost.per_frame_s else 1.0
        size = max(1, min(pending, self.limit))
        # Already late, this is the bucket with the best frames/s: a backlog drains at full speed.
        size = min(size, self.buckets.choose(size, slack_s / (scale * DEADLINE_MARGIN)))
        cover = bucket_for(size, self.buckets.buckets)
        below = [b for b in costs if b <= size]
        if not below or cover == size:
            return size
        floor = below[-1]
        return floor if floor / costs[floor] > size / costs[cover] else size


class CostModel:
    """Exponentially weighted seconds per batch, for each batch size seen.

    A batch of a few frames costs more per frame than a full one (the device pads it
    to its bucket), so latency planning asks for the cost of the batch it will get,
    while capacity (``per_frame_s``) is the cost of a frame at the most efficient size.
    """

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.per_frame_s: float | None = None
        self._batch_s: dict[int, float] = {}

    def observe(self, frames: int, seconds: float) -> None:
        frames = max(frames, 1)
        old = self._batch_s.get(frames)
        self._batch_s[frames] = seconds if old is None else old + self.weight * (seconds - old)
        self.per_frame_s = min(s / n for n, s in self._batch_s.items())

    def batch_s(self, frames: int) -> float:
        """Expected seconds of a batch of ``frames``: interpolated between the sizes seen around it
        (scaled from the nearest one outside them)."""
        if not self._batch_s:
            return (self.per_frame_s or 0.0) * frames
        if frames in self._batch_s:
            return self._batch_s[frames]
        below = [n for n in self._batch_s if n < frames]
        above = [n for n in self._batch_s if n > frames]
        if below and above:
            a, b = max(below), min(above)
            return self._batch_s[a] + (self._batch_s[b] - self._batch_s[a]) * (frames - a) / (b - a)
        nearest = max(below) if below else min(above)
        return self._batch_s[nearest] * frames / nearest


class FrameScheduler:
    """Earliest-deadline-first batching of live speech frames on one accelerator."""

    def __init__(
        self,
        renderer: MouthRenderer,
        run_on: RunOn,
        render: RenderSettings,
        clock: Clock,
        *,
        policy: BatchPolicy,
        utilisation: float = 0.85,
        retry_after_s: int = 2,
        metrics: Metrics | None = None,
        enhancer: FaceEnhancer | None = None,
    ) -> None:
        self.renderer = renderer
        self.enhancer = enhancer
        self.render = render
        self.clock = clock
        self.policy = policy
        self.cost = CostModel()
        self.utilisation = utilisation
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.batches = 0
        self.batched_frames = 0
        self._run_on = run_on
        self._heap: list[tuple[float, int, FrameRequest]] = []
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._booked: dict[str, float] = {}
        self._landed = 0.0
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="frame-scheduler")

    async def close(self) -> None:
        """Stop batching; requests still queued are cancelled."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for _, _, request in self._heap:
            request.future.cancel()
        self._heap.clear()

    # -- requests ------------------------------------------------------------
    def submit(self, requests: Iterable[FrameRequest]) -> None:
        """Queue frame requests; each one's future gets its frame (or is cancelled)."""
        for request in requests:
            heapq.heappush(self._heap, (request.deadline, next(self._order), request))
        self._idle.clear()
        self._wake.set()
        self._gauge()

    def cancel(self, requests: Iterable[FrameRequest]) -> None:
        """Drop requests that have not started; started ones finish but nobody waits for them."""
        for request in requests:
            request.future.cancel()

    @property
    def pending(self) -> int:
        return sum(1 for _, _, r in self._heap if not r.future.done())

    async def drain(self) -> None:
        """Wait until nothing is queued or running."""
        await self._idle.wait()

    async def condition(self, audio16k: np.ndarray, fps: int, phones: Sequence[Timed] | None = None) -> Sequence[Any]:
        """The renderer's per-frame conditioning of ``audio16k`` (and the phonemes spoken in it,
        when known), computed on the accelerator thread."""
        return await asyncio.wrap_future(self._run_on(self.renderer.condition, audio16k, fps, phones))

    async def pauses(self, audio16k: np.ndarray, fps: int, count: int) -> np.ndarray:
        """Per frame of ``audio16k``, the share of the source mouth that silence shows (voice activity
        off the event loop; zeros when ``render.silence_source_enabled`` is off)."""
        if not self.render.silence_source_enabled:
            return np.zeros(count, np.float32)
        try:
            return await asyncio.to_thread(silence.hold_weights, audio16k, fps, count,
                                           self.render.silence_ramp_frames)
        except MuseTalkWarmError as exc:  # no voice activity model: speech everywhere, as before
            log.warning("pauses not detected: %s", exc.message)
            return np.zeros(count, np.float32)

    async def calibrate(self, avatar: Avatar, frames: int) -> None:
        """Measure what a batch of one frame and one of ``frames`` cost, rendering silence (a first,
        unmeasured batch puts the avatar on the device): first replies are planned from the one,
        capacity from the other."""
        cond = await self.condition(np.zeros(-(-frames * SAMPLE_RATE // avatar.fps), np.float32), avatar.fps)
        jobs = [FrameJob(avatar, int(avatar.source_index(i)), cond[i]) for i in range(len(cond))]
        for measured, size in ((False, len(jobs)), (True, 1), (True, len(jobs))):
            t0 = time.perf_counter()
            result = await asyncio.wrap_future(self._run_on(self._render_batch, jobs[:size]))
            if isinstance(result, DeviceFrames):
                await asyncio.to_thread(result.frames)
            if measured:
                self.cost.observe(size, time.perf_counter() - t0)

    # -- admission -----------------------------------------------------------
    @property
    def capacity_fps(self) -> float | None:
        """Frames per second the device renders at the measured cost (None before any batch)."""
        per_frame = self.cost.per_frame_s
        return None if not per_frame else 1.0 / per_frame

    @property
    def booked_fps(self) -> float:
        return sum(self._booked.values())

    def overloaded(self, extra_fps: float = 0.0) -> bool:
        """Whether booked speech plus ``extra_fps`` would exceed the share of capacity live speech may use."""
        capacity = self.capacity_fps
        return capacity is not None and self.booked_fps + extra_fps > self.utilisation * capacity

    def book(self, key: str, fps: float) -> None:
        """Reserve ``fps`` frames per second of speech for ``key``, or raise Overloaded."""
        if key in self._booked:
            return
        if self.overloaded(fps):
            raise Overloaded(
                f"the renderer is at capacity ({self.booked_fps:g} of {self.capacity_fps or 0:.0f} frames/s booked)",
                hint="retry shortly, when another session has finished speaking",
                retry_after=self.retry_after_s,
            )
        self._booked[key] = fps
        self._gauge()

    def release(self, key: str) -> None:
        if self._booked.pop(key, None) is not None:
            self._gauge()

    # -- the loop ------------------------------------------------------------
    def _next_batch(self) -> list[FrameRequest]:
        while self._heap and self._heap[0][2].future.done():
            heapq.heappop(self._heap)  # cancelled
        if not self._heap:
            return []
        slack = self._heap[0][0] - self.clock.now()
        size = self.policy.batch_size(len(self._heap), self.cost, slack)
        batch: list[FrameRequest] = []
        while self._heap and len(batch) < size:
            request = heapq.heappop(self._heap)[2]
            if not request.future.done():
                request.started = True
                batch.append(request)
        return batch

    async def _loop(self) -> None:
        landing: set[asyncio.Task[None]] = set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while batch := self._next_batch():
                self._gauge()
                t0 = time.perf_counter()
                try:
                    result = await asyncio.wrap_future(self._run_on(self._render_batch, [r.job for r in batch]))
                except Exception as exc:
                    self._fail(batch, exc)
                    continue
                # Frames composited on the device land while the next batch renders.
                task = asyncio.create_task(self._deliver(batch, result, t0))
                landing.add(task)
                task.add_done_callback(landing.discard)
                if len(landing) >= _IN_FLIGHT:
                    await asyncio.wait(landing, return_when=asyncio.FIRST_COMPLETED)
            if landing:
                await asyncio.wait(landing)
            self._gauge()
            if not self._heap:
                self._idle.set()

    async def _deliver(self, batch: list[FrameRequest], result: list[np.ndarray] | DeviceFrames, t0: float) -> None:
        """Resolve ``batch``'s futures once its frames are on the host; measure what a frame cost."""
        try:
            frames = result if isinstance(result, list) else await asyncio.to_thread(result.frames)
        except Exception as exc:
            self._fail(batch, exc)
            return
        done = time.perf_counter()
        # Batches overlap: a batch costs from its start or the previous batch's landing, whichever is later.
        seconds = done - max(t0, self._landed)
        self._landed = done
        self.cost.observe(len(batch), seconds)
        self.batches += 1
        self.batched_frames += len(batch)
        if self.metrics is not None:
            self.metrics.live_batch_seconds.observe(seconds)
        for request, frame in zip(batch, frames):
            if not request.future.done():
                request.future.set_result(frame)

    @staticmethod
    def _fail(batch: list[FrameRequest], exc: BaseException) -> None:
        log.error("a live frame batch failed", exc_info=exc)
        for request in batch:
            if not request.future.done():
                request.future.set_exception(exc)

    def _render_batch(self, jobs: Sequence[FrameJob]) -> list[np.ndarray] | DeviceFrames:
        on_device = render_on_device(self.renderer, jobs, self.render, self.enhancer)
        if on_device is not None:
            return on_device
        faces = generate_faces(self.renderer, jobs)
        if self.enhancer is not None:
            faces = list(self.enhancer.restore(np.stack(faces)))
        faces = hold_silent_faces(jobs, faces)
        return [composite_face(job.avatar, face, job.source, self.render) for job, face in zip(jobs, faces)]

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.live_queue_depth.set(self.pending)
            self.metrics.live_speaking.set(len(self._booked))

"""The render engine: audio + avatar → composited full-resolution frames.

A :class:`MouthRenderer` turns per-frame audio conditioning into 256² face
crops (MuseTalk's UNet + VAE, or the weightless lite renderer); the
:class:`RenderEngine` batches it, generates the next batch in a worker thread
while the current one is composited, and yields frames in order as they are
ready, so encoding and streaming can start before the clip is finished.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from . import silence
from .blend import composite_face, faceless_frames
from ..media.audio import SAMPLE_RATE
from ..avatars.cache import Avatar
from ..config import RenderSettings
from ..errors import AvatarCacheError, ResourceExhausted
from .visemes import Timed

if TYPE_CHECKING:
    from ..models.musetalk import Models
    from .accelerator import Accelerator
    from .gpu_composite import FrameBatch, GpuCompositor

log = logging.getLogger(__name__)


class MouthRenderer(Protocol):
    """Generates face crops whose mouth follows the audio."""

    name: str

    def condition(self, audio: np.ndarray, fps: int, phones: Sequence[Timed] | None = None) -> Sequence[Any]:
        """Per-frame conditioning of 16 kHz mono float32 audio (one item per video frame).

        ``phones``: the phonemes spoken in ``audio`` with their spans in seconds, when
        the speech was synthesised from text; a renderer may use them or ignore them.
        """
        ...

    def generate(self, avatar: Avatar, cond: Any, src_idx: np.ndarray) -> np.ndarray:
        """``[B,256,256,3]`` uint8 BGR faces for source frames ``src_idx``, one per ``cond`` item."""
        ...


class MuseTalkRenderer:
    """MuseTalk v1.5: one UNet step on cached avatar latents, then VAE decode.

    The model path runs through an :class:`Accelerator` (eager by default; CUDA
    graphs or compiled at fixed batch buckets). With a :class:`GpuCompositor`,
    :meth:`render_frames` also pastes the faces on the device and returns finished
    frames on their way to the host.
    """

    name = "musetalk"

    def __init__(self, models: Models, accelerator: Accelerator | None = None,
                 compositor: GpuCompositor | None = None) -> None:
        from .accelerator import Accelerator

        self.models = models
        self.accelerator = accelerator or Accelerator(models)
        self.compositor = compositor

    def prepare(self) -> None:
        """Compile and capture every batch bucket (seconds once; cached compiles on restart)."""
        self.accelerator.warmup()

    def condition(self, audio: np.ndarray, fps: int, phones: Sequence[Timed] | None = None) -> Any:
        """Whisper audio prompts; MuseTalk learnt the mouth from the audio, so ``phones`` is unused."""
        from ..models.features import audio_prompts

        return audio_prompts(self.models, audio, fps)

    def generate(self, avatar: Avatar, cond: Any, src_idx: np.ndarray) -> np.ndarray:
        _require_latents(avatar)
        return self.accelerator.run(np.ascontiguousarray(avatar.latents[src_idx]), cond)

    def render_frames(self, avatar: Avatar, cond: Any, src_idx: np.ndarray,
                      settings: RenderSettings) -> FrameBatch | None:
        """Composited frames for ``src_idx`` from the device, or None where it cannot paste them."""
        if self.compositor is None or not settings.gpu_composite or not self.compositor.supports(settings.blend_mode):
            return None
        import torch

        _require_latents(avatar)
        state = self.compositor.prepare(avatar, settings.subpixel_enabled)
        index = torch.from_numpy(np.ascontiguousarray(src_idx, dtype=np.int64)).to(self.compositor.device)
        faces = self.accelerator.faces(state.latents[index], cond)  # type: ignore[index]
        return self.compositor.composite(state, faces, src_idx)


def _require_latents(avatar: Avatar) -> None:
    if avatar.latents is None:
        raise AvatarCacheError(
            f"avatar {avatar.avatar_id!r} was prepared without the VAE",
            hint=f"run `musetalk-warm prep --avatar-id {avatar.avatar_id}` with the weights installed",
        )


def _join(parts: list[Any]) -> Any:
    """One batch from its OOM-split parts: face arrays or frame batches from the device."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return type(parts[0]).concat(parts)


@dataclass
class RenderStats:
    """Seconds spent per stage of one render (summed over batches)."""

    condition_s: float = 0.0
    generate_s: float = 0.0
    composite_s: float = 0.0
    frames: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + seconds)

    def as_dict(self) -> dict[str, float]:
        return {
            "features": round(self.condition_s, 4),
            "generate": round(self.generate_s, 4),
            "composite": round(self.composite_s, 4),
        }


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


_GROW_AFTER = 8  # clean batches before a batch reduced by an OOM doubles again


def _free_accelerator() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class RenderEngine:
    """Batched, pipelined rendering of an avatar speaking an audio clip."""

    def __init__(self, renderer: MouthRenderer, settings: RenderSettings):
        self.renderer = renderer
        self.settings = settings
        # All accelerator work runs on one long-lived thread: CUDA libraries set up
        # per-thread state (seconds on first use), and one queue shares the device
        # fairly between concurrent sessions, batch by batch.
        self._accelerator = ThreadPoolExecutor(1, thread_name_prefix="accelerator")
        self._composite_pool = ThreadPoolExecutor(settings.composite_workers, thread_name_prefix="composite")
        # After an accelerator OOM, the batch that fitted: later batches start there and
        # grow back after a run of clean batches (the memory may have been freed).
        self._max_step: int | None = None
        self._clean_batches = 0

    def submit(self, fn: Any, /, *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on the accelerator thread, queued with the engine's own batches."""
        return self._accelerator.submit(fn, *args)

    def warmup(self, avatar: Avatar) -> None:
        """Render one batch of silence so the first request pays no start-up cost."""
        prepare = getattr(self.renderer, "prepare", None)
        if prepare is not None:
            self._accelerator.submit(prepare).result()
        silence = np.zeros(-(-self.settings.batch_size * SAMPLE_RATE // avatar.fps), np.float32)
        deque(self.render(silence, avatar, 0), maxlen=0)  # run it, keep nothing

    def render(
        self,
        audio: np.ndarray,
        avatar: Avatar,
        start: int = 0,
        *,
        settings: RenderSettings | None = None,
        stats: RenderStats | None = None,
        phones: Sequence[Timed] | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield one BGR frame per ``floor(len(audio)/16000*fps)``.

        Frame ``i`` shows avatar cycle position ``start + i``; the caller keeps
        ``start + n`` to continue the next clip where this one ended. Faces are
        pasted at the avatar's placements (fixed at prep, with its stabiliser
        settings); ``settings`` chooses the blend mode and whether a fractional
        placement is kept or rounded to whole pixels. ``phones``: the phonemes
        spoken in ``audio`` (spans in seconds from its first sample), for renderers
        that articulate from them.
        """
        settings = settings or self.settings
        stats = stats if stats is not None else RenderStats()
        t0 = time.perf_counter()
        cond = self._accelerator.submit(self._condition, audio, avatar.fps, phones).result()
        stats.add("condition_s", time.perf_counter() - t0)
        sources = avatar.source_index(start + np.arange(len(cond), dtype=np.int64))
        hold = np.zeros(len(cond), np.float32)
        if settings.silence_source_enabled:
            hold = silence.hold_weights(audio, avatar.fps, len(cond), settings.silence_ramp_frames)
        yield from self._pipeline(avatar, cond, sources, settings, stats, hold)

    def _condition(self, audio: np.ndarray, fps: int, phones: Sequence[Timed] | None) -> Any:
        try:
            return self.renderer.condition(audio, fps, phones)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            _free_accelerator()
            raise ResourceExhausted(
                "the accelerator ran out of memory encoding the audio",
                hint="send shorter audio or run fewer sessions per GPU",
            ) from exc

    def _generate(self, avatar: Avatar, cond: Any, src: np.ndarray, stats: RenderStats,
                  settings: RenderSettings, on_device_ok: bool = True) -> Any:
        """One batch (faces, or frames composited on the device), halving it on accelerator OOM."""
        step = min(len(src), self._max_step or len(src))
        on_device = getattr(self.renderer, "render_frames", None) if on_device_ok else None
        while True:
            try:
                t0 = time.perf_counter()
                parts = []
                for i in range(0, len(src), step):
                    part = None
                    if on_device is not None:
                        part = on_device(avatar, cond[i : i + step], src[i : i + step], settings)
                    if part is None:
                        part = self.renderer.generate(avatar, cond[i : i + step], src[i : i + step])
                    parts.append(part)
                    self._recover()
                stats.add("generate_s", time.perf_counter() - t0)
                return _join(parts)
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                _free_accelerator()
                self._clean_batches = 0
                if step == 1:
                    self._max_step = None  # nothing fits now; don't pin later clips to batch 1
                    raise ResourceExhausted(
                        "the accelerator ran out of memory even at batch size 1",
                        hint="free GPU memory or run fewer sessions per GPU",
                    ) from exc
                step = self._max_step = max(1, step // 2)
                log.warning("out of memory; batches now at most %d frames", step)

    def _recover(self) -> None:
        if self._max_step is None:
            return
        self._clean_batches += 1
        if self._clean_batches >= _GROW_AFTER:
            self._clean_batches = 0
            self._max_step *= 2
            if self._max_step >= self.settings.batch_size:
                self._max_step = None

    def _pipeline(
        self,
        avatar: Avatar,
        cond: Any,
        sources: np.ndarray,
        settings: RenderSettings,
        stats: RenderStats,
        hold: np.ndarray,
    ) -> Iterator[np.ndarray]:
        bs = settings.batch_size
        starts = deque(range(0, len(sources), bs))
        pending: deque[tuple[int, Future[Any]]] = deque()
        faceless = faceless_frames(avatar)

        # Two batches queued on the accelerator while this thread composites the current one.
        def submit_next() -> None:
            if starts:
                s = starts.popleft()
                src = sources[s : s + bs]
                # Silent or faceless frames are finished from faces on the host (source-mouth hold).
                on_device_ok = not np.any(hold[s : s + bs] > 0) and faceless.isdisjoint(src.tolist())
                pending.append(
                    (s, self._accelerator.submit(self._generate, avatar, cond[s : s + bs], src, stats,
                                                 settings, on_device_ok))
                )

        submit_next()
        submit_next()
        try:
            while pending:
                s, fut = pending.popleft()
                faces = fut.result()
                submit_next()
                src = sources[s : s + len(faces)]
                faces = silence.hold_source(faces, avatar.crops[src], hold[s : s + len(faces)])
                t0 = time.perf_counter()
                frames = faces.frames() if not isinstance(faces, np.ndarray) else list(
                    self._composite_pool.map(
                        composite_face, [avatar] * len(faces), faces, src.tolist(), [settings] * len(faces)
                    )
                )
                stats.add("composite_s", time.perf_counter() - t0)
                stats.frames += len(frames)
                yield from frames
        finally:
            for _, fut in pending:
                fut.cancel()
            # A batch already on the accelerator finishes before the render returns, so no
            # work of a closed or failed render runs on behind the caller's back.
            wait([fut for _, fut in pending])

    def close(self) -> None:
        """Stop the accelerator and compositing threads."""
        self._accelerator.shutdown(wait=False, cancel_futures=True)
        self._composite_pool.shutdown(wait=False, cancel_futures=True)

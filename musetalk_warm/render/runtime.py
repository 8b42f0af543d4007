"""The warm runtime: renderer, render engine and avatar caches, loaded once.

`Runtime.load` is what a long-lived process (the server, the CLI) calls at
start-up; `Runtime.render_clip` turns speech into an encoded clip that
continues from a given avatar frame. Nothing here prepares an avatar at speak
time: caches are loaded (or, for the built-in demo avatar and with
``avatar.preparation``, built) during `load`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from ..media import encode as media
from ..media.audio import resample
from ..avatars.cache import Avatar
from ..avatars.library import AvatarLibrary
from ..config import RenderSettings, Settings, check_quantum, clip_quantum
from .engine import MouthRenderer, MuseTalkRenderer, RenderEngine, RenderStats
from ..errors import AudioError, AvatarCacheError, NotFound
from ..media.audio import SAMPLE_RATE, num_frames
from .visemes import Timed

if TYPE_CHECKING:
    from ..models.musetalk import Models

log = logging.getLogger(__name__)


@dataclass
class RenderedClip:
    """One encoded clip and what the session needs to continue after it."""

    clip: media.EncodedClip
    frames: int
    duration_s: float
    end_frame: int
    audio_tail: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


def build_renderer(settings: Settings) -> tuple[MouthRenderer, Models | None]:
    """The renderer the settings ask for, and the models behind it (None for lite)."""
    choice = settings.models.renderer
    if choice in ("auto", "musetalk", "tiny"):
        from ..models.musetalk import load_models, missing_weights

        if choice == "auto" and missing_weights(settings.models):
            log.info("MuseTalk weights not found under %s: using the lite renderer", settings.models.models_dir)
        else:
            models = load_models(settings.models)
            return accelerated_renderer(models, settings), models
    from .lite import LiteRenderer

    return LiteRenderer(), None


def accelerated_renderer(models: Models, settings: Settings) -> MuseTalkRenderer:
    """MuseTalk with the configured model path (``models.accelerate``) and, on CUDA, GPU compositing."""
    from .accelerator import Accelerator, channels_last, resolve_mode

    mode = resolve_mode(settings.models.accelerate, models.device)
    accelerator = Accelerator(models, mode=mode, buckets=settings.models.batch_buckets if mode != "eager" else None,
                              cache_dir=settings.models.compile_cache_dir,
                              compile_modules=settings.models.compile_modules,
                              channels_last=channels_last(settings.models.memory_format, mode))
    compositor = None
    if models.device.type == "cuda" and settings.render.gpu_composite:
        from .gpu_composite import GpuCompositor

        compositor = GpuCompositor(models.device, latent_dtype=models.dtype)
    return MuseTalkRenderer(models, accelerator, compositor)


def latent_encoder(models: Models | None) -> tuple[Callable[[np.ndarray], np.ndarray] | None, str | None]:
    """The VAE crop encoder for avatar preparation and its id (None, None without models)."""
    if models is None:
        return None, None
    from ..models.musetalk import encode_latents

    return partial(encode_latents, models), models.vae_id


class Runtime:
    """Models, renderer and avatars of one process."""

    def __init__(self, settings: Settings, renderer: MouthRenderer, models: Models | None) -> None:
        self.settings = settings
        self.renderer = renderer
        self.models = models
        cfg = settings.avatar
        self.library = AvatarLibrary(cfg.cache_dir, max_loaded=cfg.max_loaded, frames_crf=cfg.cache_crf,
                                     check=self._check_avatar)
        self.engine = RenderEngine(renderer, settings.render)

    @classmethod
    def load(cls, settings: Settings) -> Runtime:
        """Load the renderer and the configured avatar once; other caches load on first use."""
        media.require_encoders(settings.media)  # fail at start-up, not on the first request
        renderer, models = build_renderer(settings)
        runtime = cls(settings, renderer, models)
        startup = runtime._startup_avatar()
        runtime.library.add(startup, pin=True)
        runtime.engine.warmup(startup)
        log.info("runtime ready: renderer=%s device=%s avatars=%s",
                 renderer.name, runtime.device, runtime.avatar_ids)
        return runtime

    @property
    def renderer_name(self) -> str:
        return self.renderer.name

    @property
    def device(self) -> str:
        return "cpu" if self.models is None else str(self.models.device)

    @property
    def avatar_ids(self) -> list[str]:
        return self.library.ids()

    def _startup_avatar(self) -> Avatar:
        """The configured avatar; built only for the demo or with ``avatar.preparation``."""
        from ..avatars.prep import load_or_prepare

        encoder, vae_id = latent_encoder(self.models)
        avatar = load_or_prepare(self.settings, encoder=encoder, vae_id=vae_id, progress=False)
        self._check_avatar(avatar)
        return avatar

    def _check_avatar(self, avatar: Avatar) -> None:
        check_quantum(avatar.fps, self.settings.media.audio_rate, f"avatar {avatar.avatar_id!r}")
        if self.models is not None and (
            avatar.latents is None or avatar.manifest.get("vae_id") != self.models.vae_id
        ):
            raise AvatarCacheError(
                f"avatar {avatar.avatar_id!r} was prepared for another VAE",
                hint=f"run `musetalk-warm prep --avatar-id {avatar.avatar_id}` to rebuild its latents",
            )
        from ..avatars.prep import STABILISER_SETTINGS

        wanted = self.settings.render.model_dump(include=set(STABILISER_SETTINGS))
        if avatar.manifest.get("params", {}).get("stabilise") != wanted:
            # Crops, latents and placements were cut with the cache's stabilisers; they win.
            log.warning("avatar %s was prepared with other stabiliser settings; re-run prep to apply the "
                        "configured ones", avatar.avatar_id)

    def prep_encoder(self) -> tuple[Callable[[np.ndarray], np.ndarray] | None, str | None]:
        """The VAE crop encoder for avatars prepared while serving, and its id (None, None for lite).

        Each call runs on the accelerator thread, queued with render batches, so
        latents of a new avatar never contend with live frames for the device.
        """
        encoder, vae_id = latent_encoder(self.models)
        if encoder is None:
            return None, None
        encode = encoder
        return (lambda crops: self.engine.submit(encode, crops).result()), vae_id

    def avatar(self, avatar_id: str | None) -> Avatar:
        """A prepared avatar (the configured one when ``avatar_id`` is None), loaded on first use."""
        key = avatar_id or self.settings.avatar.avatar_id
        try:
            return self.library.get(key)
        except NotFound:
            raise NotFound(
                f"unknown avatar {key!r}; prepared avatars: {', '.join(self.avatar_ids)}",
                hint="prepare it with `musetalk-warm prep --avatar-id ID --video-path FILE`",
            ) from None

    def render_clip(
        self,
        audio16k: np.ndarray,
        avatar_id: str | None,
        start_frame: int,
        *,
        out_audio: np.ndarray | None = None,
        prev_tail: np.ndarray | None = None,
        render: RenderSettings | None = None,
        on_fragment: Callable[[bytes, media.Fragment], None] | None = None,
        phones: Sequence[Timed] | None = None,
    ) -> RenderedClip:
        """Render and encode ``audio16k`` (16 kHz mono float32) as one clip.

        The audio is padded with trailing silence to the clip quantum, so every
        clip is a whole number of video and AAC frames (gapless appends) and
        ends with the mouth closed. ``out_audio`` is the same speech at
        ``media.audio_rate`` for the output track (resampled from ``audio16k``
        when omitted). ``on_fragment(init_segment, fragment)`` is called for each
        media fragment as soon as it is encoded, while later frames still render.
        ``phones``: the phonemes spoken in ``audio16k`` when it was synthesised from
        text (spans in seconds; the trailing padding keeps them).
        """
        key = self.avatar(avatar_id).avatar_id
        with self.library.lease(key) as avatar:
            return self._render_clip(avatar, audio16k, start_frame, out_audio=out_audio, prev_tail=prev_tail,
                                     render=render, on_fragment=on_fragment, phones=phones)

    def _render_clip(
        self,
        avatar: Avatar,
        audio16k: np.ndarray,
        start_frame: int,
        *,
        out_audio: np.ndarray | None,
        prev_tail: np.ndarray | None,
        render: RenderSettings | None,
        on_fragment: Callable[[bytes, media.Fragment], None] | None,
        phones: Sequence[Timed] | None,
    ) -> RenderedClip:
        fps = avatar.fps
        if num_frames(len(audio16k), fps) < 1:
            raise AudioError(
                f"audio is {len(audio16k) / SAMPLE_RATE * 1000:.0f} ms long, shorter than one video frame "
                f"({1000 / fps:.0f} ms)"
            )
        rate = self.settings.media.audio_rate
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        track = resample(audio16k, SAMPLE_RATE, rate) if out_audio is None else out_audio
        # The output track sets the clip length: whole quanta of video and AAC frames.
        # The 16 kHz speech is padded to cover it, so the renderer makes exactly
        # n_out·fps/rate frames (ceil adds under one sample).
        quantum = clip_quantum(fps, rate)
        n_out = max(1, math.ceil(max(len(track), len(audio16k) * rate / SAMPLE_RATE) / quantum)) * quantum
        track = media.pad_to(track, n_out)
        speech = media.pad_to(audio16k, -(-n_out * SAMPLE_RATE // rate))
        timings["audio"] = time.perf_counter() - t0

        stats = RenderStats()
        height, width = avatar.frames.shape[1:3]
        encode_s = 0.0
        t_render = time.perf_counter()
        def forward(fragment: media.Fragment) -> None:
            if on_fragment is not None:
                on_fragment(encoder.init_segment or b"", fragment)

        with media.ClipEncoder(width, height, fps, self.settings.media, audio=track, prev_tail=prev_tail,
                               on_fragment=forward) as encoder:
            for frame in self.engine.render(speech, avatar, start_frame, settings=render, stats=stats,
                                            phones=phones):
                t1 = time.perf_counter()
                encoder.add_frame(frame)
                encode_s += time.perf_counter() - t1
            t1 = time.perf_counter()
            clip = encoder.finish()
            encode_s += time.perf_counter() - t1
        timings.update(stats.as_dict())
        timings["render"] = time.perf_counter() - t_render - encode_s
        timings["encode"] = encode_s
        n = stats.frames
        return RenderedClip(
            clip=clip,
            frames=n,
            duration_s=n / fps,
            end_frame=(start_frame + n) % avatar.cycle_length,
            audio_tail=track[-media.AAC_CONTEXT_SAMPLES:].copy(),
            timings={k: round(v, 4) for k, v in timings.items()},
        )

    def close(self) -> None:
        """Release worker threads."""
        self.engine.close()

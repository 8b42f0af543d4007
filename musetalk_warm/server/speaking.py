"""Text or audio → the session's next clip: the work behind /speak and /chat.

Cheap checks (text, session, avatar) run first on the event loop; TTS, decoding,
rendering and appending run in a worker thread while the request holds its
session's first-come, first-served lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import anyio
import numpy as np

from ..audio import load_audio_native, speech_tracks
from ..errors import TextError
from ..session import SpeakResult, check_session_id
from .schemas import SpeakResponse
from .state import Warm



@dataclass(frozen=True)
class Utterance:
    """What to say: text for the TTS, or an uploaded audio file's bytes."""

    text: str | None = None
    audio: bytes | None = None
    avatar_id: str | None = None
    session_id: str | None = None
    blend_mode: str | None = None


def check_text(text: str, max_chars: int) -> str:
    """The stripped text, or TextError when empty or over ``max_chars``."""
    text = text.strip()
    if not text:
        raise TextError("text is empty", hint='send {"text": "something to say"}')
    if len(text) > max_chars:
        raise TextError(
            f"text is {len(text)} characters, more than the limit of {max_chars}",
            hint="split it into several /speak calls",
        )
    return text


def _speech(warm: Warm, utterance: Utterance) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(16 kHz speech, speech at the output audio rate, timings) for an utterance."""
    _, tts = warm.require_ready()
    settings = warm.settings
    out_rate = settings.media.audio_rate
    timings: dict[str, float] = {"tts": 0.0}
    t0 = time.perf_counter()
    if utterance.text is not None:
        samples, rate = tts.synthesize(utterance.text)
        timings["tts"] = time.perf_counter() - t0
    else:
        samples, rate = load_audio_native(
            utterance.audio or b"",
            min_seconds=1.0 / settings.avatar.fps, max_seconds=settings.server.max_audio_seconds,
        )
    t1 = time.perf_counter()
    speech16k, track = speech_tracks(samples, rate, out_rate)
    timings["audio"] = time.perf_counter() - t1
    return speech16k, track, timings


def _speak_sync(warm: Warm, utterance: Utterance, session_id: str) -> tuple[SpeakResult, dict[str, float]]:
    t0 = time.perf_counter()
    speech16k, track, timings = _speech(warm, utterance)
    runtime, _ = warm.require_ready()
    render = None
    if utterance.blend_mode is not None:
        render = warm.settings.render.model_copy(update={"blend_mode": utterance.blend_mode})
    result = warm.store.speak(
        session_id, speech16k, utterance.avatar_id, runtime,
        out_audio=track, create=utterance.session_id is None, render=render,
    )
    for stage, seconds in result.timings.items():
        # The runtime's own "audio" (padding) adds to decoding/resampling.
        timings[stage] = timings.get(stage, 0.0) + seconds
    timings["total"] = time.perf_counter() - t0
    return result, {k: round(v, 4) for k, v in timings.items()}


async def speak(warm: Warm, utterance: Utterance, urls: SessionURLs) -> SpeakResponse:
    """Say ``utterance`` in its session and return the API response."""
    runtime, _ = warm.require_ready()
    settings = warm.settings
    if utterance.text is not None:
        utterance = replace(utterance, text=check_text(utterance.text, settings.server.max_text_chars))
    session_id = check_session_id(utterance.session_id or settings.server.default_session)
    if utterance.session_id is not None:
        warm.store.require(session_id)  # NotFound before any work
    if utterance.avatar_id is not None:
        runtime.avatar(utterance.avatar_id)
    async with warm.session_lock(session_id):
        result, timings = await anyio.to_thread.run_sync(_speak_sync, warm, utterance, session_id)
    warm.metrics.observe_clip(timings, result.frames, result.duration_s)
    state = result.state
    return SpeakResponse(
        message=f"clip {result.clip_index} appended to session {session_id}",
        session_id=session_id,
        clip_index=result.clip_index,
        clip_url=urls.clip(session_id, result.clip_index),
        session_video_url=urls.video(session_id),
        video_path=urls.video(session_id),
        download_url=urls.download(session_id),
        duration=round(result.duration_s, 4),
        frames=result.frames,
        start_frame=result.start_frame,
        next_frame=state.next_frame,
        session_duration=round(state.duration_s, 4),
        session_clips=state.clips,
        timings=timings,
    )


class SessionURLs:
    """Relative URLs of a session's resources (relative, so they work behind a proxy)."""

    def __init__(self, url_path_for: Callable[..., Any]) -> None:
        self._for = url_path_for

    def clip(self, session_id: str, index: int) -> str:
        return str(self._for("session_clip", session_id=session_id, index=str(index)))

    def video(self, session_id: str) -> str:
        return str(self._for("session_video", session_id=session_id))

    def download(self, session_id: str) -> str:
        return f"{self._for('download')}?session_id={session_id}"

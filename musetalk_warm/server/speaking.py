"""Text or audio → the session's next clip: the work behind /speak and /chat.

Cheap checks (text, session, avatar) run first on the event loop; TTS, decoding,
rendering and appending run in a worker thread while the request holds its
session's first-come, first-served lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import Request

from ..media.audio import MIN_SECONDS, load_audio_native, speech_tracks
from ..errors import TextError, TooManyRequests
from ..media.fmp4 import Fragment
from ..sessions.housekeeping import session_count
from ..sessions.store import SpeakResult, check_session_id
from ..voice.phonemes import Phone
from ..voice.tts import Speech, check_text
from .deps import signer
from .schemas import SpeakResponse
from .signing import Signer
from .state import Warm


FragmentSink = Callable[[bytes, Fragment], None]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Utterance:
    """What to say: text for the TTS, or an uploaded audio file's bytes."""

    text: str | None = None
    audio: bytes | None = None
    avatar_id: str | None = None
    session_id: str | None = None
    blend_mode: str | None = None


def check_utterance(warm: Warm, utterance: Utterance) -> tuple[Utterance, str]:
    """The utterance with its text checked, and its session id; cheap, before any work.

    A session is created on first use. Raises TextError, BadInput (bad id),
    NotFound (unknown avatar), TooManyRequests (session cap) or NotReady, so
    callers answer 4xx/503 before anything is queued.
    """
    runtime, _ = warm.require_ready()
    settings = warm.settings
    if utterance.text is not None:
        utterance = replace(utterance, text=check_text(utterance.text, settings.server.max_text_chars))
    session_id = check_session_id(utterance.session_id or settings.server.default_session)
    check_room_for(warm, session_id)
    if utterance.avatar_id is not None:
        runtime.avatar(utterance.avatar_id)
    return utterance, session_id


def check_room_for(warm: Warm, session_id: str) -> None:
    """TooManyRequests when ``session_id`` is new and ``server.max_sessions`` sessions exist."""
    limit = warm.settings.server.max_sessions
    if not warm.store.exists(session_id) and session_count(warm.store.root) >= limit:
        raise TooManyRequests(
            f"the server already holds {limit} sessions",
            hint="reuse a session id, or raise server.max_sessions",
        )


@dataclass(frozen=True)
class _Speech:
    """An utterance's speech at 16 kHz and at the output rate, and its phonemes when from text."""

    speech16k: np.ndarray
    track: np.ndarray
    phones: tuple[Phone, ...] | None
    timings: dict[str, float]


def _speech(warm: Warm, utterance: Utterance) -> _Speech:
    """The speech of an utterance: synthesised (with phoneme timings where the TTS
    reports them) or decoded from the upload (none: the renderer reads the audio alone)."""
    _, tts = warm.require_ready()
    settings = warm.settings
    out_rate = settings.media.audio_rate
    timings: dict[str, float] = {"tts": 0.0}
    t0 = time.perf_counter()
    if utterance.text is not None:
        spoken = tts.synthesize_timed(utterance.text)
        timings["tts"] = time.perf_counter() - t0
        # The same cap as uploads: a long text must not render minutes of video.
        seconds = len(spoken.samples) / spoken.rate
        if seconds > settings.server.max_audio_seconds:
            raise TextError(
                f"the speech for this text is {seconds:.1f} s long; the maximum is "
                f"{settings.server.max_audio_seconds:g} s",
                hint="send shorter text, split over several /speak calls",
            )
    else:
        spoken = Speech(*load_audio_native(
            utterance.audio or b"",
            min_seconds=max(MIN_SECONDS, 1.0 / settings.avatar.fps), max_seconds=settings.server.max_audio_seconds,
        ))
    t1 = time.perf_counter()
    # Phone spans are in seconds, so resampling keeps them.
    speech16k, track = speech_tracks(spoken.samples, spoken.rate, out_rate)
    timings["audio"] = time.perf_counter() - t1
    return _Speech(speech16k, track, spoken.phones, timings)


def _speak_sync(
    warm: Warm, utterance: Utterance, session_id: str, on_fragment: FragmentSink | None = None
) -> tuple[SpeakResult, dict[str, float]]:
    t0 = time.perf_counter()
    speech = _speech(warm, utterance)
    timings = speech.timings
    runtime, _ = warm.require_ready()
    render = None
    if utterance.blend_mode is not None:
        render = warm.settings.render.model_copy(update={"blend_mode": utterance.blend_mode})
    result = warm.store.speak(
        session_id, speech.speech16k, utterance.avatar_id, runtime,
        out_audio=speech.track, render=render, on_fragment=on_fragment, phones=speech.phones,
    )
    for stage, seconds in result.timings.items():
        # The runtime's own "audio" (padding) adds to decoding/resampling.
        timings[stage] = timings.get(stage, 0.0) + seconds
    timings["total"] = time.perf_counter() - t0
    return result, {k: round(v, 4) for k, v in timings.items()}


async def speak(warm: Warm, utterance: Utterance, urls: SessionURLs) -> SpeakResponse:
    """Say ``utterance`` in its session and return the API response."""
    response, _ = await speak_clip(warm, utterance, urls)
    return response


async def _say(
    warm: Warm, utterance: Utterance, session_id: str, on_fragment: FragmentSink | None = None,
    *, admitted: bool = False, on_start: Callable[[], None] | None = None,
) -> tuple[SpeakResult, dict[str, float]]:
    """The session's next clip: queued behind the session's earlier requests, made in a worker thread.

    Counts against the queue limits unless the caller ``admitted`` it already;
    ``on_start`` is called once the clip holds its session and starts rendering.
    """
    with nullcontext() if admitted else warm.admission.hold(session_id, warm.settings.server):
        async with warm.session_lock(session_id):
            if on_start is not None:
                on_start()
            result, timings = await anyio.to_thread.run_sync(_speak_sync, warm, utterance, session_id, on_fragment)
    warm.metrics.observe_clip(timings, result.frames, result.duration_s)
    return result, timings


async def speak_clip(
    warm: Warm, utterance: Utterance, urls: SessionURLs,
    *, admitted: bool = False, on_start: Callable[[], None] | None = None,
) -> tuple[SpeakResponse, Path]:
    """Like :func:`speak`, plus the new clip's file (``admitted``, ``on_start``: see ``_say``)."""
    utterance, session_id = check_utterance(warm, utterance)
    result, timings = await _say(warm, utterance, session_id, admitted=admitted, on_start=on_start)
    state = result.state
    response = SpeakResponse(
        message=f"clip {result.clip_index} appended to session {session_id}",
        session_id=session_id,
        clip_index=result.clip_index,
        clip_url=urls.clip(session_id, state.generation, result.clip_index),
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
    return response, result.clip_path


async def speak_stream(warm: Warm, utterance: Utterance) -> tuple[AsyncIterator[bytes], str]:
    """Say ``utterance``; its clip comes back as fragmented MP4 bytes while it renders.

    Returns the byte stream (init segment, then each fragment as soon as it is
    encoded) and the session id. Failures before the first fragment (text,
    speech, a busy GPU) are raised here, so the caller still answers with an
    error status; a later failure ends the stream early and, as with /speak,
    leaves the session unchanged. The clip is appended to the session as usual.
    """
    utterance, session_id = check_utterance(warm, utterance)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    streaming = False

    def on_fragment(init: bytes, fragment: Fragment) -> None:
        nonlocal streaming
        streaming = True
        if not loop.is_closed():  # the server may be shutting down; the clip is still appended
            loop.call_soon_threadsafe(events.put_nowait, ("data", (init, fragment.data)))

    async def work() -> None:
        try:
            await _say(warm, utterance, session_id, on_fragment)
            events.put_nowait(("done", None))
        except Exception as exc:
            if streaming:  # the response already started: nobody else will report it
                code = getattr(exc, "code", "internal_error")
                log.error("stream of session %s failed after it started (%s): %s", session_id, code, exc)
                warm.metrics.errors.labels(code).inc()
            events.put_nowait(("error", exc))

    # The clip is finished and appended even if the client goes away mid-stream.
    warm.spawn(work())
    kind, value = await events.get()
    if kind == "error":
        raise value

    async def body() -> AsyncIterator[bytes]:
        init, data = value
        yield init + data
        while True:
            kind, item = await events.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item[1]

    return body(), session_id


class SessionURLs:
    """Relative URLs of a session's resources (relative, so they work behind a proxy).

    With a token configured they are signed (``exp``, ``sig``), so a player
    without the token can fetch them until they expire.
    """

    def __init__(self, url_path_for: Callable[..., Any], signer: Signer | None = None) -> None:
        self._for = url_path_for
        self._sign = signer.sign_url if signer is not None else str

    @classmethod
    def of(cls, request: Request) -> SessionURLs:
        return cls(request.app.url_path_for, signer(request.app.state.warm.settings.server))

    def clip(self, session_id: str, generation: str, index: int) -> str:
        """A clip's URL; the generation in it keeps URLs unique across resets (and caches honest)."""
        return self._sign(str(self._for("session_clip", session_id=session_id, generation=generation, index=str(index))))

    def video(self, session_id: str) -> str:
        return self._sign(str(self._for("session_video", session_id=session_id)))

    def download(self, session_id: str) -> str:
        return self._sign(f"{self._for('download')}?session_id={session_id}")

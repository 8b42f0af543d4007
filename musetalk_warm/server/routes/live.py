"""Live sessions over HTTP: start/stop, say, chat, interrupt; PCM in and events out over WebSockets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field

from ...errors import MuseTalkWarmError, NotFound, NotReady, Unauthorized
from ...live.registry import LiveRegistry
from ...live.session import LiveSession, SessionClosed
from ...sessions.store import check_session_id
from ...voice.llm import stream_reply
from ...voice.tts import check_text
from ..deps import AuthDep, WarmDep, authorized
from ..schemas import ErrorResponse
from ..state import Warm

router = APIRouter(tags=["live"])
_ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse} for c in (400, 401, 404, 422, 503)}
# WebSocket close codes (RFC 6455 private range for application errors).
_WS_UNAUTHORIZED, _WS_NOT_FOUND, _WS_ERROR = 4401, 4404, 4400


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AttachRequest(_Body):
    avatar_id: str | None = Field(None, description="a loaded avatar; default: the session's or the configured one")


class SayRequest(_Body):
    text: str = Field(description="what to say; spoken sentence by sentence")
    interrupt: bool = Field(False, description="stop what is being said first (barge-in)")


class LiveState(BaseModel):
    """A live session's state."""

    session_id: str
    avatar_id: str
    state: str = Field(description="idle or speaking")
    fps: int
    audio_rate: int
    width: int
    height: int
    tick: int = Field(description="frames emitted since the live session started")
    viewers: int
    queued_utterances: int
    deadline_misses: int


class ReplyAccepted(BaseModel):
    reply_id: str
    session: LiveState


def registry(warm: Warm) -> LiveRegistry:
    """The live sessions, or NotReady while the models or the registry are starting."""
    warm.require_ready()
    if warm.live is None:
        raise NotReady("live sessions are still starting", hint="retry when GET /health reports ready")
    return warm.live


def _live(warm: Warm, session_id: str) -> LiveSession:
    session = registry(warm).get(check_session_id(session_id))
    if session is None:
        raise NotFound(f"session {session_id!r} is not live", hint=f"POST /sessions/{session_id}/live first")
    return session


def _state(session: LiveSession) -> LiveState:
    return LiveState(**session.describe())


@router.post("/sessions/{session_id}/live", response_model=LiveState, responses=_ERRORS, dependencies=[AuthDep],
             summary="Start (or find) the session's live stream")
async def attach(warm: WarmDep, session_id: str, body: AttachRequest | None = None) -> LiveState:
    session = await registry(warm).attach(session_id, body.avatar_id if body else None)
    return _state(session)


@router.get("/sessions/{session_id}/live", response_model=LiveState, responses=_ERRORS, dependencies=[AuthDep],
            summary="A live session's state")
async def live_state(warm: WarmDep, session_id: str) -> LiveState:
    return _state(_live(warm, session_id))


@router.delete("/sessions/{session_id}/live", status_code=204, responses=_ERRORS, dependencies=[AuthDep],
               summary="Stop the live stream (the record is completed)")
async def detach(warm: WarmDep, session_id: str) -> None:
    if not await registry(warm).stop(check_session_id(session_id)):
        raise NotFound(f"session {session_id!r} is not live")


@router.post("/sessions/{session_id}/say", response_model=ReplyAccepted, status_code=202, responses=_ERRORS,
             dependencies=[AuthDep], summary="Speak text in the live stream, sentence by sentence")
async def say(warm: WarmDep, session_id: str, body: SayRequest) -> ReplyAccepted:
    session = _live(warm, session_id)
    reply = await session.say(body.text, interrupt=body.interrupt)
    return ReplyAccepted(reply_id=reply.reply_id, session=_state(session))


@router.post("/sessions/{session_id}/chat", response_model=ReplyAccepted, status_code=202, responses=_ERRORS,
             dependencies=[AuthDep], summary="Ask the LLM; its streamed reply is spoken as it arrives")
async def chat(warm: WarmDep, session_id: str, body: SayRequest) -> ReplyAccepted:
    session = _live(warm, session_id)
    prompt = check_text(body.text, warm.settings.server.max_text_chars)
    reply = session.say_stream(stream_reply(warm.settings.server, prompt), interrupt=body.interrupt)
    return ReplyAccepted(reply_id=reply.reply_id, session=_state(session))


@router.post("/sessions/{session_id}/interrupt", response_model=LiveState, responses=_ERRORS,
             dependencies=[AuthDep], summary="Stop speaking now and blend back to idle")
async def interrupt(warm: WarmDep, session_id: str) -> LiveState:
    session = _live(warm, session_id)
    session.interrupt()
    return _state(session)


async def ws_session(websocket: WebSocket, session_id: str) -> LiveSession | None:
    """Authorise and accept a session's WebSocket; None (the socket closed with a code) when refused."""
    warm: Warm = websocket.app.state.warm
    if not authorized(websocket, warm.settings.server):
        await websocket.close(_WS_UNAUTHORIZED, Unauthorized.code)
        return None
    try:
        session = _live(warm, session_id)
    except MuseTalkWarmError as exc:
        await websocket.close(_WS_NOT_FOUND, exc.message[:120])
        return None
    await websocket.accept()
    return session


@router.websocket("/sessions/{session_id}/pcm")
async def pcm(websocket: WebSocket, session_id: str, rate: int = 16000) -> None:
    """Binary messages: int16 little-endian mono PCM at ``rate``; text ``{"type": "end"}`` ends an utterance."""
    session = await ws_session(websocket, session_id)
    if session is None:
        return
    source = session.open_pcm_input(rate)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            if message.get("bytes") is not None:
                data = message["bytes"]
                source.feed(np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2"))
            elif message.get("text") is not None and _is_end(message["text"]):
                source.end()
    except MuseTalkWarmError as exc:
        await websocket.send_json({"type": "error", **exc.to_dict()})
        await websocket.close(_WS_ERROR, exc.code)
    except WebSocketDisconnect:
        pass
    finally:
        source.close()


def _is_end(text: str) -> bool:
    try:
        return bool(json.loads(text).get("type") == "end")
    except (ValueError, AttributeError):
        return False


@router.websocket("/sessions/{session_id}/events")
async def events(websocket: WebSocket, session_id: str) -> None:
    """JSON events: ``state`` (idle/speaking), ``utterance`` (started/ended, with text), ``interrupted``, ``error``."""
    session = await ws_session(websocket, session_id)
    if session is None:
        return
    feed = session.events()
    closed = asyncio.create_task(wait_disconnect(websocket))
    try:
        while True:
            getter = asyncio.create_task(feed.get())
            done, _ = await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
            if closed in done:
                getter.cancel()
                break
            try:
                await websocket.send_json(getter.result())
            except SessionClosed:
                await websocket.close()
                break
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        closed.cancel()
        feed.close()


async def wait_disconnect(websocket: WebSocket) -> None:
    """Return once the client closes ``websocket`` (whatever it sends meanwhile is dropped)."""
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass

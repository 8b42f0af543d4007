"""Watching a live session: WebRTC (WHEP-style signalling) and fMP4 over a WebSocket (MSE)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI, Request, Response, WebSocket, WebSocketDisconnect

from ...errors import BadInput, MuseTalkWarmError, NotReady
from ...live.session import SessionClosed
from ...live.transports.encoders import Fmp4Stream
from ...live.transports.webrtc import WebRTCPeers
from ...sessions.store import check_session_id
from ..deps import AuthDep, WarmDep
from ..schemas import ErrorResponse
from .live import registry, wait_disconnect, ws_session

log = logging.getLogger(__name__)
MAX_SDP_BYTES = 64 * 1024
_SDP = "application/sdp"
_ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse} for c in (400, 401, 404, 503)}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """One set of WebRTC peers per app; every peer closes before the live sessions stop."""
    app.state.webrtc = WebRTCPeers.from_settings(app.state.warm.settings.live)
    try:
        yield
    finally:
        await app.state.webrtc.close_all()


router = APIRouter(tags=["live"], lifespan=lifespan)


def _peers(request: Request) -> WebRTCPeers:
    peers = getattr(request.app.state, "webrtc", None)
    if peers is None:
        raise NotReady("WebRTC is not started", hint="run the app with its lifespan (uvicorn does)")
    return peers


@router.get("/live/ice-servers", dependencies=[AuthDep], summary="The ICE servers a WebRTC viewer should use")
async def ice_servers(warm: WarmDep) -> dict[str, list[dict[str, Any]]]:
    """``live.ice_servers`` in the browser's RTCIceServer shape (empty: host candidates only)."""
    servers = [
        {k: v for k, v in {"urls": list(s.urls), "username": s.username, "credential": s.credential}.items()
         if v is not None}
        for s in warm.settings.live.ice_servers
    ]
    return {"ice_servers": servers}


@router.post(
    "/sessions/{session_id}/whep", status_code=201, response_class=Response, responses=_ERRORS,
    dependencies=[AuthDep], summary="WebRTC: SDP offer in, SDP answer out (starts the live session)",
    openapi_extra={"requestBody": {"content": {_SDP: {"schema": {"type": "string"}}}, "required": True}},
)
async def whep(request: Request, warm: WarmDep, session_id: str) -> Response:
    """WHEP-style: the body is the browser's complete (non-trickle) offer; the answer
    carries the server's candidates. ``Location`` names the connection; DELETE it to leave."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != _SDP:
        raise BadInput(f"the offer must be sent as {_SDP}")
    body = await request.body()
    if not body or len(body) > MAX_SDP_BYTES:
        raise BadInput(f"the SDP offer must be 1..{MAX_SDP_BYTES} bytes")
    session = await registry(warm).attach(check_session_id(session_id))
    peer_id, answer = await _peers(request).answer(session, body.decode("utf-8", "replace"))
    location = request.app.url_path_for("whep_close", session_id=session.id, peer_id=peer_id)
    return Response(answer, status_code=201, media_type=_SDP, headers={"Location": str(location)})


@router.delete(
    "/sessions/{session_id}/whep/{peer_id}", status_code=204, response_class=Response, responses=_ERRORS,
    dependencies=[AuthDep], name="whep_close", summary="Close a WebRTC connection",
)
async def whep_close(request: Request, session_id: str, peer_id: str) -> Response:
    peers = _peers(request)
    peers.require(peer_id, session_id)
    await peers.close(peer_id)
    return Response(status_code=204)


@router.websocket("/sessions/{session_id}/mse")
async def mse(websocket: WebSocket, session_id: str) -> None:
    """First a JSON text message ``{"type": "init", "mime": ...}``, then binary fMP4: the
    init segment and a fragment every ``live.mse_fragment_frames`` frames."""
    session = await ws_session(websocket, session_id)
    if session is None:
        return
    subscription = session.subscribe()
    encoder: Fmp4Stream | None = None
    gone = asyncio.create_task(wait_disconnect(websocket))
    try:
        encoder = websocket.app.state.warm.live.open_fmp4(session)  # in this process or an encoder worker
        while not gone.done():
            getter = asyncio.ensure_future(subscription.get())
            await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            pieces = await anyio.to_thread.run_sync(encoder.add, getter.result())
            for i, piece in enumerate(pieces):
                if i == 0 and piece[4:8] == b"ftyp":
                    await websocket.send_json({"type": "init", "mime": encoder.mime})
                await websocket.send_bytes(piece)
    except SessionClosed:
        await websocket.close()
    except MuseTalkWarmError as exc:
        await websocket.send_json({"type": "error", **exc.to_dict()})
        await websocket.close(4400, exc.code)
    except (WebSocketDisconnect, RuntimeError):
        pass  # the viewer left while a piece was on its way
    finally:
        gone.cancel()
        subscription.close()
        if encoder is not None:
            # Even when the handler is cancelled: a pooled stream holds a worker's encoder and shared memory.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(encoder.close)

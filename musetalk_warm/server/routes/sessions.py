"""Sessions: reset, state, clip and session-video downloads (HTTP Range supported)."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import FileResponse

from ...errors import NotFound
from ...sessions.store import SessionState, check_session_id
from ..deps import AuthDep, WarmDep
from ..schemas import ErrorResponse, ResetRequest, ResetResponse, SessionInfo
from ..speaking import SessionURLs
from ..state import Warm

router = APIRouter(tags=["sessions"], dependencies=[AuthDep])
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404)}
_MP4 = "video/mp4"


def _info(state: SessionState, urls: SessionURLs) -> dict[str, Any]:
    return {
        "session_id": state.session_id,
        "avatar_id": state.avatar_id,
        "clips": state.clips,
        "frames": state.frames,
        "duration": round(state.duration_s, 4),
        "next_frame": state.next_frame,
        "session_video_url": urls.video(state.session_id),
        "download_url": urls.download(state.session_id),
    }


def _session_id(warm: Warm, session_id: str | None) -> str:
    return check_session_id(session_id or warm.settings.server.default_session)


async def _reset(request: Request, warm: Warm, session_id: str | None) -> ResetResponse:
    sid = _session_id(warm, session_id)
    async with warm.session_lock(sid):
        state = await anyio.to_thread.run_sync(warm.store.reset, sid)
    policy = warm.settings.server.reset_policy
    return ResetResponse(
        message=f"session {sid} started afresh; the previous one was {'archived' if policy == 'archive' else 'deleted'}",
        **_info(state, SessionURLs(request.app.url_path_for)),
    )


@router.get("/reset", response_model=ResetResponse, responses=_ERRORS, summary="Start the session afresh")
async def reset_get(
    request: Request, warm: WarmDep, session_id: Annotated[str | None, Query()] = None
) -> ResetResponse:
    return await _reset(request, warm, session_id)


@router.post("/reset", response_model=ResetResponse, responses=_ERRORS, summary="Start a session afresh (or create it)")
async def reset_post(
    request: Request, warm: WarmDep, body: Annotated[ResetRequest | None, Body()] = None
) -> ResetResponse:
    return await _reset(request, warm, body.session_id if body else None)


@router.get("/sessions/{session_id}", response_model=SessionInfo, responses=_ERRORS, summary="A session's state")
async def session_info(request: Request, warm: WarmDep, session_id: str) -> SessionInfo:
    # In a worker thread: it waits while a clip of this session is being appended.
    state = await anyio.to_thread.run_sync(warm.store.state, check_session_id(session_id))
    return SessionInfo(**_info(state, SessionURLs(request.app.url_path_for)))


@router.get(
    "/sessions/{session_id}/video",
    name="session_video",
    response_class=FileResponse,
    responses={**_ERRORS, 200: {"content": {_MP4: {}}}, 206: {"content": {_MP4: {}}}},
    summary="The whole session video (seekable plain MP4; ?fragmented=true for the live file)",
)
async def session_video(
    warm: WarmDep, session_id: str, fragmented: Annotated[bool, Query()] = False
) -> FileResponse:
    """The plain export by default: its ``moov`` carries every sample's offset and the
    total duration, so browsers show the length and seek with one range request. The
    fragmented file grows in place and is what a live viewer can tail.
    """
    sid = check_session_id(session_id)
    if fragmented:
        state = await anyio.to_thread.run_sync(warm.store.state, sid)
        path = warm.store.video_path(sid)
        if state.clips == 0 or not path.is_file():
            raise NotFound(f"session {sid!r} has no clips yet", hint="POST /speak first")
    else:
        async with warm.session_lock(sid):
            path = await anyio.to_thread.run_sync(warm.store.export, sid)
    return FileResponse(path, media_type=_MP4)


@router.get(
    "/sessions/{session_id}/clips/{generation}/{index}",
    name="session_clip",
    response_class=FileResponse,
    responses={**_ERRORS, 200: {"content": {_MP4: {}}}, 206: {"content": {_MP4: {}}}},
    summary="One clip of a session generation (1-based); 404 once the session was reset",
)
async def session_clip(warm: WarmDep, session_id: str, generation: str, index: int) -> FileResponse:
    return FileResponse(warm.store.clip_path(check_session_id(session_id), generation, index), media_type=_MP4)


@router.get(
    "/download",
    name="download",
    response_class=FileResponse,
    responses={**_ERRORS, 200: {"content": {_MP4: {}}}},
    summary="The session video as a full_conversation.mp4 attachment",
)
async def download(warm: WarmDep, session_id: Annotated[str | None, Query()] = None) -> FileResponse:
    sid = _session_id(warm, session_id)
    async with warm.session_lock(sid):
        path = await anyio.to_thread.run_sync(warm.store.export, sid)
    return FileResponse(path, media_type=_MP4, filename="full_conversation.mp4")

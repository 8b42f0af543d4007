"""Sessions: reset, state, clip and session-video downloads (HTTP Range supported)."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any
from urllib.parse import urlsplit

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from ...errors import Forbidden, NotFound
from ...sessions.housekeeping import prune_archives
from ...sessions.store import SessionState, check_session_id
from ..bodies import json_body, openapi_json_body
from ..deps import AuthDep, WarmDep
from ..schemas import ErrorResponse, ResetRequest, ResetResponse, SessionInfo
from ..speaking import SessionURLs, check_room_for
from ..state import Warm

router = APIRouter(tags=["sessions"], dependencies=[AuthDep])
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 415, 429)}
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
    server = warm.settings.server
    check_room_for(warm, sid)
    async with warm.session_lock(sid):
        existed = warm.store.exists(sid)
        state = await anyio.to_thread.run_sync(warm.store.reset, sid)
    if not existed:
        message = f"session {sid} created"
    elif server.reset_policy == "archive":
        await anyio.to_thread.run_sync(partial(
            prune_archives, warm.store.root, keep=server.archives_keep,
            max_age_days=server.archives_max_age_days, max_bytes=server.archives_max_bytes,
        ))
        message = f"session {sid} started afresh; the previous one was archived"
    else:
        message = f"session {sid} started afresh; the previous one was deleted"
    return ResetResponse(message=message, previous=existed, **_info(state, SessionURLs.of(request)))


def _same_site(request: Request) -> None:
    """Forbidden for a GET that a browser sent from another site (an image or link on a foreign page).

    Browsers mark every request with Sec-Fetch-Site; clients without it (curl,
    scripts of the original server) are judged by Referer when they send one.
    """
    site = request.headers.get("sec-fetch-site")
    referer = request.headers.get("referer")
    if site is not None:
        foreign = site not in ("same-origin", "none")
    else:
        foreign = referer is not None and urlsplit(referer).netloc.lower() != request.headers.get("host", "").lower()
    if foreign:
        raise Forbidden("GET /reset is refused from another site", hint="use POST /reset")


_RESET_EXAMPLES = {"default session": {}, "named session": {"session_id": "alice"}}


@router.get(
    "/reset",
    response_model=ResetResponse,
    responses=_ERRORS,
    deprecated=True,
    summary="Start the session afresh (for clients of the original server; same-site only; use POST)",
)
async def reset_get(
    request: Request, warm: WarmDep, session_id: Annotated[str | None, Query()] = None
) -> ResetResponse:
    _same_site(request)
    return await _reset(request, warm, session_id)


@router.post(
    "/reset",
    response_model=ResetResponse,
    responses=_ERRORS,
    openapi_extra=openapi_json_body(ResetRequest, _RESET_EXAMPLES, required=False),
    summary="Start a session afresh, or create it (body optional: default session)",
)
async def reset_post(request: Request, warm: WarmDep) -> ResetResponse:
    body = await json_body(request, ResetRequest, optional=True)
    return await _reset(request, warm, body.session_id if body else None)


@router.get("/sessions/{session_id}", response_model=SessionInfo, responses=_ERRORS, summary="A session's state")
async def session_info(request: Request, warm: WarmDep, session_id: str) -> SessionInfo:
    # In a worker thread: it waits while a clip of this session is being appended.
    state = await anyio.to_thread.run_sync(warm.store.state, check_session_id(session_id))
    return SessionInfo(**_info(state, SessionURLs.of(request)))


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

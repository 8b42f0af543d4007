"""Avatars as a resource: upload a video or photo to prepare one, list, inspect, delete.

``POST /avatars`` answers 202 at once; the preparation runs as a job
(:mod:`musetalk_warm.avatars.jobs`) and ``GET /avatars/{id}`` reports its
progress. A ready avatar is usable by ``/speak`` and live sessions straight away.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData, UploadFile

from ...avatars.jobs import PREP_OPTIONS, AvatarJobs, default_avatar_id, upload_name
from ...errors import BadInput, NotFound, NotReady, VideoError
from ..bodies import unsupported
from ..deps import AuthDep, WarmDep
from ..schemas import ErrorResponse
from ..state import Warm

router = APIRouter(tags=["avatars"], dependencies=[AuthDep])
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503)
}
_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "mp4, mov, m4v, mkv or webm video; png, "
                 "jpeg or webp photo; one clearly visible face"},
        "avatar_id": {"type": "string", "description": "default: from the file name"},
        "bbox_shift": {"type": "integer", "description": "px; moves the face box's top edge by twice this"},
        "extra_margin": {"type": "integer", "description": "px added below the chin"},
        "fps": {"type": "integer", "description": "frame rate the video is read at (25, or 30)"},
        "max_frames": {"type": "integer", "description": "use at most this many frames (0: all)"},
    },
}


def _jobs(warm: Warm) -> AvatarJobs:
    warm.require_ready()
    if warm.avatar_jobs is None:
        raise NotReady("avatar preparation is still starting", hint="retry when GET /health reports ready")
    return warm.avatar_jobs


def _describe(jobs: AvatarJobs, avatar_id: str) -> dict[str, Any]:
    """A ready avatar's description, else its newest job's state; NotFound for neither."""
    job = jobs.get(avatar_id)
    if job is not None and job.status != "ready":
        return job.describe()
    try:
        return jobs.library.describe(avatar_id)
    except NotFound:
        raise NotFound(f"unknown avatar {avatar_id!r}", hint="GET /avatars lists them") from None


def _options(form: FormData) -> dict[str, int]:
    options: dict[str, int] = {}
    for key in PREP_OPTIONS:  # every prep option is an integer
        value = form.get(key)
        if not isinstance(value, str) or not value.strip():
            continue
        try:
            options[key] = int(value)
        except ValueError:
            raise BadInput(f"{key} must be an integer, got {value[:20]!r}") from None
    return options


@router.post(
    "/avatars",
    status_code=202,
    responses=_ERRORS,
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _MULTIPART_SCHEMA}}}},
    summary="Upload a video or photo: it is prepared as a new avatar in the background (poll its status URL)",
)
async def create_avatar(request: Request, warm: WarmDep) -> JSONResponse:
    jobs = _jobs(warm)
    content_type = request.headers.get("content-type")
    if not (content_type or "").lower().startswith("multipart/form-data"):
        raise unsupported(content_type, "multipart/form-data")
    form = await request.form(max_files=1, max_fields=len(PREP_OPTIONS) + 1)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise BadInput("send the video or photo in a 'file' field", hint="curl -F file=@me.mp4 ...")
    source_name = upload_name(upload.filename)
    given = form.get("avatar_id")
    avatar_id = given.strip() if isinstance(given, str) and given.strip() else default_avatar_id(source_name)
    job = jobs.create(avatar_id, source_name, _options(form))
    try:
        size = await anyio.to_thread.run_sync(_save, upload, job.source)
        if size == 0:
            raise VideoError("the uploaded file is empty")
    except BaseException:
        jobs.abandon(job)
        raise
    jobs.start(job)
    url = request.url_for("avatar_status", avatar_id=avatar_id).path
    body = {**job.describe(), "status_url": url}
    return JSONResponse(body, status_code=202, headers={"Location": url})


def _save(upload: UploadFile, path: Path) -> int:
    upload.file.seek(0)
    with open(path, "wb") as fh:
        shutil.copyfileobj(upload.file, fh, 1 << 20)
        return fh.tell()


@router.get("/avatars", responses=_ERRORS, summary="Prepared avatars (source, frames, size, models) and jobs in progress")
async def list_avatars(warm: WarmDep) -> dict[str, Any]:
    jobs = _jobs(warm)

    def listing() -> list[dict[str, Any]]:
        ready = jobs.library.ids()
        pending = [job.describe() for job in jobs.unfinished() if job.avatar_id not in ready]
        return [jobs.library.describe(avatar_id) for avatar_id in ready] + pending

    return {"avatars": await anyio.to_thread.run_sync(listing)}


@router.get("/avatars/{avatar_id}", name="avatar_status", responses=_ERRORS,
            summary="An avatar: queued, preparing (with progress), ready (its description) or failed (why)")
async def avatar_status(warm: WarmDep, avatar_id: str) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(_describe, _jobs(warm), avatar_id)


@router.delete("/avatars/{avatar_id}", status_code=204, responses=_ERRORS,
               summary="Delete an avatar (409 while a live session or a render uses it)")
async def delete_avatar(warm: WarmDep, avatar_id: str) -> Response:
    await anyio.to_thread.run_sync(_jobs(warm).delete, avatar_id)
    return Response(status_code=204)

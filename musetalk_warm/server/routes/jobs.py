"""The job API of the web app: POST /chat answers at once; poll /status/{id}; fetch /video/{id}.

Jobs of one session speak in the order they were posted: LLM replies are fetched
in parallel, but each job waits for the previous job of its session before it
takes the session's queue.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from ...errors import MuseTalkWarmError, NotFound
from ...voice.llm import reply
from ..bodies import json_body, openapi_json_body
from ..deps import AuthDep, WarmDep
from ..schemas import ChatRequest, ErrorResponse, JobStatus
from ..speaking import SessionURLs, Utterance, check_utterance, speak_clip
from ..state import Warm

log = logging.getLogger(__name__)
router = APIRouter(tags=["jobs"], dependencies=[AuthDep])
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 415, 422, 429, 503)}
# Finished jobs beyond this many are forgotten, oldest first (unfinished ones never).
_MAX_JOBS = 1000
_FINISHED = ("done", "error")


async def _run(
    warm: Warm, job: JobStatus, body: ChatRequest, urls: SessionURLs, previous: asyncio.Task[None] | None
) -> None:
    """Do the job; the task ends only after the session's previous job, even when this one
    failed early, so a later job waiting on it can never overtake an earlier one."""
    await _work(warm, job, body, urls, previous)
    if previous is not None:
        await asyncio.wait([previous])


async def _work(
    warm: Warm, job: JobStatus, body: ChatRequest, urls: SessionURLs, previous: asyncio.Task[None] | None
) -> None:
    """Reply, wait for the session's previous job, speak; the outcome goes into ``job``.

    The job stays ``queued`` (its LLM reply may arrive meanwhile) until its clip
    holds the session and starts rendering: then it is ``running``.
    """

    def started() -> None:
        job.status = "running"

    try:
        job.reply = await reply(warm.settings.server, job.prompt)
        if previous is not None:
            # Speak after the session's previous job, however that one ended (wait() never raises it).
            await asyncio.wait([previous])
        utterance = Utterance(job.reply, None, body.avatar_id, body.session_id)
        result, clip = await speak_clip(warm, utterance, urls, admitted=True, on_start=started)
    except MuseTalkWarmError as exc:
        job.status, job.error = "error", ErrorResponse(**exc.to_dict())
        return
    except Exception:
        log.exception("job %s failed", job.job_id)
        job.status = "error"
        job.error = ErrorResponse(error="internal_error", message="internal server error; see the server log")
        return
    warm.job_clips[job.job_id] = clip
    job.result, job.video_url, job.status = result, result.clip_url, "done"


def _forget_finished(warm: Warm) -> None:
    """Drop the oldest finished jobs beyond ``_MAX_JOBS``; queued or running ones stay."""
    excess = len(warm.jobs) - _MAX_JOBS
    if excess <= 0:
        return
    finished = [job_id for job_id, job in warm.jobs.items() if job.status in _FINISHED][:excess]
    for job_id in finished:
        del warm.jobs[job_id]
        warm.job_clips.pop(job_id, None)


_CHAT_EXAMPLES = {
    "default session": {"text": "Tell me about yourself."},
    "named session": {"text": "What did I just say?", "session_id": "alice"},
}


@router.post(
    "/chat",
    response_model=JobStatus,
    status_code=202,
    responses=_ERRORS,
    openapi_extra=openapi_json_body(ChatRequest, _CHAT_EXAMPLES),
    summary="Start a reply job: the reply (LLM or echo) is spoken as the session's next clip",
)
async def chat(request: Request, warm: WarmDep) -> JobStatus:
    body = await json_body(request, ChatRequest)
    assert body is not None
    # Text, session and avatar are checked now, so a bad request is a 4xx, not a failed job.
    utterance, session_id = check_utterance(warm, Utterance(body.text, None, body.avatar_id, body.session_id))
    assert utterance.text is not None
    warm.admission.acquire(session_id, warm.settings.server)
    job = JobStatus(job_id=uuid.uuid4().hex, status="queued", prompt=utterance.text)
    warm.jobs[job.job_id] = job
    _forget_finished(warm)
    previous = warm.job_tails.get(session_id)
    task = warm.spawn(_run(warm, job, body, SessionURLs.of(request), previous))
    warm.job_tails[session_id] = task
    task.add_done_callback(lambda done: _job_done(warm, session_id, done))
    return job


def _job_done(warm: Warm, session_id: str, task: asyncio.Task[None]) -> None:
    """Free the job's queue place; forget it as its session's newest, unless a later one took its place."""
    warm.admission.release(session_id)
    if warm.job_tails.get(session_id) is task:
        del warm.job_tails[session_id]


def _job(warm: Warm, job_id: str) -> JobStatus:
    job = warm.jobs.get(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}", hint="jobs are kept in memory until the server restarts")
    return job


@router.get("/status/{job_id}", response_model=JobStatus, responses=_ERRORS, summary="A job's progress")
async def status(warm: WarmDep, job_id: str) -> JobStatus:
    return _job(warm, job_id)


@router.get("/video/{job_id}", response_class=FileResponse, responses=_ERRORS, summary="A finished job's clip")
async def video(warm: WarmDep, job_id: str) -> FileResponse:
    job = _job(warm, job_id)
    path = warm.job_clips.get(job_id)
    if job.result is None or path is None:
        raise NotFound(f"job {job_id!r} has no video ({job.status})", hint="poll /status until it is done")
    if not path.is_file():
        # The clip's name carries its session generation: after a reset it is gone, never replaced.
        raise NotFound(f"the video of job {job_id!r} is gone: its session was reset")
    return FileResponse(path, media_type="video/mp4")

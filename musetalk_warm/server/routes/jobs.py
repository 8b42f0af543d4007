"""The job API of the web app: POST /chat answers at once; poll /status/{id}; fetch /video/{id}."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from ...errors import MuseTalkWarmError, NotFound
from ..deps import AuthDep, WarmDep
from ..schemas import ChatRequest, ErrorResponse, JobStatus
from ..speaking import SessionURLs, Utterance, check_text, speak
from ..state import Warm

log = logging.getLogger(__name__)
router = APIRouter(tags=["jobs"], dependencies=[AuthDep])
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (401, 404, 422)}
# Finished jobs beyond this many are forgotten, oldest first.
_MAX_JOBS = 1000
_LLM_TIMEOUT_S = 60.0


class ReplyError(MuseTalkWarmError):
    """The configured LLM endpoint failed to answer."""

    status_code = 502
    code = "llm_error"


async def _reply(warm: Warm, prompt: str) -> str:
    """The LLM's answer via an OpenAI-compatible chat endpoint, or an echo when none is configured."""
    url = warm.settings.server.llm_url
    if not url:
        return prompt
    base = url.rstrip("/")
    endpoint = f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"
    body = {
        "model": warm.settings.server.llm_model,
        "messages": [
            {"role": "system", "content": "You are a friendly talking avatar. Answer in one to three short sentences."},
            {"role": "user", "content": prompt},
        ],
    }
    try:
        async with httpx.AsyncClient(timeout=_LLM_TIMEOUT_S) as client:
            response = await client.post(endpoint, json=body)
        response.raise_for_status()
        return str(response.json()["choices"][0]["message"]["content"]).strip()
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise ReplyError(f"the LLM endpoint failed ({type(exc).__name__})") from exc


async def _run(warm: Warm, job: JobStatus, body: ChatRequest, urls: SessionURLs) -> None:
    job.status = "running"
    try:
        job.reply = await _reply(warm, job.prompt)
        result = await speak(warm, Utterance(job.reply, None, body.avatar_id, body.session_id), urls)
    except MuseTalkWarmError as exc:
        job.status, job.error = "error", ErrorResponse(**exc.to_dict())
        return
    except Exception:
        log.exception("job %s failed", job.job_id)
        job.status = "error"
        job.error = ErrorResponse(error="internal_error", message="internal server error; see the server log")
        return
    job.result, job.video_url, job.status = result, result.clip_url, "done"


@router.post("/chat", response_model=JobStatus, status_code=202, responses=_ERRORS, summary="Start a reply job")
async def chat(request: Request, warm: WarmDep, body: ChatRequest) -> JobStatus:
    warm.require_ready()
    prompt = check_text(body.text, warm.settings.server.max_text_chars)
    job = JobStatus(job_id=uuid.uuid4().hex, status="queued", prompt=prompt)
    jobs = warm.jobs
    jobs[job.job_id] = job
    while len(jobs) > _MAX_JOBS:
        jobs.popitem(last=False)
    task = asyncio.create_task(_run(warm, job, body, SessionURLs(request.app.url_path_for)))
    warm.tasks.add(task)
    task.add_done_callback(warm.tasks.discard)
    return job


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
    if job.result is None:
        raise NotFound(f"job {job_id!r} has no video ({job.status})", hint="poll /status until it is done")
    path = warm.store.clip_path(job.result.session_id, job.result.clip_index)
    return FileResponse(path, media_type="video/mp4")

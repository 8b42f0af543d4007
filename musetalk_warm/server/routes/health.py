"""Readiness, Prometheus metrics and the web page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, JSONResponse

from ..deps import AuthDep, WarmDep
from ..schemas import HealthResponse
from ..state import Warm

router = APIRouter(tags=["service"])
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


def _health(warm: Warm) -> HealthResponse:
    runtime = warm.runtime
    status = "ok" if warm.ready else ("error" if warm.load_error else "loading")
    return HealthResponse(
        status=status,
        ready=warm.ready,
        renderer=runtime.renderer_name if runtime else None,
        device=runtime.device if runtime else None,
        avatars=runtime.avatar_ids if runtime else [],
        default_avatar=warm.settings.avatar.avatar_id,
        tts=warm.tts.name if warm.tts else None,
        load_seconds=round(warm.load_seconds, 2) if warm.load_seconds is not None else None,
        error=warm.load_error.to_dict() if warm.load_error else None,
    )


@router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "still loading, or loading failed"}},
    summary="Models loaded? Renderer, device, avatars (503 until ready)",
)
async def health(warm: WarmDep) -> JSONResponse:
    body = _health(warm)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/metrics", dependencies=[AuthDep], summary="Prometheus metrics", response_class=Response)
async def metrics(warm: WarmDep) -> Response:
    return Response(warm.metrics.render(), media_type=warm.metrics.content_type)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

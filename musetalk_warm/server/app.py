"""The FastAPI app factory and its lifespan (models, TTS and avatars load once, in the background)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import Settings
from ..errors import MuseTalkWarmError
from ..sessions.store import SessionStore
from .middleware import BodyLimit, RequestContext
from .routes import health, jobs, live, sessions, speak, transports
from .routes.health import STATIC_DIR
from .state import Warm

log = logging.getLogger(__name__)
# Multipart framing around an upload of exactly max_upload_bytes.
_MULTIPART_SLACK = 64 * 1024

SHUTDOWN_GRACE_S = 60.0


def _default_runtime(settings: Settings) -> Any:
    from ..render.runtime import Runtime

    return Runtime.load(settings)


def _default_tts(settings: Settings) -> Any:
    from ..voice.tts import load_tts

    return load_tts(settings.tts)


async def _load(warm: Warm, runtime_factory: Callable[[Settings], Any], tts_factory: Callable[[Settings], Any]) -> None:
    """Load TTS and runtime off the event loop; record a failure for /health instead of dying."""
    t0 = time.perf_counter()
    try:
        tts = await anyio.to_thread.run_sync(tts_factory, warm.settings)
        runtime = await anyio.to_thread.run_sync(runtime_factory, warm.settings)
        live = await _start_live(warm, runtime, tts)
    except MuseTalkWarmError as exc:
        log.error("startup failed: %s", exc)
        warm.load_error = exc
        return
    except Exception as exc:
        log.exception("startup failed")
        warm.load_error = MuseTalkWarmError(f"startup failed ({type(exc).__name__})", hint="see the server log")
        return
    warm.live, warm.tts, warm.runtime = live, tts, runtime
    warm.load_seconds = time.perf_counter() - t0
    warm.metrics.ready.set(1)
    log.info("ready in %.1f s", warm.load_seconds)


async def _start_live(warm: Warm, runtime: Any, tts: Any) -> Any:
    """The live-session registry, its scheduler started and its frame cost measured."""
    from ..live.registry import LiveRegistry

    live = LiveRegistry(warm.settings, runtime, tts, warm.store, metrics=warm.metrics)
    await live.start()
    return live


def create_app(
    settings: Settings,
    *,
    runtime_factory: Callable[[Settings], Any] = _default_runtime,
    tts_factory: Callable[[Settings], Any] = _default_tts,
) -> FastAPI:
    """Build the app. Models load in the background once it starts; /health says when ready.

    ``runtime_factory`` and ``tts_factory`` build the runtime and speech engine
    from the settings (defaults: ``Runtime.load`` and ``load_tts``).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        warm: Warm = app.state.warm
        loader = asyncio.create_task(_load(warm, runtime_factory, tts_factory))
        try:
            yield
        finally:
            loader.cancel()
            if warm.live is not None:
                await warm.live.close()  # stops every live clock and completes its record
            if warm.tasks:
                # Clips in flight (streams, chat jobs) finish and are appended before the models go.
                await asyncio.wait(set(warm.tasks), timeout=SHUTDOWN_GRACE_S)
            pending = [loader, *warm.tasks]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if warm.runtime is not None:
                warm.runtime.close()
            close_tts = getattr(warm.tts, "close", None)
            if close_tts is not None:
                close_tts()

    app = FastAPI(
        title="musetalk-warm",
        summary="A warm MuseTalk v1.5 talking-head server: text or audio in, lip-synced session video out.",
        version="0.1.0",
        lifespan=lifespan,
    )
    warm = Warm(settings=settings, store=SessionStore(settings))
    app.state.warm = warm
    _add_error_handlers(app)
    for router in (speak.router, sessions.router, jobs.router, live.router, transports.router, health.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if settings.server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.server.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(BodyLimit, max_bytes=settings.server.max_upload_bytes + _MULTIPART_SLACK)
    app.add_middleware(RequestContext, metrics=warm.metrics)
    return app


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _error_response(request: Request, status: int, body: dict[str, Any]) -> JSONResponse:
    body["request_id"] = _request_id(request)
    request.app.state.warm.metrics.errors.labels(body["error"]).inc()
    return JSONResponse(body, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MuseTalkWarmError)
    async def _typed(request: Request, exc: MuseTalkWarmError) -> JSONResponse:
        if exc.status_code >= 500:
            log.warning("%s %s -> %s: %s", request.method, request.url.path, exc.status_code, exc)
        response = _error_response(request, exc.status_code, exc.to_dict())
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error_response(request, 422, {"error": "bad_input", "message": "; ".join(parts)})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(request, exc.status_code, {"error": code, "message": str(exc.detail)})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s (request %s)", request.method, request.url.path, _request_id(request))
        response = _error_response(
            request, 500, {"error": "internal_error", "message": "internal server error; see the server log"}
        )
        # This handler runs outside the middleware that stamps the id on responses.
        response.headers["x-request-id"] = _request_id(request) or ""
        return response

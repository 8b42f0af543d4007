"""The FastAPI app factory and its lifespan (models, TTS and avatars load once, in the background)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from ..avatars.jobs import CHILD_MODULES, AvatarJobs, clean_staging
from ..config import Settings
from ..errors import MuseTalkWarmError
from ..live.transports.encoders import WORKER_MODULE as ENCODER_MODULE
from ..media.isolate import preload as preload_in_children
from ..media.isolate import start as start_audio_decoder
from ..sessions.housekeeping import prune_archives
from ..sessions.store import SessionStore
from .deps import require_auth
from .middleware import STATUS_CODES, BodyLimit, ErrorShape, RequestContext, RequestGuard
from .routes import auth, avatars, docs, health, jobs, live, sessions, speak, transports
from .signing import redact_access_log
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
        preload_in_children(*CHILD_MODULES, ENCODER_MODULE)
        await anyio.to_thread.run_sync(start_audio_decoder)  # the first upload pays no start-up
        live = await _start_live(warm, runtime, tts)
        warm.avatar_jobs = _avatar_jobs(warm, runtime)
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


def _avatar_jobs(warm: Warm, runtime: Any) -> AvatarJobs:
    """Avatar preparation jobs whose latents come from the runtime's VAE."""
    encoder, vae_id = runtime.prep_encoder()
    return AvatarJobs(warm.settings, runtime.library, encoder, vae_id, metrics=warm.metrics)


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
            if warm.avatar_jobs is not None:
                await anyio.to_thread.run_sync(warm.avatar_jobs.close)  # a prep child is killed, not awaited
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
        docs_url=None,
        redoc_url=None,
    )
    server = settings.server
    warm = Warm(settings=settings, store=SessionStore(settings))
    clean_staging(settings.avatar.cache_dir)  # what an interrupted avatar preparation left
    if server.reset_policy == "archive":
        prune_archives(warm.store.root, keep=server.archives_keep, max_age_days=server.archives_max_age_days,
                       max_bytes=server.archives_max_bytes)
    app.state.warm = warm
    _add_error_handlers(app)
    for router in (speak.router, avatars.router, sessions.router, jobs.router, live.router, transports.router,
                   health.router, auth.router, docs.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount(docs.ASSETS_URL, docs.assets, name="docs_assets")
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    # Innermost first: the body limit, the JSON error shape (inside CORS, so errors carry
    # CORS headers), CORS, the Host/Origin guard, request ids and metrics outermost.
    app.add_middleware(BodyLimit, max_bytes=server.max_upload_bytes + _MULTIPART_SLACK)
    app.add_middleware(ErrorShape)
    if server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(server.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After", "X-Request-ID", "X-Session-Id"],
        )
    app.add_middleware(RequestGuard)
    app.add_middleware(RequestContext, metrics=warm.metrics)
    redact_access_log()
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI spec; bearer auth is declared (on the routes that check it) only when a token is set."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    if app.state.warm.settings.server.auth_token:
        spec.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "server.auth_token"}
        }
        for route in _flat_routes(app.routes):
            if isinstance(route, APIRoute) and route.include_in_schema and _needs_auth(route.dependant):
                for method in route.methods:
                    spec["paths"][route.path_format][method.lower()]["security"] = [{"bearer": []}]
    app.openapi_schema = spec
    return spec


def _flat_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """The app's routes with included routers opened up (the routers add no path prefixes)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        yield from _flat_routes(included.routes) if included is not None else (route,)


def _needs_auth(dependant: Dependant) -> bool:
    return any(dep.call is require_auth or _needs_auth(dep) for dep in dependant.dependencies)


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _error_response(
    request: Request, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> JSONResponse:
    body["request_id"] = _request_id(request)
    request.app.state.warm.metrics.errors.labels(body["error"]).inc()
    return JSONResponse(body, status_code=status, headers=headers)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (routes are declared one method each)."""
    methods: set[str] = set()
    for route in _flat_routes(request.app.router.routes):
        match, _ = route.matches({**request.scope, "method": ""})
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def _add_error_handlers(app: FastAPI) -> None:
    # Unexpected exceptions are answered by the ErrorShape middleware, which never re-raises.
    @app.exception_handler(MuseTalkWarmError)
    async def _typed(request: Request, exc: MuseTalkWarmError) -> JSONResponse:
        if exc.status_code >= 500:
            log.warning("%s %s -> %s: %s", request.method, request.url.path, exc.status_code, exc)
        return _error_response(request, exc.status_code, exc.to_dict(), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error_response(request, 422, {"error": "bad_input", "message": "; ".join(parts)})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return _error_response(request, exc.status_code, {"error": code, "message": str(exc.detail)}, headers)

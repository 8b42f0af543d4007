"""ASGI middleware: request ids and metrics, Host/Origin checks, one JSON error shape, body size limit.

Order, outermost first (see ``app.py``): RequestContext, RequestGuard, CORS,
ErrorShape, BodyLimit, then the routes.
"""

from __future__ import annotations

import http
import json
import logging
import uuid
from collections.abc import Iterable
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import MuseTalkWarmError, PayloadTooLarge
from ..metrics import Metrics
from .deps import check_host, check_origin

log = logging.getLogger(__name__)

# Any other method string (clients may send anything) is counted as "other", so
# label values stay a small fixed set.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The error code of a response that did not come from a typed error (a framework or Range error).
STATUS_CODES = {
    400: "bad_input", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    413: "payload_too_large", 415: "unsupported_media_type", 416: "range_not_satisfiable",
    422: "bad_input", 429: "too_many_requests", 500: "internal_error",
}
_INTERNAL = "internal server error; see the server log"


def error_body(scope: Scope, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` plus the request id; counts the error in the app's metrics."""
    body["request_id"] = scope.get("state", {}).get("request_id")
    app = scope.get("app")
    if app is not None:
        app.state.warm.metrics.errors.labels(body["error"]).inc()
    return body


async def send_error(
    scope: Scope, send: Send, status: int, body: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Send a complete JSON error response (the one shape: error, message, hint?, request_id)."""
    payload = json.dumps(error_body(scope, body)).encode()
    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-length")]
    await send({
        "type": "http.response.start", "status": status,
        "headers": [*kept, (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
    })
    await send({"type": "http.response.body", "body": payload})


class RequestContext:
    """Give each request an id (``X-Request-ID``) and count it by route and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            # The route template, not the raw path, keeps label cardinality bounded.
            name = getattr(route, "path", "unmatched")
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.requests.labels(name, method, str(status)).inc()


class RequestGuard:
    """Refuse HTTP requests and WebSocket handshakes whose Host or Origin is not allowed (403)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            conn = HTTPConnection(scope)
            server = scope["app"].state.warm.settings.server
            try:
                check_host(conn, server)
                check_origin(conn, server)
            except MuseTalkWarmError as exc:
                log.warning("refused %s %s: %s", scope["type"], scope["path"], exc.message)
                if scope["type"] == "websocket":
                    # Closing before accepting makes the server answer the handshake with 403.
                    await send({"type": "websocket.close", "code": 1008, "reason": exc.code})
                else:
                    await send_error(scope, send, exc.status_code, exc.to_dict())
                return
        await self.app(scope, receive, send)


class ErrorShape:
    """Every error response is JSON, and an unexpected exception is a clean 500.

    Non-JSON error responses (Range errors, framework errors) are rewritten into
    the JSON shape with their headers kept. An exception is logged and answered
    with a 500 here, never re-raised: the server then keeps the connection alive.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        held: Message | None = None  # the start of a non-JSON error response, until its body is read
        chunks: list[bytes] = []

        async def shaped(message: Message) -> None:
            nonlocal started, held
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400 and not _is_json(message.get("headers", [])):
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                status = held["status"]
                text = b"".join(chunks).decode("utf-8", "replace").strip()[:300]
                body = {"error": STATUS_CODES.get(status, "http_error"), "message": text or _phrase(status)}
                await send_error(scope, send, status, body, held.get("headers", []))
                return
            await send(message)

        try:
            await self.app(scope, receive, shaped)
        except Exception:
            log.exception("unhandled error in %s %s (request %s)", scope["method"], scope["path"],
                          scope.get("state", {}).get("request_id"))
            if not started:
                await send_error(scope, send, 500, {"error": "internal_error", "message": _INTERNAL})
            # A response already under way ends here; the server closes that connection.


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    for key, value in headers:
        if key.lower() == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return False


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase.lower()
    except ValueError:
        return "error"


class _TooLarge(Exception):
    """Raised into the app when the body passes the limit; the app's own answer is replaced."""


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, declared or chunked, on every route.

    The body is counted as the app reads it (never buffered here). Once the
    limit is passed, whatever the app answers instead is dropped and a 413 is sent.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                await send_error(scope, send, 413, _error(limit).to_dict())
                return
        seen = 0
        exceeded = started = False

        async def counted() -> Message:
            nonlocal seen, exceeded
            if exceeded:
                raise _TooLarge
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to a cut-off body (a parse error, a 500) is replaced
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await send_error(scope, send, 413, _error(limit).to_dict())


def _error(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"request body is larger than {limit / 1e6:.1f} MB",
        hint="send a shorter audio file or raise server.max_upload_bytes",
    )

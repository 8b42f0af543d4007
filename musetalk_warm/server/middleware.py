"""ASGI middleware: request ids, request metrics, body size limit."""

from __future__ import annotations

import uuid

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import PayloadTooLarge
from ..metrics import Metrics

# Any other method string (clients may send anything) is counted as "other", so
# label values stay a small fixed set.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


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


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (413) without reading them into memory."""

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
                await _too_large(scope, receive, send, limit)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _error(limit)
            return message

        await self.app(scope, counted, send)


def _error(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"request body is larger than {limit / 1e6:.1f} MB",
        hint="send a shorter audio file or raise server.max_upload_bytes",
    )


async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    body = _error(limit).to_dict()
    body["request_id"] = scope.get("state", {}).get("request_id")
    await JSONResponse(body, status_code=413)(scope, receive, send)

"""Typed dependencies and request checks: the app's state, auth, Host and Origin allow-lists.

Every check takes a Starlette ``HTTPConnection``, so the same function guards
HTTP routes and WebSocket routes.
"""

from __future__ import annotations

import secrets
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, WebSocketException, status
from starlette.requests import HTTPConnection

from ..config import ServerSettings
from ..errors import Forbidden, Unauthorized
from .signing import COOKIE, Signer
from .state import Warm

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_ANY_ADDRESS = ("0.0.0.0", "::", "")


def get_warm(conn: HTTPConnection) -> Warm:
    return conn.app.state.warm


WarmDep = Annotated[Warm, Depends(get_warm)]


def signer(server: ServerSettings) -> Signer | None:
    """The cookie and URL signer, or None when no token is configured (no auth)."""
    return Signer(server) if server.auth_token else None


def authorized(conn: HTTPConnection, server: ServerSettings) -> bool:
    """True when no token is configured, or the connection carries a valid credential.

    Credentials: ``Authorization: Bearer <token>``; the login cookie set by
    ``POST /auth``; for GET/HEAD, a signed URL (``exp`` and ``sig`` parameters).
    """
    expected = server.auth_token
    if not expected:
        return True
    scheme, _, given = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and given:
        return secrets.compare_digest(given.strip().encode(), expected.encode())
    sign = Signer(server)
    cookie = conn.cookies.get(COOKIE)
    if cookie and sign.check_cookie(cookie):
        return True
    method = conn.scope.get("method", "GET")
    return method in ("GET", "HEAD") and sign.check_url(conn.url.path, conn.query_params.multi_items())


def require_auth(conn: HTTPConnection, warm: WarmDep) -> None:
    """Refuse a connection without a valid credential: 401 for HTTP, close 1008 for a WebSocket."""
    if authorized(conn, warm.settings.server):
        return
    if conn.scope["type"] == "websocket":
        raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION, reason="unauthorized")
    hint = "send Authorization: Bearer <token> (browsers: POST /auth once for a cookie)"
    if "access_token" in conn.query_params:
        hint = "tokens in URLs are not accepted; " + hint
    raise Unauthorized("a valid bearer token is required", hint=hint)


AuthDep = Depends(require_auth)


def host_name(netloc: str) -> str:
    """The host of ``host[:port]`` (IPv6 in brackets), lower-cased."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:].partition("]")[0]
    return netloc.rpartition(":")[0] if netloc.count(":") == 1 else netloc


def allowed_hosts(server: ServerSettings) -> frozenset[str]:
    """Loopback names, the bind host (unless it is a wildcard address) and ``server.allowed_hosts``."""
    names = {*LOOPBACK_HOSTS, *(h.lower() for h in server.allowed_hosts)}
    if server.host not in _ANY_ADDRESS:
        names.add(server.host.lower())
    return frozenset(names)


def check_host(conn: HTTPConnection, server: ServerSettings) -> None:
    """Forbidden unless the Host header names this server (guards against DNS rebinding)."""
    hosts = allowed_hosts(server)
    if "*" in hosts:
        return
    host = host_name(conn.headers.get("host", ""))
    if host not in hosts:
        raise Forbidden(
            f"host {host!r} is not served here",
            hint="add it to server.allowed_hosts (loopback and server.host are allowed by default)",
        )


def check_origin(conn: HTTPConnection, server: ServerSettings) -> None:
    """Forbidden when a browser sends the request from a foreign page.

    Allowed: no Origin header (not a browser), the page's own origin (same
    host and port as the Host header), or an origin listed in ``server.cors_origins``.
    """
    origin = conn.headers.get("origin")
    if origin is None or origin in server.cors_origins:
        return
    parts = urlsplit(origin)
    if parts.scheme in ("http", "https") and parts.netloc.lower() == conn.headers.get("host", "").lower():
        return
    raise Forbidden(
        f"requests from origin {origin!r} are not accepted",
        hint="use the page served by this server, or add the origin to server.cors_origins",
    )

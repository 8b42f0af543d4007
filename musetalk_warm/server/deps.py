"""Typed dependencies: the app's state, the ready runtime, bearer-token auth."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..errors import Unauthorized
from .state import Warm

_bearer = HTTPBearer(auto_error=False, description="server.auth_token, when configured")


def get_warm(request: Request) -> Warm:
    return request.app.state.warm


WarmDep = Annotated[Warm, Depends(get_warm)]


def require_auth(
    warm: WarmDep,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Check ``Authorization: Bearer <server.auth_token>`` when a token is configured.

    ``?access_token=`` is accepted too, because a ``<video src>`` cannot send headers.
    """
    expected = warm.settings.server.auth_token
    if not expected:
        return
    given = credentials.credentials if credentials else request.query_params.get("access_token")
    if not given or not secrets.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("a valid bearer token is required", hint="send Authorization: Bearer <token>")


AuthDep = Depends(require_auth)

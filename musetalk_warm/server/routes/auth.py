"""Browser login: POST the token once for an HttpOnly cookie; media URLs then work in <video>."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request, Response

from ...errors import Unauthorized
from ..bodies import json_body, openapi_json_body
from ..deps import WarmDep, authorized, signer
from ..schemas import AuthRequest, AuthStatus, ErrorResponse
from ..signing import COOKIE

router = APIRouter(tags=["auth"])
_ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 415, 422)}


@router.get("/auth", response_model=AuthStatus, summary="Does the server need a token; is this request logged in?")
async def auth_status(request: Request, warm: WarmDep) -> AuthStatus:
    server = warm.settings.server
    return AuthStatus(required=bool(server.auth_token), authenticated=authorized(request, server))


@router.post(
    "/auth",
    response_model=AuthStatus,
    responses=_ERRORS,
    openapi_extra=openapi_json_body(AuthRequest, {"login": {"token": "s3cret"}}),
    summary="Log a browser in: sets an HttpOnly, SameSite=Strict, signed, short-lived cookie",
)
async def login(request: Request, response: Response, warm: WarmDep) -> AuthStatus:
    body = await json_body(request, AuthRequest)
    assert body is not None
    server = warm.settings.server
    sign = signer(server)
    if sign is None:
        return AuthStatus(required=False, authenticated=True)
    assert server.auth_token is not None
    if not secrets.compare_digest(body.token.encode(), server.auth_token.encode()):
        raise Unauthorized("wrong token", hint="the token is server.auth_token")
    response.set_cookie(
        COOKIE, sign.cookie(), max_age=sign.cookie_seconds, path="/", httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )
    return AuthStatus(required=True, authenticated=True, expires_in=sign.cookie_seconds)


@router.delete("/auth", response_model=AuthStatus, responses=_ERRORS, summary="Log a browser out (clears the cookie)")
async def logout(response: Response, warm: WarmDep) -> AuthStatus:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return AuthStatus(required=bool(warm.settings.server.auth_token), authenticated=False)

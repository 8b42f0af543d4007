"""Credentials besides the bearer header: the page's login cookie, signed media URLs; log redaction.

Both are an expiry time plus an HMAC-SHA256 over it, keyed by a key derived from
``server.auth_token``: changing the token revokes every cookie and URL, and no
state is kept on the server.
"""

from __future__ import annotations

import hashlib
import logging
import hmac
import time
from urllib.parse import parse_qsl, urlencode

from ..config import ServerSettings

COOKIE = "musetalk_auth"
SIG, EXP = "sig", "exp"
# Query parameter names redacted from access logs (credentials, old and new).
SECRET_PARAMS = frozenset({SIG, "access_token", "token", "api_key", "key"})


class Signer:
    """Issues and checks login cookies and signed URLs for one token."""

    def __init__(self, server: ServerSettings) -> None:
        assert server.auth_token, "signing needs server.auth_token"
        self._key = hmac.new(server.auth_token.encode(), b"musetalk-warm signing key v1", hashlib.sha256).digest()
        self.cookie_seconds = server.auth_cookie_seconds
        self.url_seconds = server.signed_url_seconds

    def _mac(self, message: str) -> str:
        return hmac.new(self._key, message.encode(), hashlib.sha256).hexdigest()

    def _valid(self, message: str, exp: str, sig: str) -> bool:
        if not exp.isdigit() or int(exp) < time.time():
            return False
        return hmac.compare_digest(self._mac(message), sig)

    def cookie(self) -> str:
        """A login cookie value valid for ``auth_cookie_seconds``."""
        exp = str(int(time.time()) + self.cookie_seconds)
        return f"{exp}.{self._mac(f'cookie:{exp}')}"

    def check_cookie(self, value: str) -> bool:
        exp, _, sig = value.partition(".")
        return self._valid(f"cookie:{exp}", exp, sig)

    def sign_url(self, url: str) -> str:
        """``url`` (a path with an optional query) plus ``exp`` and ``sig``, valid for GET/HEAD."""
        path, _, query = url.partition("?")
        params = [*parse_qsl(query, keep_blank_values=True), (EXP, str(int(time.time()) + self.url_seconds))]
        return f"{path}?{urlencode(params)}&{SIG}={self._mac(_canonical(path, params))}"

    def check_url(self, path: str, params: list[tuple[str, str]]) -> bool:
        """True when ``params`` hold a valid, unexpired signature of ``path`` and the other params."""
        sigs = [value for key, value in params if key == SIG]
        exps = [value for key, value in params if key == EXP]
        if len(sigs) != 1 or len(exps) != 1:
            return False
        rest = [(key, value) for key, value in params if key != SIG]
        return self._valid(_canonical(path, rest), exps[0], sigs[0])


def _canonical(path: str, params: list[tuple[str, str]]) -> str:
    return f"url:{path}?{urlencode(sorted(params))}"


def redact_query(target: str) -> str:
    """A request target with the values of credential-like query parameters replaced."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    params = parse_qsl(query, keep_blank_values=True)
    if not any(key.lower() in SECRET_PARAMS for key, _ in params):
        return target
    clean = [(key, "REDACTED" if key.lower() in SECRET_PARAMS else value) for key, value in params]
    return f"{path}?{urlencode(clean)}"


class RedactCredentials(logging.Filter):
    """Blank credential-like query values in uvicorn access-log lines (headers are never logged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def redact_access_log() -> None:
    """Install :class:`RedactCredentials` on uvicorn's access logger (once per process)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactCredentials) for f in logger.filters):
        logger.addFilter(RedactCredentials())

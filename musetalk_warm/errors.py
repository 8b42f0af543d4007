"""Typed errors that carry a user-facing message and an HTTP status.

Every failure a user can cause or fix is raised as one of these, so the CLI
prints one clear line and the server answers JSON (never a traceback or an
absolute path).
"""

from __future__ import annotations


class MuseTalkWarmError(Exception):
    """Base class: ``message`` is safe to show a user, ``hint`` says what to do."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def to_dict(self) -> dict[str, str]:
        """JSON body for an HTTP error response."""
        body = {"error": self.code, "message": self.message}
        if self.hint:
            body["hint"] = self.hint
        return body

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(MuseTalkWarmError):
    """A setting is unknown or has a bad value."""

    status_code = 400
    code = "bad_config"


class BadInput(MuseTalkWarmError):
    """A request's payload cannot be used."""

    status_code = 400
    code = "bad_input"


class AudioError(BadInput):
    """Uploaded audio is empty, too short, corrupt or not audio."""

    status_code = 422
    code = "bad_audio"


class VideoError(BadInput):
    """An uploaded avatar source is not a readable video or image in a supported format, or too long."""

    status_code = 422
    code = "bad_video"


class TextError(BadInput):
    """Text to speak is empty or too long."""

    status_code = 422
    code = "bad_text"


class PayloadTooLarge(BadInput):
    """An upload or body is over the configured limit."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(BadInput):
    """A request body is not in a content type the route accepts."""

    status_code = 415
    code = "unsupported_media_type"


class Forbidden(MuseTalkWarmError):
    """A request from a host or origin the server does not accept."""

    status_code = 403
    code = "forbidden"


class TooManyRequests(MuseTalkWarmError):
    """A configured limit (sessions, queued clips) is reached; ``retry_after`` says when to retry."""

    status_code = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, hint: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.headers = {"Retry-After": str(retry_after)} if retry_after else {}


class NotFound(MuseTalkWarmError):
    """An avatar, session, clip or job does not exist."""

    status_code = 404
    code = "not_found"


class Conflict(MuseTalkWarmError):
    """The request clashes with the current state: an id taken, an avatar in use."""

    status_code = 409
    code = "conflict"


class AvatarCacheError(MuseTalkWarmError):
    """An avatar cache is missing, stale or unreadable."""

    status_code = 409
    code = "avatar_cache"


class FaceNotFound(BadInput):
    """No face could be found in the avatar source."""

    status_code = 422
    code = "face_not_found"


class WeightsMissing(MuseTalkWarmError):
    """A model weight file is absent: the message names it and how to fetch it."""

    status_code = 503
    code = "weights_missing"


class DependencyMissing(MuseTalkWarmError):
    """An optional extra or a system tool (ffmpeg, espeak-ng) is not installed."""

    status_code = 503
    code = "dependency_missing"


class MediaError(MuseTalkWarmError):
    """Encoding, muxing or appending video failed."""

    status_code = 500
    code = "media_error"


class TTSError(MuseTalkWarmError):
    """The speech engine failed to synthesise."""

    status_code = 502
    code = "tts_error"


class ResourceExhausted(MuseTalkWarmError):
    """The accelerator ran out of memory even at the smallest batch."""

    status_code = 503
    code = "resource_exhausted"


class Overloaded(MuseTalkWarmError):
    """Live speech would exceed the measured frame capacity; ``retry_after`` seconds is a fair wait."""

    status_code = 503
    code = "overloaded"

    def __init__(self, message: str, *, hint: str | None = None, retry_after: int = 2) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after)}


class NotReady(MuseTalkWarmError):
    """The models are still loading (or failed to load)."""

    status_code = 503
    code = "not_ready"


class Unauthorized(MuseTalkWarmError):
    """A bearer token is required and was missing or wrong."""

    status_code = 401
    code = "unauthorized"
    headers = {"WWW-Authenticate": 'Bearer realm="musetalk-warm"'}

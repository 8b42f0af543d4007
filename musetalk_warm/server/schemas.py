"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import BlendMode


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpeakRequest(_Body):
    """Text for the avatar to say (JSON body of ``POST /speak``)."""

    text: str = Field(description="what to say; spoken by the configured TTS engine")
    avatar_id: str | None = Field(None, description="a loaded avatar; default: the session's or the configured one")
    session_id: str | None = Field(None, description="a session id, created on first use; default: the default session")
    blend_mode: BlendMode | None = Field(None, description="paste-back for this clip; default: render.blend_mode")


class SpeakResponse(BaseModel):
    """A clip appended to a session."""

    status: Literal["success"] = "success"
    message: str
    session_id: str
    clip_index: int = Field(description="1-based number of this clip in its session")
    clip_url: str
    session_video_url: str
    video_path: str = Field(description="the session video's URL (compatibility with the original server)")
    download_url: str
    duration: float = Field(description="clip duration in seconds (padded to the clip quantum)")
    frames: int
    start_frame: int = Field(description="avatar cycle position of the clip's first frame")
    next_frame: int = Field(description="avatar cycle position the next clip starts at")
    session_duration: float
    session_clips: int
    timings: dict[str, float] = Field(
        description="seconds per stage: tts, audio, features, render, encode, write, append, total"
    )


class ResetRequest(_Body):
    session_id: str | None = Field(None, description="session to reset; default: the default session")


class SessionInfo(BaseModel):
    """A session's committed state."""

    session_id: str
    avatar_id: str | None
    clips: int
    frames: int
    duration: float
    next_frame: int
    session_video_url: str
    download_url: str


class ResetResponse(SessionInfo):
    status: Literal["success"] = "success"
    message: str
    previous: bool = Field(description="whether a session of this id existed (and was archived or deleted)")


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "error"]
    ready: bool
    renderer: str | None = None
    device: str | None = None
    avatars: list[str] = []
    default_avatar: str
    tts: str | None = None
    load_seconds: float | None = None
    error: dict[str, str] | None = None


class ErrorResponse(BaseModel):
    error: str
    message: str
    hint: str | None = None
    request_id: str | None = None


class ChatRequest(_Body):
    """The JSON body of ``POST /chat``."""

    text: str = Field(description="the user's message; the reply (LLM, or the message itself) is spoken by the avatar")
    session_id: str | None = Field(None, description="a session id, created on first use; default: the default session")
    avatar_id: str | None = Field(None, description="a loaded avatar; default: the session's or the configured one")


class AuthRequest(_Body):
    """The JSON body of ``POST /auth``."""

    token: str = Field(description="server.auth_token")


class AuthStatus(BaseModel):
    required: bool = Field(description="whether the server needs a token (server.auth_token is set)")
    authenticated: bool = Field(description="whether this request carried a valid credential")
    expires_in: int | None = Field(None, description="seconds the login cookie just set stays valid")


class JobStatus(BaseModel):
    job_id: str
    status: Literal["queued", "running", "done", "error"] = Field(
        description="queued: waiting (for the LLM reply, the session's earlier clips or the renderer); "
        "running: its clip is rendering; done or error"
    )
    prompt: str
    reply: str | None = None
    video_url: str | None = None
    result: SpeakResponse | None = None
    error: ErrorResponse | None = None

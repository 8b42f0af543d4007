"""POST /speak: text (JSON) or an audio upload (multipart) → the session's next clip."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from ...render.blend import BLEND_MODES
from ...errors import AudioError, BadInput
from ..bodies import is_json, parse_json, unsupported
from ..deps import AuthDep, WarmDep
from ..schemas import ErrorResponse, SpeakRequest, SpeakResponse
from ..speaking import SessionURLs, Utterance, speak, speak_stream

router = APIRouter(tags=["speak"], dependencies=[AuthDep])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 422, 429, 502, 503)
}
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_MULTIPART_SCHEMA = {
    "type": "object",
    "properties": {
        "audio": {"type": "string", "format": "binary", "description": "wav, mp3, ogg, webm, m4a, any rate"},
        "text": {"type": "string", "description": "used when no audio file is sent"},
        "avatar_id": {"type": "string"},
        "session_id": {"type": "string", "description": "created on first use; default: the default session"},
        "blend_mode": {"type": "string", "enum": list(BLEND_MODES)},
    },
}
_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": SpeakRequest.model_json_schema(),
                "examples": {
                    "text": {"value": {"text": "Hello! Nice to meet you."}},
                    "named session": {"value": {"text": "Hi Alice.", "session_id": "alice"}},
                },
            },
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
        },
    }
}


async def _from_form(request: Request) -> Utterance:
    form = await request.form(max_files=1, max_fields=8)
    fields: dict[str, str | None] = {}
    for key in ("text", "avatar_id", "session_id", "blend_mode"):
        value = form.get(key)
        fields[key] = value if isinstance(value, str) and value.strip() else None
    if fields["blend_mode"] not in (None, *BLEND_MODES):
        raise BadInput(f"blend_mode must be one of {', '.join(BLEND_MODES)}, got {fields['blend_mode']!r}")
    if "audio" not in form and isinstance(form.get("file"), UploadFile):
        raise BadInput("the upload field is called 'audio', not 'file'", hint="curl -F audio=@speech.wav ...")
    upload = form.get("audio")
    if isinstance(upload, UploadFile):
        data = await upload.read()
        if not data:
            raise AudioError("the uploaded audio file is empty")
        return Utterance(None, data, fields["avatar_id"], fields["session_id"], fields["blend_mode"])
    if fields["text"] is None:
        raise BadInput("send an audio file in the 'audio' field or a 'text' field")
    return Utterance(fields["text"], None, fields["avatar_id"], fields["session_id"], fields["blend_mode"])


async def _from_json(request: Request) -> Utterance:
    body = parse_json(SpeakRequest, await request.body())
    return Utterance(body.text, None, body.avatar_id, body.session_id, body.blend_mode)


@router.post(
    "/speak",
    response_model=SpeakResponse,
    responses=_ERRORS,
    openapi_extra=_OPENAPI_BODY,
    summary="Say text (JSON) or an uploaded audio file (multipart) as the session's next clip",
)
async def speak_route(request: Request, warm: WarmDep) -> SpeakResponse:
    return await speak(warm, await _utterance(request), SessionURLs.of(request))


@router.post(
    "/speak/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"video/mp4": {}}, "description": "fragmented MP4, sent as it renders"}, **_ERRORS},
    openapi_extra=_OPENAPI_BODY,
    summary="Like /speak, but the clip streams back as fragmented MP4 while it renders",
)
async def speak_stream_route(request: Request, warm: WarmDep) -> StreamingResponse:
    body, session_id = await speak_stream(warm, await _utterance(request))
    return StreamingResponse(
        body, media_type="video/mp4", headers={"X-Session-Id": session_id, "Cache-Control": "no-store"}
    )


async def _utterance(request: Request) -> Utterance:
    content_type = request.headers.get("content-type")
    if content_type and content_type.lower().startswith(_FORM_TYPES):
        return await _from_form(request)
    if is_json(content_type):
        return await _from_json(request)
    raise unsupported(content_type, "application/json, multipart/form-data or application/x-www-form-urlencoded")

"""JSON request bodies read by the routes themselves, after auth (FastAPI would read them first).

A JSON route refuses any other content type with 415, so a cross-site form
cannot pass for an API call.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from ..errors import UnsupportedMediaType

M = TypeVar("M", bound=BaseModel)


def is_json(content_type: str | None) -> bool:
    """``application/json`` or ``application/*+json``, with any parameters."""
    if not content_type:
        return False
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def unsupported(content_type: str | None, accepted: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"content type {content_type or '(none)'!r} is not accepted here",
        hint=f"send {accepted}",
    )


async def json_body(request: Request, model: type[M], *, optional: bool = False) -> M | None:
    """The request's JSON body validated as ``model``; None for an empty body when ``optional``.

    Raises UnsupportedMediaType (415) for a non-JSON content type and
    RequestValidationError (422) for JSON that does not fit the model.
    """
    content_type = request.headers.get("content-type")
    if not is_json(content_type):
        if optional and not await request.body():
            return None
        raise unsupported(content_type, "Content-Type: application/json")
    raw = await request.body()
    if optional and not raw.strip():
        return None
    return parse_json(model, raw)


def parse_json(model: type[M], raw: bytes) -> M:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None


def openapi_json_body(model: type[BaseModel], examples: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as the route's JSON body, with named examples."""
    return {
        "requestBody": {
            "required": required,
            "content": {
                "application/json": {
                    "schema": model.model_json_schema(),
                    "examples": {name: {"value": value} for name, value in examples.items()},
                }
            },
        }
    }

"""Replies from an OpenAI-compatible chat endpoint: whole, or streamed (server-sent events)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from ..config import ServerSettings
from ..errors import MuseTalkWarmError
from .tts import openai_endpoint

SYSTEM_PROMPT = "You are a friendly talking avatar. Answer in one to three short sentences."
_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
_WHOLE_TIMEOUT_S = 60.0


class ReplyError(MuseTalkWarmError):
    """The configured LLM endpoint failed to answer."""

    status_code = 502
    code = "llm_error"


def _request(server: ServerSettings, prompt: str, *, stream: bool) -> tuple[str, dict[str, str], dict[str, object]]:
    """Endpoint, headers and body of a chat completion for ``prompt``."""
    assert server.llm_url
    headers = {"Authorization": f"Bearer {server.llm_api_key}"} if server.llm_api_key else {}
    body: dict[str, object] = {
        "model": server.llm_model,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
    }
    if stream:
        body["stream"] = True
    return openai_endpoint(server.llm_url, "chat/completions"), headers, body


async def reply(server: ServerSettings, prompt: str) -> str:
    """The whole reply to ``prompt``; the prompt itself without an LLM."""
    if not server.llm_url:
        return prompt
    endpoint, headers, body = _request(server, prompt, stream=False)
    try:
        async with httpx.AsyncClient(timeout=_WHOLE_TIMEOUT_S, headers=headers) as client:
            response = await client.post(endpoint, json=body)
        response.raise_for_status()
        return str(response.json()["choices"][0]["message"]["content"]).strip()
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise ReplyError(f"the LLM endpoint failed ({type(exc).__name__})") from exc


async def stream_reply(
    server: ServerSettings, prompt: str, *, transport: httpx.AsyncBaseTransport | None = None
) -> AsyncIterator[str]:
    """The reply to ``prompt`` in pieces as the endpoint streams them; the prompt itself without an LLM."""
    if not server.llm_url:
        yield prompt
        return
    endpoint, headers, body = _request(server, prompt, stream=True)
    try:
        async with httpx.AsyncClient(timeout=_TIMEOUT, headers=headers, transport=transport) as client:
            async with client.stream("POST", endpoint, json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    piece = _delta(line)
                    if piece is None:
                        return
                    if piece:
                        yield piece
    except httpx.HTTPError as exc:
        raise ReplyError(f"the LLM endpoint failed ({type(exc).__name__})") from exc


def _delta(line: str) -> str | None:
    """The text of one SSE line ('' for none), or None at ``data: [DONE]``."""
    if not line.startswith("data:"):
        return ""
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    try:
        choice = json.loads(data)["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ReplyError("the LLM endpoint sent an unreadable stream event") from exc
    content = (choice.get("delta") or {}).get("content")
    return content if isinstance(content, str) else ""

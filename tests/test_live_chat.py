"""Streamed replies: sentence splitting, and /chat against a real local OpenAI-compatible SSE server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from musetalk_warm.server.app import create_app
from musetalk_warm.voice.sentences import SentenceSplitter, split_sentences
from test_live_api import _events_until, live_settings
from test_server import wait_ready

REPLY = ["Sure", ", Dr. Smith. It costs 3", ".50 today", "! Anything else", "?"]


def test_sentences_split_at_ends_not_abbreviations_or_numbers() -> None:
    assert split_sentences("Hello there. Mr. Smith paid 3.50 dollars! Is it?\nYes") == [
        "Hello there.", "Mr. Smith paid 3.50 dollars!", "Is it?", "Yes",
    ]
    assert split_sentences("  ...  ") == []
    splitter = SentenceSplitter()
    out = [s for piece in REPLY for s in splitter.feed(piece)]
    assert out == ["Sure, Dr. Smith.", "It costs 3.50 today!"]  # complete as soon as the next word starts
    assert splitter.flush() == ["Anything else?"]
    long = "word " * 100
    parts = split_sentences(long, max_chars=60)
    assert all(len(p) <= 60 for p in parts) and " ".join(parts) == long.strip()


class _FakeLLM(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that streams REPLY as server-sent events."""

    requests: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in REPLY:
            event = {"choices": [{"index": 0, "delta": {"content": piece}}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.05)
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def llm_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_chat_streams_the_reply_into_the_live_queue(tmp_path: Path, llm_url: str) -> None:
    settings = live_settings(tmp_path)
    settings = settings.model_copy(update={"server": settings.server.model_copy(
        update={"llm_url": llm_url, "llm_model": "fake-model", "llm_api_key": "sk-test"})})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        client.post("/sessions/chat/live")
        with client.websocket_connect("/sessions/chat/events") as ws:
            response = client.post("/sessions/chat/chat", json={"text": "How much is it?"})
            assert response.status_code == 202, response.text
            spoken = []
            while len(spoken) < 3:
                spoken.append(_events_until(ws, "utterance", "started")[-1]["text"])
    assert spoken == ["Sure, Dr. Smith.", "It costs 3.50 today!", "Anything else?"]
    request = _FakeLLM.requests[-1]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["stream"] is True and request["body"]["model"] == "fake-model"
    assert request["body"]["messages"][-1] == {"role": "user", "content": "How much is it?"}

"""Every error is the one JSON shape; a 500 keeps the connection; credentials stay out of the access log.

The keep-alive and log checks run against a real uvicorn server on a free port.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from test_server import lite_settings, wait_ready
from test_server_concurrency import _free_port

from musetalk_warm.server import create_app

ORIGIN = "http://app.example"
TOKEN = "log-secret-token"


def _shape(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    assert set(body) <= {"error", "message", "hint", "request_id"}
    assert body["error"] == code and body["message"] and body["request_id"] == response.headers["x-request-id"]
    return body


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("errors")
    settings = lite_settings(root, cors_origins=[ORIGIN], max_upload_bytes=4096)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def test_range_errors_are_json(client: TestClient) -> None:
    reply = client.post("/speak", json={"text": "Ranges."}).json()
    size = len(client.get(reply["clip_url"]).content)
    unsatisfiable = client.get(reply["clip_url"], headers={"Range": f"bytes={size + 10}-"})
    _shape(unsatisfiable, 416, "range_not_satisfiable")
    assert unsatisfiable.headers["content-range"] == f"bytes */{size}"
    _shape(client.get(reply["clip_url"], headers={"Range": "bytes=9-3"}), 400, "bad_input")
    _shape(client.get(reply["clip_url"], headers={"Range": "pages=1-2"}), 400, "bad_input")
    _shape(client.get("/static/nope.js"), 404, "not_found")


def test_405_lists_every_allowed_method(client: TestClient) -> None:
    assert _shape(client.put("/sessions/default"), 405, "method_not_allowed")
    assert client.put("/sessions/default").headers["allow"] == "GET"
    # /auth and /reset are served by several routes: Allow names them all.
    assert client.put("/auth").headers["allow"] == "DELETE, GET, POST"
    assert client.delete("/reset").headers["allow"] == "GET, POST"


def test_413_and_500_carry_cors_headers(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    cors = {"Origin": ORIGIN}
    big = client.post("/chat", content=b"x" * 100_000, headers={**cors, "content-type": "application/json"})
    _shape(big, 413, "payload_too_large")
    assert big.headers["access-control-allow-origin"] == ORIGIN

    def explode(*args: object) -> None:
        raise RuntimeError("boom at /secret/path")

    monkeypatch.setattr(client.app.state.warm.store, "state", explode)
    failed = client.get("/sessions/default", headers=cors)
    body = _shape(failed, 500, "internal_error")
    assert failed.headers["access-control-allow-origin"] == ORIGIN
    assert "secret" not in json.dumps(body)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_500_keeps_the_connection_and_the_access_log_has_no_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _free_port()
    app = create_app(lite_settings(tmp_path, auth_token=TOKEN))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info", access_log=True))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    access = _Lines()
    logging.getLogger("uvicorn.access").addHandler(access)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)

        def explode(*args: object) -> None:
            raise RuntimeError("forced")

        monkeypatch.setattr(app.state.warm.store, "state", explode)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/sessions/default", headers=auth)
        first = conn.getresponse()
        assert first.status == 500 and json.loads(first.read())["error"] == "internal_error"
        sock = conn.sock
        monkeypatch.undo()
        conn.request("GET", "/health")  # the same connection, still open
        second = conn.getresponse()
        assert second.status == 200 and json.loads(second.read())["ready"] is True
        assert conn.sock is sock
        conn.close()

        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            c.get(f"/sessions/default?access_token={TOKEN}")
            c.get("/sessions/default/video?exp=1&sig=deadbeefcafe&fragmented=true")
            c.get("/health", headers={**auth, "Cookie": "musetalk_auth=123.abcdef"})
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        logging.getLogger("uvicorn.access").removeHandler(access)
    log = "\n".join(access.lines)
    assert "/sessions/default?access_token=REDACTED" in log and "sig=REDACTED" in log, log
    assert TOKEN not in log and "deadbeefcafe" not in log and "abcdef" not in log

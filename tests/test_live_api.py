"""Live-session routes through the app (lite renderer, real clock, real TTS)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from musetalk_warm.config import Settings
from musetalk_warm.server.app import create_app
from test_server import wait_ready


def live_settings(root: Path, **live: object) -> Settings:
    return Settings(
        models={"renderer": "lite"},
        avatar={"demo_seconds": 1.0, "cache_dir": root / "avatars"},
        server={"sessions_dir": root / "sessions", "max_text_chars": 200, "allowed_hosts": ["testserver"]},
        live={"idle_timeout_s": 0, **live},
    )


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("live-api")
    with TestClient(create_app(live_settings(root, max_sessions=2)), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def _events_until(ws, kind: str, event: str | None = None, limit: int = 200) -> list[dict]:
    seen = []
    for _ in range(limit):
        item = ws.receive_json()
        seen.append(item)
        if item["type"] == kind and (event is None or item.get("event") == event):
            return seen
    raise AssertionError(f"no {kind}/{event} event in {seen}")


def test_attach_say_events_and_interrupt(client: TestClient) -> None:
    response = client.post("/sessions/talk/live", json={})
    assert response.status_code == 200, response.text
    state = response.json()
    assert state["state"] == "idle" and state["fps"] == 25 and state["audio_rate"] == 48000
    assert client.post("/sessions/talk/live").json()["session_id"] == "talk"  # attach again: same session

    with client.websocket_connect("/sessions/talk/events") as ws:
        assert ws.receive_json()["type"] == "state"
        response = client.post("/sessions/talk/say", json={"text": "Hello there. This is live."})
        assert response.status_code == 202, response.text
        seen = _events_until(ws, "utterance", "started")
        assert seen[-1]["text"] == "Hello there."
        assert {"type": "state", "state": "speaking"}.items() <= next(
            e for e in seen if e["type"] == "state" and e["state"] == "speaking"
        ).items()
        assert client.post("/sessions/talk/interrupt").status_code == 200
        ended = _events_until(ws, "utterance", "ended")[-1]
        assert ended["interrupted"] is True
        seen = _events_until(ws, "state")
        assert seen[-1]["state"] == "idle"


def test_unknown_live_session_is_404_and_bad_text_422(client: TestClient) -> None:
    response = client.post("/sessions/nobody/say", json={"text": "hi"})
    assert response.status_code == 404 and response.json()["error"] == "not_found"
    client.post("/sessions/talk/live")
    response = client.post("/sessions/talk/say", json={"text": "   "})
    assert response.status_code == 422 and response.json()["error"] == "bad_text"


def test_pcm_websocket_speaks(client: TestClient, speech_16k: np.ndarray) -> None:
    client.post("/sessions/talk/live")
    pcm = (np.clip(speech_16k[:16000], -1, 1) * 32767).astype("<i2")
    with client.websocket_connect("/sessions/talk/events") as events:
        with client.websocket_connect("/sessions/talk/pcm?rate=16000") as ws:
            for start in range(0, pcm.size, 320):  # 20 ms chunks
                ws.send_bytes(pcm[start : start + 320].tobytes())
            ws.send_text('{"type": "end"}')
            started = _events_until(events, "utterance", "started")[-1]
            assert started["text"] is None
            _events_until(events, "utterance", "ended")


def test_admission_refuses_with_503_and_retry_after(tmp_path: Path) -> None:
    settings = live_settings(tmp_path, max_sessions=1, utilisation=1e-6, retry_after_s=3)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        assert c.post("/sessions/one/live").status_code == 200
        response = c.post("/sessions/two/live")
        assert response.status_code == 503 and response.headers["retry-after"] == "3"
        assert response.json()["error"] == "overloaded"
        # Any speech exceeds a capacity share this small: the utterance is refused, nothing queued.
        response = c.post("/sessions/one/say", json={"text": "Hello."})
        assert response.status_code == 503 and response.headers["retry-after"] == "3"
        assert c.get("/sessions/one/live").json()["queued_utterances"] == 0
        metrics = c.get("/metrics").text
        assert "musetalk_live_sessions 1.0" in metrics

"""Cross-site requests, Host checks, token handling, auth before bodies, body limits, resource caps.

Each test repeats a defect found by probing the server (content types, foreign
origins, GET /reset from a foreign page, tokens in URLs and logs, bodies read
before auth, unbounded sessions, jobs and archives).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from fastapi import WebSocket
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from test_server import MAX_UPLOAD, lite_settings, wait_job, wait_ready

from musetalk_warm.server import create_app
from musetalk_warm.server.deps import AuthDep
from musetalk_warm.sessions.housekeeping import archives, prune_archives

TOKEN = "s3cret-token"
EVIL = "http://evil.example"


async def _echo_ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("ok")
    await websocket.close()


def _app(root: Path, **server: object):  # type: ignore[no-untyped-def]
    app = create_app(lite_settings(root, **server))
    # A WebSocket route like the live ones: the guard and the auth dependency must cover it.
    app.add_api_websocket_route("/sessions/{session_id}/test-ws", _echo_ws, dependencies=[AuthDep])
    return app


@pytest.fixture(scope="module")
def open_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """No token (the default), one listed cross-origin page."""
    root = tmp_path_factory.mktemp("open")
    with TestClient(_app(root, cors_origins=["http://app.example"]), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def token_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("token")
    with TestClient(_app(root, auth_token=TOKEN), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def _error(response, status: int, code: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == code and body["message"] and body["request_id"], body
    return body


def _clips(client: TestClient, session_id: str) -> int:
    return client.get(f"/sessions/{session_id}", headers={"Authorization": f"Bearer {TOKEN}"}).json()["clips"]


# -- cross-site requests and Host -----------------------------------------------------------


def test_json_routes_refuse_other_content_types(open_client: TestClient) -> None:
    c = open_client
    c.post("/reset", json={"session_id": "ctype"})
    plain = {"content-type": "text/plain"}
    body = b'{"text": "Hi.", "session_id": "ctype"}'
    for url in ("/speak", "/chat", "/reset"):
        _error(c.post(url, content=body, headers=plain), 415, "unsupported_media_type")
    _error(c.post("/speak", content=body), 415, "unsupported_media_type")  # no content type at all
    # A form is accepted by /speak (uploads), never by the JSON-only routes.
    _error(c.post("/chat", data={"text": "Hi.", "session_id": "ctype"}), 415, "unsupported_media_type")
    _error(c.post("/reset", data={"session_id": "ctype"}), 415, "unsupported_media_type")
    assert _clips(c, "ctype") == 0
    ok = c.post("/speak", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_foreign_origins_are_refused(open_client: TestClient) -> None:
    c = open_client
    c.post("/reset", json={"session_id": "csrf"})
    form = {"text": "Forged.", "session_id": "csrf"}
    _error(c.post("/speak", data=form, headers={"Origin": EVIL}), 403, "forbidden")
    _error(c.post("/reset", json={"session_id": "csrf"}, headers={"Origin": "null"}), 403, "forbidden")
    _error(c.post("/chat", json=form, headers={"Origin": "http://testserver.evil.example"}), 403, "forbidden")
    assert _clips(c, "csrf") == 0
    # The page's own origin and a configured one are fine; CORS headers name the configured one.
    assert c.post("/speak", data=form, headers={"Origin": "http://testserver"}).status_code == 200
    listed = c.post("/speak", json=form, headers={"Origin": "http://app.example"})
    assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == "http://app.example"
    assert _clips(c, "csrf") == 2


def test_get_reset_from_a_foreign_page_is_refused(open_client: TestClient) -> None:
    c = open_client
    c.post("/reset", json={"session_id": "victim"})
    assert c.post("/speak", json={"text": "Keep me.", "session_id": "victim"}).status_code == 200
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Referer": f"{EVIL}/page.html"}):
        _error(c.get("/reset?session_id=victim", headers=headers), 403, "forbidden")
    assert _clips(c, "victim") == 1
    # Clients of the original server (no browser headers) and the page itself still may.
    assert c.get("/reset?session_id=victim", headers={"Sec-Fetch-Site": "same-origin"}).json()["clips"] == 0
    assert c.get("/reset?session_id=victim").status_code == 200


def test_host_header_is_checked(open_client: TestClient) -> None:
    c = open_client
    body = _error(c.get("/health", headers={"Host": "rebind.evil.example"}), 403, "forbidden")
    assert "server.allowed_hosts" in body["hint"]
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "testserver"):
        assert c.get("/health", headers={"Host": host}).status_code == 200, host


def test_websockets_get_the_origin_and_host_checks(open_client: TestClient) -> None:
    with open_client.websocket_connect("/sessions/a/test-ws", headers={"Origin": "http://testserver"}) as ws:
        assert ws.receive_text() == "ok"
    for headers in ({"Origin": EVIL}, {"Host": "rebind.evil.example"}):
        with pytest.raises(WebSocketDisconnect) as refused:
            with open_client.websocket_connect("/sessions/a/test-ws", headers=headers) as ws:
                ws.receive_text()
        assert refused.value.code == 1008


# -- tokens -------------------------------------------------------------------------------------


def test_401_names_the_scheme_and_urls_never_carry_the_token(token_client: TestClient) -> None:
    c = token_client
    refused = c.get("/sessions/default")
    _error(refused, 401, "unauthorized")
    assert refused.headers["www-authenticate"].startswith("Bearer")
    in_url = _error(c.get(f"/sessions/default?access_token={TOKEN}"), 401, "unauthorized")
    assert "not accepted" in in_url["hint"]
    assert c.get("/sessions/default", headers={"Authorization": f"Bearer {TOKEN}"}).status_code in (200, 404)


def test_openapi_declares_bearer_auth_only_with_a_token(
    token_client: TestClient, open_client: TestClient
) -> None:
    spec = token_client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "server.auth_token"
    }
    assert spec["paths"]["/speak"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/health"]["get"]
    assert "security" not in spec["paths"]["/auth"]["post"]
    open_spec = open_client.get("/openapi.json").json()
    assert "securitySchemes" not in open_spec.get("components", {})
    assert "security" not in open_spec["paths"]["/speak"]["post"]


def test_login_cookie_and_signed_media_urls(token_client: TestClient) -> None:
    c = token_client
    _error(c.post("/auth", json={"token": "wrong"}), 401, "unauthorized")
    assert c.get("/auth").json() == {"required": True, "authenticated": False, "expires_in": None}
    login = c.post("/auth", json={"token": TOKEN})
    assert login.status_code == 200 and login.json()["expires_in"] == 8 * 3600
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=28800" in cookie
    assert TOKEN not in cookie
    # The cookie now authorises the API and media, as it does for the page's <video>.
    assert c.get("/auth").json()["authenticated"] is True
    c.post("/reset", json={"session_id": "signed"})
    reply = c.post("/speak", json={"text": "Signed links.", "session_id": "signed"}).json()
    clip = c.get(reply["clip_url"])
    assert clip.status_code == 200 and clip.content[4:8] == b"ftyp"
    assert c.delete("/auth").json()["authenticated"] is False
    c.cookies.clear()

    # Without any credential, the signed URLs the API returned still play (a non-browser player).
    _error(c.get(reply["clip_url"].split("?")[0]), 401, "unauthorized")
    assert c.get(reply["clip_url"]).content == clip.content
    assert c.get(reply["session_video_url"]).status_code == 200
    download = c.get(reply["download_url"])
    assert download.status_code == 200 and "full_conversation.mp4" in download.headers["content-disposition"]
    # A signature is bound to its path, its other parameters and its expiry.
    path, _, query = reply["clip_url"].partition("?")
    params = dict(parse_qsl(query))
    other = f"/sessions/default/clips/{path.split('/')[-2]}/1?{query}"
    _error(c.get(other), 401, "unauthorized")
    _error(c.get(f"{path}?exp={int(params['exp']) + 60}&sig={params['sig']}"), 401, "unauthorized")
    _error(c.get(reply["session_video_url"] + "&fragmented=true"), 401, "unauthorized")
    _error(c.post("/speak", json={"text": "Hi."}, params=params), 401, "unauthorized")  # GET/HEAD only


def test_signed_urls_expire(token_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = token_client.get("/sessions/signed", headers=auth).json()["session_video_url"]
    assert token_client.get(url).status_code == 200
    later = time.time() + 3601
    monkeypatch.setattr("musetalk_warm.server.signing.time.time", lambda: later)
    _error(token_client.get(url), 401, "unauthorized")


def test_websocket_auth_by_header_or_cookie(token_client: TestClient) -> None:
    with pytest.raises(WebSocketDisconnect) as refused:
        with token_client.websocket_connect("/sessions/a/test-ws") as ws:
            ws.receive_text()
    assert refused.value.code == 1008
    with token_client.websocket_connect("/sessions/a/test-ws", headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        assert ws.receive_text() == "ok"
    token_client.post("/auth", json={"token": TOKEN})
    try:
        with token_client.websocket_connect("/sessions/a/test-ws") as ws:
            assert ws.receive_text() == "ok"
    finally:
        token_client.cookies.clear()


# -- bodies: auth first, limits on every route --------------------------------------------------


def _asgi(client: TestClient, method: str, path: str, chunks: list[bytes], headers: list[tuple[bytes, bytes]]
          ) -> tuple[int, dict[str, str], bytes, int]:
    """Send a chunked request straight to the app; returns status, headers, body and body chunks read."""
    pending = list(chunks)
    reads = 0

    async def call() -> tuple[int, dict[str, str], bytes]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            nonlocal reads
            if not pending:
                return {"type": "http.disconnect"}
            reads += 1
            return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending)}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"testserver"), (b"transfer-encoding", b"chunked"), *headers],
            "client": ("127.0.0.1", 5000), "server": ("testserver", 80), "state": {},
        }
        await client.app(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body

    assert client.portal is not None
    status, response_headers, body = client.portal.call(call)
    return status, response_headers, body, reads


_JSON = [(b"content-type", b"application/json")]


def test_auth_is_checked_before_the_body_is_read(token_client: TestClient) -> None:
    # 20 MB an unauthenticated client would stream: not one chunk is read.
    chunks = [b'{"text": "' + b"x" * 65536] + [b"x" * 65536] * 300 + [b'"}']
    for path in ("/chat", "/reset", "/speak"):
        status, headers, _, reads = _asgi(token_client, "POST", path, chunks, _JSON)
        assert (status, reads) == (401, 0), path
        assert headers["www-authenticate"].startswith("Bearer")


def test_chunked_bodies_over_the_limit_get_413_on_every_route(open_client: TestClient) -> None:
    chunk = b"x" * 65536
    chunks = [chunk] * ((MAX_UPLOAD + 128 * 1024) // len(chunk))
    form = [(b"content-type", b"multipart/form-data; boundary=zzz")]
    part = b'--zzz\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n\r\n'
    for path, headers, head in (("/speak", form, part), ("/speak", _JSON, b'{"text": "'),
                                ("/chat", _JSON, b'{"text": "'), ("/reset", _JSON, b'{"session_id": "'),
                                ("/auth", _JSON, b'{"token": "'), ("/speak/stream", _JSON, b'{"text": "')):
        status, response_headers, body, _ = _asgi(open_client, "POST", path, [head, *chunks], headers)
        assert status == 413, (path, body)
        assert response_headers["content-type"] == "application/json" and b"payload_too_large" in body


# -- caps ---------------------------------------------------------------------------------------


def test_sessions_are_capped(tmp_path: Path) -> None:
    with TestClient(create_app(lite_settings(tmp_path, max_sessions=2)), raise_server_exceptions=False) as c:
        wait_ready(c)
        assert c.post("/speak", json={"text": "One.", "session_id": "s1"}).status_code == 200
        assert c.post("/reset", json={"session_id": "s2"}).status_code == 200
        for response in (c.post("/speak", json={"text": "Three.", "session_id": "s3"}),
                         c.post("/reset", json={"session_id": "s4"}),
                         c.post("/chat", json={"text": "Five.", "session_id": "s5"})):
            assert "2 sessions" in _error(response, 429, "too_many_requests")["message"]
        # Existing sessions keep working.
        assert c.post("/speak", json={"text": "Again.", "session_id": "s1"}).status_code == 200
        assert c.post("/reset", json={"session_id": "s2"}).status_code == 200
        assert not (tmp_path / "sessions" / "s3").exists()


def test_queued_jobs_are_capped_and_report_honest_states(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = lite_settings(tmp_path, max_jobs=3, max_jobs_per_session=2, retry_after_seconds=7)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        warm = c.app.state.warm
        release = threading.Event()
        speak = warm.store.speak

        def held(*args: object, **kwargs: object) -> object:
            assert release.wait(60)
            return speak(*args, **kwargs)

        monkeypatch.setattr(warm.store, "speak", held)
        first = c.post("/chat", json={"text": "First.", "session_id": "busy"}).json()["job_id"]
        second = c.post("/chat", json={"text": "Second.", "session_id": "busy"}).json()["job_id"]
        deadline = time.monotonic() + 30
        while c.get(f"/status/{first}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # The second waits behind the first: queued, not "running".
        assert c.get(f"/status/{second}").json()["status"] == "queued"
        for response in (c.post("/chat", json={"text": "Third.", "session_id": "busy"}),
                         c.post("/speak", json={"text": "Fourth.", "session_id": "busy"})):
            body = _error(response, 429, "too_many_requests")
            assert response.headers["retry-after"] == "7" and "max_jobs_per_session" in body["hint"]
        third = c.post("/chat", json={"text": "Other.", "session_id": "other"}).json()["job_id"]
        overall = c.post("/chat", json={"text": "One too many.", "session_id": "more"})
        assert "max_jobs" in _error(overall, 429, "too_many_requests")["hint"]
        release.set()
        assert [wait_job(c, j)["status"] for j in (first, second, third)] == ["done"] * 3
        assert warm.admission.pending == {}
        assert c.post("/speak", json={"text": "Room again.", "session_id": "busy"}).status_code == 200


def test_archives_are_pruned_on_reset(tmp_path: Path) -> None:
    with TestClient(create_app(lite_settings(tmp_path, archives_keep=2)), raise_server_exceptions=False) as c:
        wait_ready(c)
        for i in range(4):
            assert c.post("/speak", json={"text": f"Take {i}.", "session_id": "arch"}).status_code == 200
            reset = c.post("/reset", json={"session_id": "arch"}).json()
            assert reset["previous"] is True and "archived" in reset["message"]
            time.sleep(1.05)  # archive names carry the reset time in seconds
        kept = archives(tmp_path / "sessions")
    assert len(kept) == 2
    assert not [p for p in (tmp_path / "sessions").iterdir() if p.name.startswith(".trash-")]


def test_prune_archives_by_age_and_bytes(tmp_path: Path) -> None:
    root = tmp_path
    for stamp, size in (("20250101T000000", 400), ("20250102T000000", 300), ("20250103T000000", 200)):
        folder = root / f"_s.{stamp}"
        folder.mkdir()
        (folder / "full_session.mp4").write_bytes(bytes(size))
    (root / "s").mkdir()  # a live session is never touched
    day3 = time.mktime((2025, 1, 3, 12, 0, 0, 0, 0, 0)) - time.timezone
    gone = prune_archives(root, keep=10, max_age_days=0, max_bytes=600, now=day3)
    assert [p.name for p in gone] == ["_s.20250101T000000"]
    gone = prune_archives(root, keep=10, max_age_days=1.0, max_bytes=0, now=day3)
    assert [p.name for p in gone] == ["_s.20250102T000000"]
    assert sorted(p.name for p in root.iterdir()) == ["_s.20250103T000000", "s"]


# -- newcomer paths -----------------------------------------------------------------------------


def test_sessions_are_created_on_first_use(open_client: TestClient, speech_wav: Path) -> None:
    c = open_client
    with open(speech_wav, "rb") as fh:  # the README's example, with no reset before it
        reply = c.post("/speak", files={"audio": ("question.wav", fh, "audio/wav")}, data={"session_id": "alice"})
    assert reply.status_code == 200 and reply.json()["clip_index"] == 1
    never = c.post("/reset", json={"session_id": "never-seen"}).json()
    assert never["previous"] is False and "archived" not in never["message"] and "created" in never["message"]
    with open(speech_wav, "rb") as fh:
        wrong_field = c.post("/speak", files={"file": ("q.wav", fh, "audio/wav")}, data={"session_id": "alice"})
    assert "'audio'" in _error(wrong_field, 400, "bad_input")["message"]


def test_chat_body_is_documented(open_client: TestClient) -> None:
    body = open_client.get("/openapi.json").json()["paths"]["/chat"]["post"]["requestBody"]
    content = body["content"]["application/json"]
    assert content["schema"]["required"] == ["text"] and set(content["schema"]["properties"]) == {
        "text", "session_id", "avatar_id"
    }
    assert content["examples"]["named session"]["value"] == {"text": "What did I just say?", "session_id": "alice"}


def test_api_docs_load_nothing_from_other_hosts(open_client: TestClient) -> None:
    import re

    for page in ("/docs", "/redoc"):
        html = open_client.get(page)
        assert html.status_code == 200
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html.text)
        assert urls, page
        for url in urls:
            assert not urlsplit(url).netloc, (page, url)
            if url.startswith("/docs-assets/"):
                asset = open_client.get(url)
                assert asset.status_code == 200 and len(asset.content) > 1000, url
        assert "cdn" not in html.text.lower() and "googleapis" not in html.text


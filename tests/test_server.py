"""The HTTP server end to end on the lite renderer (TestClient with the lifespan running)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import decodes, ffprobe, snapshot
from fastapi.testclient import TestClient

from musetalk_warm.config import Settings
from musetalk_warm.render.runtime import Runtime
from musetalk_warm.server import create_app
from musetalk_warm.server.routes import jobs
from musetalk_warm.voice import llm as llm_client
from musetalk_warm.server.schemas import JobStatus
from musetalk_warm.voice.tts import Speech

FPS = 25
CYCLE = 50  # the one-second demo avatar: 25 frames, cycled forward and back
MAX_UPLOAD = 2 * 1024 * 1024


def lite_settings(root: Path, tts: dict | None = None, **server: object) -> Settings:
    """Lite renderer, a one-second demo avatar, small limits, everything under ``root``."""
    return Settings(
        models={"renderer": "lite"},
        avatar={"demo_seconds": 1.0, "cache_dir": root / "avatars"},
        tts=tts or {},
        server={"sessions_dir": root / "sessions", "max_upload_bytes": MAX_UPLOAD,
                "max_text_chars": 200, "allowed_hosts": ["testserver"], **server},
    )


@contextmanager
def ready_client(settings: Settings) -> Iterator[TestClient]:
    """A TestClient on an app built from ``settings``, once its models are loaded."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def wait_ready(client: TestClient, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/health")
        if response.status_code == 200:
            return response.json()
        assert response.json()["status"] == "loading", response.json()
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server")


@pytest.fixture(scope="module")
def client(root: Path) -> Iterator[TestClient]:
    with TestClient(create_app(lite_settings(root)), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def fetch(client: TestClient, url: str, dst: Path) -> Path:
    response = client.get(url)
    assert response.status_code == 200, response.text
    dst.write_bytes(response.content)
    return dst


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_health_docs_and_page(client: TestClient) -> None:
    health = client.get("/health").json()
    assert health["ready"] and health["renderer"] == "lite" and health["device"] == "cpu"
    assert health["avatars"] == ["demo"] and health["tts"] == "espeak-ng"
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]["/speak"]["post"]["requestBody"]["content"]) == {
        "application/json", "multipart/form-data"
    }
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "<video" in page.text
    script = client.get("/static/app.js").text
    assert "play()" in script
    # The page logs in through the cookie route and never keeps the token.
    assert '"/auth"' in script and 'id="token"' in page.text
    assert "localStorage" not in script and "sessionStorage" not in script and "access_token" not in script


def test_speak_texts_and_upload_build_one_session_video(
    client: TestClient, speech_wav: Path, tmp_path: Path
) -> None:
    assert client.get("/reset").json()["clips"] == 0
    texts = ["Hello there.", "This is the second sentence, a little longer.", "Third."]
    replies = [client.post("/speak", json={"text": t}).json() for t in texts]
    with open(speech_wav, "rb") as fh:
        upload = client.post("/speak", files={"audio": ("speech.wav", fh, "audio/wav")})
    assert upload.status_code == 200, upload.text
    replies.append(upload.json())

    assert [r["clip_index"] for r in replies] == [1, 2, 3, 4]
    assert all(r["status"] == "success" and r["session_id"] == "default" for r in replies)
    frames = [r["frames"] for r in replies]
    starts = [r["start_frame"] for r in replies]
    assert starts == [int(sum(frames[:i])) % CYCLE for i in range(4)]
    for r in replies:
        assert r["video_path"] == r["session_video_url"] == "/sessions/default/video"
        assert r["duration"] == pytest.approx(r["frames"] / FPS)
        assert {"tts", "audio", "render", "encode", "append", "total"} <= set(r["timings"])
        assert r["timings"]["total"] >= r["timings"]["render"] > 0
    assert replies[3]["timings"]["tts"] == 0 and replies[0]["timings"]["tts"] > 0
    # The uploaded speech is ~5 s: its clip is the longest.
    assert replies[3]["frames"] == max(frames) and replies[3]["duration"] > 3

    state = client.get("/sessions/default").json()
    assert state["clips"] == 4 and state["frames"] == sum(frames)
    assert state["next_frame"] == sum(frames) % CYCLE

    total = sum(frames) / FPS
    for url, name in ((replies[0]["session_video_url"], "plain.mp4"),
                      (replies[0]["session_video_url"] + "?fragmented=true", "frag.mp4")):
        info = ffprobe(fetch(client, url, tmp_path / name))
        assert info["video"]["codec_name"] == "h264" and info["audio"]["codec_name"] == "aac"
        assert int(info["video"]["nb_read_packets"]) == sum(frames)
        assert decodes(tmp_path / name)
    plain = ffprobe(tmp_path / "plain.mp4")
    assert abs(float(plain["video"]["duration"]) - total) < 0.04
    assert abs(float(plain["audio"]["duration"]) - float(plain["video"]["duration"])) < 1 / FPS

    download = client.get("/download")
    assert download.headers["content-disposition"].startswith('attachment; filename="full_conversation.mp4"')
    assert download.content == (tmp_path / "plain.mp4").read_bytes()
    clip = ffprobe(fetch(client, replies[1]["clip_url"], tmp_path / "clip.mp4"))
    assert int(clip["video"]["nb_read_packets"]) == frames[1]

    reset = client.post("/reset", json={})
    assert reset.status_code == 200 and reset.json()["clips"] == 0 and reset.json()["duration"] == 0
    assert client.get("/sessions/default").json()["clips"] == 0
    assert client.get("/sessions/default/video").status_code == 404
    assert client.post("/speak", json={"text": "Fresh start."}).json()["start_frame"] == 0


def test_clip_range_requests(client: TestClient) -> None:
    client.post("/reset", json={"session_id": "ranges"})
    reply = client.post("/speak", json={"text": "Range test.", "session_id": "ranges"}).json()
    whole = client.get(reply["clip_url"]).content
    part = client.get(reply["clip_url"], headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206 and part.content == whole[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(whole)}"
    tail = client.get(reply["clip_url"], headers={"Range": "bytes=-64"})
    assert tail.status_code == 206 and tail.content == whole[-64:]
    assert client.get(reply["clip_url"], headers={"Range": f"bytes={len(whole) + 10}-"}).status_code == 416
    video = client.get("/sessions/ranges/video", headers={"Range": "bytes=0-7"})
    assert video.status_code == 206 and video.content[4:8] == b"ftyp"


def _assert_clean_error(response, status: int, code: str, root: Path) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and body["message"] and body["request_id"]
    assert "Traceback" not in response.text and str(root) not in response.text
    assert "/tmp" not in body["message"] and "/work" not in body["message"]
    return body


def test_bad_requests_leave_the_session_untouched(client: TestClient, root: Path) -> None:
    client.post("/reset", json={"session_id": "guarded"})
    kept = client.post("/speak", json={"text": "Keep me.", "session_id": "guarded"})
    assert kept.status_code == 200
    generation = kept.json()["clip_url"].split("/")[-2]
    folder = root / "sessions" / "guarded"
    before = snapshot(folder)
    s = {"session_id": "guarded"}
    rate = 16000
    tone = (0.3 * np.sin(np.arange(rate) * 2 * np.pi * 200 / rate)).astype(np.float32)
    flac = io.BytesIO()
    sf.write(flac, tone, rate, format="FLAC")
    corrupt = flac.getvalue()[:200] + bytes(range(256)) * 4  # a real header, then garbage
    cases = [
        (client.post("/speak", json={"text": "   ", **s}), 422, "bad_text", "empty"),
        (client.post("/speak", json={"text": "x" * 201, **s}), 422, "bad_text", "limit of 200"),
        (client.post("/speak", json={**s}), 422, "bad_input", "text"),
        (client.post("/speak", content=b"{not json", headers={"content-type": "application/json"}), 422,
         "bad_input", "JSON"),
        (client.post("/speak", data=s, files={"audio": ("a.wav", b"hello, not audio", "audio/wav")}), 422,
         "bad_audio", ""),
        (client.post("/speak", data=s, files={"audio": ("a.wav", corrupt, "audio/wav")}), 422, "bad_audio", ""),
        (client.post("/speak", data=s, files={"audio": ("a.wav", wav_bytes(tone[:320], rate), "audio/wav")}),
         422, "bad_audio", "100 ms"),
        (client.post("/speak", data=s, files={"audio": ("a.wav", b"", "audio/wav")}), 422, "bad_audio", "empty"),
        (client.post("/speak", data=s, files={"audio": ("big.wav", bytes(MAX_UPLOAD + 70_000), "audio/wav")}),
         413, "payload_too_large", "larger than"),
        (client.post("/speak", json={"text": "Hi.", "blend_mode": "smear", **s}), 422, "bad_input", "blend_mode"),
        (client.post("/speak", data={"text": "Hi.", "blend_mode": "smear", **s}), 400, "bad_input", "blend_mode"),
        (client.post("/speak", json={"text": "Hi.", "avatar_id": "nobody", **s}), 404, "not_found", "nobody"),
        (client.post("/speak", json={"text": "Hi.", "session_id": "../escape"}), 400, "bad_input", "session_id"),
        (client.get(f"/sessions/missing/clips/{generation}/1"), 404, "not_found", "missing"),
        (client.get(f"/sessions/guarded/clips/{generation}/9"), 404, "not_found", "clip 9"),
        (client.get("/sessions/guarded/clips/..%2F..%2Fx/1"), 404, "not_found", ""),
        (client.get("/no/such/route"), 404, "not_found", ""),
    ]
    for response, status, code, words in cases:
        body = _assert_clean_error(response, status, code, root)
        assert words in body["message"], body
    assert snapshot(folder) == before


def test_blend_mode_per_request(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    warm = client.app.state.warm
    seen: list[str | None] = []
    speak = warm.store.speak

    def spy(*args: object, **kwargs: object) -> object:
        render = kwargs.get("render")
        seen.append(getattr(render, "blend_mode", None))
        return speak(*args, **kwargs)

    monkeypatch.setattr(warm.store, "speak", spy)
    client.post("/reset", json={"session_id": "blends"})
    assert client.post("/speak", json={"text": "Smooth.", "session_id": "blends", "blend_mode": "poisson"}).status_code == 200
    assert client.post("/speak", data={"text": "Plain.", "session_id": "blends", "blend_mode": "upstream"}).status_code == 200
    assert client.post("/speak", json={"text": "Default.", "session_id": "blends"}).status_code == 200
    assert seen == ["poisson", "upstream", None]


def test_unexpected_error_is_a_clean_500(client: TestClient, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    warm = client.app.state.warm

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"secret detail {root}/x")

    monkeypatch.setattr(warm.store, "speak", explode)
    response = client.post("/speak", json={"text": "Boom."})
    body = _assert_clean_error(response, 500, "internal_error", root)
    assert "secret" not in response.text
    assert response.headers["x-request-id"] == body["request_id"]


def test_metrics_count_frames_and_stages(client: TestClient) -> None:
    client.post("/speak", json={"text": "Count me."})
    text = client.get("/metrics").text
    frames = [line for line in text.splitlines() if line.startswith("musetalk_frames_rendered_total")]
    assert frames and float(frames[0].split()[-1]) > 0
    assert 'musetalk_stage_seconds_count{stage="render"}' in text
    assert 'musetalk_requests_total{method="POST",route="/speak",status="200"}' in text


def test_chat_job_api(client: TestClient) -> None:
    client.post("/reset", json={"session_id": "jobs"})
    started = client.post("/chat", json={"text": "Tell me something.", "session_id": "jobs"})
    assert started.status_code == 202 and started.json()["status"] in ("queued", "running")
    job_id = started.json()["job_id"]
    deadline = time.monotonic() + 60
    while (job := client.get(f"/status/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert job["status"] == "done" and job["reply"] == "Tell me something."
    assert re.fullmatch(r"/sessions/jobs/clips/[0-9a-f]{8}/1", job["video_url"])
    video = client.get(f"/video/{job_id}")
    assert video.status_code == 200 and video.content[4:8] == b"ftyp"
    assert client.get("/status/nope").status_code == 404


def test_not_ready_until_loaded(tmp_path: Path) -> None:
    release = threading.Event()

    def slow_load(settings: Settings) -> Runtime:
        release.wait(30)
        return Runtime.load(settings)

    app = create_app(lite_settings(tmp_path), runtime_factory=slow_load)
    with TestClient(app) as c:
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        busy = c.post("/speak", json={"text": "Too early."})
        assert busy.status_code == 503 and busy.json()["error"] == "not_ready"
        release.set()
        assert wait_ready(c)["ready"]


def test_auth_and_tts_failure(tmp_path: Path) -> None:
    # A TTS endpoint nobody listens on: every synthesis fails like a real outage.
    settings = lite_settings(tmp_path, tts={"engine": "openai", "openai_url": "http://127.0.0.1:9"},
                             auth_token="s3cret")
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        _assert_clean_error(c.post("/speak", json={"text": "Hi."}), 401, "unauthorized", tmp_path)
        wrong = c.post("/speak", json={"text": "Hi."}, headers={"Authorization": "Bearer nope"})
        _assert_clean_error(wrong, 401, "unauthorized", tmp_path)
        _assert_clean_error(c.get("/sessions/default"), 401, "unauthorized", tmp_path)
        assert c.get("/health").status_code == 200  # probes need no token
        auth = {"Authorization": "Bearer s3cret"}
        assert c.post("/reset", headers=auth).status_code == 200
        failed = c.post("/speak", json={"text": "Hi."}, headers=auth)
        assert "speech endpoint" in _assert_clean_error(failed, 502, "tts_error", tmp_path)["message"]
        assert c.get("/sessions/default?access_token=s3cret").status_code == 401  # never a token in a URL
        assert c.get("/sessions/default/video", headers=auth).status_code == 404


def wait_job(client: TestClient, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/status/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def _with_server(warm: object, monkeypatch: pytest.MonkeyPatch, **server: object) -> None:
    """Swap in settings with some server values changed, for one test."""
    settings = warm.settings  # type: ignore[attr-defined]
    monkeypatch.setattr(warm, "settings", settings.model_copy(update={"server": settings.server.model_copy(update=server)}))


def test_chat_jobs_speak_in_arrival_order_with_llm(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first message's LLM reply comes last, yet it is spoken first; the key is sent as a bearer token."""
    warm = client.app.state.warm
    _with_server(warm, monkeypatch, llm_url="http://llm.local/", llm_api_key="k3y")
    seen: list[httpx.Request] = []

    async def llm(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        prompt = json.loads(request.content)["messages"][-1]["content"]
        if prompt == "First question?":
            await asyncio.sleep(1.5)
        return httpx.Response(200, json={"choices": [{"message": {"content": f"Answer to {prompt}"}}]})

    real_client = httpx.AsyncClient
    monkeypatch.setattr(
        llm_client.httpx, "AsyncClient", lambda **kw: real_client(transport=httpx.MockTransport(llm), **kw)
    )
    client.post("/reset", json={"session_id": "ordered"})
    ids = [client.post("/chat", json={"text": t, "session_id": "ordered"}).json()["job_id"]
           for t in ("First question?", "Second question?")]
    done = [wait_job(client, job_id) for job_id in ids]
    assert [j["status"] for j in done] == ["done", "done"], done
    assert [j["reply"] for j in done] == ["Answer to First question?", "Answer to Second question?"]
    assert [j["result"]["clip_index"] for j in done] == [1, 2]
    assert {str(r.url) for r in seen} == {"http://llm.local/v1/chat/completions"}
    assert {r.headers["authorization"] for r in seen} == {"Bearer k3y"}
    assert warm.job_tails == {}  # finished chains are forgotten


def test_chat_checks_session_and_avatar_at_post_time(client: TestClient, root: Path) -> None:
    before = set(client.app.state.warm.jobs)
    cases = [
        (client.post("/chat", json={"text": "Hi.", "avatar_id": "nobody"}), 404, "not_found", "nobody"),
        (client.post("/chat", json={"text": "Hi.", "session_id": "../x"}), 400, "bad_input", "session_id"),
        (client.post("/chat", json={"text": "  "}), 422, "bad_text", "empty"),
    ]
    for response, status, code, words in cases:
        assert words in _assert_clean_error(response, status, code, root)["message"]
    assert set(client.app.state.warm.jobs) == before  # no failed jobs were queued


def test_job_eviction_keeps_unfinished_jobs(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    warm = client.app.state.warm
    monkeypatch.setattr(jobs, "_MAX_JOBS", 2)
    busy = JobStatus(job_id="busy", status="running", prompt="still going")
    old = JobStatus(job_id="old", status="done", prompt="long done")
    monkeypatch.setattr(warm, "jobs", OrderedDict([("busy", busy), ("old", old)]))
    client.post("/reset", json={"session_id": "evict"})
    new = client.post("/chat", json={"text": "Newest.", "session_id": "evict"}).json()["job_id"]
    assert list(warm.jobs) == ["busy", new]  # the oldest job is running: the finished one goes
    assert client.get("/status/busy").json()["status"] == "running"
    assert wait_job(client, new)["status"] == "done"


def test_reset_retires_clip_and_job_urls(client: TestClient) -> None:
    """After a reset, old clip and job URLs answer 404 instead of serving the new session's clip."""
    client.post("/reset", json={"session_id": "gens"})
    old_clip = client.post("/speak", json={"text": "Before the reset.", "session_id": "gens"}).json()["clip_url"]
    job_id = client.post("/chat", json={"text": "Also before.", "session_id": "gens"}).json()["job_id"]
    assert wait_job(client, job_id)["status"] == "done"
    old_job_video = client.get(f"/video/{job_id}").content
    assert client.get(old_clip).status_code == 200

    client.post("/reset", json={"session_id": "gens"})
    new_clip = client.post("/speak", json={"text": "After the reset, longer.", "session_id": "gens"}).json()
    assert new_clip["clip_index"] == 1 and new_clip["clip_url"] != old_clip
    assert client.get(new_clip["clip_url"]).status_code == 200
    assert client.get(old_clip).status_code == 404
    gone = client.get(f"/video/{job_id}")
    assert gone.status_code == 404 and "reset" in gone.json()["message"] and gone.content != old_job_video
    state = json.loads((client.app.state.warm.store.path("gens") / "state.json").read_text())
    assert new_clip["clip_url"].split("/")[-2] == state["generation"]


def test_unknown_ids_and_methods_leave_no_state(client: TestClient) -> None:
    warm = client.app.state.warm
    for url in ("/sessions/rand-1", "/download?session_id=rand-2", "/sessions/rand-3/video",
                "/sessions/rand-4/video?fragmented=true"):
        assert client.get(url).status_code == 404, url
    assert not [sid for sid in warm.store._locks if sid.startswith("rand-")]
    assert not [sid for sid in warm._session_locks if sid.startswith("rand-")]
    client.request("BREW", "/health")
    text = client.get("/metrics").text
    assert 'method="BREW"' not in text and 'method="other",route="/health"' in text


class _LongTTS:
    """A TTS that answers any text with three seconds of tone."""

    name = "long"

    def synthesize_timed(self, text: str) -> Speech:
        t = np.arange(3 * 16000) / 16000
        return Speech((0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)


def test_tts_output_over_the_audio_limit_is_refused(
    client: TestClient, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    warm = client.app.state.warm
    client.post("/reset", json={"session_id": "longtts"})
    folder = root / "sessions" / "longtts"
    before = snapshot(folder)
    _with_server(warm, monkeypatch, max_audio_seconds=2.0)
    monkeypatch.setattr(warm, "tts", _LongTTS())
    response = client.post("/speak", json={"text": "Say a lot.", "session_id": "longtts"})
    body = _assert_clean_error(response, 422, "bad_text", root)
    assert "3.0 s long" in body["message"] and "maximum is 2 s" in body["message"]
    assert snapshot(folder) == before


def test_speak_stream_sends_fragments_as_they_render(client: TestClient, tmp_path: Path) -> None:
    client.post("/reset", json={"session_id": "live"})
    text = "Streaming lets the first frames play while the rest of this sentence is still rendering."
    with client.stream("POST", "/speak/stream", json={"text": text, "session_id": "live"}) as response:
        assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
        assert response.headers["x-session-id"] == "live"
        chunks = [chunk for chunk in response.iter_raw() if chunk]
    assert len(chunks) >= 3  # init + first fragment, then one chunk per fragment
    assert chunks[0][4:8] == b"ftyp"
    streamed = tmp_path / "streamed.mp4"
    streamed.write_bytes(b"".join(chunks))
    info = ffprobe(streamed)
    state = client.get("/sessions/live").json()
    # The streamed clip is the session's clip: same frames, appended as with /speak.
    assert int(info["video"]["nb_read_packets"]) == state["frames"] and state["clips"] == 1
    assert decodes(streamed)

    bad = client.post("/speak/stream", json={"text": "  ", "session_id": "live"})
    assert bad.status_code == 422 and bad.json()["error"] == "bad_text"
    assert client.get("/sessions/live").json()["clips"] == 1


def test_speak_stream_first_bytes_arrive_before_the_clip_is_rendered(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    warm = client.app.state.warm
    engine = warm.runtime.engine
    render = engine.render
    release = threading.Event()

    def held_render(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        for i, frame in enumerate(render(*args, **kwargs)):
            if i == 60:  # past the first fragments: wait until the test has seen bytes
                assert release.wait(60), "the client never received the first fragment"
            yield frame

    monkeypatch.setattr(engine, "render", held_render)
    client.post("/reset", json={"session_id": "held"})
    text = "This sentence is long enough to make several seconds of speech, so the clip has many fragments."
    with client.stream("POST", "/speak/stream", json={"text": text, "session_id": "held"}) as response:
        chunks = response.iter_raw()
        first = next(chunks)
        assert first[4:8] == b"ftyp" and not release.is_set()  # bytes came while rendering was held
        release.set()
        rest = b"".join(chunks)
    assert len(first) + len(rest) > len(first)
    assert client.get("/sessions/held").json()["clips"] == 1

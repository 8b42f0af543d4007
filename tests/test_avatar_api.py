"""POST/GET/DELETE /avatars end to end: tiny uploads made here from the demo face, tiny random-init models."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from musetalk_warm.avatars.demo import demo_frames
from musetalk_warm.avatars.jobs import clean_staging
from musetalk_warm.config import Settings
from musetalk_warm.models.musetalk import encode_latents
from musetalk_warm.server import create_app
from test_server import ready_client

FPS = 25
SIZE = 256  # the demo face scaled down: fast to detect, encode and render


def _video(frames: np.ndarray, container: str = "mp4", codec: str = "libx264") -> bytes:
    """``frames`` (BGR) encoded as a small video file in memory."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=FPS)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="bgr24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def face_video() -> bytes:
    return _video(demo_frames(0.8, FPS, SIZE))


def _settings(root: Path, renderer: str = "tiny", **server: object) -> Settings:
    return Settings(
        models={"renderer": renderer, "device": "cpu", "models_dir": root / "models"},
        avatar={"demo_seconds": 0.4, "cache_dir": root / "avatars", "max_upload_seconds": 1.5,
                "mask_source": "landmarks"},
        render={"batch_size": 8},
        server={"sessions_dir": root / "sessions", "max_upload_bytes": 2 * 1024 * 1024,
                "allowed_hosts": ["testserver"], **server},
        live={"idle_timeout_s": 0},
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("avatar-api")


@pytest.fixture(scope="module")
def client(root: Path) -> Iterator[TestClient]:
    with ready_client(_settings(root)) as c:
        yield c


def _upload(client: TestClient, data: bytes, name: str, **fields: str):
    return client.post("/avatars", files={"file": (name, data, "application/octet-stream")}, data=fields)


def _wait(client: TestClient, avatar_id: str, timeout: float = 60.0) -> tuple[dict, list[dict]]:
    """The final state of an avatar's job, and every state seen while polling."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = time.perf_counter()
        response = client.get(f"/avatars/{avatar_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        seen.append({**body, "latency_s": time.perf_counter() - started})
        if body["status"] in ("ready", "failed"):
            return body, seen[:-1]
        time.sleep(0.05)
    raise AssertionError(f"avatar {avatar_id} still {seen[-1]} after {timeout} s")


def _staging(root: Path) -> list[Path]:
    staging = root / "avatars" / ".jobs"
    return sorted(staging.iterdir()) if staging.is_dir() else []


def test_upload_prepare_speak_live_and_delete(client: TestClient, root: Path, face_video: bytes) -> None:
    response = _upload(client, face_video, "my face.mp4", avatar_id="anna", bbox_shift="2")
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["avatar_id"] == "anna" and body["status"] in ("queued", "preparing")
    assert body["status_url"] == "/avatars/anna" == response.headers["location"]
    assert body["options"] == {"bbox_shift": 2}
    assert _upload(client, face_video, "again.mp4", avatar_id="anna").status_code == 409  # being prepared

    ready, seen = _wait(client, "anna")
    assert ready["status"] == "ready", ready
    # Preparation runs in a child process: the server answered every poll meanwhile, quickly.
    assert max(s["latency_s"] for s in seen) < 1.0, [s["latency_s"] for s in seen]
    progress = [s["progress"] for s in seen if s["status"] == "preparing" and s["progress"]["frames_total"]]
    assert all(p["frames_total"] == 20 and 0 <= p["frames_done"] <= 20 for p in progress)
    assert ready["num_frames"] == 20 and ready["fps"] == FPS and ready["frame_size"] == [SIZE, SIZE]
    assert ready["source"]["name"] == "my_face.mp4" and len(ready["source"]["sha256"]) == 64
    assert ready["vae_id"].startswith("tiny") and ready["detector"] == "mediapipe"
    assert ready["mask_source"] == "landmarks" and ready["bytes_on_disk"] > 1000
    assert _staging(root) == []
    cache = root / "avatars" / "anna"
    assert (cache / "manifest.json").is_file()

    listed = {a["avatar_id"]: a for a in client.get("/avatars").json()["avatars"]}
    assert set(listed) == {"demo", "anna"} and listed["anna"] == {**ready, "loaded": listed["anna"]["loaded"]}
    assert _upload(client, face_video, "again.mp4", avatar_id="anna").status_code == 409  # exists

    library = client.app.state.warm.runtime.library
    speaking: dict[str, object] = {}

    def speak() -> None:
        text = "Hello there, this is my new face speaking a sentence."
        speaking["response"] = client.post("/speak", json={"text": text, "avatar_id": "anna", "session_id": "s-anna"})

    thread = threading.Thread(target=speak)
    thread.start()
    deadline = time.monotonic() + 30
    while not library.in_use("anna") and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.002)
    refused = client.delete("/avatars/anna")  # while /speak renders with it
    thread.join()
    assert refused.status_code == 409 and "clip being rendered" in refused.json()["message"], refused.text
    spoken = speaking["response"]
    assert spoken.status_code == 200, spoken.text
    assert spoken.json()["frames"] > 0 and not library.in_use("anna")
    clip = client.get(spoken.json()["clip_url"])
    with av.open(io.BytesIO(clip.content)) as video:  # the new avatar's frames, not the demo's 512²
        assert (video.streams.video[0].width, video.streams.video[0].height) == (SIZE, SIZE)
    # Latents came from the server's own VAE, as `musetalk-warm prep` computes them.
    avatar = library.get("anna")
    expected = encode_latents(client.app.state.warm.runtime.models, avatar.crops[:2])
    np.testing.assert_allclose(avatar.latents[:2], expected, rtol=1e-4, atol=1e-5)

    live = client.post("/sessions/live-anna/live", json={"avatar_id": "anna"})
    assert live.status_code == 200, live.text
    assert live.json()["avatar_id"] == "anna" and live.json()["width"] == SIZE
    refused = client.delete("/avatars/anna")
    assert refused.status_code == 409 and refused.json()["error"] == "conflict"
    assert "live session" in refused.json()["message"] and cache.is_dir()

    assert client.delete("/sessions/live-anna/live").status_code == 204
    assert client.delete("/avatars/anna").status_code == 204
    assert not cache.exists() and _staging(root) == []
    assert client.get("/avatars/anna").status_code == 404
    assert client.delete("/avatars/anna").status_code == 404
    assert client.post("/speak", json={"text": "Hi.", "avatar_id": "anna"}).status_code == 404


def test_photo_upload_is_a_one_frame_avatar(client: TestClient) -> None:
    ok, png = cv2.imencode(".png", demo_frames(0.04, FPS, SIZE)[0])
    response = _upload(client, png.tobytes(), "portrait.png")
    assert response.status_code == 202, response.text
    assert response.json()["avatar_id"] == "portrait"
    ready, _ = _wait(client, "portrait")
    assert ready["status"] == "ready" and ready["num_frames"] == 1, ready
    assert client.delete("/avatars/portrait").status_code == 204


def test_pinned_avatar_and_bad_requests_are_refused(client: TestClient, face_video: bytes) -> None:
    refused = client.delete("/avatars/demo")
    assert refused.status_code == 409 and "built-in demo avatar" in refused.json()["message"]
    assert _upload(client, face_video, "x.mp4", avatar_id="demo").status_code == 409
    assert client.get("/avatars/nobody").status_code == 404
    assert client.post("/avatars", json={"file": "x"}).status_code == 415
    bad = [
        _upload(client, face_video, "x.mp4", avatar_id="../up"),
        _upload(client, face_video, "x.mp4", avatar_id="ok", fps="24"),  # padding > 1 s at 48 kHz
        _upload(client, face_video, "x.mp4", avatar_id="ok", bbox_shift="two"),
        _upload(client, face_video, "x.avi"),
        _upload(client, b"", "x.mp4"),
    ]
    assert [r.status_code for r in bad] == [400, 400, 400, 422, 422], [r.text for r in bad]
    assert all(r.json()["error"] in ("bad_input", "bad_video") for r in bad)
    assert client.get("/avatars/ok").status_code == 404  # nothing started
    too_large = _upload(client, bytes(2 * 1024 * 1024 + 100 * 1024), "big.mp4")  # server.max_upload_bytes
    assert too_large.status_code == 413 and too_large.json()["error"] == "payload_too_large"
    assert client.get("/avatars/big").status_code == 404


@pytest.mark.parametrize(
    ("name", "make", "error", "words"),
    [
        ("text.mp4", lambda: b"this is not a video at all\n" * 50, "bad_video", "supported container"),
        ("avi.mp4", lambda: _video(demo_frames(0.4, FPS, 64), "avi", "mpeg4"), "bad_video", "supported container"),
        ("long.mp4", lambda: _video(demo_frames(2.0, FPS, 64)), "bad_video", "longer than the maximum of 1.5 s"),
        ("blank.mp4", lambda: _video(np.full((10, 96, 96, 3), 128, np.uint8)), "face_not_found", "no face"),
        ("broken.png", lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "bad_video", "not an image"),
    ],
)
def test_a_failed_prep_reports_why_and_leaves_nothing(
    client: TestClient, root: Path, name: str, make, error: str, words: str
) -> None:
    before = sorted(p.name for p in (root / "avatars").iterdir())
    avatar_id = Path(name).stem
    response = _upload(client, make(), name)
    assert response.status_code == 202, response.text
    failed, _ = _wait(client, avatar_id)
    assert failed["status"] == "failed" and failed["error"]["error"] == error, failed
    assert words in failed["error"]["message"] and str(root) not in str(failed)
    assert sorted(p.name for p in (root / "avatars").iterdir()) == before
    assert _staging(root) == []
    listed = {a["avatar_id"]: a["status"] for a in client.get("/avatars").json()["avatars"]}
    assert listed[avatar_id] == "failed"
    assert client.delete(f"/avatars/{avatar_id}").status_code == 204  # forgets the failed job
    assert client.get(f"/avatars/{avatar_id}").status_code == 404


def test_a_crashed_prep_process_fails_the_job_not_the_server(client: TestClient, root: Path, face_video: bytes) -> None:
    jobs = client.app.state.warm.avatar_jobs
    assert _upload(client, face_video, "crash.mp4").status_code == 202
    deadline = time.monotonic() + 30
    while jobs._child is None and time.monotonic() < deadline:  # the running preparation's process
        time.sleep(0.005)
    os.kill(jobs._child.pid, signal.SIGSEGV)
    failed, _ = _wait(client, "crash")
    assert failed["status"] == "failed" and "ended by SIGSEGV" in failed["error"]["message"], failed
    assert not (root / "avatars" / "crash").exists() and _staging(root) == []
    assert client.get("/health").json()["ready"]


def test_prep_metrics_count_outcomes(client: TestClient) -> None:
    text = client.get("/metrics").text
    assert 'musetalk_avatar_preps_total{status="ready"}' in text
    assert 'musetalk_avatar_preps_total{status="failed"}' in text


def test_stale_staging_is_cleaned_at_start(tmp_path: Path) -> None:
    staging = tmp_path / "avatars" / ".jobs"
    (staging / "0123" / "half").mkdir(parents=True)
    (staging / "0123" / "half" / "frames.mkv").write_bytes(b"x" * 10)
    (staging / "stray.tmp").write_bytes(b"x")
    assert clean_staging(tmp_path / "avatars") == 2
    assert list(staging.iterdir()) == []
    (staging / "4567").mkdir()
    create_app(_settings(tmp_path))  # the app cleans at creation too
    assert list(staging.iterdir()) == []


def test_avatar_routes_need_the_token(tmp_path: Path, face_video: bytes) -> None:
    with ready_client(_settings(tmp_path, "lite", auth_token="s3cret-token-for-tests")) as c:
        assert _upload(c, face_video, "x.mp4").status_code == 401
        assert c.get("/avatars").status_code == 401
        assert c.delete("/avatars/demo").status_code == 401
        listed = c.get("/avatars", headers={"Authorization": "Bearer s3cret-token-for-tests"})
        assert listed.status_code == 200 and [a["avatar_id"] for a in listed.json()["avatars"]] == ["demo"]
    assert not (tmp_path / "avatars" / "x").exists()

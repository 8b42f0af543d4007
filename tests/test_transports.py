"""WHEP and fMP4-over-WebSocket routes on a real app (lite renderer, real live sessions)."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from fastapi.testclient import TestClient

from musetalk_warm.media.fmp4 import iter_boxes
from musetalk_warm.server.app import create_app
from test_live_api import live_settings
from test_server import ready_client


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("transports")
    with ready_client(live_settings(root)) as c:
        yield c


def test_whep_offer_answer_frames_and_delete(client: TestClient) -> None:
    async def main() -> None:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        tracks: dict = {}
        pc.on("track", lambda t: tracks.__setitem__(t.kind, t))
        await pc.setLocalDescription(await pc.createOffer())
        response = await asyncio.to_thread(
            client.post, "/sessions/rtc/whep", content=pc.localDescription.sdp,
            headers={"content-type": "application/sdp"},
        )
        assert response.status_code == 201, response.text
        assert response.headers["content-type"].startswith("application/sdp")
        location = response.headers["location"]
        assert location.startswith("/sessions/rtc/whep/")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))
        state = client.get("/sessions/rtc/live").json()
        assert state["viewers"] >= 2 and state["state"] == "idle"
        frames = [await asyncio.wait_for(tracks["video"].recv(), 15) for _ in range(20)]
        assert (frames[0].width, frames[0].height) == (state["width"], state["height"])
        steps = np.diff([f.pts for f in frames])
        assert all(step > 0 and step % 3600 == 0 for step in steps), steps  # on session ticks, in order
        images = [f.to_ndarray(format="rgb24").astype(float) for f in frames]
        assert min(im.std() for im in images) > 20  # a picture, not a flat grey frame
        assert max(np.abs(a - b).mean() for a, b in zip(images, images[1:])) > 0.1  # idle motion
        closed = await asyncio.to_thread(client.delete, location)
        assert closed.status_code == 204
        assert (await asyncio.to_thread(client.delete, location)).status_code == 404
        await pc.close()

    asyncio.run(main())
    assert client.get("/sessions/rtc/live").json()["viewers"] == 0


def test_whep_refuses_bad_offers(client: TestClient) -> None:
    sdp = {"content-type": "application/sdp"}
    r = client.post("/sessions/bad/whep", content="v=0", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and r.json()["error"] == "bad_input"
    r = client.post("/sessions/bad/whep", content="v=0\r\nm=video nonsense\r\n", headers=sdp)
    assert r.status_code == 400 and "SDP" in r.json()["message"]
    r = client.post("/sessions/bad..id/whep", content="v=0", headers=sdp)
    assert r.status_code in (400, 422)


def test_mse_websocket_sends_mime_init_and_continuous_fragments(client: TestClient) -> None:
    check_mse_stream(client, "mse")


def test_mse_websocket_with_encoder_processes(tmp_path: Path) -> None:
    """The same stream encoded in a worker process; the worker and its shared memory end with the app."""
    with ready_client(live_settings(tmp_path, encoder_processes=1)) as c:
        pool = c.app.state.warm.live.encoders
        assert pool is not None and len(pool.pids) == 1
        worker = pool._workers[0].process
        check_mse_stream(c, "pooled")
        deadline = time.monotonic() + 5
        while pool._streams and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not pool._streams  # the viewer's stream closed when it left
    assert not worker.is_alive() and worker.exitcode == 0  # stopped with the app, not killed
    assert pool.pids == []


def check_mse_stream(client: TestClient, session_id: str) -> None:
    assert client.post(f"/sessions/{session_id}/live", json={}).status_code == 200
    with client.websocket_connect(f"/sessions/{session_id}/mse") as ws:
        first = ws.receive_json()
        assert first["type"] == "init" and first["mime"].startswith('video/mp4; codecs="avc1.42')
        assert "mp4a.40.2" in first["mime"]
        init = ws.receive_bytes()
        assert [b.kind for b in iter_boxes(init)] == [b"ftyp", b"moov"]
        fragments = [ws.receive_bytes() for _ in range(12)]
    for fragment in fragments:
        assert [b.kind for b in iter_boxes(fragment)] == [b"moof", b"mdat"]
    with av.open(io.BytesIO(init + b"".join(fragments))) as container:
        video = [(f.pts, f.time_base) for f in container.decode(video=0)]
    with av.open(io.BytesIO(init + b"".join(fragments))) as container:
        audio = [(f.pts, f.samples) for f in container.decode(audio=0)]
    step = round(1 / (25 * video[0][1]))
    assert [p for p, _ in video] == [i * step for i in range(len(video))]  # every frame, no gap
    assert len(video) >= 30
    assert all(b[0] == a[0] + a[1] for a, b in zip(audio, audio[1:]))  # gapless audio
    assert audio[0][0] == 0


def test_ice_servers_come_from_config(tmp_path) -> None:
    turn = {"urls": ["turn:turn.example.org:3478"], "username": "u", "credential": "p"}
    app = create_app(live_settings(tmp_path, ice_servers=[turn, {"urls": ["stun:stun.example.org"]}]))
    with TestClient(app) as c:
        assert c.get("/live/ice-servers").json() == {"ice_servers": [turn, {"urls": ["stun:stun.example.org"]}]}
        assert app.state.webrtc._configuration().iceServers[0].urls == turn["urls"]

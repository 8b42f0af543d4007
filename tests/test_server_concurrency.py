"""4 sessions x 5 concurrent /speak each against a real uvicorn server."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from musetalk_warm.config import Settings
from musetalk_warm.server import create_app

SESSIONS = 4
PER_SESSION = 5
# Requests to one session leave the client this far apart.
STAGGER_S = 0.02


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("concurrency")
    settings = Settings(
        models={"renderer": "lite"},
        avatar={"demo_seconds": 1.0, "cache_dir": root / "avatars"},
        server={"sessions_dir": root / "sessions", "max_jobs_per_session": PER_SESSION},
    )
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(timeout=30)


def _packets(path: Path) -> tuple[int, int]:
    """(video packets, audio packets) as ffprobe counts them; raises if ffprobe fails."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_packets", "-show_entries", "stream=codec_type,nb_read_packets",
         "-of", "json", str(path)], check=True, capture_output=True, text=True,
    ).stdout
    counts = {s["codec_type"]: int(s["nb_read_packets"]) for s in json.loads(out)["streams"]}
    return counts["video"], counts["audio"]


def _decodes(path: Path) -> bool:
    proc = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "null", "-"],
                          capture_output=True, text=True)
    return proc.returncode == 0 and not proc.stderr.strip()


async def _speak_all(url: str) -> dict[str, list[dict]]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for s in range(SESSIONS):
            (await client.post("/reset", json={"session_id": f"s{s}"})).raise_for_status()

        async def one(s: int, k: int) -> dict:
            await asyncio.sleep(k * STAGGER_S)
            text = " ".join(["word"] * (k + 1) * 2)
            response = await client.post("/speak", json={"text": text, "session_id": f"s{s}"})
            assert response.status_code == 200, response.text
            return {**response.json(), "k": k}

        replies = await asyncio.gather(*(one(s, k) for s in range(SESSIONS) for k in range(PER_SESSION)))
    by_session: dict[str, list[dict]] = {}
    for r in replies:
        by_session.setdefault(r["session_id"], []).append(r)
    return by_session


def test_concurrent_sessions_each_get_every_clip_once_in_order(base_url: str, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    by_session = asyncio.run(_speak_all(base_url))
    wall = time.perf_counter() - t0
    assert sorted(by_session) == [f"s{s}" for s in range(SESSIONS)]
    serial = 0.0
    for sid, replies in by_session.items():
        replies.sort(key=lambda r: r["clip_index"])
        # Every request became exactly one clip.
        assert [r["clip_index"] for r in replies] == list(range(1, PER_SESSION + 1))
        assert sorted(r["k"] for r in replies) == list(range(PER_SESSION))
        frames = [r["frames"] for r in replies]
        # Serialised: each clip started where the one before it ended (overlapping renders
        # of one session would have started from the same avatar frame).
        assert [r["start_frame"] for r in replies] == [sum(frames[:i]) % 50 for i in range(PER_SESSION)]
        serial += sum(r["timings"]["total"] for r in replies)

        with httpx.Client(base_url=base_url, timeout=60) as client:
            state = client.get(f"/sessions/{sid}").json()
            assert state["clips"] == PER_SESSION and state["frames"] == sum(frames)
            for r in replies:
                clip = tmp_path / f"{sid}_{r['clip_index']}.mp4"
                clip.write_bytes(client.get(r["clip_url"]).content)
                assert _packets(clip)[0] == r["frames"]
            for name, url in (("plain", f"/sessions/{sid}/video"), ("frag", f"/sessions/{sid}/video?fragmented=true")):
                video = tmp_path / f"{sid}_{name}.mp4"
                video.write_bytes(client.get(url).content)
                assert _packets(video)[0] == sum(frames)
                assert _decodes(video)
    # Different sessions overlapped: the whole run took less than the requests' summed time.
    assert wall < serial

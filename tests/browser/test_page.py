"""The live page in Debian's Chromium (Playwright) against a real server with the lite renderer.

Frames are sampled from the <video> element every 40 ms (canvas drawImage + getImageData)
across idle → speech → idle → interrupted speech → idle.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn

from musetalk_warm.server.app import create_app
from test_live_api import live_settings

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    # Host candidates as plain addresses (no mDNS names) on a machine without multicast.
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]

# Runs in the page from its first script: samples the video every 40 ms once it has a picture.
SAMPLER = """
(() => {
  window.__samples = [];
  const canvas = document.createElement("canvas");
  const sample = () => {
    const video = document.getElementById("video");
    // HAVE_CURRENT_DATA: the element holds a decoded picture (before that it shows none).
    if (!video || !video.videoWidth || video.readyState < 2 || !window.__mouth) return;
    const w = video.videoWidth, h = video.videoHeight;
    if (canvas.width !== w) { canvas.width = w; canvas.height = h; }
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(video, 0, 0, w, h);
    const all = ctx.getImageData(0, 0, w, h).data;
    let sum = 0, sq = 0, n = 0;
    for (let i = 0; i < all.length; i += 4 * 7) {
      const g = (all[i] + all[i + 1] + all[i + 2]) / 3; sum += g; sq += g * g; n++;
    }
    const [x1, y1, x2, y2] = window.__mouth;
    const mouth = Array.from(ctx.getImageData(x1, y1, x2 - x1, y2 - y1).data.filter((_, i) => i % 4 === 1));
    const mean = sum / n;
    window.__samples.push({ t: Date.now(), ct: video.currentTime, mean, std: Math.sqrt(sq / n - mean * mean), mouth });
  };
  setInterval(sample, 40);
})();
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    app = create_app(live_settings(tmp_path_factory.mktemp("browser")))
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not (srv.started and app.state.warm.live is not None):
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    if shutil.which(CHROMIUM) is None:
        pytest.fail("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def _mouth_box(app: object) -> list[int]:
    """The mouth's bounding box over the whole avatar cycle, with a margin (frame pixels)."""
    avatar = app.state.warm.runtime.avatar(None)  # type: ignore[attr-defined]
    lips = avatar.landmarks[:, 48:68]
    (x1, y1), (x2, y2) = lips.min(axis=(0, 1)), lips.max(axis=(0, 1))
    pad = 0.3 * (x2 - x1)
    height, width = avatar.frames.shape[1:3]
    return [max(0, int(x1 - pad)), max(0, int(y1 - pad)), min(width, int(x2 + pad)), min(height, int(y2 + 2 * pad))]


def _mouth_change(samples: list[dict], sources: np.ndarray) -> np.ndarray:
    """Per sample, how far its mouth region is from the closest source frame's (green channel).

    Idle frames are source frames (only coding noise remains); a rendered, opening mouth is
    far from all of them, whatever the head motion along the cycle.
    """
    h, w = sources.shape[1:]
    return np.array([
        np.abs(np.asarray(s["mouth"], float).reshape(h, w)[None] - sources).mean(axis=(1, 2)).min()
        for s in samples
    ])


def _wait_status(page, text: str, timeout_s: float) -> float:
    page.wait_for_function(f"document.getElementById('status').textContent === {text!r}", timeout=timeout_s * 1000)
    return page.evaluate("Date.now()")


def test_page_plays_idle_speaks_and_interrupts(server, browser, tmp_path: Path) -> None:
    url, app = server
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.add_init_script(f"window.__mouth = {_mouth_box(app)};" + SAMPLER)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/?session=browser")
    loaded = page.evaluate("performance.timeOrigin")
    page.wait_for_function("window.__samples.length > 0 && window.__samples.at(-1).ct > 1.0", timeout=10_000)
    idle = page.evaluate("window.__samples")
    assert page.evaluate("window.musetalkLive.transport") == "webrtc"
    first = next(s for s in idle if s["ct"] > 0)
    assert first["t"] - loaded < 3000, (first["t"] - loaded, page.evaluate("window.musetalkLive.marks"))
    assert idle[-1]["ct"] > first["ct"]  # currentTime advances
    assert len({round(s["mean"], 3) for s in idle}) > 1  # frames change: the avatar idles along its cycle
    assert page.is_visible("#unmute")  # muted autoplay; the button unmutes
    page.click("#unmute")
    assert page.evaluate("document.getElementById('video').muted") is False
    x1, y1, x2, y2 = _mouth_box(app)
    sources = app.state.warm.runtime.avatar(None).frames[:, y1:y2, x1:x2, 1].astype(float)
    baseline = _mouth_change(idle[-25:], sources)

    page.fill("#text", "Hello there. I am talking to you now.")
    page.press("#text", "Enter")
    sent = page.evaluate("Date.now()")
    page.wait_for_timeout(2000)
    page.screenshot(path=str(tmp_path / "live_page.png"))  # for a look when it fails; not in the tree
    spoken = [s for s in page.evaluate("window.__samples") if s["t"] >= sent - 200]
    opening = _mouth_change(spoken, sources)
    threshold = baseline.max() + 2.5  # idle: coding noise only; speech: +3..8
    moved = [s["t"] - sent for s, m in zip(spoken, opening) if m > threshold]
    assert moved and moved[0] <= 1500, (moved[:1], threshold, [(s["t"] - sent, round(m, 1)) for s, m in zip(spoken, opening)][::4])
    _wait_status(page, "Idle", 20)
    assert page.locator("#transcript .avatar").count() >= 1

    page.fill("#text", "This is a much longer reply, with several words to say, so that it can be interrupted.")
    page.press("#text", "Enter")
    _wait_status(page, "Speaking", 5)
    page.wait_for_timeout(500)
    page.click("#interrupt")
    clicked = page.evaluate("Date.now()")
    idle_again = _wait_status(page, "Idle", 2)
    assert idle_again - clicked < 1000
    page.wait_for_timeout(1500)
    state = app.state.warm.live.get("browser").describe()
    assert state["state"] == "idle" and state["queued_utterances"] == 0
    samples = page.evaluate("window.__samples")
    settled = _mouth_change([s for s in samples if s["t"] > clicked + 700], sources)
    assert settled.max() <= threshold, np.round(settled, 3).tolist()  # the mouth is closed again

    # Never blank or grey, from the first picture to the end.
    for s in samples:
        assert s["std"] > 15 and 15 < s["mean"] < 240, s
    assert not errors, errors
    page.close()

"""Viewers' fMP4 encoders in worker processes: the same bytes as in-process, failures contained, no leaks."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from musetalk_warm.config import LiveSettings
from musetalk_warm.errors import MediaError
from musetalk_warm.live.session import LiveFrame
from musetalk_warm.live.transports.encoders import EncoderPool, Fmp4Stream, PooledFmp4, open_fmp4
from musetalk_warm.live.transports.mse import LiveFmp4

RATE, FPS = 48000, 25


def frames(count: int, width: int = 96, height: int = 64, seed: int = 0) -> list[LiveFrame]:
    """Moving colour ramps (what x264 keeps close) and noise as sound."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    return [
        LiveFrame(i, np.stack([(x + 3 * i) % 256, (2 * y + i) % 256, (x + y) % 256], -1).astype(np.uint8),
                  (3000 * rng.standard_normal(RATE // FPS)).astype(np.int16), i % 2 == 0)
        for i in range(count)
    ]


def encode(stream: Fmp4Stream, ticks: list[LiveFrame]) -> list[bytes]:
    pieces = [p for f in ticks for p in stream.add(f)]
    stream.close()
    return pieces


def shm_exists(stream: PooledFmp4) -> bool:
    return Path("/dev/shm", stream.shm.name).exists()


@pytest.fixture(scope="module")
def pool() -> Iterator[EncoderPool]:
    pool = EncoderPool(2)
    pool.start()
    yield pool
    pool.close()


@pytest.mark.parametrize("size", [(96, 64), (95, 63)])  # odd sizes are padded by the worker's encoder
def test_pooled_stream_is_byte_identical_to_the_in_process_encoder(pool: EncoderPool, size: tuple[int, int]) -> None:
    ticks = frames(20, *size)
    reference = LiveFmp4(*size, FPS, RATE, 3, threads=1)
    expected = [p for f in ticks for p in reference.add(f)]
    stream = pool.open(*size, FPS, RATE, 3, threads=1)
    got = [p for f in ticks for p in stream.add(f)]
    assert stream.mime == reference.mime
    assert got[0][4:8] == b"ftyp" and len(got) == len(expected) >= 6
    assert got == expected  # x264 with one thread is deterministic: the same init and fragments
    stream.close()
    reference.close()
    with av.open(io.BytesIO(b"".join(got))) as container:
        decoded = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    assert len(decoded) == 18  # the last fragment's frames are still buffered
    assert decoded[0].shape == (64, 96, 3)
    assert np.abs(decoded[0][: size[1], : size[0]].astype(int) - ticks[0].image).mean() < 4


def test_factory_picks_the_pool_only_when_given(pool: EncoderPool) -> None:
    live = LiveSettings(mse_fragment_frames=2)
    local, pooled = open_fmp4(live, 96, 64, FPS, RATE), open_fmp4(live, 96, 64, FPS, RATE, pool)
    assert isinstance(local, LiveFmp4) and isinstance(pooled, PooledFmp4)
    ticks = frames(6)
    assert encode(pooled, ticks) == encode(local, ticks)  # two frames a fragment in both
    unstarted = pool.open(96, 64, FPS, RATE)
    with pytest.raises(MediaError, match="no frame encoded yet"):
        _ = unstarted.mime
    unstarted.close()


def test_streams_go_to_the_least_loaded_worker(pool: EncoderPool) -> None:
    streams = [pool.open(96, 64, FPS, RATE) for _ in range(4)]
    workers = [s._worker.process.pid for s in streams]
    assert sorted(workers) == sorted(pool.pids * 2)
    for s in streams:
        s.close()
    assert all(w.load == 0 for w in pool._workers)


@pytest.mark.parametrize("kind", ["in-process", "pooled"])
def test_close_waits_for_a_running_add_then_refuses_frames(pool: EncoderPool, kind: str) -> None:
    """A viewer leaving closes its encoder from one thread while another may be encoding: close
    waits for the running frame, and the encoder refuses frames afterwards (no crash)."""
    encoder: Fmp4Stream = LiveFmp4(96, 64, FPS, RATE) if kind == "in-process" else pool.open(96, 64, FPS, RATE)
    frame = frames(1)[0]
    outcome: list[str] = []
    pieces: list[bytes] = []

    def feed() -> None:
        try:
            while True:
                pieces.extend(encoder.add(frame))
        except MediaError as exc:
            outcome.append(str(exc))

    worker = threading.Thread(target=feed)
    worker.start()
    time.sleep(0.3)
    encoder.close()
    worker.join(5)
    assert not worker.is_alive()
    assert outcome == ["the live stream's encoder is closed"]
    assert pieces and pieces[0][4:8] == b"ftyp"
    encoder.close()  # twice is harmless
    if isinstance(encoder, PooledFmp4):
        assert not shm_exists(encoder)


def test_a_killed_worker_fails_its_streams_only_and_is_replaced(pool: EncoderPool) -> None:
    doomed, other = pool.open(96, 64, FPS, RATE), pool.open(96, 64, FPS, RATE)
    assert doomed._worker is not other._worker
    ticks = frames(8)
    doomed.add(ticks[0])
    other.add(ticks[0])
    killed = doomed._worker.process.pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    with pytest.raises(MediaError, match=r"encoder process ended \(SIGKILL\)"):
        for tick in ticks[1:]:
            doomed.add(tick)
    with pytest.raises(MediaError, match="SIGKILL"):  # and every later frame
        doomed.add(ticks[1])
    assert len([p for t in ticks[1:] for p in other.add(t)]) >= 2  # the other worker goes on
    pids = pool.pids
    assert killed not in pids and len(pids) == 2 and None not in pids
    doomed.close()
    other.close()
    assert not shm_exists(doomed)
    for _ in range(2):  # both workers, the new one included, encode new streams
        assert encode(pool.open(96, 64, FPS, RATE), ticks) == encode(LiveFmp4(96, 64, FPS, RATE), ticks)


def test_shared_memory_is_unlinked_on_close_and_at_shutdown() -> None:
    pool = EncoderPool(1)
    pool.start()
    streams = [pool.open(96, 64, FPS, RATE) for _ in range(3)]
    streams[0].add(frames(1)[0])
    assert all(shm_exists(s) for s in streams)
    assert streams[0].shm.size >= 96 * 64 * 3 + 2 * RATE // FPS
    streams[1].close()
    assert not shm_exists(streams[1]) and shm_exists(streams[0])
    process = streams[0]._worker.process
    pool.close()
    assert not any(shm_exists(s) for s in streams)
    assert not process.is_alive() and process.exitcode == 0  # stopped, not killed
    with pytest.raises(MediaError, match="closed"):
        streams[0].add(frames(1)[0])
    with pytest.raises(MediaError, match="not running"):
        pool.open(96, 64, FPS, RATE)


def test_a_frame_larger_than_the_stream_is_refused(pool: EncoderPool) -> None:
    stream = pool.open(96, 64, FPS, RATE)
    big = frames(1, 128, 64)[0]
    with pytest.raises(MediaError, match="does not fit"):
        stream.add(big)
    assert [p[4:8] for p in stream.add(frames(1)[0])] == [b"ftyp"]  # the stream goes on
    stream.close()


def test_a_hung_worker_times_out_and_is_replaced() -> None:
    pool = EncoderPool(1, timeout_s=0.5)
    pool.start()
    try:
        stream = pool.open(96, 64, FPS, RATE)
        stream.add(frames(1)[0])
        hung = pool.pids[0]
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        with pytest.raises(MediaError, match="did not answer within 0.5 s"):
            stream.add(frames(1)[0])
        with pytest.raises(MediaError, match="SIGKILL"):
            stream.add(frames(1)[0])
        stream.close()
        deadline = time.monotonic() + 5
        while pool.pids == [hung] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pool.pids != [hung]
        ticks = frames(8)
        assert encode(pool.open(96, 64, FPS, RATE), ticks) == encode(LiveFmp4(96, 64, FPS, RATE), ticks)
    finally:
        pool.close()

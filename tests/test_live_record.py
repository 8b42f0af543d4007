"""The record of a live session: only what was shown reaches full_session.mp4."""

from __future__ import annotations

import asyncio
from pathlib import Path

import av
import numpy as np

from live_support import Rig, build_avatar, drain_frames, live_test_settings, queued, until
from musetalk_warm.config import Settings
from musetalk_warm.live.recorder import Recorder
from musetalk_warm.sessions.store import SessionStore

QUANTUM = 8  # frames in 320 ms: whole video and AAC frames at 25 fps / 48 kHz


def probe(path: Path) -> tuple[int, float, float]:
    """Video frames, video seconds and audio seconds of an MP4, as PyAV decodes them."""
    with av.open(str(path)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        samples = sum(f.samples for f in container.decode(audio=0))
        rate = container.streams.audio[0].rate
    return frames, frames / 25, samples / rate


def run_session(settings: Settings, interrupt_after: int | None) -> tuple[list, Path, int]:
    store = SessionStore(settings)
    avatar = build_avatar(settings)

    async def scenario() -> tuple[list, int]:
        rig = Rig(settings)
        recorder = Recorder(store, "rec", avatar, settings.live, settings.media, asyncio.create_task)
        session = rig.session("rec", avatar, recorder=recorder)
        sub = session.subscribe()
        await rig.tick(5)
        await session.say("This reply is long enough that the viewer cuts it off well before it ends.")
        await until(lambda: queued(session))
        total = session._current.total_frames
        speaking = 0
        while interrupt_after is None or speaking < interrupt_after:
            await rig.tick(1)
            speaking += sub._queue[-1].speaking
            if interrupt_after is None and speaking and not sub._queue[-1].speaking:
                break
        if interrupt_after is not None:
            session.interrupt()
        await rig.tick(30)
        await rig.close()  # the session stops: the record is complete
        assert recorder.errors == 0
        return drain_frames(sub), total

    frames, total = asyncio.run(scenario())
    return frames, store.video_path("rec"), total


def test_interrupted_utterance_appends_only_what_was_shown(tmp_path: Path) -> None:
    settings = live_test_settings(tmp_path)
    frames, video, total = run_session(settings, interrupt_after=12)
    shown = sum(f.speaking for f in frames)
    assert 12 <= shown < 12 + settings.live.blend_frames  # the fade after the interrupt
    n, video_s, audio_s = probe(video)
    # The clip is what was shown, closed at the next clip quantum with the idle frames that followed.
    assert n == -(-shown // QUANTUM) * QUANTUM
    assert n < total
    assert abs(audio_s - video_s) < 1e-3
    state = SessionStore(settings).state("rec")
    assert state.clips == 1 and state.frames == n


def test_whole_utterance_recorded_and_idle_is_not(tmp_path: Path) -> None:
    settings = live_test_settings(tmp_path)
    frames, video, total = run_session(settings, interrupt_after=None)
    shown = sum(f.speaking for f in frames)
    assert shown == total
    n, video_s, audio_s = probe(video)
    assert n == -(-total // QUANTUM) * QUANTUM < len(frames)  # idle before and after is not in the record
    # The recorded audio is the speech that played, frame for frame.
    with av.open(str(video)) as container:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    played = np.concatenate([f.audio for f in frames if f.speaking]).astype(np.float32) / 32768
    assert np.abs(audio).max() > 0.05
    assert abs(float(np.sqrt(np.mean(audio[: played.size] ** 2))) - float(np.sqrt(np.mean(played**2)))) < 0.02

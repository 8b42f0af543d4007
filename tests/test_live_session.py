"""A live session's stream on a manual clock: continuous ticks, silent idle, speech, barge-in."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from live_support import Rig, build_avatar, drain_frames, live_test_settings, queued, until
from musetalk_warm.avatars.cache import Avatar
from musetalk_warm.config import Settings
from musetalk_warm.live.session import LiveFrame
from musetalk_warm.render.mixed import face_region

SPF = 48000 // 25


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return live_test_settings(tmp_path_factory.mktemp("live-session"))


@pytest.fixture(scope="module")
def avatar(settings: Settings) -> Avatar:
    return build_avatar(settings)


def check_stream(frames: list[LiveFrame], avatar: Avatar, start: int, first_index: int = 0) -> None:
    """Ticks in order without gap or repeat, one frame of audio each, silent and untouched idle,
    and the background (everything outside the face box) at the cycle position of every tick."""
    assert [f.index for f in frames] == list(range(first_index, first_index + len(frames)))
    for frame in frames:
        assert frame.audio.dtype == np.int16 and frame.audio.shape == (SPF,)
        source = int(avatar.source_index(start + frame.index))
        expected = avatar.frames[source]
        if not frame.speaking:
            assert not frame.audio.any()
            assert np.array_equal(frame.image, expected)
        else:
            rows, cols = face_region(avatar, source)
            outside = np.ones(expected.shape[:2], bool)
            outside[rows, cols] = False
            assert np.array_equal(frame.image[outside], expected[outside])


def runs(frames: list[LiveFrame]) -> list[tuple[bool, int]]:
    """(speaking, length) of each run of equal ``speaking``."""
    out: list[tuple[bool, int]] = []
    for f in frames:
        if out and out[-1][0] == f.speaking:
            out[-1] = (f.speaking, out[-1][1] + 1)
        else:
            out.append((f.speaking, 1))
    return out


def test_idle_speech_idle_is_continuous_and_in_sync(settings: Settings, avatar: Avatar) -> None:
    async def scenario() -> tuple[list[LiveFrame], int, int]:
        rig = Rig(settings)
        session = rig.session("s", avatar, start_position=7)
        sub = session.subscribe()
        await rig.tick(10)
        await session.say("Hello there.")
        await until(lambda: queued(session))
        await rig.tick(120)
        misses, batches = session.stats.misses, rig.scheduler.batches
        await rig.close()
        return drain_frames(sub), misses, batches

    frames, misses, batches = asyncio.run(scenario())
    check_stream(frames, avatar, start=7)
    pattern = runs(frames)
    assert [speaking for speaking, _ in pattern] == [False, True, False]  # one utterance, back to idle
    speech = [f for f in frames if f.speaking]
    assert any(f.audio.any() for f in speech)
    assert misses == 0 and batches >= 1
    # The mouth moved: some speech frame differs from the avatar's own frame.
    assert any(not np.array_equal(f.image, avatar.frames[int(avatar.source_index(7 + f.index))]) for f in speech)


def test_interrupt_blends_back_to_idle_without_a_gap(settings: Settings, avatar: Avatar) -> None:
    blend = settings.live.blend_frames

    async def scenario() -> tuple[list[LiveFrame], list[LiveFrame], list[dict]]:
        rig = Rig(settings)
        session = rig.session("s", avatar)
        sub, events = session.subscribe(), session.events()
        await session.say("This sentence is long enough to be cut off in the middle by the viewer.")
        await until(lambda: queued(session))
        while sum(f.speaking for f in sub._queue) < 15:
            await rig.tick(1)
        before = drain_frames(sub)
        session.interrupt()
        await rig.tick(40)
        after = drain_frames(sub)
        await session.say("Again.")
        await until(lambda: queued(session))
        await rig.tick(60)
        after += drain_frames(sub)
        seen = []
        while True:
            try:
                seen.append(events.get_nowait())
            except IndexError:
                break
        await rig.close()
        return before, after, seen

    before, after, seen = asyncio.run(scenario())
    frames = before + after
    check_stream(frames, avatar, start=0)
    # Within the blend the picture is back to idle, and audio stops at once (a one-frame fade).
    first_run = runs(after)[0]
    assert first_run[0] is True and first_run[1] < blend
    assert after[0].audio[-1] == 0 and all(not f.audio.any() for f in after[1 : first_run[1]])
    assert [s for s, _ in runs(frames)] == [False, True, False, True, False]  # the next reply speaks again
    ended = [e for e in seen if e["type"] == "utterance" and e["event"] == "ended"]
    assert ended[0]["interrupted"] is True and ended[-1]["interrupted"] is False


def test_pcm_stream_speaks_with_bounded_lookahead(settings: Settings, avatar: Avatar, speech_16k: np.ndarray) -> None:
    pcm = (np.clip(speech_16k[:32000], -1, 1) * 32767).astype(np.int16)

    async def scenario() -> tuple[list[LiveFrame], list[int]]:
        rig = Rig(settings)
        session = rig.session("s", avatar)
        sub = session.subscribe()
        source = session.open_pcm_input(16000)
        hop = settings.live.pcm_hop_frames
        lag = []
        for start in range(0, pcm.size, 640):  # one frame of audio per tick, as a live speaker would send
            source.feed(pcm[start : start + 640])
            utt = session._current
            if utt is not None:  # features follow the audio within look-ahead + one hop
                await until(lambda: utt.audio_frames - utt.ready_frames < 2 + hop)
                lag.append((utt.audio_frames, utt.ready_frames))
            await rig.tick(1)
        utt = session._current
        source.end()
        await until(lambda: utt.planned_all)
        await rig.tick(40)
        await rig.close()
        return drain_frames(sub), lag

    frames, lag = asyncio.run(scenario())
    check_stream(frames, avatar, start=0)
    # Frame i is conditioned once the audio of frame i + 2 exists: never earlier, at most a hop later.
    assert all(ready <= max(0, audio - 2) for audio, ready in lag)
    assert max(audio - ready for audio, ready in lag) < 2 + settings.live.pcm_hop_frames
    pattern = runs(frames)
    assert [s for s, _ in pattern] == [False, True, False]
    # Speech starts within look-ahead + one hop + the start lead of the first audio, and lasts
    # the two seconds sent plus the fade-out.
    assert pattern[0][1] <= 2 + 2 * settings.live.pcm_hop_frames + settings.live.start_lead_frames + 2
    assert pattern[1][1] == 50 + settings.live.blend_frames - 1


def test_pauses_within_an_utterance_show_the_source_mouth(settings: Settings, avatar: Avatar,
                                                          speech_16k: np.ndarray) -> None:
    """Speech, a second of silence, speech again, as one utterance: the silent middle shows the
    avatar's own mouth (the source frame), the speech around it the rendered one."""
    speech = np.clip(speech_16k[:16000] * (0.5 / max(1e-6, np.abs(speech_16k[:16000]).max())), -1, 1)
    clip = np.concatenate([speech, np.zeros(16000, np.float32), speech]).astype(np.float32)

    async def scenario() -> tuple[list[LiveFrame], list[float]]:
        rig = Rig(settings)
        session = rig.session("s", avatar)
        sub = session.subscribe()
        session.speak_audio(clip, 16000)
        await until(lambda: queued(session))
        utt = session._current or session._queue[0]
        # The first frames' pauses are read at once, the rest once the utterance is on screen.
        await until(lambda: len(utt.hold) >= settings.live.lead_frames)
        assert len(utt.hold) < utt.total_frames
        await rig.tick(5)
        assert utt.started
        await until(lambda: len(utt.hold) == utt.total_frames)  # voice activity read for every frame
        await rig.tick(75 + settings.live.blend_frames + 20 - 5)
        await rig.close()
        return drain_frames(sub), list(utt.hold)

    frames, hold = asyncio.run(scenario())
    check_stream(frames, avatar, start=0)
    spoken = [f for f in frames if f.speaking]
    assert len(spoken) == 75 + settings.live.blend_frames - 1

    def mouth_change(frame: LiveFrame) -> float:
        source = int(avatar.source_index(frame.index))
        rows, cols = face_region(avatar, source)
        return float(np.abs(frame.image[rows, cols].astype(int) - avatar.frames[source][rows, cols]).mean())

    pause = range(25 + 4, 50 - 4)  # clear of the 0.1 s hangover and the ramp on either side
    assert all(hold[j] == 1.0 for j in pause)
    assert max(hold[j] for j in range(5, 20)) < 1.0  # speech keeps the rendered mouth
    held = [mouth_change(spoken[j]) for j in pause]
    talking = [mouth_change(spoken[j]) for j in range(5, 20)] + [mouth_change(spoken[j]) for j in range(55, 70)]
    assert max(held) < 1.0, held  # the source mouth, pasted back (resampling only)
    assert float(np.median(talking)) > 3 * max(max(held), 0.2), (np.median(talking), max(held))

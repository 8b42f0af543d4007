"""SessionStore on the lite renderer: continuity, atomic appends, crash recovery, reset."""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import decodes, ffprobe, make_settings, snapshot

from musetalk_warm.media import session_video
from musetalk_warm.config import Settings
from musetalk_warm.errors import AudioError, BadInput, MediaError, NotFound
from musetalk_warm.render.runtime import Runtime
from musetalk_warm.sessions.store import SessionStore, check_session_id
from musetalk_warm.voice.tts import EspeakTTS

RATE = 16000
FPS = 25


def _settings(root: Path, **server: object) -> Settings:
    """Lite renderer, a one-second demo avatar, everything under ``root``."""
    return make_settings(root, avatar={"demo_seconds": 1.0}, server=server)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="module")
def runtime(root: Path) -> Runtime:
    rt = Runtime.load(_settings(root))
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def speech() -> list[np.ndarray]:
    import soxr

    tts = EspeakTTS()
    out = []
    for text in ("Hello there.", "How are you today?", "Fine, thanks."):
        samples, rate = tts.synthesize(text)
        out.append(soxr.resample(samples, rate, RATE).astype(np.float32))
    return out


def test_clips_continue_and_session_adds_up(root: Path, runtime: Runtime, speech: list[np.ndarray]) -> None:
    store = SessionStore(_settings(root))
    cycle = runtime.avatar(None).cycle_length
    results = [store.speak("talk", audio, None, runtime) for audio in speech]
    assert [r.clip_index for r in results] == [1, 2, 3]
    frames = [r.frames for r in results]
    # Each clip starts where the previous one ended on the avatar's frame cycle.
    assert [r.start_frame for r in results] == [0, frames[0] % cycle, (frames[0] + frames[1]) % cycle]
    state = store.state("talk")
    assert state.clips == 3 and state.frames == sum(frames)
    assert state.next_frame == sum(frames) % cycle
    assert state.audio_tail is not None and state.audio_tail.dtype == np.float32
    for r, audio in zip(results, speech):
        # Padded to the 320 ms quantum: whole frames, never shorter than the speech.
        assert r.frames % 8 == 0 and len(audio) / RATE <= r.duration_s < len(audio) / RATE + 0.32 + 1e-6
        clip = ffprobe(r.clip_path)
        assert clip["video"]["codec_name"] == "h264" and int(clip["video"]["nb_read_packets"]) == r.frames

    info = ffprobe(store.video_path("talk"))
    assert info["video"]["codec_name"] == "h264" and info["audio"]["codec_name"] == "aac"
    assert int(info["video"]["nb_read_packets"]) == sum(frames)
    total = sum(frames) / FPS
    exported = store.export("talk")
    plain = ffprobe(exported)
    assert abs(float(plain["video"]["duration"]) - total) < 0.04
    assert abs(float(plain["audio"]["duration"]) - float(plain["video"]["duration"])) < 1 / FPS
    assert decodes(exported)
    assert store.export("talk").stat().st_mtime_ns == exported.stat().st_mtime_ns  # cached


def test_failed_append_leaves_session_unchanged(
    root: Path, runtime: Runtime, speech: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SessionStore(_settings(root))
    store.speak("fail", speech[0], None, runtime)
    folder = store.path("fail")
    before = snapshot(folder)

    # The disk fails while the session video's new bytes are flushed: they were already written.
    def broken_fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("full_session.mp4"):
            raise OSError(5, "Input/output error")
        os.fsync(fd)

    monkeypatch.setattr(session_video, "os", types.SimpleNamespace(**{**vars(os), "fsync": broken_fsync}))
    with pytest.raises(MediaError):
        store.speak("fail", speech[1], None, runtime)
    monkeypatch.undo()
    after = snapshot(folder)
    # Media, index and clips are as they were; the state only moved to a new generation,
    # so the discarded clip's name is never given to another clip.
    assert {k: v for k, v in after.items() if k != "state.json"} == {
        k: v for k, v in before.items() if k != "state.json"}
    old, new = (json.loads(d["state.json"]) for d in (before, after))
    assert new["generation"] != old["generation"] and new["earlier"] == [[1, old["generation"]]]
    assert {k: v for k, v in new.items() if k not in ("generation", "earlier")} == {
        k: v for k, v in old.items() if k not in ("generation", "earlier")}
    assert decodes(store.video_path("fail"))
    # The session carries on from where the last good clip ended.
    result = store.speak("fail", speech[1], None, runtime)
    assert result.clip_index == 2 and result.start_frame == store.state("fail").previous.next_frame


def test_state_ahead_of_video_is_rolled_back(root: Path, runtime: Runtime, speech: list[np.ndarray]) -> None:
    """A crash after state.json was written but before the append landed loses only that clip."""
    store = SessionStore(_settings(root))
    first = store.speak("crash", speech[0], None, runtime)
    good = store.state("crash")
    store.speak("crash", speech[1], None, runtime)
    folder = store.path("crash")
    # Rebuild what the disk holds when the process dies between the two writes:
    # the index and video of clip 1, the state (and clip file) of clip 2.
    index = folder / "full_session.index.jsonl"
    lines = index.read_bytes().splitlines(keepends=True)
    index.write_bytes(lines[0])
    fresh = SessionStore(_settings(root))
    state = fresh.state("crash")
    assert state.clips == 1 and state.next_frame == good.next_frame == first.frames
    assert not (folder / "clips" / f"clip_{state.generation}_0002.mp4").exists()
    assert os.path.getsize(folder / "full_session.mp4") == json.loads(lines[0])["end"]
    again = fresh.speak("crash", speech[2], None, runtime)
    assert again.clip_index == 2 and again.start_frame == first.frames
    assert decodes(fresh.export("crash"))


def test_bad_audio_and_ids(root: Path, runtime: Runtime) -> None:
    store = SessionStore(_settings(root))
    store.create("short")
    before = snapshot(store.path("short"))
    with pytest.raises(AudioError, match="shorter than one video frame"):
        store.speak("short", np.zeros(RATE // 50, np.float32), None, runtime)
    with pytest.raises(NotFound, match="unknown avatar"):
        store.speak("short", np.zeros(RATE, np.float32), "nobody", runtime)
    assert snapshot(store.path("short")) == before
    with pytest.raises(NotFound):
        store.speak("absent", np.zeros(RATE, np.float32), None, runtime, create=False)
    for bad in ("../etc", "a/b", "", ".hidden"):
        with pytest.raises(BadInput):
            store.state(bad)
    with pytest.raises(NotFound, match="no clips yet"):
        store.export("short")


@pytest.mark.parametrize("policy", ["archive", "delete"])
def test_reset(tmp_path: Path, runtime: Runtime, speech: list[np.ndarray], policy: str) -> None:
    store = SessionStore(_settings(tmp_path, reset_policy=policy))
    store.speak("r", speech[0], None, runtime)
    old = snapshot(store.path("r"))
    state = store.reset("r")
    assert state.clips == 0 and state.next_frame == 0 and state.duration_s == 0
    assert not store.video_path("r").exists()
    siblings = [p for p in store.root.iterdir() if p.name != "r"]
    if policy == "archive":
        assert len(siblings) == 1 and siblings[0].name.startswith("_r.")
        assert snapshot(siblings[0]) == old
        # An archive is not a session: no request can name it, let alone append to it.
        with pytest.raises(BadInput):
            check_session_id(siblings[0].name)
        with pytest.raises(BadInput):
            store.speak(siblings[0].name, speech[1], None, runtime, create=False)
        assert snapshot(siblings[0]) == old
    else:
        assert siblings == []
    assert store.speak("r", speech[1], None, runtime).start_frame == 0


def test_reset_starts_a_new_generation(tmp_path: Path, runtime: Runtime, speech: list[np.ndarray]) -> None:
    """Clip names carry the session generation, so a reset never reuses an old clip's name."""
    store = SessionStore(_settings(tmp_path))
    first = store.speak("g", speech[0], None, runtime)
    old = first.state.generation
    assert store.clip_path("g", old, 1) == first.clip_path
    assert json.loads((store.path("g") / "state.json").read_text())["generation"] == old
    assert SessionStore(_settings(tmp_path)).state("g").generation == old  # stable across reopen
    new = store.reset("g").generation
    assert new != old
    again = store.speak("g", speech[1], None, runtime)
    assert again.clip_index == 1 and again.state.generation == new and again.clip_path != first.clip_path
    with pytest.raises(NotFound):
        store.clip_path("g", old, 1)
    for bad in ("../x", "", "G0"):
        with pytest.raises(NotFound):
            store.clip_path("g", bad, 1)
    # A state.json from before generations: every read agrees on one.
    state_file = store.path("g") / "state.json"
    data = json.loads(state_file.read_text())
    del data["generation"], data["previous"]["generation"]
    state_file.write_text(json.dumps(data))
    fresh = SessionStore(_settings(tmp_path))
    assert fresh.state("g").generation == fresh.state("g").generation == "0"


def test_locks_exist_only_while_used(tmp_path: Path, runtime: Runtime, speech: list[np.ndarray]) -> None:
    store = SessionStore(_settings(tmp_path))
    for sid in ("nobody-1", "nobody-2"):
        with pytest.raises(NotFound):
            store.state(sid)
        with pytest.raises(NotFound):
            store.export(sid)
    store.speak("somebody", speech[0], None, runtime)
    with store.lock("somebody"), store.lock("somebody"):  # re-entrant
        assert list(store._locks) == ["somebody"]
    assert store._locks == {}


def test_gapless_after_100_appends(tmp_path: Path, runtime: Runtime, speech: list[np.ndarray]) -> None:
    """Audio and video of a 100-clip session end within one frame of each other."""
    store = SessionStore(_settings(tmp_path))
    source = np.concatenate(speech)
    rng = np.random.default_rng(0)
    frames = 0
    for _ in range(100):
        # Odd lengths, so clips end at every phase of the AAC frame grid before padding.
        n = int(rng.integers(RATE // 20, RATE * 6 // 10))
        start = int(rng.integers(0, len(source) - n))
        frames += store.speak("long", source[start : start + n], None, runtime).frames
    state = store.state("long")
    assert state.clips == 100 and state.frames == frames
    info = ffprobe(store.export("long"))
    video_s, audio_s = float(info["video"]["duration"]), float(info["audio"]["duration"])
    assert abs(video_s - frames / FPS) < 0.04
    assert abs(audio_s - video_s) < 1 / FPS
    assert int(info["video"]["nb_read_packets"]) == frames
    # 48 kHz AAC: 1024 samples a packet, no priming frames left between clips.
    assert int(info["audio"]["nb_read_packets"]) == round(frames / FPS * 48000 / 1024)


def test_clip_renamed_before_its_state_is_never_served(
    tmp_path: Path, runtime: Runtime, speech: list[np.ndarray]
) -> None:
    """Killed after the clip file is in place but before state.json: recovery removes the orphan,
    and its URL never serves the next clip's different bytes."""
    store = SessionStore(_settings(tmp_path))
    store.speak("orphan", speech[0], None, runtime)
    generation = store.state("orphan").generation
    clips = store.path("orphan") / "clips"
    orphan = clips / f"clip_{generation}_0002.mp4"
    # What the kill leaves: clip 2 renamed into place, the state still at clip 1.
    orphan.write_bytes((clips / f"clip_{generation}_0001.mp4").read_bytes())
    with pytest.raises(NotFound):  # not served even before recovery: the state does not own it
        store.clip_path("orphan", generation, 2)
    (store.path("orphan") / ".state.json.dead.tmp").write_bytes(b"half")  # a torn temp file
    restarted = SessionStore(_settings(tmp_path))
    state = restarted.state("orphan")
    assert state.clips == 1 and not orphan.exists()
    assert not list(store.path("orphan").glob(".*.tmp"))
    result = restarted.speak("orphan", speech[2], None, runtime)
    assert result.clip_index == 2 and result.clip_path.name != orphan.name
    assert sorted(p.name for p in clips.iterdir()) == sorted(restarted.state("orphan").clip_names())
    with pytest.raises(NotFound):
        restarted.clip_path("orphan", generation, 2)
    # Clip 1 keeps its URL; clip 2 has its own.
    assert restarted.clip_path("orphan", generation, 1).is_file()
    assert restarted.clip_path("orphan", result.state.generation, 2) == result.clip_path
    assert decodes(restarted.export("orphan"))


def test_temp_clip_left_by_a_kill_is_removed(tmp_path: Path, runtime: Runtime, speech: list[np.ndarray]) -> None:
    store = SessionStore(_settings(tmp_path))
    store.speak("tmp", speech[0], None, runtime)
    clips = store.path("tmp") / "clips"
    before = sorted(p.name for p in clips.iterdir())
    (clips / ".clip_x_0002.mp4.dead.tmp").write_bytes(b"\0" * 100)  # as a kill mid-write leaves it
    restarted = SessionStore(_settings(tmp_path))
    assert restarted.state("tmp").clips == 1
    assert sorted(p.name for p in clips.iterdir()) == before


def test_failed_index_truncate_still_cuts_the_video_tail(
    root: Path, runtime: Runtime, speech: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index line is written but its fsync fails, and truncating the index fails too:
    the uncommitted video bytes are cut at once, not left for the next open."""
    store = SessionStore(_settings(root))
    store.speak("trunc", speech[0], None, runtime)
    video, index = store.video_path("trunc"), store.video_path("trunc").with_name("full_session.index.jsonl")
    sizes = video.stat().st_size, index.stat().st_size

    def broken_fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("index.jsonl"):
            raise OSError(5, "Input/output error")
        os.fsync(fd)

    def broken_truncate(path: object, size: int) -> None:
        if str(path).endswith("index.jsonl"):
            raise OSError(5, "Input/output error")
        os.truncate(path, size)

    fake = types.SimpleNamespace(**{**vars(os), "fsync": broken_fsync, "truncate": broken_truncate})
    monkeypatch.setattr(session_video, "os", fake)
    with pytest.raises(MediaError):
        store.speak("trunc", speech[1], None, runtime)
    monkeypatch.undo()
    assert (video.stat().st_size, index.stat().st_size) == sizes
    assert decodes(video)
    assert store.speak("trunc", speech[1], None, runtime).clip_index == 2

"""Phoneme timings from the TTS reach the lite renderer: /speak output, live utterances, offsets."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from live_support import Rig, build_avatar, live_test_settings, until
from musetalk_warm.live.utterance import Utterance
from musetalk_warm.media.decode import iter_video_frames
from musetalk_warm.quality.articulation import articulation
from musetalk_warm.quality.clip import track_faces
from musetalk_warm.render.lite import LiteRenderer
from musetalk_warm.voice.phonemes import Phone, shifted
from musetalk_warm.voice.tts import EspeakTTS
from test_server import lite_settings, ready_client

FPS = 25
TEXT = "Bob moved the blue boots. My mom bought a map."


def _clip_articulation(client: Any, phones: Sequence[Phone], tmp: Path, **request: Any) -> dict[str, Any]:
    """Articulation on the landmarks of the clip /speak returned."""
    response = client.post("/speak", **request)
    assert response.status_code == 200, response.text
    path = tmp / f"clip{response.json()['clip_index']}.mp4"
    path.write_bytes(client.get(response.json()["clip_url"]).content)
    return articulation(track_faces(np.stack(list(iter_video_frames(path)))), phones, FPS)


def measure_text_and_upload(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Articulation of TEXT spoken through /speak as text, and as the same speech uploaded."""
    speech = EspeakTTS().synthesize_timed(TEXT)  # the server's engine and settings: the same audio
    assert speech.phones is not None
    wav = tmp_path / "speech.wav"
    sf.write(wav, speech.samples, speech.rate)
    with ready_client(lite_settings(tmp_path)) as client:
        text = _clip_articulation(client, speech.phones, tmp_path, json={"text": TEXT, "session_id": "text"})
        upload = _clip_articulation(client, speech.phones, tmp_path, data={"session_id": "upload"},
                                    files={"audio": ("speech.wav", wav.read_bytes(), "audio/wav")})
    return text, upload


def test_speak_text_closes_the_lips_on_bilabials(tmp_path: Path) -> None:
    """From text the output video closes the lips on m/b/p; the same speech uploaded does not
    carry the timings (the spectrum cannot tell m from n), so it closes on far fewer.

    Measured in a process of its own: espeak-ng's pitch state carries over from one synthesis
    to the next, shifting phonemes by fractions of a millisecond, so in this process the
    clip would depend on whatever the suite synthesised before.
    """
    script = ("import json, sys; from pathlib import Path; sys.path.insert(0, 'tests'); "
              "from test_lipsync_phones import measure_text_and_upload; "
              "print('RESULT ' + json.dumps(measure_text_and_upload(Path(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=300, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    text, upload = json.loads(lines[-1][len("RESULT "):])
    print("text", text, "upload", upload)
    assert text["bilabials"] >= 8
    assert text["bilabial_closed"] >= 0.8
    assert upload["bilabial_closed"] <= text["bilabial_closed"] - 0.3


def test_live_sentences_condition_with_their_own_phones(tmp_path: Path) -> None:
    """A reply of two sentences: each utterance is conditioned with the phonemes of its own
    sentence (times from its own start), so the lips close at each sentence's bilabials."""
    settings = live_test_settings(tmp_path)
    avatar = build_avatar(settings)
    calls: list[tuple[Sequence[Phone] | None, np.ndarray]] = []

    async def scenario() -> None:
        rig = Rig(settings)
        condition = rig.scheduler.condition

        async def recorded(audio: np.ndarray, fps: int, phones: Sequence[Phone] | None = None) -> Sequence[Any]:
            cond = await condition(audio, fps, phones)
            calls.append((phones, np.asarray(cond)))
            return cond

        rig.scheduler.condition = recorded  # type: ignore[method-assign]
        try:
            session = rig.session("lips", avatar)
            await session.say(TEXT)
            await until(lambda: len(calls) == 2)
        finally:
            await rig.close()

    asyncio.run(scenario())
    tts = EspeakTTS()
    for (phones, cond), sentence in zip(calls, ("Bob moved the blue boots.", "My mom bought a map.")):
        expected = tts.synthesize_timed(sentence).phones
        assert phones is not None and expected is not None
        # The sentence's own timings, not offset into the reply (espeak varies by some ms).
        assert [p.symbol for p in phones] == [p.symbol for p in expected]
        assert [p.start for p in phones] == pytest.approx([p.start for p in expected], abs=0.02)
        bilabials = [p for p in phones if p.symbol in ("m", "b", "p")]
        assert len(bilabials) >= 4
        for p in bilabials:
            middle = int(round((p.start + p.end) / 2 * FPS - 0.5 - 0.04 * FPS))
            assert cond[max(0, middle - 1) : middle + 2, 2].max() == 1.0, (sentence, p)
        assert (cond[:, 2] == 1.0).mean() < 0.5


def test_phones_move_with_the_audio_they_are_appended_after() -> None:
    first = [Phone("m", 0.1, 0.2), Phone("a", 0.2, 0.5)]
    second = [Phone("p", 0.05, 0.1), Phone("a", 0.1, 0.3)]
    assert shifted(second, 0.5) == (Phone("p", 0.55, 0.6), Phone("a", 0.6, 0.8))
    back = shifted(shifted(first, 2.0), -2.0)
    assert [t for p in back for t in (p.start, p.end)] == pytest.approx([0.1, 0.2, 0.2, 0.5])
    utt = Utterance(FPS, 48000)
    utt.add_audio(np.full(8000, 0.2, np.float32), np.zeros(24000, np.float32), first)
    utt.add_audio(np.full(4800, 0.2, np.float32), np.zeros(14400, np.float32), second)
    assert utt.phones == (*first, Phone("p", 0.55, 0.6), Phone("a", 0.6, 0.8))
    utt.end()
    lite = LiteRenderer()

    async def condition(audio: np.ndarray, fps: int, phones: Sequence[Phone] | None) -> np.ndarray:
        return lite.condition(audio, fps, phones)

    asyncio.run(utt.update_conditioning(condition))
    closed = np.flatnonzero(np.asarray(utt.cond)[:, 2] == 1.0)
    # m spans frames 2-3 (centres 0.1-0.2 s, 40 ms lead), p lands at frame 13 (0.55-0.6 s).
    assert set(closed) >= {2, 13} and all(f in (1, 2, 3, 12, 13, 14) for f in closed)

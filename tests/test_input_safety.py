"""Hostile and odd uploads and texts: refused with a clear 422, never a crash, never another file read."""

from __future__ import annotations

import ctypes
import io
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_server import lite_settings, ready_client

from musetalk_warm.errors import AudioError, TextError
from musetalk_warm.media import isolate
from musetalk_warm.media.audio import load_audio, load_audio_native
from musetalk_warm.media.decode import decode_audio
from musetalk_warm.voice.tts import EspeakTTS
from test_audio import encode_audio

RATE = 16000


def encode(fmt: str, codec: str, channels: np.ndarray, layout: str, rate: int = RATE) -> bytes:
    """``channels`` ``[C,N]`` float32 in an in-memory file of ``fmt``."""
    return encode_audio(fmt, codec, rate, channels, layout)


def wav_header(rate: int, channels: int, data_bytes: int, declared: int | None = None) -> bytes:
    """A PCM s16 WAV header; ``declared`` overrides the data size it claims."""
    size = data_bytes if declared is None else declared
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI", b"RIFF", min(36 + size, 0xFFFFFFFF), b"WAVE", b"fmt ", 16, 1, channels, rate,
        rate * channels * 2, channels * 2, 16, b"data", size,
    )


def pcm_wav(samples: np.ndarray, rate: int = RATE) -> bytes:
    """Mono or ``[N,C]`` float samples as a 16-bit WAV."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    channels = 1 if pcm.ndim == 1 else pcm.shape[1]
    return wav_header(rate, channels, pcm.nbytes) + pcm.tobytes()


def tone(seconds: float, freq: float = 300.0, rate: int = RATE) -> np.ndarray:
    return (0.4 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("safety")
    with ready_client(lite_settings(root)) as c:
        yield c


def upload(client: TestClient, data: bytes, name: str = "a.wav") -> dict:
    response = client.post("/speak", files={"audio": (name, data, "application/octet-stream")})
    body = response.json()
    body["status_code"] = response.status_code
    return body


# --- many channels ------------------------------------------------------------------------


def test_seven_one_aac_upload_is_spoken(client: TestClient) -> None:
    # The report's repro: `ffmpeg -f lavfi -i anullsrc=r=16000:cl=7.1 -t 2 -c:a aac t.m4a`; it
    # segfaulted the server in PyAV's planar to_ndarray().
    silence = encode("mp4", "aac", np.zeros((8, 2 * RATE), np.float32), "7.1")
    body = upload(client, silence, "t.m4a")
    assert body["status_code"] == 200, body
    assert body["duration"] == pytest.approx(2.0, abs=0.35)


@pytest.mark.parametrize(("fmt", "codec"), [("wav", "pcm_s16le"), ("flac", "flac"), ("mp4", "aac")])
def test_eight_channels_are_averaged(fmt: str, codec: str) -> None:
    channels = np.zeros((8, RATE), np.float32)
    channels[2] = tone(1.0)  # only the centre channel speaks: the mix is 1/8 of it
    mono, rate = load_audio_native(encode(fmt, codec, channels, "7.1"))
    assert rate == RATE and abs(len(mono) - RATE) <= 2048
    middle = mono[4000:12000]
    assert np.sqrt(2 * np.mean(middle**2)) == pytest.approx(0.4 / 8, rel=0.08)


def test_sixteen_channel_wav_is_refused_with_the_limit(client: TestClient) -> None:
    data = pcm_wav(np.repeat(tone(0.5)[:, None], 16, axis=1))
    with pytest.raises(AudioError, match="16 audio channels; at most 8") as err:
        load_audio(data)
    assert err.value.status_code == 422
    body = upload(client, data)
    assert body["status_code"] == 422 and body["error"] == "bad_audio" and "at most 8" in body["message"]


# --- a decoder that crashes or hangs --------------------------------------------------------


def segfault(source: bytes, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """A native crash, as the planar 8-channel decode was: read address 0."""
    ctypes.string_at(0)
    raise AssertionError("unreachable")


def hang(source: bytes, max_seconds: float | None) -> tuple[np.ndarray, int]:
    time.sleep(60)
    raise AssertionError("unreachable")


def test_a_crashing_decoder_is_a_422_and_the_server_lives(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    speech = pcm_wav(tone(0.5))
    with monkeypatch.context() as patch:
        patch.setattr(isolate, "decode_audio", segfault)
        with pytest.raises(AudioError, match="decoder crashed: SIGSEGV"):
            load_audio(speech)
        body = upload(client, speech)
        assert body["status_code"] == 422 and body["error"] == "bad_audio", body
        assert "crashed" in body["message"]
    # Same process, same server: the next upload and the next text are spoken.
    assert upload(client, speech)["status_code"] == 200
    assert client.post("/speak", json={"text": "Still here."}).status_code == 200


def test_a_hanging_decoder_is_killed_at_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isolate, "decode_audio", hang)
    t0 = time.perf_counter()
    with pytest.raises(AudioError, match="longer than 1 s"):
        isolate.decode_audio_isolated(pcm_wav(tone(0.5)), timeout_s=1.0)
    assert time.perf_counter() - t0 < 10


def test_isolated_decode_equals_in_process_decode() -> None:
    data = encode("mp4", "aac", np.stack([tone(1.0), tone(1.0, 500.0)]), "stereo", 44100)
    inside, rate = decode_audio(data)
    outside, rate_out = isolate.decode_audio_isolated(data)
    assert rate == rate_out == 44100 and outside.dtype == np.float32 and outside.flags.writeable
    np.testing.assert_array_equal(inside, outside)


# --- uploads that would read other files -----------------------------------------------------


def test_ffconcat_script_does_not_read_the_file_it_names(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "victim.wav").write_bytes(pcm_wav(tone(1.0)))
    script = b"ffconcat version 1.0\nfile 'victim.wav'\n"
    (tmp_path / "script.ffconcat").write_bytes(script)
    with pytest.raises(AudioError, match="not an audio file in a supported format") as err:
        load_audio(tmp_path / "script.ffconcat")
    assert str(tmp_path) not in str(err.value)
    monkeypatch.chdir(tmp_path)  # the upload's relative name resolves here
    body = upload(client, script, "a.txt")
    assert body["status_code"] == 422 and body["error"] == "bad_audio", body
    assert str(tmp_path) not in body["message"]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("list.m3u8", "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\nvictim.wav\n#EXT-X-ENDLIST\n"),
        ("list.m3u", "#EXTM3U\n#EXTINF:1,victim\nvictim.wav\n"),
        ("img%03d.png", ""),
    ],
)
def test_playlists_and_sequences_are_refused(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / "victim.wav").write_bytes(pcm_wav(tone(1.0)))
    if text:
        (tmp_path / name).write_text(text)
        source: bytes | Path = tmp_path / name
    else:  # an image sequence pattern would open img001.png...
        import cv2

        ok, png = cv2.imencode(".png", np.full((8, 8, 3), 9, np.uint8))
        source = png.tobytes()
    with pytest.raises(AudioError, match="not an audio file in a supported format"):
        load_audio(source)
    hls = text.startswith("#EXTM3U\n#EXT-X")
    if hls:
        with pytest.raises(AudioError):
            load_audio(text.encode())


# --- implausible inputs ------------------------------------------------------------------------


def test_a_54_byte_wav_claiming_1_hz_is_refused(client: TestClient) -> None:
    data = wav_header(1, 1, 10) + bytes(range(10))  # 5 samples at 1 Hz: "5 s" of audio
    assert len(data) == 54
    with pytest.raises(AudioError, match="1 Hz; accepted rates are 8000–192000 Hz"):
        load_audio(data)
    body = upload(client, data)
    assert body["status_code"] == 422 and "8000–192000 Hz" in body["message"], body


@pytest.mark.parametrize("rate", [8000, 192000])
def test_rates_at_the_edges_are_accepted(rate: int) -> None:
    mono, native = load_audio_native(pcm_wav(tone(0.5, rate=rate), rate))
    assert native == rate and len(mono) == rate // 2


def test_50_ms_upload_is_refused_with_the_minimum(client: TestClient) -> None:
    body = upload(client, pcm_wav(tone(0.05)))
    assert body["status_code"] == 422, body
    assert body["message"] == "audio is 50 ms long; the minimum is 100 ms"
    assert upload(client, pcm_wav(tone(0.1)))["status_code"] == 200


def test_fuzzer_edge_cases_are_clean_422s(client: TestClient) -> None:
    rng = np.random.default_rng(7)
    video = io.BytesIO()
    with av.open(video, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 20, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        container.mux(stream.encode(None))
    cases = {
        "empty": (b"", "empty"),
        "garbage": (rng.bytes(4096), "not an audio file"),
        "zeros": (bytes(4096), "not an audio file"),
        "header only": (wav_header(RATE, 1, 0), "no decodable audio"),
        "cut header": (pcm_wav(tone(0.5))[:30], "not an audio file"),
        "video only": (video.getvalue(), "no audio stream"),
        "zero channels": (wav_header(RATE, 0, 3200) + bytes(3200), ""),
        "huge rate": (wav_header(2**31 - 1, 1, 3200) + bytes(3200), ""),
    }
    for label, (data, words) in cases.items():
        body = upload(client, data)
        assert body["status_code"] == 422 and body["error"] == "bad_audio", (label, body)
        assert words in body["message"], (label, body)
        assert "Traceback" not in body["message"] and "/" not in body["message"], (label, body)


def test_huge_declared_duration_decodes_what_is_there_and_stops_at_the_cap() -> None:
    # The header claims ~37 hours; only half a second follows.
    liar = wav_header(RATE, 1, 0, declared=0xFFFFFF00) + (tone(0.5) * 32767).astype("<i2").tobytes()
    assert len(load_audio(liar)) == RATE // 2
    long = pcm_wav(np.zeros(RATE * 30, np.float32))
    t0 = time.perf_counter()
    with pytest.raises(AudioError, match="longer than the maximum of 2 s"):
        load_audio(long, max_seconds=2)
    assert time.perf_counter() - t0 < 10


# --- text the speech engine cannot take ----------------------------------------------------------


@pytest.fixture(scope="module")
def espeak() -> EspeakTTS:
    return EspeakTTS()


@pytest.mark.parametrize("text", [".", ")", "¡", "...", "¿?"])
def test_text_espeak_cannot_voice_is_a_422(espeak: EspeakTTS, client: TestClient, text: str) -> None:
    with pytest.raises(TextError, match="nothing to say") as err:
        espeak.synthesize(text)
    assert err.value.status_code == 422
    response = client.post("/speak", json={"text": text})
    assert response.status_code == 422 and response.json()["error"] == "bad_text", response.text
    assert "nothing to say" in response.json()["message"]


def test_nul_and_control_characters_are_a_422(espeak: EspeakTTS, client: TestClient) -> None:
    with pytest.raises(TextError, match="U\\+0000 at position 5"):
        espeak.synthesize("Hello\x00world")
    response = client.post("/speak", json={"text": "Hello\u0000world"})
    assert response.status_code == 422 and response.json()["error"] == "bad_text", response.text
    assert "U+0000" in response.json()["message"]
    response = client.post("/speak", json={"text": "bell\x07"})
    assert response.status_code == 422 and "U+0007" in response.json()["message"], response.text
    # Tabs and line breaks are ordinary text.
    samples, _ = espeak.synthesize("Line one.\n\tLine two.")
    assert len(samples) > 0

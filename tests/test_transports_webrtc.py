"""WebRTC transport: an in-process aiortc client receives the session's frames at its pts."""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from musetalk_warm.live.transports.webrtc import WebRTCPeers

from live_double import FakeSession, level


class Tone(MediaStreamTrack):
    """A microphone stand-in: 440 Hz at 48 kHz stereo in 20 ms frames, paced in real time."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._n = 0
        self._t0 = time.monotonic()

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        samples = 960
        await asyncio.sleep(max(0.0, self._t0 + self._n * samples / 48000 - time.monotonic()))
        t = np.arange(self._n * samples, (self._n + 1) * samples) / 48000
        tone = (10000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.repeat(tone, 2)[None, :], format="s16", layout="stereo")
        frame.sample_rate, frame.pts = 48000, self._n * samples
        frame.time_base = fractions.Fraction(1, 48000)
        self._n += 1
        return frame


async def _collect(track: MediaStreamTrack, count: int) -> list[av.Frame]:
    return [await asyncio.wait_for(track.recv(), 10) for _ in range(count)]


async def _connect(peers: WebRTCPeers, session: FakeSession, mic: MediaStreamTrack | None):
    client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    client.addTransceiver("video", direction="recvonly")
    if mic is None:
        client.addTransceiver("audio", direction="recvonly")
    else:
        client.addTransceiver(mic, direction="sendrecv")
    remote: dict[str, MediaStreamTrack] = {}
    client.on("track", lambda track: remote.__setitem__(track.kind, track))
    await client.setLocalDescription(await client.createOffer())
    peer_id, answer = await peers.answer(session, client.localDescription.sdp)
    await client.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return client, peer_id, remote, answer


@pytest.mark.parametrize("codec", ["H264", "VP8"])
def test_client_receives_frames_at_session_pts(codec: str) -> None:
    async def main() -> None:
        session = FakeSession()
        session.start()
        peers = WebRTCPeers(video_codec=codec)
        client, peer_id, remote, answer = await _connect(peers, session, None)
        assert f"{codec}/90000" in answer.split("m=video")[1].split("a=rtpmap")[1]
        video = await _collect(remote["video"], 30)
        audio = await _collect(remote["audio"], 30)
        # Each decoded frame shows the session frame its timestamp names.
        indices = [round(int(f.to_ndarray(format="gray").mean())) for f in video]
        pts = [f.pts for f in video]
        steps = np.diff(pts)
        # On the 90 kHz clock at 25 fps, in order; a reader that fell behind skips ticks.
        assert all(step > 0 and step % 3600 == 0 for step in steps), steps
        first = next(i for i in range(session.index) if abs(level(i) - indices[0]) <= 3)
        for p, seen in zip(pts, indices):
            tick = first + (p - pts[0]) // 3600
            assert abs(seen - level(tick)) <= 3, (tick, seen, level(tick))
        assert set(np.diff([f.pts for f in audio])) == {960}  # 20 ms Opus frames at 48 kHz
        tone = np.concatenate([f.to_ndarray().reshape(-1)[::2] for f in audio[5:]]).astype(float)
        spectrum = np.abs(np.fft.rfft(tone))
        assert abs(np.argmax(spectrum) * 48000 / len(tone) - 440) < 5
        assert await peers.close(peer_id)
        assert len(peers) == 0 and all(sub.closed for sub in session.subs)
        await client.close()
        session.stop()

    asyncio.run(main())


def test_microphone_reaches_pcm_input_at_16k_and_session_end_closes_peer() -> None:
    async def main() -> None:
        session = FakeSession()
        session.start()
        peers = WebRTCPeers(mic_gap_s=0.3)
        mic = Tone()
        client, peer_id, remote, _ = await _connect(peers, session, mic)
        await _collect(remote["video"], 25)
        mic.stop()  # the page stops its microphone: the utterance ends after the gap
        await asyncio.sleep(0.8)
        assert session.pcm and session.pcm[0].ended
        fed = np.concatenate(session.pcm[0].chunks).astype(float)
        assert fed.dtype == float and len(fed) > 16000 * 0.5
        spectrum = np.abs(np.fft.rfft(fed[1600:]))
        assert abs(np.argmax(spectrum) * 16000 / len(fed[1600:]) - 440) < 5
        session.stop()  # the session ends: its peers close, nothing keeps running
        for _ in range(50):
            if not len(peers):
                break
            await asyncio.sleep(0.05)
        assert len(peers) == 0
        await peers.close_all()
        await client.close()

    asyncio.run(main())


def test_offer_without_video_is_refused() -> None:
    from musetalk_warm.errors import BadInput

    async def main() -> None:
        session = FakeSession()
        peers = WebRTCPeers()
        client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        client.addTransceiver("audio", direction="recvonly")
        await client.setLocalDescription(await client.createOffer())
        with pytest.raises(BadInput):
            await peers.answer(session, client.localDescription.sdp)
        with pytest.raises(BadInput):
            await peers.answer(session, "v=0\r\nm=video garbage\r\n")
        assert len(peers) == 0
        await client.close()

    asyncio.run(main())


def test_reader_stays_in_order_until_it_trails_then_jumps_to_newest() -> None:
    from live_double import LiveFrame, Subscription

    from musetalk_warm.live.transports.webrtc import LiveReader

    async def main() -> tuple[list[int], int]:
        sub = Subscription()
        reader = LiveReader(sub, max_lag=5)
        frame = lambda i: LiveFrame(i, np.zeros((2, 2, 3), np.uint8), np.zeros(1920, np.int16), False)  # noqa: E731
        for i in range(3):
            sub.put(frame(i))
        seen = [(await reader.next()).index for _ in range(3)]
        for i in range(3, 13):
            sub.put(frame(i))
        seen.append((await reader.next()).index)
        return seen, reader.skipped

    seen, skipped = asyncio.run(main())
    assert seen == [0, 1, 2, 12] and skipped == 9

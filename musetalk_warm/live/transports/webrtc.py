"""WebRTC with aiortc: a live session's frames as media tracks, the browser microphone in.

The tracks only read the session's subscription: ``recv()`` returns the next frame
the session clock emitted, stamped with that tick's pts (video on the 90 kHz RTP
clock, audio in samples), so the transport never paces anything itself. Signalling
is WHEP-style: one SDP offer in, one answer out (non-trickle: the answer carries
the server's candidates).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import av
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpCodecCapability,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError

from ...config import IceServer, LiveSettings
from ...errors import BadInput, NotFound, Overloaded

if TYPE_CHECKING:
    from ..session import LiveFrame, LiveSession, PcmInput, Subscription

log = logging.getLogger(__name__)

VIDEO_CLOCK = 90000
MIC_RATE = 16000
OPUS_PTIME_MS = 20
# How far (in frames) a track may trail the session clock before it skips to the newest frame.
MAX_LAG_FRAMES = 5


def video_frame(frame: LiveFrame, fps: int) -> av.VideoFrame:
    """The tick's image as an ``av.VideoFrame`` at pts ``index / fps`` on the 90 kHz clock."""
    out = av.VideoFrame.from_ndarray(frame.image, format="bgr24")
    out.pts = frame.index * VIDEO_CLOCK // fps
    out.time_base = Fraction(1, VIDEO_CLOCK)
    return out


def audio_frames(frame: LiveFrame, rate: int) -> list[av.AudioFrame]:
    """The tick's audio (int16 mono) as 20 ms ``av.AudioFrame``s whose pts count samples.

    One Opus packet per frame: aiortc stamps every packet of one ``recv()`` with the
    same RTP timestamp, so a 40 ms tick must not go out as one frame.
    """
    samples = np.ascontiguousarray(frame.audio, dtype=np.int16).reshape(-1)
    step = rate * OPUS_PTIME_MS // 1000
    out = []
    for start in range(0, len(samples), step):
        chunk = av.AudioFrame.from_ndarray(samples[None, start : start + step], format="s16", layout="mono")
        chunk.sample_rate = rate
        chunk.pts = frame.index * len(samples) + start
        chunk.time_base = Fraction(1, rate)
        out.append(chunk)
    return out


class LiveReader:
    """Reads a subscription in order but never more than ``max_lag`` frames behind the clock.

    A viewer whose encoder fell behind (a busy CPU) jumps to the newest frame instead of
    showing the past: latency stays bounded; the skipped ticks are a gap in pts.
    """

    def __init__(self, subscription: Subscription, max_lag: int) -> None:
        self._subscription = subscription
        self._max_lag = max_lag
        self._backlog: deque[LiveFrame] = deque()
        self.skipped = 0

    async def next(self) -> LiveFrame:
        if not self._backlog:
            self._backlog.append(await self._subscription.get())
        with contextlib.suppress(IndexError):
            while True:
                self._backlog.append(self._subscription.get_nowait())
        if len(self._backlog) > self._max_lag:
            self.skipped += len(self._backlog) - 1
            self._backlog = deque([self._backlog[-1]])
        return self._backlog.popleft()

    def close(self) -> None:
        self._subscription.close()


class SessionTrack(MediaStreamTrack):
    """One kind (audio or video) of a live session, read from its own subscription."""

    def __init__(self, kind: str, session: LiveSession, max_lag: int = MAX_LAG_FRAMES) -> None:
        super().__init__()
        self.kind = kind
        self._session = session
        self._reader = LiveReader(session.subscribe(), max_lag)
        self._pending: list[av.AudioFrame] = []

    async def recv(self) -> av.VideoFrame | av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._pending:
            return self._pending.pop(0)
        try:
            frame = await self._reader.next()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the session ended or dropped this viewer
            self.stop()
            raise MediaStreamError from exc
        if self.kind == "video":
            return video_frame(frame, self._session.fps)
        self._pending = audio_frames(frame, self._session.audio_rate)
        return self._pending.pop(0)

    def stop(self) -> None:
        self._reader.close()
        super().stop()


def session_tracks(session: LiveSession) -> tuple[SessionTrack, SessionTrack]:
    """(video, audio) tracks of ``session``; each holds a subscription until stopped."""
    return SessionTrack("video", session), SessionTrack("audio", session)


class MicrophoneInput:
    """The browser's audio track → 16 kHz int16 mono into the session's PCM input.

    A run of received audio is one utterance: when no packet has come for
    ``gap_s`` (the page stopped sending its microphone) the utterance ends, and
    the next packet opens a new one.
    """

    def __init__(self, session: LiveSession, gap_s: float) -> None:
        self._session = session
        self._gap_s = gap_s
        self._pcm: PcmInput | None = None
        self._resampler: av.AudioResampler | None = None
        self.samples_fed = 0

    async def run(self, track: MediaStreamTrack) -> None:
        """Read ``track`` until it ends (or the task is cancelled)."""
        try:
            while True:
                try:
                    frame = await asyncio.wait_for(track.recv(), self._gap_s if self._pcm else None)
                except TimeoutError:
                    self._end()
                    continue
                except MediaStreamError:
                    return
                self._feed(frame)
        finally:
            self._end()

    def _feed(self, frame: av.AudioFrame) -> None:
        if self._pcm is None:
            self._pcm = self._session.open_pcm_input(MIC_RATE)
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=MIC_RATE)
        assert self._resampler is not None
        for out in self._resampler.resample(frame):
            self._push(out)

    def _push(self, frame: av.AudioFrame) -> None:
        assert self._pcm is not None
        samples = frame.to_ndarray().reshape(-1).astype(np.int16, copy=False)
        if len(samples):
            self._pcm.feed(samples)
            self.samples_fed += len(samples)

    def _end(self) -> None:
        if self._pcm is None:
            return
        assert self._resampler is not None
        for out in self._resampler.resample(None):
            self._push(out)
        self._pcm.end()
        self._pcm = self._resampler = None


@dataclass
class Peer:
    """One viewer's peer connection and what runs for it."""

    id: str
    session_id: str
    pc: RTCPeerConnection
    tracks: list[MediaStreamTrack] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class WebRTCPeers:
    """Every open peer connection of this server: created from an offer, closed by id,
    by session, when ICE fails or the session ends, and all at shutdown."""

    def __init__(
        self,
        *,
        ice_servers: Sequence[IceServer] = (),
        video_codec: str = "H264",
        max_peers: int = 64,
        mic_gap_s: float = 0.4,
    ) -> None:
        self._ice_servers = tuple(ice_servers)
        self._video_codec = video_codec
        self._max_peers = max_peers
        self._mic_gap_s = mic_gap_s
        self._peers: dict[str, Peer] = {}
        self._closing: set[asyncio.Task[bool]] = set()

    @classmethod
    def from_settings(cls, live: LiveSettings) -> WebRTCPeers:
        return cls(
            ice_servers=live.ice_servers,
            video_codec=live.webrtc_video_codec,
            max_peers=live.max_webrtc_peers,
            mic_gap_s=live.mic_gap_s,
        )

    def __len__(self) -> int:
        return len(self._peers)

    def _configuration(self) -> RTCConfiguration:
        # An explicit list, even empty: aiortc would otherwise add a public STUN server.
        servers = [
            RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
            for s in self._ice_servers
        ]
        return RTCConfiguration(iceServers=servers)

    async def answer(self, session: LiveSession, offer_sdp: str) -> tuple[str, str]:
        """Answer a viewer's SDP offer for ``session``: (peer id, answer SDP).

        The offer must ask to receive video; an audio section, if any, carries the
        session's audio back and the viewer's microphone in.
        """
        if len(self._peers) >= self._max_peers:
            raise Overloaded(f"{self._max_peers} WebRTC viewers are connected", hint="retry later")
        if "m=video" not in offer_sdp:
            raise BadInput("the SDP offer has no video section", hint="add a recvonly video transceiver")
        pc = RTCPeerConnection(self._configuration())
        peer = Peer(secrets.token_urlsafe(12), session.id, pc)
        self._peers[peer.id] = peer
        try:
            await self._negotiate(peer, session, offer_sdp)
        except BaseException:
            await self.close(peer.id)
            raise
        log.info("webrtc peer %s joined session %s", peer.id, session.id)
        return peer.id, pc.localDescription.sdp

    async def _negotiate(self, peer: Peer, session: LiveSession, offer_sdp: str) -> None:
        pc = peer.pc

        @pc.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._spawn(peer, MicrophoneInput(session, self._mic_gap_s).run(track))

        @pc.on("connectionstatechange")
        def _on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self._close_soon(peer.id)

        # Transceivers made before the offer is applied take it over with their codec
        # order (aiortc's answer sends with the first codec of the common list).
        video, audio = session_tracks(session)
        pc.addTransceiver(video, direction="sendonly").setCodecPreferences(self._video_preferences())
        pc.addTransceiver(audio, direction="sendrecv")
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # aiortc's parser raises ValueError, AssertionError, ...
            raise BadInput("the SDP offer cannot be used", hint="send the browser's offer unchanged") from exc
        for transceiver in pc.getTransceivers():
            track = transceiver.sender.track
            if transceiver.mid is None or track is None:  # not in the offer
                if track is not None:
                    track.stop()
                continue
            peer.tracks.append(track)
            track.on("ended", lambda: self._close_soon(peer.id))
        await pc.setLocalDescription(await pc.createAnswer())

    def _video_preferences(self) -> list[RTCRtpCodecCapability]:
        codecs = RTCRtpSender.getCapabilities("video").codecs
        wanted = f"video/{self._video_codec}".lower()
        return sorted(codecs, key=lambda c: c.mimeType.lower() != wanted)

    def _spawn(self, peer: Peer, work: Any) -> None:
        task = asyncio.ensure_future(work)
        peer.tasks.add(task)
        task.add_done_callback(peer.tasks.discard)

    def _close_soon(self, peer_id: str) -> None:
        """Close a peer from an aiortc event handler (which must not wait for it)."""
        if peer_id in self._peers:
            task = asyncio.ensure_future(self.close(peer_id))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def require(self, peer_id: str, session_id: str) -> Peer:
        """The open peer ``peer_id`` of ``session_id``, or NotFound."""
        peer = self._peers.get(peer_id)
        if peer is None or peer.session_id != session_id:
            raise NotFound(f"no WebRTC connection {peer_id} on session {session_id}")
        return peer

    async def close(self, peer_id: str) -> bool:
        """Close one peer connection (its tracks, microphone input); False if unknown."""
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return False
        for track in peer.tracks:
            track.stop()
        await peer.pc.close()
        for task in peer.tasks:
            task.cancel()
        await asyncio.gather(*peer.tasks, return_exceptions=True)
        log.info("webrtc peer %s left session %s", peer.id, peer.session_id)
        return True

    async def close_session(self, session_id: str) -> int:
        """Close every peer of ``session_id``; how many there were."""
        ids = [p.id for p in self._peers.values() if p.session_id == session_id]
        for peer_id in ids:
            await self.close(peer_id)
        return len(ids)

    async def close_all(self) -> None:
        """Close every peer (server shutdown)."""
        for peer_id in list(self._peers):
            await self.close(peer_id)
        await asyncio.gather(*self._closing, return_exceptions=True)

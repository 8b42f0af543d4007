"""A stand-in live session with the contract's interface, until the real one is wired here."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class LiveFrame:
    index: int
    image: np.ndarray
    audio: np.ndarray
    speaking: bool


def level(index: int) -> int:
    """The flat grey level of frame ``index``: it identifies the frame after lossy coding."""
    return 40 + (index * 12) % 180


class Subscription:
    def __init__(self, limit: int = 50) -> None:
        self.queue: asyncio.Queue[LiveFrame | None] = asyncio.Queue(limit)
        self.closed = False

    def put(self, frame: LiveFrame | None) -> None:
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(frame)

    async def get(self) -> LiveFrame:
        frame = await self.queue.get()
        if frame is None:
            raise RuntimeError("session ended")
        return frame

    def get_nowait(self) -> LiveFrame:
        if self.queue.empty():
            raise IndexError
        frame = self.queue.get_nowait()
        if frame is None:
            raise RuntimeError("session ended")
        return frame

    def close(self) -> None:
        self.closed = True


@dataclass
class Pcm:
    chunks: list[np.ndarray] = field(default_factory=list)
    ended: bool = False

    def feed(self, samples: np.ndarray) -> None:
        self.chunks.append(samples.copy())

    def end(self) -> None:
        self.ended = True


class FakeSession:
    id = "s1"
    avatar_id = "demo"
    fps = 25
    audio_rate = 48000
    width = height = 128

    def __init__(self) -> None:
        self.subs: list[Subscription] = []
        self.pcm: list[Pcm] = []
        self.index = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        n = self.audio_rate // self.fps
        while True:
            t = np.arange(self.index * n, (self.index + 1) * n) / self.audio_rate
            audio = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
            image = np.full((self.height, self.width, 3), level(self.index), np.uint8)
            frame = LiveFrame(self.index, image, audio, False)
            for sub in self.subs:
                if not sub.closed:
                    sub.put(frame)
            self.index += 1
            await asyncio.sleep(max(0.0, t0 + self.index / self.fps - loop.time()))

    def stop(self) -> None:
        if self._task:
            self._task.cancel()
        for sub in self.subs:
            sub.put(None)

    def subscribe(self) -> Subscription:
        sub = Subscription()
        self.subs.append(sub)
        return sub

    def open_pcm_input(self, rate: int = 16000) -> Pcm:
        assert rate == 16000
        pcm = Pcm()
        self.pcm.append(pcm)
        return pcm

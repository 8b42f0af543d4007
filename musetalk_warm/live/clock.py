"""Clocks for live sessions: the event loop's monotonic time, or a manually advanced one.

Sessions compute every deadline from their start time and tick number, never
from the previous wake-up, so a late wake-up never shifts later frames.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds and a way to wait until a point in them."""

    def now(self) -> float: ...

    async def sleep_until(self, deadline: float) -> None: ...


class LoopClock:
    """The running event loop's monotonic clock."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


class ManualClock:
    """A clock that moves only when :meth:`advance` is called (deterministic simulations)."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._order), waiter))
        await waiter

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline has come, and let them run."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, waiter = heapq.heappop(self._sleepers)
            if not waiter.done():
                waiter.set_result(None)
        for _ in range(5):  # let woken tasks run up to their next wait
            await asyncio.sleep(0)

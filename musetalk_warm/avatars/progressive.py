"""Arrays filled in order by a background thread; reading an item not filled yet waits for it.

Decoding a 720p avatar's frames takes seconds on a small CPU, far longer than
reading the rest of its cache. :class:`Progress` runs that work in a daemon
thread, item 0 first; :class:`ProgressiveArray` and :class:`ProgressiveList` are
the array and the list of masks the renderers index as before: an index, slice
or index array blocks only until the items it touches are there; ``shape``,
``dtype`` and ``len`` never block; ``np.asarray``, operators and any other
ndarray method wait until all are. Renderers read frames in cycle
order 0, 1, 2, …, so they rarely wait.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np


class Progress:
    """Runs ``work`` (which yields after finishing each item, in order) in a daemon thread.

    ``on_error`` turns an exception of the work into the one :meth:`wait` raises,
    for every reader after it.
    """

    def __init__(self, count: int, work: Iterable[Any], on_error: Callable[[Exception], Exception],
                 name: str = "progressive") -> None:
        self.count = count
        self._done = 0
        self._error: Exception | None = None
        self._on_error = on_error
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)
        _running.add(self)
        self._thread.start()

    @property
    def done(self) -> int:
        """Items filled so far."""
        return self._done

    def _run(self, work: Iterable[Any]) -> None:
        try:
            for _ in work:
                if self._stop.is_set():
                    raise RuntimeError("stopped before the last item")
                with self._cond:
                    self._done += 1
                    self._cond.notify_all()
            if self._done != self.count:
                raise ValueError(f"{self._done} items, {self.count} expected")
        except Exception as exc:  # handed to every reader, not lost in the thread
            with self._cond:
                self._error = self._on_error(exc)
                self._cond.notify_all()

    def wait(self, upto: int | None = None) -> None:
        """Block until items ``0..upto-1`` (all when ``None``) are filled; raise the work's error."""
        need = self.count if upto is None else min(upto, self.count)
        with self._cond:
            while self._done < need and self._error is None:
                self._cond.wait()
            if self._done < need and self._error is not None:
                raise self._error

    def stop(self) -> None:
        """End the work after the item in hand; readers of later items get the error."""
        self._stop.set()
        self._thread.join()


_running: weakref.WeakSet[Progress] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    # A daemon thread killed inside a native decoder or OpenCV at exit can abort the process.
    for progress in list(_running):
        progress.stop()


def _items_touched(key: Any, count: int) -> int:
    """How many leading items indexing with ``key`` (along axis 0) needs."""
    if isinstance(key, tuple):
        key = key[0] if key else slice(None)
    if key is Ellipsis:
        return count
    if isinstance(key, slice):
        start, stop, step = key.indices(count)
        span = range(start, stop, step)
        return max(span) + 1 if span else 0
    idx = np.asarray(key)
    if idx.size == 0:
        return 0
    if idx.dtype == bool or idx.min() < 0:  # a mask or counting from the end: all items
        return count
    return int(idx.max()) + 1


class ProgressiveArray:
    """An ``[N,...]`` array that :class:`Progress` fills item by item (reads wait as needed)."""

    def __init__(self, buffer: np.ndarray, progress: Progress) -> None:
        self._buffer = buffer
        self._progress = progress

    shape = property(lambda self: self._buffer.shape)
    dtype = property(lambda self: self._buffer.dtype)
    ndim = property(lambda self: self._buffer.ndim)
    nbytes = property(lambda self: self._buffer.nbytes)

    def __len__(self) -> int:
        return len(self._buffer)

    def __getitem__(self, key: Any) -> np.ndarray:
        self._progress.wait(_items_touched(key, len(self._buffer)))
        return self._buffer[key]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        self._progress.wait()
        if copy:
            return np.array(self._buffer, dtype=dtype)
        return self._buffer if dtype is None else self._buffer.astype(dtype, copy=False)

    def __getattr__(self, name: str) -> Any:
        # Any other ndarray attribute (astype, copy, mean, ...) is that of the whole, filled array.
        if name.startswith("_"):
            raise AttributeError(name)
        self._progress.wait()
        return getattr(self._buffer, name)


class ProgressiveList(Sequence[np.ndarray]):
    """Items of varying shapes (masks) that :class:`Progress` fills in order."""

    def __init__(self, items: list[np.ndarray | None], progress: Progress) -> None:
        self._items = items
        self._progress = progress

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, key: Any) -> Any:
        self._progress.wait(_items_touched(key, len(self._items)))
        return self._items[key]

"""Viewers' fMP4 encoders in worker processes, where the interpreter lock does not serialise them.

PyAV holds the GIL for part of every frame's encode, so encoders in threads of one
process stop scaling near 500 frames/s of 720p in total; in separate processes they
scale with the cores. An :class:`EncoderPool` keeps ``live.encoder_processes``
workers forked from the fork server (never a plain fork of a process with threads
and CUDA); each viewer's :class:`PooledFmp4` lives on the least-loaded worker, which
owns a real :class:`LiveFmp4` for it. A frame travels through the stream's
shared-memory slot (nothing is pickled); a short header goes down the worker's pipe
and the encoded pieces come back up it. A worker that dies fails its streams (their
next ``add`` raises :class:`MediaError`) and is replaced; other workers go on.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import signal
import struct
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ...errors import MediaError
from ...media.isolate import end_child, exit_reason, preload, start_child
from .mse import LiveFmp4, SerialEncoder, fmp4_mime

if TYPE_CHECKING:
    from ...config import LiveSettings
    from ..session import LiveFrame

ENCODE_TIMEOUT_S = 10.0
WORKER_MODULE = __name__  # for the fork server to import before its first worker
_STOP_S = 5.0
# Pool → worker: a kind byte and the stream's id first. Open carries the stream's shape
# and the shared-memory name; add the tick's image shape and sample count (the data is
# in the stream's slot); close nothing more. The worker answers each add only.
_OPEN = struct.Struct("<cIIIIIII")  # b"O", stream, width, height, fps, audio rate, fragment frames, threads
_ADD = struct.Struct("<cIIII")  # b"A", stream, image height, image width, audio samples
_CLOSE = struct.Struct("<cI")  # b"C", stream
_STOP = b"S"
# Worker → pool: the stream, ok/error and a count; then that many lengths and the
# pieces, or an error's message.
_REPLY = struct.Struct("<IcI")
_LENGTH = struct.Struct("<Q")
_OK, _ERROR = b"\x00", b"\x01"
log = logging.getLogger(__name__)


class Fmp4Stream(Protocol):
    """One viewer's fMP4 encoder: in this process (:class:`LiveFmp4`) or in a pool's worker."""

    @property
    def mime(self) -> str: ...

    def add(self, frame: LiveFrame) -> list[bytes]: ...

    def close(self) -> None: ...


def open_fmp4(live: LiveSettings, width: int, height: int, fps: int, audio_rate: int,
              pool: EncoderPool | None = None) -> Fmp4Stream:
    """A viewer's encoder with ``live``'s fragment length and x264 threads: in ``pool`` when given."""
    if pool is None:
        return LiveFmp4(width, height, fps, audio_rate, live.mse_fragment_frames, threads=live.encoder_threads)
    return pool.open(width, height, fps, audio_rate, live.mse_fragment_frames, threads=live.encoder_threads)


def _slot_layout(width: int, height: int, fps: int, audio_rate: int) -> tuple[int, int]:
    """Bytes of a stream's slot for the image and for the audio (room for twice a tick's samples)."""
    return width * height * 3, 2 * 2 * -(-audio_rate // fps)


class PooledFmp4(SerialEncoder):
    """One viewer's fMP4 stream, encoded by a pool worker; used exactly like :class:`LiveFmp4`."""

    def __init__(self, pool: EncoderPool, worker: _Worker, stream_id: int, width: int, height: int, fps: int,
                 audio_rate: int, fragment_frames: int, threads: int) -> None:
        super().__init__()  # the slot is never written under an encode either
        self.id = stream_id
        self.fps = fps
        self.audio_rate = audio_rate
        self._pool = pool
        self._worker = worker
        self._image_bytes, audio_bytes = _slot_layout(width, height, fps, audio_rate)
        try:
            self.shm = SharedMemory(f"mtw_enc_{secrets.token_hex(8)}", create=True,
                                    size=self._image_bytes + audio_bytes)
        except OSError as exc:
            raise MediaError(f"no shared memory for a live stream's frames ({exc.strerror})") from None
        self._init: bytes | None = None
        try:
            worker.send(_OPEN.pack(b"O", stream_id, width, height, fps, audio_rate, fragment_frames, threads)
                        + self.shm.name.encode())
        except MediaError:
            pass  # the worker has just ended: the first add says so

    @property
    def mime(self) -> str:
        """The ``MediaSource.isTypeSupported`` type, once the first frame was added."""
        return fmp4_mime(self._init)

    def add(self, frame: LiveFrame) -> list[bytes]:
        """Encode one tick in the worker; returns what is complete: the init segment first, then fragments."""
        with self._serially():
            image = np.ascontiguousarray(frame.image, np.uint8)
            audio = np.ascontiguousarray(frame.audio, np.int16)
            if image.ndim != 3 or image.nbytes > self._image_bytes or self._image_bytes + audio.nbytes > self.shm.size:
                raise MediaError("a live frame does not fit the stream it is encoded into")
            self._write(image, audio)
            reply = self._worker.ask(self.id, _ADD.pack(b"A", self.id, image.shape[0], image.shape[1], audio.size))
            timeout = self._pool.timeout_s
            try:
                message = reply.result(timeout)
            except FutureTimeout:
                self._worker.kill()  # hung: it is replaced like one that died
                raise MediaError(f"the live stream's encoder did not answer within {timeout:g} s") from None
            pieces = _read_reply(message)
            if self._init is None and pieces and pieces[0][4:8] == b"ftyp":
                self._init = pieces[0]
            return pieces

    def _write(self, image: np.ndarray, audio: np.ndarray) -> None:
        # Views of the segment end with this call: it can be closed whenever no add runs.
        slot = np.frombuffer(self.shm.buf, np.uint8)
        slot[: image.nbytes] = image.reshape(-1)
        slot[self._image_bytes : self._image_bytes + audio.nbytes] = audio.view(np.uint8)

    def _release(self) -> None:
        try:
            self._worker.send(_CLOSE.pack(b"C", self.id))
        except MediaError:
            pass  # the worker has ended, and its encoders with it
        self.shm.close()
        self.shm.unlink()
        self._pool.forget(self)


class _Worker:
    """One encoder process, its pipe, and the replies its streams wait for."""

    def __init__(self, pool: EncoderPool) -> None:
        self._pool = pool
        self.process, self._conn = start_child(_serve, duplex=True)
        self.load = 0  # streams opened here and not closed
        self.alive = True
        # Held while sending, and while the reader changes what is waiting or ends the pipe.
        self._send_lock = threading.Lock()
        self._waiting: dict[int, Future[bytes]] = {}
        self._reader = threading.Thread(target=self._read, name=f"encoder-{self.process.pid}", daemon=True)
        self._reader.start()

    def ended(self) -> str:
        return f"the live stream's encoder process ended ({exit_reason(self.process.exitcode)})"

    def send(self, message: bytes) -> None:
        """Send ``message``, which is not answered."""
        self._send(message, None)

    def ask(self, stream_id: int, message: bytes) -> Future[bytes]:
        """Send ``message``; the future of the worker's answer to stream ``stream_id``."""
        future: Future[bytes] = Future()
        self._send(message, (stream_id, future))
        return future

    def _send(self, message: bytes, waiter: tuple[int, Future[bytes]] | None) -> None:
        with self._send_lock:
            if not self.alive:
                raise MediaError(self.ended())
            if waiter is not None:
                self._waiting[waiter[0]] = waiter[1]
            try:
                self._conn.send_bytes(message)
            except OSError:
                if waiter is not None:
                    del self._waiting[waiter[0]]
                self.process.join(_STOP_S)  # the pipe broke as it died: say how it ended
                raise MediaError(self.ended()) from None

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv_bytes()
                (stream_id,) = struct.unpack_from("<I", message)
                with self._send_lock:
                    future = self._waiting.pop(stream_id, None)
                if future is not None:
                    future.set_result(message)
        except (EOFError, OSError):
            pass  # the worker has ended (stopped, killed, or crashed)
        with self._send_lock:
            self.alive = False  # nothing is sent from now on
            waiting, self._waiting = self._waiting, {}
        self.process.join(_STOP_S)  # a stopped worker closes its pipe just before it exits
        end_child(self.process, self._conn)
        self._pool.replace(self)
        for future in waiting.values():
            future.set_exception(MediaError(self.ended()))

    def kill(self) -> None:
        """End the process now; the reader fails what waits and the pool replaces it."""
        self.process.kill()

    def stop(self) -> None:
        """Ask the worker to end (its encoders close), kill it if it does not, and reap it."""
        try:
            self.send(_STOP)
        except MediaError:
            pass  # it has ended already
        self._reader.join(_STOP_S)
        if self._reader.is_alive():
            self.kill()
            self._reader.join()


class EncoderPool:
    """``processes`` encoder workers shared by every viewer's stream, started and stopped with the app."""

    def __init__(self, processes: int, *, timeout_s: float = ENCODE_TIMEOUT_S) -> None:
        if processes < 1:
            raise ValueError("an encoder pool needs at least one process")
        self.processes = processes
        self.timeout_s = timeout_s
        self._workers: list[_Worker] = []
        self._streams: dict[int, PooledFmp4] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Start the workers (blocking: call off the event loop)."""
        preload(WORKER_MODULE)  # effective when the fork server is not running yet
        with self._lock:
            self._workers = [_Worker(self) for _ in range(self.processes)]

    @property
    def pids(self) -> list[int | None]:
        """The workers' process ids, in their places (a replaced one has a new id)."""
        with self._lock:
            return [w.process.pid for w in self._workers]

    def open(self, width: int, height: int, fps: int, audio_rate: int, fragment_frames: int = 3,
             threads: int = 1) -> PooledFmp4:
        """A stream on the worker with the fewest streams."""
        with self._lock:
            if self._closed or not self._workers:
                raise MediaError("the live encoder processes are not running")
            worker = min(self._workers, key=lambda w: w.load)
            stream = PooledFmp4(self, worker, next(self._ids), width, height, fps, audio_rate, fragment_frames,
                                threads)
            worker.load += 1
            self._streams[stream.id] = stream
        return stream

    def forget(self, stream: PooledFmp4) -> None:
        """A closed stream no longer counts towards its worker's load."""
        with self._lock:
            if self._streams.pop(stream.id, None) is not None:
                stream._worker.load -= 1

    def replace(self, worker: _Worker) -> None:
        """Start a new worker in place of one that ended (not while the pool closes)."""
        with self._lock:
            if self._closed or worker not in self._workers:
                return
            at = self._workers.index(worker)
            log.warning("%s; starting another", worker.ended())
            try:
                self._workers[at] = _Worker(self)
            except Exception:
                log.exception("a live encoder process cannot be started")
                del self._workers[at]

    def close(self) -> None:
        """Close every stream (its shared memory unlinked) and stop the workers."""
        with self._lock:
            self._closed = True
            streams, workers, self._workers = list(self._streams.values()), self._workers, []
        for stream in streams:
            stream.close()
        for worker in workers:
            worker.stop()


class _Encoding:
    """A worker's side of one stream: the slot, attached, and the real encoder."""

    def __init__(self, message: bytes) -> None:
        _, _, width, height, fps, audio_rate, fragment_frames, threads = _OPEN.unpack_from(message)
        self.image_bytes = _slot_layout(width, height, fps, audio_rate)[0]
        self.shm: SharedMemory | None = None
        self.encoder: LiveFmp4 | None = None
        self.error: str | None = None
        try:
            self.shm = SharedMemory(message[_OPEN.size :].decode())
            self.encoder = LiveFmp4(width, height, fps, audio_rate, fragment_frames, threads=threads)
        except Exception as exc:  # noqa: BLE001 - answered to the stream's first add
            self.error = f"the live stream's encoder cannot start ({type(exc).__name__})"

    def encode(self, message: bytes) -> list[bytes]:
        _, _, height, width, samples = _ADD.unpack(message)
        if self.error is not None:
            raise MediaError(self.error)
        assert self.shm is not None and self.encoder is not None
        image = np.ndarray((height, width, 3), np.uint8, self.shm.buf)
        audio = np.ndarray((samples,), np.int16, self.shm.buf, offset=self.image_bytes)
        return self.encoder.encode(image, audio)

    def close(self) -> None:
        if self.encoder is not None:
            self.encoder.close()
        if self.shm is not None:
            self.shm.close()


def _serve(conn: Connection) -> None:
    """A worker: open, encode and close streams as the pool asks, until it says stop or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server, which stops the pool
    streams: dict[int, _Encoding] = {}
    try:
        while (message := conn.recv_bytes()) != _STOP:
            kind, stream_id = message[:1], struct.unpack_from("<I", message, 1)[0]
            if kind == b"O":
                streams[stream_id] = _Encoding(message)
            elif kind == b"C" and stream_id in streams:
                streams.pop(stream_id).close()
            elif kind == b"A":
                conn.send_bytes(_answer(streams.get(stream_id), stream_id, message))
    except (EOFError, OSError):
        pass  # the server has gone
    finally:
        for encoding in streams.values():
            encoding.close()
        conn.close()


def _answer(encoding: _Encoding | None, stream_id: int, message: bytes) -> bytes:
    try:
        if encoding is None:
            raise MediaError("the live stream's encoder is closed")
        pieces = encoding.encode(message)
    except MediaError as exc:
        return _REPLY.pack(stream_id, _ERROR, 0) + exc.message.encode()
    except Exception as exc:  # noqa: BLE001 - the stream fails, the worker goes on
        return _REPLY.pack(stream_id, _ERROR, 0) + f"live fMP4 encoding failed ({type(exc).__name__})".encode()
    lengths = b"".join(_LENGTH.pack(len(p)) for p in pieces)
    return b"".join([_REPLY.pack(stream_id, _OK, len(pieces)), lengths, *pieces])


def _read_reply(message: bytes) -> list[bytes]:
    _, status, count = _REPLY.unpack_from(message)
    at = _REPLY.size
    if status == _ERROR:
        raise MediaError(message[at:].decode())
    lengths = [_LENGTH.unpack_from(message, at + _LENGTH.size * i)[0] for i in range(count)]
    at += _LENGTH.size * count
    pieces = []
    for length in lengths:
        pieces.append(message[at : at + length])
        at += length
    return pieces

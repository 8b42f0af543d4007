"""Decoding audio in a short-lived child process: a native crash or hang costs a 422, not the server.

FFmpeg's demuxers and decoders (and PyAV's bindings over them) are native code fed
with untrusted bytes; a segfault there would end the whole server. Each decode runs
in a child forked from multiprocessing's fork server, which has PyAV and NumPy
imported already, so a decode pays a fork, not an interpreter start. The child
sends back raw samples or an error's JSON: nothing it writes is unpickled here.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import signal
import struct
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AudioError
from .decode import decode_audio

DECODE_TIMEOUT_S = 30.0
_OK, _ERROR = b"\x00", b"\x01"
_HEADER = struct.Struct("<IQ")  # sample rate, sample count; the float32 samples follow
_context_lock = threading.Lock()
_extra_preload: list[str] = []
Decoder = Callable[[bytes | str | Path, float | None], tuple[np.ndarray, int]]
log = logging.getLogger(__name__)


def fork_context() -> multiprocessing.context.BaseContext:
    """The fork server context, its preload set before the server starts (once per process)."""
    with _context_lock:
        if "forkserver" not in multiprocessing.get_all_start_methods():
            return multiprocessing.get_context("spawn")
        ctx = multiprocessing.get_context("forkserver")
        # The parent's main module is preloaded too, or every child would import it again.
        main_spec = getattr(sys.modules["__main__"], "__spec__", None)
        preload = ["__main__", __name__, f"{__package__}._forkserver"]
        preload += [main_spec.name] if main_spec is not None else []
        ctx.set_forkserver_preload(preload + _extra_preload)
        return ctx


def preload(*modules: str) -> None:
    """Have the fork server import ``modules`` as it starts (call before :func:`start`), so no child
    imports them again; one that is not installed is skipped."""
    with _context_lock:
        _extra_preload.extend(m for m in modules if m not in _extra_preload)


def start() -> None:
    """Start the fork server now, so the first upload does not pay for it."""
    decode_audio_isolated(_WARM_UP_WAV, timeout_s=DECODE_TIMEOUT_S)


def start_child(target: Callable[..., None], *args: Any, duplex: bool = False) -> tuple[BaseProcess, Connection]:
    """Start ``target(send, *args)`` in a child forked from the fork server; the child and
    the receiving end of its one-way pipe (``send`` is the child's alone; both ends send
    and receive when ``duplex``)."""
    ctx = fork_context()
    receive, send = ctx.Pipe(duplex=duplex)
    child = ctx.Process(target=target, args=(send, *args), daemon=True)
    try:
        child.start()
    except BaseException:
        receive.close()
        raise
    finally:
        send.close()
    return child, receive


def end_child(child: BaseProcess, receive: Connection) -> None:
    """Close the pipe, kill the child if it still runs, and reap it."""
    receive.close()
    if child.is_alive():
        child.kill()
    child.join()


def decode_audio_isolated(
    source: bytes | str | Path, max_seconds: float | None = None, *, timeout_s: float = DECODE_TIMEOUT_S
) -> tuple[np.ndarray, int]:
    """:func:`~musetalk_warm.media.decode.decode_audio` in a child process.

    Errors are the same :class:`AudioError` instances; a child that crashes, or runs
    past ``timeout_s`` (then it is killed), is an AudioError too.
    """
    name = "the upload" if isinstance(source, bytes | bytearray) else Path(source).name
    child, receive = start_child(_child, decode_audio, source, max_seconds)
    try:
        if not receive.poll(timeout_s):
            log.warning("audio decoder process killed after %g s", timeout_s)
            raise AudioError(f"decoding {name} took longer than {timeout_s:g} s")
        message = receive.recv_bytes()
        if message[:1] == _OK:
            rate, count = _HEADER.unpack_from(message, 1)
            samples = bytearray(4 * count)  # received in place: writable, no copy
            receive.recv_bytes_into(samples)
    except EOFError:  # the child died without a word
        message = None
    finally:
        end_child(child, receive)
    if message is None:
        reason = exit_reason(child.exitcode)
        log.warning("audio decoder process ended by %s", reason)
        raise AudioError(f"{name} cannot be decoded (the decoder crashed: {reason})")
    if message[:1] == _ERROR:
        error = json.loads(message[1:])
        raise AudioError(error["message"], hint=error.get("hint"))
    return np.frombuffer(samples, np.float32), rate


def exit_reason(code: int | None) -> str:
    """How a child process ended, for a log line or an error: a signal's name or the exit code."""
    if code is not None and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _child(send: Connection, decode: Decoder, source: bytes | str | Path, max_seconds: float | None) -> None:
    try:
        samples, rate = decode(source, max_seconds)
        samples = np.ascontiguousarray(samples, np.float32)
        send.send_bytes(_OK + _HEADER.pack(rate, len(samples)))
        send.send_bytes(memoryview(samples).cast("B"))
    except AudioError as exc:
        send.send_bytes(_ERROR + json.dumps({"message": exc.message, "hint": exc.hint}).encode())
    except Exception as exc:  # noqa: BLE001 - any other failure is still the upload's
        reason = {"message": f"the audio cannot be decoded ({type(exc).__name__})"}
        send.send_bytes(_ERROR + json.dumps(reason).encode())
    finally:
        send.close()


def _silent_wav(samples: int, rate: int) -> bytes:
    data = bytes(2 * samples)
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16, 1, 1, rate, 2 * rate, 2, 16,
        b"data", len(data),
    )
    return header + data


_WARM_UP_WAV = _silent_wav(1600, 16000)

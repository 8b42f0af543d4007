"""Crash-safe file writes: a unique temp file in the same folder, fsync, rename."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)``, fsync ``tmp`` and rename it over ``path``.

    On failure ``path`` is untouched and the temporary file removed. Temp names
    are unique per call, so concurrent writers never share one.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_stream(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Like :func:`atomic_write`, with ``write`` given the open binary temp file."""

    def to_tmp(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    atomic_write(path, to_tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    atomic_write_stream(path, lambda handle: handle.write(data))


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Bounds on what the sessions folder holds: how many sessions exist, which archives are kept."""

from __future__ import annotations

import calendar
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .store import _ARCHIVE_PREFIX, _TRASH_PREFIX, STATE_FILE

# The reset time in an archive's name: _<id>.<YYYYmmddTHHMMSS>[.n]
_STAMP = re.compile(r"\.(\d{8}T\d{6})(?:\.\d+)?$")


def session_count(root: Path) -> int:
    """Live sessions under ``root`` (archives and temp folders not counted)."""
    if not root.is_dir():
        return 0
    return sum(
        1 for entry in os.scandir(root)
        if entry.is_dir() and entry.name[0].isalnum() and os.path.isfile(os.path.join(entry.path, STATE_FILE))
    )


@dataclass(frozen=True)
class Archive:
    path: Path
    archived: float  # UTC seconds
    size: int


def archives(root: Path) -> list[Archive]:
    """The archived sessions under ``root``, oldest first."""
    found = []
    for path in root.glob(f"{_ARCHIVE_PREFIX}*"):
        if not path.is_dir():
            continue
        match = _STAMP.search(path.name)
        when = calendar.timegm(time.strptime(match.group(1), "%Y%m%dT%H%M%S")) if match else path.stat().st_mtime
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        found.append(Archive(path, when, size))
    return sorted(found, key=lambda a: (a.archived, a.path.name))


def prune_archives(root: Path, *, keep: int, max_age_days: float, max_bytes: int, now: float | None = None) -> list[Path]:
    """Delete the oldest archives until at most ``keep`` remain, none is older than
    ``max_age_days`` and all together hold at most ``max_bytes`` (0: no age or size limit).

    Each is renamed to a temp name first (the store removes those left by a crash).
    Returns the archives deleted.
    """
    now = time.time() if now is None else now
    kept = archives(root)
    total = sum(a.size for a in kept)
    gone = []
    while kept:
        oldest = kept[0]
        too_old = max_age_days > 0 and now - oldest.archived > max_age_days * 86400
        if len(kept) <= keep and not too_old and (max_bytes == 0 or total <= max_bytes):
            break
        kept.pop(0)
        total -= oldest.size
        trash = root / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
        os.rename(oldest.path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        gone.append(oldest.path)
    return gone

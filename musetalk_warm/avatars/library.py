"""The prepared avatars of a cache folder, loaded on first use and held under an LRU cap.

Listing reads only manifests; :meth:`AvatarLibrary.get` decodes a cache the
first time it is asked for and keeps at most ``max_loaded`` avatars in memory,
dropping the least recently used one that is neither pinned (the configured
avatar) nor leased (rendering right now, or shown by a live session). A cache
prepared while the process runs is found on its first request, without a
restart; :meth:`AvatarLibrary.remove` deletes one that nothing uses.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import safe_name
from ..errors import Conflict, NotFound
from .cache import DEFAULT_FRAMES_CRF, MANIFEST, Avatar, cache_bytes, load_avatar, read_manifest

# Avatars being prepared (and deleted ones on their way out) live here; never an avatar id
# (ids start with a letter or digit), so listing skips it.
STAGING_DIR = ".jobs"


class AvatarLibrary:
    """Thread-safe lazy, capped access to ``<cache_root>/<avatar_id>/`` caches.

    ``check`` runs on each avatar as it is loaded (raise to refuse it);
    ``max_loaded`` 0 means no cap.
    """

    def __init__(self, cache_root: str | Path, *, max_loaded: int = 0, frames_crf: int = DEFAULT_FRAMES_CRF,
                 check: Callable[[Avatar], None] | None = None) -> None:
        self.root = Path(cache_root)
        self.max_loaded = max_loaded
        self.frames_crf = frames_crf
        self._check = check
        self._loaded: OrderedDict[str, Avatar] = OrderedDict()
        self._pinned: set[str] = set()
        self._leases: dict[str, int] = {}
        self._lock = threading.Lock()

    def ids(self) -> list[str]:
        """Ids of the caches with a readable manifest (loaded or not)."""
        if not self.root.is_dir():
            return sorted(self._loaded)
        found = {p.name for p in self.root.iterdir() if p.is_dir() and _valid(p.name)
                 and read_manifest(p.name, self.root) is not None}
        return sorted(found | set(self._loaded))

    def loaded_ids(self) -> list[str]:
        """Ids held in memory now, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def describe(self, avatar_id: str) -> dict[str, Any]:
        """Source, frame count, size on disk and models of a prepared avatar (from its manifest)."""
        manifest = read_manifest(avatar_id, self.root) if _valid(avatar_id) else None
        if manifest is None:
            raise NotFound(f"unknown avatar {avatar_id!r}")
        return {
            "avatar_id": avatar_id,
            "status": "ready",
            "source": manifest.get("source"),
            "num_frames": manifest.get("num_frames"),
            "fps": manifest.get("fps"),
            "frame_size": manifest.get("frame_size"),
            "bytes_on_disk": cache_bytes(avatar_id, self.root),
            "vae_id": manifest.get("vae_id"),
            "detector": manifest.get("detector"),
            "mask_source": manifest.get("params", {}).get("mask_source"),
            "loaded": avatar_id in self._loaded,
            "in_use": self.in_use(avatar_id),
        }

    def add(self, avatar: Avatar, *, pin: bool = False) -> None:
        """Hold an avatar already in memory; a pinned one is never dropped."""
        with self._lock:
            self._loaded[avatar.avatar_id] = avatar
            self._loaded.move_to_end(avatar.avatar_id)
            if pin:
                self._pinned.add(avatar.avatar_id)
            self._evict()

    def get(self, avatar_id: str) -> Avatar:
        """The avatar, loaded from its cache on first use.

        Raises :class:`NotFound` for an id without a cache and
        :class:`~musetalk_warm.errors.AvatarCacheError` for a broken one.
        """
        with self._lock:
            if avatar_id in self._loaded:
                self._loaded.move_to_end(avatar_id)
                return self._loaded[avatar_id]
        if not _valid(avatar_id) or not (self.root / avatar_id).is_dir():
            raise NotFound(f"unknown avatar {avatar_id!r}")
        # Decoding takes a while: outside the lock, so other avatars stay available.
        avatar = load_avatar(avatar_id, self.root, frames_crf=self.frames_crf)
        self.check(avatar)
        with self._lock:
            if not (self.root / avatar_id / MANIFEST).is_file():  # removed while it loaded
                raise NotFound(f"unknown avatar {avatar_id!r}")
            avatar = self._loaded.setdefault(avatar_id, avatar)
            self._loaded.move_to_end(avatar_id)
            self._evict()
        return avatar

    @contextmanager
    def lease(self, avatar_id: str) -> Iterator[Avatar]:
        """The avatar, marked in use (not dropped, not deletable) until the block ends."""
        avatar = self.get(avatar_id)
        self.hold(avatar_id)
        try:
            yield avatar
        finally:
            self.release(avatar_id)

    def hold(self, avatar_id: str) -> None:
        """Mark a loaded avatar in use until :meth:`release` (a live session holds it while it runs)."""
        with self._lock:
            self._leases[avatar_id] = self._leases.get(avatar_id, 0) + 1

    def release(self, avatar_id: str) -> None:
        """End one :meth:`hold`."""
        with self._lock:
            self._leases[avatar_id] -= 1
            if not self._leases[avatar_id]:
                del self._leases[avatar_id]

    def in_use(self, avatar_id: str) -> bool:
        """Whether the avatar is pinned or leased."""
        return avatar_id in self._pinned or avatar_id in self._leases

    def check(self, avatar: Avatar) -> None:
        """Run the library's load check on an avatar (raises what it raises)."""
        if self._check is not None:
            self._check(avatar)

    def forget(self, avatar_id: str) -> None:
        """Drop the avatar from memory (its cache was replaced or removed)."""
        with self._lock:
            self._loaded.pop(avatar_id, None)

    def remove(self, avatar_id: str) -> None:
        """Delete a prepared avatar's cache: NotFound for an unknown id, Conflict while pinned or leased.

        The folder is first renamed into the staging folder (atomic: it is gone for
        :meth:`ids` and :meth:`get` at once), then deleted.
        """
        if not _valid(avatar_id) or read_manifest(avatar_id, self.root) is None:
            raise NotFound(f"unknown avatar {avatar_id!r}")
        trash = self.root / STAGING_DIR / f"deleted-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if avatar_id in self._pinned:
                raise Conflict(f"avatar {avatar_id!r} is the server's configured avatar and cannot be deleted",
                               hint="configure another avatar.avatar_id first")
            if avatar_id in self._leases:
                raise Conflict(f"avatar {avatar_id!r} is in use by a live session or a clip being rendered",
                               hint="stop its live sessions (DELETE /sessions/{id}/live) and retry")
            (self.root / avatar_id).rename(trash)
            self._loaded.pop(avatar_id, None)
        shutil.rmtree(trash, ignore_errors=True)

    def _evict(self) -> None:
        if not self.max_loaded:
            return
        for avatar_id in list(self._loaded):
            if len(self._loaded) <= self.max_loaded:
                return
            if avatar_id not in self._pinned and avatar_id not in self._leases:
                del self._loaded[avatar_id]


def _valid(avatar_id: str) -> bool:
    try:
        safe_name(avatar_id, "avatar_id")
    except ValueError:
        return False
    return True

"""The prepared avatar: frames, face boxes, placements, landmarks, latents and blend masks.

`Avatar` is what the render engine consumes; `save_avatar` / `load_avatar`
keep it under ``<cache_dir>/<avatar_id>/`` in safe formats (npy, safetensors,
json manifest; never pickle).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors import numpy as st_numpy

from ..config import safe_name
from ..errors import AvatarCacheError
from ..files import atomic_write_stream

CROP_SIZE = 256


@dataclass(frozen=True)
class Avatar:
    """A prepared avatar. Arrays are indexed by source frame 0..N-1.

    Attributes:
        avatar_id: cache folder name.
        fps: frame rate the frames were read at.
        frames: ``[N,H,W,3]`` uint8 BGR source frames (may be a read-only memmap).
        boxes: ``[N,4]`` int32 raw face boxes ``x1,y1,x2,y2`` (upstream v1.5 rule,
            with ``extra_margin`` on y2), the input of stabilisation.
        landmarks: ``[N,68,2]`` float32 iBUG-68 points in frame coordinates.
        crops: ``[N,256,256,3]`` uint8 BGR face crops, each cut with its placement
            (:func:`~musetalk_warm.avatars.stabilise.crop_face`; upstream's LANCZOS4 resize
            of the box when the placement is a whole-pixel box).
        latents: ``[N,8,32,32]`` float32 UNet input (masked ‖ reference latents),
            or ``None`` when the avatar was prepared without a VAE.
        masks: per frame, the uint8 blend mask ``[2s,2s]`` over ``crop_boxes[i]``.
        crop_boxes: ``[N,4]`` int32 expanded square crop boxes of the placed face
            boxes (may leave the frame).
        placements: ``[N,2,3]`` float64 stabilised face-crop → frame maps: where
            ``crops[i]`` was cut and where a face generated from it is pasted.
        manifest: the cache manifest (source hash, model id, parameters, version).
    """

    avatar_id: str
    fps: int
    frames: np.ndarray
    boxes: np.ndarray
    landmarks: np.ndarray
    crops: np.ndarray
    latents: np.ndarray | None
    masks: tuple[np.ndarray, ...]
    crop_boxes: np.ndarray
    placements: np.ndarray
    manifest: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def cycle_length(self) -> int:
        """Length of the forward+reversed frame cycle (2N, both ends repeated)."""
        return 2 * len(self)

    def source_index(self, position: int | np.ndarray) -> np.ndarray:
        """Source frame for cycle position(s): 0,1,…,N-1,N-1,…,1,0,0,1,…"""
        n = len(self)
        j = np.asarray(position, dtype=np.int64) % (2 * n)
        return np.where(j < n, j, 2 * n - 1 - j)


FORMAT_VERSION = 2
MANIFEST = "manifest.json"
_FRAMES = "frames.npy"
_CROPS = "crops.npy"
_ARRAYS = "arrays.safetensors"
_MASKS = "masks.safetensors"
_PREP_HINT = "run `python -m scripts.force_prep --avatar-id {id}` (or `musetalk-warm prep --avatar-id {id}`)"


def _hint(avatar_id: str) -> str:
    return _PREP_HINT.format(id=avatar_id)


def _mask_key(index: int) -> str:
    return f"mask_{index:06d}"


def save_avatar(avatar: Avatar, cache_root: str | Path) -> Path:
    """Write ``avatar`` under ``<cache_root>/<avatar_id>/`` and return that folder.

    Each file is replaced atomically. The old manifest is removed first and the
    new one written last, so an interrupted save leaves a cache that
    :func:`load_avatar` refuses instead of a mix of old and new files.
    """
    folder = Path(cache_root) / avatar.avatar_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    arrays = {
        "boxes": np.ascontiguousarray(avatar.boxes, dtype=np.int32),
        "landmarks": np.ascontiguousarray(avatar.landmarks, dtype=np.float32),
        "crop_boxes": np.ascontiguousarray(avatar.crop_boxes, dtype=np.int32),
        "placements": np.ascontiguousarray(avatar.placements, dtype=np.float64),
    }
    if avatar.latents is not None:
        arrays["latents"] = np.ascontiguousarray(avatar.latents, dtype=np.float32)
    masks = {_mask_key(i): np.ascontiguousarray(m, dtype=np.uint8) for i, m in enumerate(avatar.masks)}
    atomic_write_stream(folder / _FRAMES, lambda fh: np.save(fh, np.asarray(avatar.frames), allow_pickle=False))
    atomic_write_stream(folder / _CROPS, lambda fh: np.save(fh, np.asarray(avatar.crops), allow_pickle=False))
    atomic_write_stream(folder / _ARRAYS, lambda fh: fh.write(st_numpy.save(arrays)))
    atomic_write_stream(folder / _MASKS, lambda fh: fh.write(st_numpy.save(masks)))
    manifest = {
        **avatar.manifest,
        "format_version": FORMAT_VERSION,
        "avatar_id": avatar.avatar_id,
        "fps": avatar.fps,
        "num_frames": len(avatar),
        "frame_size": [int(avatar.frames.shape[2]), int(avatar.frames.shape[1])],
        "has_latents": avatar.latents is not None,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True)
    atomic_write_stream(folder / MANIFEST, lambda fh: fh.write(text.encode()))
    return folder


def read_manifest(avatar_id: str, cache_root: str | Path) -> dict[str, Any] | None:
    """The cache's manifest, or ``None`` when it is missing, unreadable or of another format."""
    try:
        manifest = json.loads((Path(cache_root) / avatar_id / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        return None
    return manifest


def load_avatar(avatar_id: str, cache_root: str | Path, *, mmap: bool = True) -> Avatar:
    """Load a prepared avatar; with ``mmap`` the frames stay on disk (read-only memmap).

    Raises :class:`AvatarCacheError` when the cache is missing, half-written,
    unreadable or of another format version.
    """
    try:
        safe_name(avatar_id, "avatar_id")
    except ValueError as exc:
        raise AvatarCacheError(str(exc)) from None
    folder = Path(cache_root) / avatar_id
    path = folder / MANIFEST
    if not path.is_file():
        raise AvatarCacheError(f"avatar {avatar_id!r} has not been prepared", hint=_hint(avatar_id))
    manifest = read_manifest(avatar_id, cache_root)
    if manifest is None:
        raise AvatarCacheError(
            f"the cache of avatar {avatar_id!r} is unreadable or of another format "
            f"(this version reads format {FORMAT_VERSION})",
            hint=_hint(avatar_id) + " with --force",
        )
    try:
        frames = np.load(folder / _FRAMES, mmap_mode="r" if mmap else None, allow_pickle=False)
        crops = np.load(folder / _CROPS, allow_pickle=False)
        arrays = st_numpy.load_file(str(folder / _ARRAYS))
        stored = st_numpy.load_file(str(folder / _MASKS))
        n = int(manifest["num_frames"])
        masks = tuple(stored[_mask_key(i)] for i in range(n))
        avatar = Avatar(
            avatar_id=avatar_id,
            fps=int(manifest["fps"]),
            frames=frames,
            boxes=arrays["boxes"],
            landmarks=arrays["landmarks"],
            crops=crops,
            latents=arrays.get("latents"),
            masks=masks,
            crop_boxes=arrays["crop_boxes"],
            placements=arrays["placements"],
            manifest=manifest,
        )
    except (OSError, EOFError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise AvatarCacheError(
            f"the cache of avatar {avatar_id!r} is damaged ({type(exc).__name__})",
            hint=_hint(avatar_id) + " with --force",
        ) from exc
    sizes = {len(frames), len(crops), len(avatar.boxes), len(avatar.landmarks), len(avatar.crop_boxes),
             len(avatar.placements)}
    if avatar.latents is not None:
        sizes.add(len(avatar.latents))
    if sizes != {n} or avatar.placements.shape[1:] != (2, 3):
        raise AvatarCacheError(
            f"the cache of avatar {avatar_id!r} is inconsistent (frame counts {sorted(sizes)}, "
            f"placements {avatar.placements.shape})",
            hint=_hint(avatar_id) + " with --force",
        )
    return avatar


def cache_is_current(
    avatar_id: str,
    cache_root: str | Path,
    *,
    source_sha256: str,
    params: dict[str, Any],
    vae_id: str | None,
) -> bool:
    """Whether the cache was built from this source with these parameters and VAE.

    ``vae_id=None`` (no latents wanted) accepts a cache with or without latents.
    """
    manifest = read_manifest(avatar_id, cache_root)
    # Compare as JSON stores them (tuples become lists).
    params = json.loads(json.dumps(params))
    return (
        manifest is not None
        and manifest.get("source", {}).get("sha256") == source_sha256
        and manifest.get("params") == params
        and (vae_id is None or manifest.get("vae_id") == vae_id)
    )

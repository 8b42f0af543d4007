"""The prepared avatar: frames, face boxes, placements, landmarks, latents and blend masks.

`Avatar` is what the render engine consumes; `save_avatar` / `load_avatar`
keep it under ``<cache_dir>/<avatar_id>/`` compactly and in safe formats
(never pickle): ``frames.mkv`` and ``crops.mkv`` (RGB H.264, near-lossless
by default), ``arrays.safetensors`` (boxes, landmarks, placements, fp16
latents and the blend masks as PNGs) and ``manifest.json``. Loading reads the
small arrays and returns; frames and crops are decoded and masks unpacked in a
background thread (:mod:`.progressive`), and a read of a frame not decoded yet
waits for it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from safetensors import SafetensorError
from safetensors import numpy as st_numpy

from ..config import safe_name
from ..errors import AvatarCacheError, MediaError
from ..files import atomic_write_stream
from .progressive import Progress, ProgressiveArray, ProgressiveList

log = logging.getLogger(__name__)

CROP_SIZE = 256


@dataclass(frozen=True)
class Avatar:
    """A prepared avatar. Arrays are indexed by source frame 0..N-1.

    Attributes:
        avatar_id: cache folder name.
        fps: frame rate the frames were read at.
        frames: ``[N,H,W,3]`` uint8 BGR source frames (an ndarray, or a
            :class:`~.progressive.ProgressiveArray` while a loaded cache decodes).
        boxes: ``[N,4]`` int32 raw face boxes ``x1,y1,x2,y2`` (upstream v1.5 rule,
            with ``extra_margin`` on y2), the input of stabilisation.
        landmarks: ``[N,68,2]`` float32 iBUG-68 points in frame coordinates.
        crops: ``[N,256,256,3]`` uint8 BGR face crops, each cut with its placement
            (:func:`~musetalk_warm.avatars.stabilise.crop_face`; upstream's LANCZOS4 resize
            of the box when the placement is a whole-pixel box).
        latents: ``[N,8,32,32]`` float32 UNet input (masked ‖ reference latents),
            or ``None`` when the avatar was prepared without a VAE.
        masks: per frame, the uint8 blend mask ``[2s,2s]`` over ``crop_boxes[i]``
            (a tuple, or a :class:`~.progressive.ProgressiveList` when loaded).
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
    masks: Sequence[np.ndarray]
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


FORMAT_VERSION = 4
# Format 3 (no crops.mkv: crops cut again at every load, fp32 latents) is
# migrated in place on first load, its frames kept as they are; format 2 (raw
# frames.npy / crops.npy, one safetensors entry per mask) is re-coded.
LEGACY_VERSIONS = (2, 3)
MANIFEST = "manifest.json"
_FRAMES = "frames.mkv"
# Cutting 250 crops (LANCZOS4) took 9 s on a loaded 2-core machine, decoding them is a small
# part of decoding the frames; stored, they add 8 % to the frames' bytes.
_CROPS = "crops.mkv"
_ARRAYS = "arrays.safetensors"
_LEGACY_FILES = ("frames.npy", "crops.npy", "masks.safetensors")
DEFAULT_FRAMES_CRF = 6
_PREP_HINT = "run `musetalk-warm prep --avatar-id {id} --video-path FILE`"
_DAMAGE = (OSError, EOFError, ValueError, KeyError, TypeError, SafetensorError, MediaError)


def _hint(avatar_id: str) -> str:
    return _PREP_HINT.format(id=avatar_id)


def pack_masks(masks: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Masks as one buffer of PNGs plus ``[N+1]`` offsets (blurred masks compress ~20x losslessly)."""
    blobs = []
    for mask in masks:
        ok, png = cv2.imencode(".png", np.ascontiguousarray(mask, dtype=np.uint8))
        if not ok:
            raise ValueError(f"cannot encode a {mask.shape} mask")
        blobs.append(png.reshape(-1))
    offsets = np.zeros(len(blobs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    data = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)
    return {"mask_png": data, "mask_offsets": offsets}


def unpack_mask(data: np.ndarray, offsets: np.ndarray, index: int) -> np.ndarray:
    """Mask ``index`` of those :func:`pack_masks` stored."""
    mask = cv2.imdecode(data[int(offsets[index]) : int(offsets[index + 1])], cv2.IMREAD_UNCHANGED)
    if mask is None or mask.ndim != 2:
        raise ValueError("a stored mask cannot be decoded")
    return mask


def save_avatar(avatar: Avatar, cache_root: str | Path, *, frames_crf: int = DEFAULT_FRAMES_CRF) -> Path:
    """Write ``avatar`` under ``<cache_root>/<avatar_id>/`` and return that folder.

    Frames and crops are stored as RGB H.264 at ``frames_crf`` (0 = lossless;
    always 0 for a one-frame photo avatar), masks as PNGs, latents as fp16. Each file is
    replaced atomically. The old manifest is removed first and the new one
    written last, so an interrupted save leaves a cache that
    :func:`load_avatar` refuses instead of a mix of old and new files.
    """
    from ..media.framepack import CODEC, PRESET, write_frames

    if len(avatar) == 1:
        frames_crf = 0  # a photo avatar is one frame: lossless costs little
    folder = Path(cache_root) / avatar.avatar_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    atomic_write_stream(folder / _FRAMES, lambda fh: write_frames(fh, avatar.frames, avatar.fps, frames_crf))
    _write_crops(folder, avatar.crops, avatar.fps, frames_crf)
    for name in _LEGACY_FILES:
        (folder / name).unlink(missing_ok=True)
    codec = {"codec": CODEC, "preset": PRESET, "crf": frames_crf, **_coded_bytes(folder)}
    _write_arrays_and_manifest(folder, avatar, codec)
    return folder


def _write_crops(folder: Path, crops: np.ndarray, fps: int, crf: int) -> None:
    from ..media.framepack import write_frames

    atomic_write_stream(folder / _CROPS, lambda fh: write_frames(fh, crops, fps, crf))


def _coded_bytes(folder: Path) -> dict[str, int]:
    """Sizes of the coded files, kept in the manifest: a truncated file is refused at load."""
    return {"bytes": (folder / _FRAMES).stat().st_size, "crops_bytes": (folder / _CROPS).stat().st_size}


def save_latents(avatar: Avatar, cache_root: str | Path) -> None:
    """Rewrite only the arrays and manifest of a saved avatar (new latents; frames untouched,
    so they are not coded a second time)."""
    folder = Path(cache_root) / avatar.avatar_id
    (folder / MANIFEST).unlink(missing_ok=True)
    _write_arrays_and_manifest(folder, avatar, avatar.manifest["frames_codec"])


def _write_arrays_and_manifest(folder: Path, avatar: Avatar, frames_codec: dict[str, Any]) -> None:
    arrays = {
        "boxes": np.ascontiguousarray(avatar.boxes, dtype=np.int32),
        "landmarks": np.ascontiguousarray(avatar.landmarks, dtype=np.float32),
        "crop_boxes": np.ascontiguousarray(avatar.crop_boxes, dtype=np.int32),
        "placements": np.ascontiguousarray(avatar.placements, dtype=np.float64),
        **pack_masks(avatar.masks),
    }
    if avatar.latents is not None:
        # fp16 halves them (upcast again at load); the UNet runs in fp16 or bf16 on a GPU.
        arrays["latents"] = np.ascontiguousarray(avatar.latents, dtype=np.float16)
    atomic_write_stream(folder / _ARRAYS, lambda fh: fh.write(st_numpy.save(arrays)))
    _write_manifest(folder, {
        **avatar.manifest,
        "format_version": FORMAT_VERSION,
        "avatar_id": avatar.avatar_id,
        "fps": avatar.fps,
        "num_frames": len(avatar),
        "frame_size": [int(avatar.frames.shape[2]), int(avatar.frames.shape[1])],
        "has_latents": avatar.latents is not None,
        "frames_codec": frames_codec,
    })


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Written last: a cache without its manifest is one :func:`load_avatar` refuses."""
    text = json.dumps(manifest, indent=2, sort_keys=True)
    atomic_write_stream(folder / MANIFEST, lambda fh: fh.write(text.encode()))


def read_manifest(avatar_id: str, cache_root: str | Path) -> dict[str, Any] | None:
    """The cache's manifest (this format or one :func:`load_avatar` migrates), or ``None``
    when it is missing, unreadable or of an unknown format."""
    try:
        manifest = json.loads((Path(cache_root) / avatar_id / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format_version") not in (FORMAT_VERSION, *LEGACY_VERSIONS):
        return None
    return manifest


def cache_bytes(avatar_id: str, cache_root: str | Path) -> int:
    """Bytes the avatar's cache folder holds on disk."""
    folder = Path(cache_root) / avatar_id
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0


def load_avatar(avatar_id: str, cache_root: str | Path, *, frames_crf: int = DEFAULT_FRAMES_CRF) -> Avatar:
    """Load a prepared avatar; frames, crops and masks fill in behind it (:func:`_decode_behind`).

    A cache of an older format is migrated to this one first (format 2's frames
    coded at ``frames_crf``). Raises :class:`AvatarCacheError` when the cache is
    missing, half-written, unreadable or of an unknown format version; damage
    found only while decoding is raised, as the same error, by the read that
    needs the damaged frame.
    """
    try:
        safe_name(avatar_id, "avatar_id")
    except ValueError as exc:
        raise AvatarCacheError(str(exc)) from None
    folder = Path(cache_root) / avatar_id
    if not (folder / MANIFEST).is_file():
        raise AvatarCacheError(f"avatar {avatar_id!r} has not been prepared", hint=_hint(avatar_id))
    manifest = read_manifest(avatar_id, cache_root)
    if manifest is None:
        raise AvatarCacheError(
            f"the cache of avatar {avatar_id!r} is unreadable or of another format "
            f"(this version reads format {FORMAT_VERSION} and migrates {', '.join(map(str, LEGACY_VERSIONS))})",
            hint=_hint(avatar_id) + " with --force",
        )
    try:
        if manifest["format_version"] != FORMAT_VERSION:
            return _migrate(folder, manifest, frames_crf)
        n = int(manifest["num_frames"])
        arrays = st_numpy.load_file(str(folder / _ARRAYS))
        stored = {k: int(manifest["frames_codec"][k]) for k in ("bytes", "crops_bytes")}
        if _coded_bytes(folder) != stored:
            raise MediaError("a coded file is not the size its manifest says")
        frames, crops, masks = _decode_behind(folder, manifest, arrays)
        latents = arrays.get("latents")
        avatar = Avatar(
            avatar_id=avatar_id,
            fps=int(manifest["fps"]),
            frames=frames,
            boxes=arrays["boxes"],
            landmarks=arrays["landmarks"],
            crops=crops,
            latents=None if latents is None else latents.astype(np.float32),
            masks=masks,
            crop_boxes=arrays["crop_boxes"],
            placements=arrays["placements"],
            manifest=manifest,
        )
    except _DAMAGE as exc:
        raise _damaged(avatar_id, exc) from exc
    _check_counts(avatar, n)
    return avatar


def _damaged(avatar_id: str, exc: Exception) -> AvatarCacheError:
    """The error a damaged cache raises, at load or at the read that found the damage."""
    error = AvatarCacheError(f"the cache of avatar {avatar_id!r} is damaged ({type(exc).__name__})",
                             hint=_hint(avatar_id) + " with --force")
    error.__cause__ = exc
    return error


def _decode_behind(folder: Path, manifest: dict[str, Any],
                   arrays: dict[str, np.ndarray]) -> tuple[ProgressiveArray, ProgressiveArray, ProgressiveList]:
    """Frames, crops and masks, filled frame by frame by a background thread.

    Decoding is most of a load (seconds for 250 frames of 720p on 2 cores); this
    way a load returns once the small arrays are read and rendering starts on
    frame 0 while later frames decode.
    """
    from ..media.framepack import iter_frames

    n = int(manifest["num_frames"])
    width, height = (int(v) for v in manifest["frame_size"])
    mask_png, mask_offsets = arrays["mask_png"], arrays["mask_offsets"]
    frames = np.empty((n, height, width, 3), np.uint8)
    crops = np.empty((n, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    masks: list[np.ndarray | None] = [None] * n
    if len(mask_offsets) != n + 1:
        raise ValueError("the masks do not match the frame count")

    def work() -> Iterator[int]:
        coded = zip(iter_frames(folder / _FRAMES, height, width), iter_frames(folder / _CROPS, CROP_SIZE, CROP_SIZE))
        for i, (frame, crop) in enumerate(coded):
            if i >= n:
                raise MediaError("a coded file holds more frames than its manifest says")
            frames[i], crops[i] = frame, crop
            masks[i] = unpack_mask(mask_png, mask_offsets, i)
            yield i

    progress = Progress(n, work(), lambda exc: _damaged(folder.name, exc), name=f"avatar-{folder.name}")
    return ProgressiveArray(frames, progress), ProgressiveArray(crops, progress), ProgressiveList(masks, progress)


def _check_counts(avatar: Avatar, n: int) -> None:
    sizes = {len(avatar.frames), len(avatar.crops), len(avatar.boxes), len(avatar.landmarks),
             len(avatar.crop_boxes), len(avatar.placements), len(avatar.masks)}
    if avatar.latents is not None:
        sizes.add(len(avatar.latents))
    if sizes != {n} or avatar.placements.shape[1:] != (2, 3):
        raise AvatarCacheError(
            f"the cache of avatar {avatar.avatar_id!r} is inconsistent (frame counts {sorted(sizes)}, "
            f"placements {avatar.placements.shape})",
            hint=_hint(avatar.avatar_id) + " with --force",
        )


def _migrate(folder: Path, manifest: dict[str, Any], frames_crf: int) -> Avatar:
    """Rewrite a cache of an older format in this one and load the result."""
    avatar_id, version = folder.name, manifest["format_version"]
    before = cache_bytes(avatar_id, folder.parent)
    if version == 3:
        _migrate_format3(folder, manifest)
    else:
        _migrate_format2(folder, manifest, frames_crf)
    log.warning("avatar %s: cache migrated from format %s to %s (%.1f MB -> %.1f MB)", avatar_id,
                version, FORMAT_VERSION, before / 1e6, cache_bytes(avatar_id, folder.parent) / 1e6)
    return load_avatar(avatar_id, folder.parent, frames_crf=frames_crf)


def _migrate_format3(folder: Path, manifest: dict[str, Any]) -> None:
    """Format 3 cut its crops at every load: cut them once and store them; the coded frames are
    kept as they are (``prep --force`` codes them again, smaller)."""
    from ..media.framepack import read_frames
    from .stabilise import cut_crops  # stabilise imports this module's CROP_SIZE

    arrays = st_numpy.load_file(str(folder / _ARRAYS))
    width, height = (int(v) for v in manifest["frame_size"])
    crops = cut_crops(read_frames(folder / _FRAMES, int(manifest["num_frames"]), height, width), arrays["placements"])
    # Format 3 coded its frames at preset veryfast.
    codec = {"preset": "veryfast", **manifest["frames_codec"]}
    (folder / MANIFEST).unlink()
    _write_crops(folder, crops, int(manifest["fps"]), int(codec["crf"]))
    codec.update(_coded_bytes(folder))
    if "latents" in arrays:
        arrays["latents"] = arrays["latents"].astype(np.float16)
    atomic_write_stream(folder / _ARRAYS, lambda fh: fh.write(st_numpy.save(arrays)))
    _write_manifest(folder, {**manifest, "format_version": FORMAT_VERSION, "frames_codec": codec})


def _migrate_format2(folder: Path, manifest: dict[str, Any], frames_crf: int) -> None:
    """Format 2 held raw frames and crops: both are coded."""
    avatar_id, n = folder.name, int(manifest["num_frames"])
    arrays = st_numpy.load_file(str(folder / _ARRAYS))
    stored = st_numpy.load_file(str(folder / "masks.safetensors"))
    old = Avatar(
        avatar_id=avatar_id,
        fps=int(manifest["fps"]),
        frames=np.load(folder / "frames.npy", allow_pickle=False),
        boxes=arrays["boxes"],
        landmarks=arrays["landmarks"],
        crops=np.load(folder / "crops.npy", mmap_mode="r", allow_pickle=False),
        latents=arrays.get("latents"),
        masks=tuple(stored[f"mask_{i:06d}"] for i in range(n)),
        crop_boxes=arrays["crop_boxes"],
        placements=arrays["placements"],
        manifest={k: v for k, v in manifest.items() if k != "format_version"},
    )
    _check_counts(old, n)
    save_avatar(old, folder.parent, frames_crf=frames_crf)


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

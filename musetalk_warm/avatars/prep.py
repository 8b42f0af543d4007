"""Avatar preparation ("force prep"): source frames -> boxes, placements, crops, masks, latents -> cache.

Per frame, as upstream MuseTalk v1.5 (``get_landmark_and_bbox`` and
``Avatar.prepare_material``): 68 landmarks, the face box from them (detector
box as fallback), ``extra_margin`` below the chin, a 256x256 LANCZOS4 crop, the
blend mask over the 1.5x crop box, and the VAE latents of the crop.

Deliberate differences: upstream forces ``bbox_shift = 0`` for v1.5; here it
stays configurable (default 0). The crop is cut at the frame's stabilised
placement (:func:`musetalk_warm.avatars.stabilise.plan`), the same map the engine pastes
the generated face with, and the mask is built on the box that placement
covers, so crop, paste and mask always agree. With every stabiliser off the
placement is the raw box and the crop is upstream's.

The result is cached (:mod:`musetalk_warm.avatars.cache`). Running again on the same
source with the same parameters and VAE only loads the cache; when only the
VAE changed, only the latents are recomputed. Servers call
:func:`~musetalk_warm.avatars.cache.load_avatar` and never prepare at speak time.
"""

from __future__ import annotations

import hashlib
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from itertools import islice
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from .cache import CROP_SIZE, MANIFEST, Avatar, cache_is_current, load_avatar, save_avatar, save_latents
from ..config import Settings
from .demo import DEMO_SOURCE_ID, demo_frames, demo_source_sha256
from ..errors import AvatarCacheError, BadInput, ConfigError, FaceNotFound, MediaError
from .landmarks import Detection, LandmarkDetector, make_detector
from .masks import Box, blend_mask, crop_box, landmark_segment
from .stabilise import cut_crops, placed_box, plan

log = logging.getLogger(__name__)

Encoder = Callable[[np.ndarray], np.ndarray]
# (stage, frames done, frames in all) as preparation goes.
Progress = Callable[[str, int, int], None]
# The one avatar id whose source is the built-in demo photo; any other id needs a video or image.
DEMO_AVATAR_ID = "demo"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
# BiSeNet's checkpoint holds the whole network (the ResNet-18 file upstream also
# reads is only an initialisation it overwrites).
PARSING_CHECKPOINT = "79999_iter.pth"
_VERSIONED = ("numpy", "opencv-contrib-python", "mediapipe", "scikit-image", "musetalk-warm")
# The render settings that change placements (and so crops, latents and masks).
_PREALLOC_FRAMES = 1500  # a minute at 25 fps; longer sources grow the array geometrically
STABILISER_SETTINGS = (
    "one_euro_enabled", "one_euro_center", "one_euro_size", "jump_reset_px",
    "scale_lock_enabled", "scale_lock_frames", "affine_enabled", "subpixel_enabled",
)


@dataclass(frozen=True)
class Source:
    """Where the avatar's frames come from; ``sha256`` identifies the content."""

    kind: str  # "video", "image" or "demo"
    name: str
    sha256: str
    path: Path | None = None


def _prep_command(avatar_id: str) -> str:
    return f"musetalk-warm prep --avatar-id {avatar_id} --video-path FILE"


def check_source(settings: Settings) -> Path | None:
    """The configured source file (None for the demo), checked to exist; reads nothing.

    Only the id ``demo`` has the built-in photo as its source, so another avatar
    can never be overwritten with the demo by a missing ``video_path``.
    """
    cfg = settings.avatar
    if cfg.video_path is None:
        if cfg.avatar_id != DEMO_AVATAR_ID:
            raise ConfigError(
                f"avatar {cfg.avatar_id!r} has no source to prepare from (only {DEMO_AVATAR_ID!r} is the demo)",
                hint=f"give its video or image: {_prep_command(cfg.avatar_id)}",
            )
        return None
    path = Path(cfg.video_path)
    if not path.is_file():
        raise ConfigError(
            f"avatar.video_path: file not found: {path.name}",
            hint="point avatar.video_path (or --video-path) at a video or image of the avatar",
        )
    return path


def describe_source(settings: Settings) -> Source:
    """The configured source and its content hash (reads the file, decodes nothing)."""
    cfg = settings.avatar
    path = check_source(settings)
    if path is None:
        return Source("demo", DEMO_SOURCE_ID, demo_source_sha256(cfg.demo_seconds, cfg.fps))
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    kind = "image" if path.suffix.lower() in IMAGE_SUFFIXES else "video"
    return Source(kind, path.name, digest, path)


def read_frames(source: Source, settings: Settings) -> np.ndarray:
    """``[N,H,W,3]`` uint8 BGR frames at ``avatar.fps``, at most ``avatar.max_frames``."""
    cfg = settings.avatar
    limit = cfg.max_frames or None
    if source.kind == "demo":
        return demo_frames(cfg.demo_seconds, cfg.fps)[:limit]
    assert source.path is not None
    if source.kind == "image":
        # A still image is a one-frame avatar: its ping-pong cycle is a motionless loop.
        image = cv2.imread(str(source.path), cv2.IMREAD_COLOR)
        if image is None:
            raise BadInput(f"avatar image {source.name} cannot be read")
        return image[None]
    from ..media.decode import iter_video_frames, probe

    # One preallocated array (a list of frames then np.stack would hold every frame twice),
    # sized from the probed duration but never trusting a broken timestamp with a huge one.
    try:
        expected = math.ceil(probe(source.path).video_duration * cfg.fps) + 1
    except MediaError:  # unreadable timestamps: grow as frames arrive
        expected = 1
    expected = max(1, min(expected, limit or _PREALLOC_FRAMES, _PREALLOC_FRAMES))
    frames: np.ndarray | None = None
    count = 0
    for count, frame in enumerate(islice(iter_video_frames(source.path, cfg.fps), limit), start=1):
        if frames is None or count > len(frames):
            grown = np.empty((max(expected, 2 * count), *frame.shape), np.uint8)
            if frames is not None:
                grown[: count - 1] = frames[: count - 1]
            frames = grown
        frames[count - 1] = frame
    if frames is None:
        raise BadInput(f"avatar video {source.name} has no frames")
    return frames[:count]


def prep_params(settings: Settings, mask_source: str) -> dict[str, Any]:
    """Every parameter the cache content depends on (compared for the no-op rule)."""
    cfg, render = settings.avatar, settings.render
    return {
        "fps": cfg.fps,
        "max_frames": cfg.max_frames,
        "bbox_shift": cfg.bbox_shift,
        "extra_margin": cfg.extra_margin,
        "face_backend": cfg.face_backend,
        "mask_source": mask_source,
        "parsing_mode": cfg.parsing_mode if mask_source == "parsing" else None,
        "expand": render.expand,
        "upper_boundary_ratio": render.upper_boundary_ratio,
        "blur_ratio": render.blur_ratio,
        "crop_size": CROP_SIZE,
        # Placements decide where crops are cut and masks drawn.
        "stabilise": render.model_dump(include=set(STABILISER_SETTINGS)),
    }


def resolve_mask_source(settings: Settings) -> str:
    """``parsing`` (BiSeNet) or ``landmarks`` for ``avatar.mask_source``.

    ``auto`` takes BiSeNet when its checkpoint is present.
    """
    choice = settings.avatar.mask_source
    if choice != "auto":
        return choice
    models = settings.models
    return "parsing" if (models.path(models.face_parsing_dir) / PARSING_CHECKPOINT).is_file() else "landmarks"


def face_box(landmarks: np.ndarray, fallback: Box, *, bbox_shift: int = 0) -> tuple[Box, bool]:
    """Upstream's face box from 68 landmarks, and whether the fallback box was used.

    As ``get_landmark_and_bbox``: landmarks truncated to int32; centre
    ``y29 + bbox_shift`` (the shift is applied through a view, so it also moves
    point 29 itself before the chin maximum is taken); ``y1 = max(0, 2*centre -
    max_y)``, so a shift moves the top edge by twice its value; x from the
    landmark extremes, ``y2`` the lowest landmark. When the box is empty or
    ``x1 < 0``, the detector box ``fallback`` is used.
    """
    lm = np.asarray(landmarks).astype(np.int32)
    half_face_coord = lm[29]
    if bbox_shift != 0:
        half_face_coord[1] += bbox_shift
    half_face_dist = np.max(lm[:, 1]) - half_face_coord[1]
    upper_bond = max(0, half_face_coord[1] - half_face_dist)
    box = (int(np.min(lm[:, 0])), int(upper_bond), int(np.max(lm[:, 0])), int(np.max(lm[:, 1])))
    x1, y1, x2, y2 = box
    if y2 - y1 <= 0 or x2 - x1 <= 0 or x1 < 0:
        return detector_box(fallback), True
    return box, False


def detector_box(box: tuple[float, ...]) -> Box:
    """A detector box as upstream's S3FD wrapper returns it: clipped at 0, truncated to int."""
    x1, y1, x2, y2 = (int(max(0.0, v)) for v in box[:4])
    return (x1, y1, x2, y2)


def with_margin(box: Box, extra_margin: int, frame_height: int) -> Box:
    """v1.5: ``y2 = min(y2 + extra_margin, frame_height)``; x1, y1, x2 unchanged."""
    x1, y1, x2, y2 = box
    return (x1, y1, x2, min(y2 + extra_margin, frame_height))


def encode_crops(encoder: Encoder, crops: np.ndarray, batch_size: int, progress: bool = False) -> np.ndarray:
    """``[N,8,32,32]`` float32 latents of ``crops``, ``batch_size`` crops per encoder call."""
    starts = range(0, len(crops), batch_size)
    parts = [
        np.asarray(encoder(crops[i : i + batch_size]), dtype=np.float32)
        for i in tqdm(starts, desc="latents", unit="batch", disable=not progress)
    ]
    latents = np.concatenate(parts)
    if latents.shape != (len(crops), 8, 32, 32):
        raise ValueError(f"the encoder returned {latents.shape}, expected ({len(crops)}, 8, 32, 32)")
    return latents


def _detect_all(frames: np.ndarray, settings: Settings, source: Source, detector: LandmarkDetector | None,
                progress: bool, on_progress: Progress) -> tuple[list[Detection | None], str]:
    """Detections per frame and the detector's name; a detector made here is closed after."""

    def detect_all(found: LandmarkDetector) -> list[Detection | None]:
        # Detectors without tracking may take frames in batches (one network call each).
        batch = getattr(found, "batch_frames", 1)
        detect = (found.detect_many if batch > 1  # type: ignore[attr-defined]
                  else lambda chunk: [found.detect(frame) for frame in chunk])
        detections: list[Detection | None] = []
        with tqdm(total=len(frames), desc="landmarks", unit="frame", disable=not progress) as bar:
            for start in range(0, len(frames), batch):
                chunk = frames[start : start + batch]
                detections.extend(detect(chunk))
                bar.update(len(chunk))
                on_progress("landmarks", len(detections), len(frames))
        return detections

    if detector is not None:
        return detect_all(detector), detector.name
    # Tracking across frames steadies the points of a video; a still image is one photo.
    owned = make_detector(settings.avatar.face_backend, video=source.kind != "image", models=settings.models)
    try:
        return detect_all(owned), owned.name
    finally:
        owned.close()


def _boxes(frames: np.ndarray, found: list[Detection | None], settings: Settings,
           source: Source) -> tuple[np.ndarray, np.ndarray, dict[str, list[int]]]:
    """Boxes ``[N,4]`` and landmarks ``[N,68,2]``, and notes for the manifest.

    Frames without a usable face borrow the nearest one's box (the arrays need
    one) and are listed as ``faceless_frames``: the engine shows them untouched.
    """
    cfg = settings.avatar
    height, width = frames.shape[1:3]
    boxes = np.zeros((len(frames), 4), dtype=np.int32)
    landmarks = np.zeros((len(frames), 68, 2), dtype=np.float32)
    usable, fallback = [], []
    for i, det in enumerate(found):
        if det is None:
            continue
        box, used_fallback = face_box(det.landmarks, det.box, bbox_shift=cfg.bbox_shift)
        x1, y1, x2, y2 = with_margin(box, cfg.extra_margin, height)
        if x2 <= x1 or y2 <= y1 or x1 >= width or y1 >= height:
            continue
        boxes[i], landmarks[i] = (x1, y1, x2, y2), det.landmarks
        usable.append(i)
        if used_fallback:
            fallback.append(i)
    if not usable:
        raise FaceNotFound(
            f"no face found in the avatar source {source.name} ({len(frames)} frames)",
            hint="use a video or photo with one clearly visible, roughly frontal face",
        )
    have = np.asarray(usable)
    missing = sorted(set(range(len(frames))) - set(usable))
    for i in missing:
        nearest = int(have[np.argmin(np.abs(have - i))])
        boxes[i], landmarks[i] = boxes[nearest], landmarks[nearest]
    if missing:
        log.warning("no face in %d of %d frames; they are shown unchanged", len(missing), len(frames))
    return boxes, landmarks, {"faceless_frames": missing, "fallback_box_frames": fallback}


def _placements(frames: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray, settings: Settings) -> np.ndarray:
    """``[N,2,3]`` stabilised placements of the raw ``boxes`` under the render settings."""
    render = settings.render
    raw_crop_boxes = np.array(
        [crop_box((int(b[0]), int(b[1]), int(b[2]), int(b[3])), render.expand) for b in boxes], dtype=np.int32
    )
    started = time.perf_counter()
    placements = plan(frames, landmarks, boxes, raw_crop_boxes, settings.avatar.fps, render)
    log.info("placements of %d frames in %.2f s", len(frames), time.perf_counter() - started)
    return placements


def _masks(frames: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray, settings: Settings,
           mask_source: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Blend masks and their crop boxes around ``boxes``, the face boxes the placements cover."""
    render = settings.render
    segment: Callable[[int, Box], np.ndarray]
    if mask_source == "parsing":
        from PIL import Image

        from ..models.musetalk import resolve_device
        from .parsing import FaceParser

        models = settings.models
        parser = FaceParser(models.models_dir, resolve_device(models.device), subdir=models.face_parsing_dir)
        mode = settings.avatar.parsing_mode

        def segment(i: int, box: Box) -> np.ndarray:
            # Upstream parses the RGB crop box of the frame (black outside the frame).
            return parser.segment(Image.fromarray(frames[i][:, :, ::-1]).crop(box), mode)
    else:

        def segment(i: int, box: Box) -> np.ndarray:
            return landmark_segment(landmarks[i], box)

    masks, crop_boxes = [], np.zeros((len(frames), 4), dtype=np.int32)
    for i, box in enumerate(boxes):
        face = (int(box[0]), int(box[1]), int(box[2]), int(box[3]))
        mask, crop_boxes[i] = blend_mask(
            frames.shape[1:], face, segment(i, crop_box(face, render.expand)),
            upper_boundary_ratio=render.upper_boundary_ratio,
            expand=render.expand,
            blur_ratio=render.blur_ratio,
        )
        masks.append(mask)
    return masks, crop_boxes


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def prepare_avatar(
    settings: Settings,
    *,
    encoder: Encoder | None = None,
    vae_id: str | None = None,
    force: bool = False,
    detector: LandmarkDetector | None = None,
    progress: bool = True,
    on_progress: Progress | None = None,
) -> Avatar:
    """Prepare (or reuse) the configured avatar and return it as cached.

    ``encoder`` maps ``[B,256,256,3]`` uint8 BGR crops to ``[B,8,32,32]``
    float32 latents and ``vae_id`` names it; without one the avatar has no
    latents (enough for the lite renderer). The cache is reused when the
    source, parameters and VAE match, unless ``force``. ``detector`` defaults
    to a fresh ``avatar.face_backend`` detector (a video detector carries
    tracking state, so pass a fresh one per source). ``on_progress`` is told
    each frame's landmarks as they are found, and the start of each later stage.
    """
    if encoder is not None and vae_id is None:
        raise ValueError("vae_id must name the encoder's VAE")
    cfg = settings.avatar
    started = time.perf_counter()
    source = describe_source(settings)
    mask_source = resolve_mask_source(settings)
    params = prep_params(settings, mask_source)
    key = {"source_sha256": source.sha256, "params": params}
    if not force and cache_is_current(cfg.avatar_id, cfg.cache_dir, **key, vae_id=vae_id):
        log.info("avatar %s: cache is current, loaded", cfg.avatar_id)
        return load_avatar(cfg.avatar_id, cfg.cache_dir, frames_crf=cfg.cache_crf)
    if not force and encoder is not None and cache_is_current(cfg.avatar_id, cfg.cache_dir, **key, vae_id=None):
        cached = load_avatar(cfg.avatar_id, cfg.cache_dir, frames_crf=cfg.cache_crf)
        latents = encode_crops(encoder, cached.crops, settings.render.batch_size, progress)
        updated = replace(cached, latents=latents, manifest={**cached.manifest, "vae_id": vae_id, "has_latents": True})
        save_latents(updated, cfg.cache_dir)
        log.info("avatar %s: only the VAE changed, latents recomputed in %.1f s",
                 cfg.avatar_id, time.perf_counter() - started)
        return updated

    frames = read_frames(source, settings)
    report: Progress = on_progress or (lambda stage, done, total: None)
    found, detector_name = _detect_all(frames, settings, source, detector, progress, report)
    boxes, landmarks, notes = _boxes(frames, found, settings, source)
    report("placements", 0, len(frames))
    placements = _placements(frames, boxes, landmarks, settings)
    crops = cut_crops(frames, placements)
    placed = np.array([placed_box(t) for t in placements], dtype=np.int32)
    report("masks", 0, len(frames))
    masks, crop_boxes = _masks(frames, placed, landmarks, settings, mask_source)
    latents = None if encoder is None else encode_crops(encoder, crops, settings.render.batch_size, progress)
    manifest = {
        "source": {"kind": source.kind, "name": source.name, "sha256": source.sha256},
        "params": params,
        "vae_id": vae_id if latents is not None else None,
        "detector": detector_name,
        "versions": _versions(),
        **notes,
    }
    avatar = Avatar(cfg.avatar_id, cfg.fps, frames, boxes, landmarks, crops, latents,
                    tuple(masks), crop_boxes, placements, manifest)
    report("saving", 0, len(frames))
    save_avatar(avatar, cfg.cache_dir, frames_crf=cfg.cache_crf)
    log.info("avatar %s: prepared %d frames from %s %s in %.1f s (masks: %s, latents: %s)",
             cfg.avatar_id, len(frames), source.kind, source.name, time.perf_counter() - started,
             mask_source, vae_id)
    return load_avatar(cfg.avatar_id, cfg.cache_dir)


def load_or_prepare(
    settings: Settings,
    *,
    encoder: Encoder | None = None,
    vae_id: str | None = None,
    detector: LandmarkDetector | None = None,
    progress: bool = True,
) -> Avatar:
    """The avatar for a CLI, demo or server run.

    With ``avatar.preparation`` or the built-in ``demo`` avatar, prepare it (a
    no-op load when the cache is current); otherwise load the cache as it is,
    never running detection (see :func:`will_prepare`).
    """
    cfg = settings.avatar
    if will_prepare(settings):
        return prepare_avatar(settings, encoder=encoder, vae_id=vae_id, detector=detector, progress=progress)
    return load_avatar(cfg.avatar_id, cfg.cache_dir)


def will_prepare(settings: Settings) -> bool:
    """Whether :func:`load_or_prepare` prepares (True) or loads a cache (False); cheap, loads nothing.

    Checked before any model is loaded, so a missing source or cache fails at once:
    ConfigError for a missing source file, AvatarCacheError naming ``prep`` for
    an avatar other than the demo that was never prepared.
    """
    cfg = settings.avatar
    prepare = cfg.preparation or (cfg.video_path is None and cfg.avatar_id == DEMO_AVATAR_ID)
    if prepare or cfg.video_path is not None:
        check_source(settings)
    if not prepare and not (Path(cfg.cache_dir) / cfg.avatar_id / MANIFEST).is_file():
        raise AvatarCacheError(
            f"avatar {cfg.avatar_id!r} has not been prepared",
            hint=f"prepare it first: {_prep_command(cfg.avatar_id)}",
        )
    return prepare

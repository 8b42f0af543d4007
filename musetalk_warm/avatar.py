"""The prepared avatar: frames, face boxes, landmarks, latents and blend masks.

`Avatar` is what the render engine consumes; `save_avatar` / `load_avatar`
keep it under ``<cache_dir>/<avatar_id>/`` in safe formats (npy, safetensors,
json manifest; never pickle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

CROP_SIZE = 256


@dataclass(frozen=True)
class Avatar:
    """A prepared avatar. Arrays are indexed by source frame 0..N-1.

    Attributes:
        avatar_id: cache folder name.
        fps: frame rate the frames were read at.
        frames: ``[N,H,W,3]`` uint8 BGR source frames (may be a read-only memmap).
        boxes: ``[N,4]`` int32 face boxes ``x1,y1,x2,y2`` (upstream v1.5 rule, with
            ``extra_margin`` on y2): the region the generated 256² face replaces.
        landmarks: ``[N,68,2]`` float32 iBUG-68 points in frame coordinates.
        crops: ``[N,256,256,3]`` uint8 BGR face crops (box resized with INTER_LANCZOS4).
        latents: ``[N,8,32,32]`` float32 UNet input (masked ‖ reference latents),
            or ``None`` when the avatar was prepared without a VAE.
        masks: per frame, the uint8 blend mask ``[2s,2s]`` over ``crop_boxes[i]``.
        crop_boxes: ``[N,4]`` int32 expanded square crop boxes (may leave the frame).
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

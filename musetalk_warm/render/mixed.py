"""One batch of faces for frames of many avatars, then each pasted into its own frame.

MuseTalk's UNet takes per-frame latents and per-frame audio prompts, so frames of
different avatars (and sessions) share one UNet + VAE call; other renderers take
one avatar per call and get one call per avatar of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..avatars.cache import Avatar
from ..errors import AvatarCacheError
from .engine import MouthRenderer, MuseTalkRenderer


@dataclass(frozen=True)
class FrameJob:
    """One frame to render: the avatar, its source frame and one frame's conditioning."""

    avatar: Avatar
    source: int
    cond: Any


def stack_conditioning(items: Sequence[Any]) -> Any:
    """Per-frame conditioning items (tensors or numbers) as one batch."""
    first = items[0]
    if hasattr(first, "unsqueeze"):  # torch tensors: the accelerator path
        import torch

        return torch.stack(list(items))
    return np.asarray(items)


def generate_faces(renderer: MouthRenderer, jobs: Sequence[FrameJob]) -> list[np.ndarray]:
    """``[256,256,3]`` faces for ``jobs``, in order, in as few renderer calls as the renderer allows."""
    if isinstance(renderer, MuseTalkRenderer):
        return list(_musetalk_mixed(renderer, jobs))
    faces: list[np.ndarray | None] = [None] * len(jobs)
    groups: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.avatar.avatar_id, []).append(i)
    for members in groups.values():
        avatar = jobs[members[0]].avatar
        out = renderer.generate(
            avatar,
            stack_conditioning([jobs[i].cond for i in members]),
            np.array([jobs[i].source for i in members], dtype=np.int64),
        )
        for i, face in zip(members, out):
            faces[i] = face
    return [f for f in faces if f is not None]


def _musetalk_mixed(renderer: MuseTalkRenderer, jobs: Sequence[FrameJob]) -> np.ndarray:
    for job in jobs:
        if job.avatar.latents is None:
            raise AvatarCacheError(f"avatar {job.avatar.avatar_id!r} was prepared without the VAE")
    # Latents and audio prompts are per frame, so one accelerator call (its buckets) serves every avatar.
    latents = np.stack([job.avatar.latents[job.source] for job in jobs])  # type: ignore[index]
    return renderer.accelerator.run(latents, stack_conditioning([job.cond for job in jobs]))


def face_region(avatar: Avatar, source: int) -> tuple[slice, slice]:
    """Rows and columns of a frame that compositing can change (the crop box inside the frame)."""
    height, width = avatar.frames.shape[1:3]
    x1, y1, x2, y2 = (int(v) for v in avatar.crop_boxes[source])
    return slice(max(y1, 0), min(y2, height)), slice(max(x1, 0), min(x2, width))


def mix_frames(idle: np.ndarray, speech: np.ndarray, alpha: float, region: tuple[slice, slice]) -> np.ndarray:
    """``idle`` with ``region`` moved ``alpha`` of the way to ``speech`` (0: idle exactly, 1: speech)."""
    if alpha >= 1.0:
        return speech
    out = np.array(idle)
    if alpha <= 0.0:
        return out
    a = idle[region].astype(np.float32)
    b = speech[region].astype(np.float32)
    out[region] = np.rint(a + alpha * (b - a)).astype(np.uint8)
    return out

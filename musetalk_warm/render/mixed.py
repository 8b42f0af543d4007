"""One batch of faces for frames of many avatars, then each pasted into its own frame.

MuseTalk's UNet takes per-frame latents and per-frame audio prompts, so frames of
different avatars (and sessions) share one UNet + VAE call; other renderers take
one avatar per call and get one call per avatar of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..avatars.cache import Avatar
from ..config import RenderSettings
from ..errors import AvatarCacheError
from . import silence
from .blend import faceless_frames
from .engine import MouthRenderer, MuseTalkRenderer

if TYPE_CHECKING:
    from .enhance import FaceEnhancer
    from .gpu_composite import FrameBatch


@dataclass(frozen=True)
class FrameJob:
    """One frame to render: the avatar, its source frame and one frame's conditioning."""

    avatar: Avatar
    source: int
    cond: Any
    hold: float = 0.0  # share of the source mouth (silence); see render/silence.py


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


def hold_silent_faces(jobs: Sequence[FrameJob], faces: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each face blended towards its source crop by its job's ``hold`` (silent frames show the source mouth)."""
    return [face if job.hold <= 0 else silence.hold_source(face[None], job.avatar.crops[job.source][None],
                                                           np.array([job.hold], np.float32))[0]
            for job, face in zip(jobs, faces)]


def _musetalk_mixed(renderer: MuseTalkRenderer, jobs: Sequence[FrameJob]) -> np.ndarray:
    for job in jobs:
        if job.avatar.latents is None:
            raise AvatarCacheError(f"avatar {job.avatar.avatar_id!r} was prepared without the VAE")
    # Latents and audio prompts are per frame, so one accelerator call (its buckets) serves every avatar.
    latents = np.stack([job.avatar.latents[job.source] for job in jobs])  # type: ignore[index]
    return renderer.accelerator.run(latents, stack_conditioning([job.cond for job in jobs]))


@dataclass(frozen=True)
class DeviceFrames:
    """Frames composited on the device, on their way to the host, grouped by avatar."""

    batch: FrameBatch
    order: list[int]  # job index of each frame of ``batch``

    def frames(self) -> list[np.ndarray]:
        """The finished frames in job order (waits for their copy to the host)."""
        landed = self.batch.frames()
        out: list[np.ndarray] = [landed[0]] * len(landed)
        for frame, job in zip(landed, self.order):
            out[job] = frame
        return out


def render_on_device(renderer: MouthRenderer, jobs: Sequence[FrameJob], settings: RenderSettings,
                     enhancer: FaceEnhancer | None = None) -> DeviceFrames | None:
    """Finished frames for ``jobs`` from one UNet + VAE call (each face restored by ``enhancer``
    when given) and a GPU paste per avatar.

    Silent frames are blended towards the source mouth there too. None where the device
    cannot finish them (no compositor, a blend mode it lacks, or a faceless source frame,
    which is shown untouched): the caller pastes on the host.
    """
    compositor = getattr(renderer, "compositor", None)
    if (not isinstance(renderer, MuseTalkRenderer) or compositor is None or not settings.gpu_composite
            or not compositor.supports(settings.blend_mode)):
        return None
    groups: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.avatar.avatar_id, []).append(i)
    for members in groups.values():
        faceless = faceless_frames(jobs[members[0]].avatar)
        if any(jobs[i].source in faceless for i in members):
            return None
    import torch

    from .gpu_composite import FrameBatch

    order = [i for members in groups.values() for i in members]
    states, indices, latents = [], [], []
    for members in groups.values():
        avatar = jobs[members[0]].avatar
        if avatar.latents is None:
            raise AvatarCacheError(f"avatar {avatar.avatar_id!r} was prepared without the VAE")
        state = compositor.prepare(avatar, settings.subpixel_enabled)
        index = torch.tensor([jobs[i].source for i in members], dtype=torch.int64, device=compositor.device)
        states.append(state)
        indices.append(index)
        latents.append(state.latents[index])
    with torch.inference_mode():
        faces = renderer.accelerator.faces(torch.cat(latents), stack_conditioning([jobs[i].cond for i in order]))
        if enhancer is not None:
            faces = enhancer.restore_tensor(faces)
        parts, start = [], 0
        for state, index, members in zip(states, indices, groups.values()):
            held = compositor.hold(state, faces[start : start + len(index)], index, [jobs[i].hold for i in members])
            frames = compositor.paste(state, held, index)
            parts.append(compositor.to_host(frames))
            start += len(index)
    return DeviceFrames(FrameBatch.concat(parts), order)


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

"""Feather paste-back on the accelerator, batched, with finished frames copied out through pinned memory.

:meth:`GpuCompositor.prepare` puts an avatar on the device once: its frames,
latents, per-frame feather weights (:func:`blend.feather_alpha` over the
placement's footprint, computed on the CPU as :func:`blend.composite` does) and
the inverse placement maps. :meth:`GpuCompositor.composite` then pastes a batch
of generated faces in a handful of kernels: gather the frames, sample each face
at its placement (bilinear, as ``cv2.warpAffine`` / ``cv2.resize``), blend with
the weights, scatter the regions back, and start an asynchronous copy of the
finished frames to pinned host memory on a side stream, so the next batch runs
while it lands. Works on CPU torch too (same arithmetic, no copy stream).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..avatars.cache import CROP_SIZE, Avatar
from ..avatars.stabilise import snap, upright_box
from . import blend

GPU_BLEND_MODES = ("feather",)


@dataclass
class DeviceAvatar:
    """One avatar resident on the device for one placement rounding (``subpixel``)."""

    frames: torch.Tensor  # [N,H,W,3] uint8 BGR
    crops: torch.Tensor  # [N,256,256,3] uint8 BGR source face crops (the mouth silence shows)
    latents: torch.Tensor | None  # [N,8,32,32] model dtype
    weights: torch.Tensor  # [N,Rh,Rw] float32 feather alpha in [0,1], zero outside the region
    inverse: torch.Tensor  # [N,2,3] float32: region pixel → face-crop pixel
    clamp: torch.Tensor  # [N] bool: upright box (cv2.resize semantics: coordinates clamped)
    origin: torch.Tensor  # [N,2] int64 region x1, y1
    size: torch.Tensor  # [N,2] int64 region w, h

    @property
    def nbytes(self) -> int:
        """Device memory this avatar holds."""
        tensors = (self.frames, self.crops, self.latents, self.weights, self.inverse, self.clamp, self.origin, self.size)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _region_maps(avatar: Avatar, i: int, subpixel: bool) -> tuple[tuple[int, int, int, int], np.ndarray,
                                                                  np.ndarray, bool]:
    """Frame ``i``'s region, feather weight (uint8), inverse map and clamp flag, as blend.composite."""
    frame_shape = avatar.frames.shape[1:]
    x1, y1, x2, y2 = blend._region(avatar.crop_boxes[i], frame_shape)
    w, h = max(x2 - x1, 0), max(y2 - y1, 0)
    if w == 0 or h == 0:
        return (x1, y1, w, h), np.zeros((0, 0), np.uint8), np.zeros((2, 3)), False
    t = np.asarray(avatar.placements[i], dtype=np.float64) if subpixel else snap(avatar.placements[i])
    _, footprint = blend._place(np.zeros((CROP_SIZE, CROP_SIZE, 3), np.uint8), t, (x1, y1), (w, h))
    cx, cy = int(avatar.crop_boxes[i][0]), int(avatar.crop_boxes[i][1])
    mask = np.ascontiguousarray(avatar.masks[i][y1 - cy : y2 - cy, x1 - cx : x2 - cx])
    weight = blend.feather_alpha(mask, footprint)
    if upright_box(t) is not None:
        # cv2.resize INTER_LINEAR: src = (dst + 0.5)·scale − 0.5 inside the whole-pixel box.
        bw, bh = round(t[0, 0] * CROP_SIZE), round(t[1, 1] * CROP_SIZE)
        bx = round(t[0, 2] - 0.5 * t[0, 0] + 0.5) - x1
        by = round(t[1, 2] - 0.5 * t[1, 1] + 0.5) - y1
        sx, sy = CROP_SIZE / bw, CROP_SIZE / bh
        inverse = np.array([[sx, 0, (0.5 - bx) * sx - 0.5], [0, sy, (0.5 - by) * sy - 0.5]])
        return (x1, y1, w, h), weight, inverse, True
    shifted = t.copy()
    shifted[:, 2] -= (x1, y1)
    full = np.vstack([shifted, [0, 0, 1]])
    return (x1, y1, w, h), weight, np.linalg.inv(full)[:2], False


@dataclass
class FrameBatch:
    """Finished frames on their way to the host: ``frames()`` waits for the copy."""

    chunks: list[tuple[torch.Tensor, torch.cuda.Event | None]] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(host) for host, _ in self.chunks)

    def frames(self) -> list[np.ndarray]:
        """``[H,W,3]`` uint8 BGR frames (views of pinned host memory, kept alive by the views)."""
        out: list[np.ndarray] = []
        for host, done in self.chunks:
            if done is not None:
                done.synchronize()  # releases the GIL while the copy lands
            out.extend(host.numpy())
        return out

    @staticmethod
    def concat(parts: list[FrameBatch]) -> FrameBatch:
        return FrameBatch([chunk for part in parts for chunk in part.chunks])


class GpuCompositor:
    """Avatars resident on one device; batched feather paste-back and pinned copies to the host."""

    def __init__(self, device: torch.device | str, latent_dtype: torch.dtype = torch.float16) -> None:
        self.device = torch.device(device)
        self.latent_dtype = latent_dtype
        self._avatars: dict[tuple[int, bool], DeviceAvatar] = {}
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @staticmethod
    def supports(blend_mode: str) -> bool:
        return blend_mode in GPU_BLEND_MODES

    def prepare(self, avatar: Avatar, subpixel: bool = True) -> DeviceAvatar:
        """``avatar`` on the device (built once per avatar and placement rounding)."""
        key = (id(avatar), subpixel)
        if key in self._avatars:
            return self._avatars[key]
        maps = [_region_maps(avatar, i, subpixel) for i in range(len(avatar.frames))]
        rh = max(m[1].shape[0] for m in maps) or 1
        rw = max(m[1].shape[1] for m in maps) or 1
        weights = np.zeros((len(maps), rh, rw), np.float32)
        for i, (_, weight, _, _) in enumerate(maps):
            weights[i, : weight.shape[0], : weight.shape[1]] = weight * np.float32(1.0 / 255.0)
        dev = self.device
        latents = None
        if avatar.latents is not None:
            latents = torch.from_numpy(np.ascontiguousarray(avatar.latents)).to(dev, self.latent_dtype)
        state = DeviceAvatar(
            # A copy: cache frames may be read-only memmaps, which torch must not alias.
            frames=torch.from_numpy(np.array(avatar.frames)).to(dev),
            crops=torch.from_numpy(np.array(avatar.crops)).to(dev),
            latents=latents,
            weights=torch.from_numpy(weights).to(dev),
            inverse=torch.from_numpy(np.stack([m[2] for m in maps]).astype(np.float32)).to(dev),
            clamp=torch.tensor([m[3] for m in maps], device=dev),
            origin=torch.tensor([m[0][:2] for m in maps], dtype=torch.int64, device=dev),
            size=torch.tensor([m[0][2:] for m in maps], dtype=torch.int64, device=dev),
        )
        self._avatars[key] = state
        return state

    def release(self, avatar: Avatar) -> None:
        """Drop ``avatar``'s device copies."""
        for key in [k for k in self._avatars if k[0] == id(avatar)]:
            del self._avatars[key]

    @staticmethod
    def hold(state: DeviceAvatar, faces: torch.Tensor, src: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
        """``faces`` blended towards their source crops by ``weights`` (as :func:`silence.hold_source`)."""
        if not any(w > 0 for w in weights):
            return faces
        w = torch.tensor(weights, dtype=torch.float32, device=faces.device)[:, None, None, None]
        mixed = faces.float() * (1.0 - w) + state.crops[src].float() * w
        return mixed.round().to(torch.uint8)

    def paste(self, state: DeviceAvatar, faces: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """``[B,H,W,3]`` uint8 frames ``src`` with ``faces`` (``[B,256,256,3]`` uint8 BGR) feathered in."""
        b = len(src)
        n_frames, height, width, _ = state.frames.shape
        rh, rw = state.weights.shape[1:]
        dev = self.device
        origin, size = state.origin[src], state.size[src]
        ys = origin[:, 1, None] + torch.arange(rh, device=dev)  # [B,Rh]
        xs = origin[:, 0, None] + torch.arange(rw, device=dev)  # [B,Rw]
        valid = ((torch.arange(rh, device=dev) < size[:, 1, None])[:, :, None]
                 & (torch.arange(rw, device=dev) < size[:, 0, None])[:, None, :])  # [B,Rh,Rw]
        yc, xc = ys.clamp(0, height - 1), xs.clamp(0, width - 1)
        flat = (src[:, None, None] * height + yc[:, :, None]) * width + xc[:, None, :]
        dst = state.frames.view(-1, 3)[flat]  # [B,Rh,Rw,3]
        # Face-crop coordinates of every region pixel, normalised for grid_sample (align_corners:
        # pixel centres at 0 and 255, as OpenCV's remap).
        gy, gx = torch.meshgrid(torch.arange(rh, device=dev, dtype=torch.float32),
                                torch.arange(rw, device=dev, dtype=torch.float32), indexing="ij")
        inv = state.inverse[src]
        sx = inv[:, 0, 0, None, None] * gx + inv[:, 0, 1, None, None] * gy + inv[:, 0, 2, None, None]
        sy = inv[:, 1, 0, None, None] * gx + inv[:, 1, 1, None, None] * gy + inv[:, 1, 2, None, None]
        clamp = state.clamp[src][:, None, None]
        sx = torch.where(clamp, sx.clamp(0, CROP_SIZE - 1), sx)
        sy = torch.where(clamp, sy.clamp(0, CROP_SIZE - 1), sy)
        grid = torch.stack([sx, sy], dim=-1) * (2.0 / (CROP_SIZE - 1)) - 1.0
        face = faces.permute(0, 3, 1, 2).float()
        patch = torch.nn.functional.grid_sample(face, grid, mode="bilinear", padding_mode="zeros",
                                                align_corners=True)
        patch = patch.round().permute(0, 2, 3, 1)  # the warped face is 8-bit, as cv2's
        w = (state.weights[src] * valid)[..., None]
        mixed = (patch * w + dst.float() * (1.0 - w)).round().clamp(0, 255).to(torch.uint8)
        # Scatter the regions back; pixels outside the frame go to one spare slot at the end.
        out = torch.empty(b * height * width + 1, 3, dtype=torch.uint8, device=dev)
        frames = out[:-1].view(b, height, width, 3)
        frames.copy_(state.frames[src])
        # Regions are clipped to the frame, so every valid pixel lies inside it.
        local = (torch.arange(b, device=dev)[:, None, None] * height + yc[:, :, None]) * width + xc[:, None, :]
        out[torch.where(valid, local, b * height * width)] = mixed
        return frames

    def to_host(self, frames: torch.Tensor) -> FrameBatch:
        """Start copying ``frames`` to pinned host memory on a side stream (CPU: a plain batch)."""
        if self._copy_stream is None:
            return FrameBatch([(frames, None)])
        host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            host.copy_(frames, non_blocking=True)
            frames.record_stream(stream)
            done = torch.cuda.Event()
            done.record(stream)
        return FrameBatch([(host, done)])

    def composite(self, state: DeviceAvatar, faces: torch.Tensor, src: np.ndarray) -> FrameBatch:
        """Paste ``faces`` into source frames ``src`` and start their copy to the host."""
        index = torch.from_numpy(np.ascontiguousarray(src, dtype=np.int64)).to(self.device)
        with torch.inference_mode():
            return self.to_host(self.paste(state, faces, index))

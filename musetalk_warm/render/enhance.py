"""Face enhancement with GFPGAN v1.4: a face region cut at 512², restored, pasted back.

The region is a frame's face placement (the 256² crop → frame map) grown by
``REGION_EXPAND`` about its centre: the face box then fills two thirds of the
crop, roughly the framing of FFHQ, GFPGAN's training data. It is cut at the network's size
(512²), restored, and pasted back with the frame's blend mask (``feather``: alpha
ends inside the restored square). Outside the mask every pixel stays as it was.

Two sources of placements: a prepared avatar's (for a session video, whose frame
``i`` shows avatar cycle position ``start + i``), or a face found in every frame
(for a source video before prep; the mask then covers the whole face box).
:func:`enhance_video` keeps the frame count, each frame's timestamp and the frame
rate, and stream-copies the audio.

Weights: the official ``GFPGANv1.4.pth`` (``params_ema``), read with
``torch.load(weights_only=True)`` into :class:`~.gfpgan.GFPGANv1Clean` (strict).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..avatars.cache import CROP_SIZE, Avatar
from ..avatars.landmarks import LandmarkDetector
from ..avatars.masks import blend_mask, crop_box
from ..avatars.prep import face_box, with_margin
from ..avatars.stabilise import box_transform, boxes_center_size, compose
from ..config import Settings
from ..errors import BadInput, MediaError, WeightsMissing
from ..files import atomic_write
from ..media.decode import ffmpeg_reason, open_input
from .blend import composite, faceless_frames
from .gfpgan import GFPGANv1Clean

log = logging.getLogger(__name__)

REGION_EXPAND = 1.5
_DOWN = "conv_body_down."
_MLP = "stylegan_decoder.style_mlp."

# (placement [2,3], blend mask, crop box) of one frame, or None: leave the frame as it is.
Target = tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]] | None
Targets = Callable[[int, np.ndarray], Target]


def _network(state: dict[str, torch.Tensor]) -> GFPGANv1Clean:
    """A ``GFPGANv1Clean`` shaped like ``state``: size from the encoder depth, width from its first conv."""
    depth = len({k.split(".")[1] for k in state if k.startswith(_DOWN)})
    layers = len({k.split(".")[2] for k in state if k.startswith(_MLP)})
    first = state["conv_body_first.weight"].shape[0]
    style = state["stylegan_decoder.style_conv1.modulated_conv.modulation.weight"].shape[1]
    # conv_body_first has 32·narrow channels (512² output, channel multiplier 2, as released).
    return GFPGANv1Clean(out_size=2 ** (depth + 2), style=style, narrow=first / 32, num_mlp=layers)


def load_gfpgan(path: Path) -> GFPGANv1Clean:
    """The GFPGAN v1.3/v1.4 network in ``path`` (an official ``.pth``), in eval mode on the CPU."""
    if not path.is_file():
        raise WeightsMissing(
            f"face enhancement weights {path.name} not found in the models folder",
            hint="run `python scripts/download_weights.py --with-enhance` (fetches GFPGANv1.4.pth)",
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        # The official files keep the EMA generator under params_ema (older ones under params).
        state = checkpoint.get("params_ema", checkpoint.get("params", checkpoint))
        net = _network(state)
        net.load_state_dict(state, strict=True)
    except (pickle.UnpicklingError, EOFError, AttributeError, KeyError, RuntimeError, ValueError) as exc:
        raise WeightsMissing(
            f"{path.name} is not a GFPGAN v1.3/v1.4 checkpoint ({type(exc).__name__})",
            hint="use the official GFPGANv1.4.pth (scripts/download_weights.py --with-enhance)",
        ) from None
    return net.eval()


class FaceEnhancer:
    """A restoration network on a device: ``size``² BGR face crops in, restored crops out.

    ``net`` maps ``[B,3,S,S]`` RGB in ``[-1, 1]`` to the same (GFPGAN's convention).
    """

    def __init__(self, net: nn.Module, size: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.net = net.to(self.device, dtype)
        self.size = size

    @classmethod
    def load(cls, settings: Settings) -> FaceEnhancer:
        """``models.gfpgan_weights`` under ``models.models_dir``, on ``models.device`` in ``models.dtype``."""
        models = settings.models
        net = load_gfpgan(models.path(models.gfpgan_weights))
        from ..models.musetalk import resolve_device, resolve_dtype

        device = resolve_device(models.device)
        return cls(net, net.out_size, device, resolve_dtype(models.dtype, device))

    def restore(self, faces: np.ndarray) -> np.ndarray:
        """``[B,S,S,3]`` uint8 BGR → restored, same shape (GFPGAN's [-1, 1] RGB in and out)."""
        return self.restore_tensor(torch.from_numpy(np.ascontiguousarray(faces))).cpu().numpy()

    @torch.inference_mode()
    def restore_tensor(self, faces: torch.Tensor) -> torch.Tensor:
        """``[B,H,W,3]`` uint8 BGR (any device) → restored on this one, same shape; crops of another
        size are resized to the network's (bicubic) and back (area)."""
        x = faces.to(self.device).flip(-1).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        size = tuple(faces.shape[1:3])
        if size != (self.size, self.size):
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        y = self.net(x.to(self.dtype)).float().clamp_(-1.0, 1.0)
        if size != (self.size, self.size):
            y = nn.functional.interpolate(y, size=size, mode="area")
        return y.add_(1.0).mul_(127.5).round_().to(torch.uint8).flip(1).permute(0, 2, 3, 1)


def enhance_region(placement: np.ndarray, size: int, expand: float = REGION_EXPAND) -> np.ndarray:
    """The ``size``² crop → frame map of the placement's square grown ``expand`` times about its centre."""
    k = expand * CROP_SIZE / size
    centre = (CROP_SIZE - 1) / 2 - k * (size - 1) / 2
    return compose(np.asarray(placement, np.float64), np.array([[k, 0.0, centre], [0.0, k, centre]]))


def enhance_frame(enhancer: FaceEnhancer, frame: np.ndarray, target: Target) -> np.ndarray:
    """``frame`` with its face region restored and pasted back with the mask (unchanged for ``None``)."""
    if target is None:
        return np.array(frame)
    placement, mask, box = target
    region = enhance_region(placement, enhancer.size)
    size = (enhancer.size, enhancer.size)
    crop = cv2.warpAffine(frame, region, size, flags=cv2.INTER_LANCZOS4 | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)
    face = enhancer.restore(crop[None])[0]
    # feather: the mask is cut inside the restored square, so its edge never shows.
    return composite(frame, face, region, mask, box, "feather")


def avatar_targets(avatar: Avatar, start: int = 0) -> Targets:
    """Frame ``i`` of a session video → its avatar frame's placement, mask and crop box."""
    faceless = faceless_frames(avatar)
    shape = avatar.frames.shape[1:]

    def target(i: int, frame: np.ndarray) -> Target:
        if frame.shape != shape:
            raise BadInput(f"the video is {frame.shape[1]}x{frame.shape[0]}, avatar {avatar.avatar_id} "
                           f"is {shape[1]}x{shape[0]}", hint="enhance a session video of this avatar")
        src = int(avatar.source_index(start + i))
        if src in faceless:
            return None
        box = avatar.crop_boxes[src]
        return avatar.placements[src], avatar.masks[src], (int(box[0]), int(box[1]), int(box[2]), int(box[3]))

    return target


def detected_targets(detector: LandmarkDetector, settings: Settings) -> Targets:
    """A face found in each frame → its upstream face box as placement, a soft mask over that box."""
    cfg, render = settings.avatar, settings.render

    def target(i: int, frame: np.ndarray) -> Target:
        found = detector.detect(frame)
        if found is None:
            return None
        height, width = frame.shape[:2]
        box, _ = face_box(found.landmarks, found.box, bbox_shift=cfg.bbox_shift)
        x1, y1, x2, y2 = with_margin(box, cfg.extra_margin, height)
        if x2 <= x1 or y2 <= y1 or x1 >= width or y1 >= height:
            return None
        face = (x1, y1, x2, y2)
        centre, size = boxes_center_size(np.array([face]))
        cx1, _, cx2, _ = crop_box(face, render.expand)
        side = cx2 - cx1
        mask, crop = blend_mask(frame.shape, face, np.full((side, side), 255, np.uint8),
                                upper_boundary_ratio=0.0, expand=render.expand, blur_ratio=render.blur_ratio)
        return box_transform(centre[0], size[0]), mask, crop

    return target


@dataclass(frozen=True)
class EnhanceResult:
    """What :func:`enhance_video` wrote: frames, how many had a face, the video rate, audio or not."""

    frames: int
    enhanced: int
    fps: float
    audio: bool


def _items(container: av.container.InputContainer, video: Any, audio: Any) -> Iterator[av.Packet | av.VideoFrame]:
    """Audio packets and decoded video frames, in the file's order."""
    streams = [video] + ([audio] if audio is not None else [])
    for packet in container.demux(*streams):
        if packet.stream is video:
            yield from packet.decode()
        elif packet.dts is not None:  # not a flush packet
            yield packet


def _transcode(inp: av.container.InputContainer, tmp: Path, enhancer: FaceEnhancer, targets: Targets,
               crf: int, progress: bool) -> tuple[int, int]:
    """Every frame of ``inp`` enhanced into the MP4 ``tmp``, audio packets copied: (frames, enhanced)."""
    vin = inp.streams.video[0]
    ain = inp.streams.audio[0] if inp.streams.audio else None
    with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        vout = out.add_stream("libx264", rate=vin.average_rate, options={"crf": str(crf)})
        vout.width, vout.height, vout.pix_fmt = vin.codec_context.width, vin.codec_context.height, "yuv420p"
        vout.time_base = vin.time_base
        aout = out.add_stream_from_template(ain) if ain is not None else None
        count = enhanced = 0
        with tqdm(total=vin.frames or None, desc="enhance", unit="frame", disable=not progress) as bar:
            for item in _items(inp, vin, ain):
                if isinstance(item, av.Packet):
                    item.stream = aout
                    out.mux(item)
                    continue
                image = item.to_ndarray(format="bgr24")
                target = targets(count, image)
                frame = av.VideoFrame.from_ndarray(enhance_frame(enhancer, image, target), format="bgr24")
                frame.pts, frame.time_base = item.pts, item.time_base
                out.mux(vout.encode(frame))
                count, enhanced = count + 1, enhanced + (target is not None)
                bar.update()
        out.mux(vout.encode(None))
    return count, enhanced


def enhance_video(src: Path, dst: Path, enhancer: FaceEnhancer, targets: Targets, *,
                  crf: int = 18, progress: bool = True) -> EnhanceResult:
    """``src`` with every frame's face restored, as an H.264 MP4 ``dst``; audio stream-copied.

    Each frame keeps its timestamp (same time base), so frame count, rate and
    A/V sync are those of ``src``. ``dst`` appears complete or not at all.
    """
    with open_input(src, "video") as inp:
        if not inp.streams.video:
            raise BadInput(f"{src.name} has no video stream")
        dst.parent.mkdir(parents=True, exist_ok=True)
        counts: list[tuple[int, int]] = []
        try:
            atomic_write(dst, lambda tmp: counts.append(_transcode(inp, tmp, enhancer, targets, crf, progress)))
        except av.error.FFmpegError as exc:
            raise MediaError(f"enhancing {src.name} failed: {ffmpeg_reason(exc)}") from exc
        rate = inp.streams.video[0].average_rate
        (frames, enhanced), audio = counts[0], bool(inp.streams.audio)
    log.info("enhanced %d of %d frames", enhanced, frames)
    return EnhanceResult(frames=frames, enhanced=enhanced, fps=float(rate or 0), audio=audio)

"""LatentSync's 16-frame pixel SyncNet (the scorer MuseTalk v1.5 trained against).

Two convolutional encoders map 16 lower-half face frames (``[48,128,256]``,
RGB in ``[-1, 1]``) and the matching 52 columns of an 80-band mel spectrogram
(``[1,80,52]``) to unit vectors; in-sync pairs point the same way. Module and
parameter names follow upstream, so the official ``latentsync_syncnet.pt``
(``{"state_dict": ...}``) loads strictly. :data:`TINY` keeps the input shapes
and down-sampling with a few channels, for tests without weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsMissing

Factor = int | tuple[int, int]
WEIGHTS_PATH = "syncnet/latentsync_syncnet.pt"  # under the models folder, upstream layout


@dataclass(frozen=True)
class EncoderConfig:
    """One encoder: channels per down block and each block's (H, W) stride."""

    in_channels: int
    block_out_channels: tuple[int, ...]
    downsample_factors: tuple[Factor, ...]
    norm_num_groups: int = 32


@dataclass(frozen=True)
class SyncNetConfig:
    """Both encoders plus the window they expect."""

    audio: EncoderConfig
    visual: EncoderConfig
    num_frames: int = 16
    resolution: int = 256
    mel_window: int = 52  # ceil(16 frames / 25 fps * 80 mel columns per second)


# configs/training/syncnet.yaml of MuseTalk (LatentSync's syncnet_16_pixel.yaml).
OFFICIAL = SyncNetConfig(
    audio=EncoderConfig(1, (32, 64, 128, 256, 512, 1024, 2048), ((2, 1), 2, 2, 1, 2, 2, (2, 3))),
    visual=EncoderConfig(48, (64, 128, 256, 256, 512, 1024, 2048, 2048), ((1, 2), 2, 2, 2, 2, 2, 2, 2)),
)
TINY = SyncNetConfig(
    audio=EncoderConfig(1, (4, 4, 8, 8, 8, 8, 8), OFFICIAL.audio.downsample_factors, norm_num_groups=2),
    visual=EncoderConfig(48, (4, 4, 8, 8, 8, 8, 8, 8), OFFICIAL.visual.downsample_factors, norm_num_groups=2),
)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual, then a strided 3×3 conv (asymmetric zero pad)."""

    def __init__(self, in_channels: int, out_channels: int, factor: Factor, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.downsample_conv = None if factor == 1 else nn.Conv2d(out_channels, out_channels, 3, stride=factor)
        # (left, right, top, bottom): an axis that is not down-sampled keeps its size.
        if isinstance(factor, tuple) and factor[0] == 1:
            self.pad = (0, 1, 1, 1)
        elif isinstance(factor, tuple) and factor[1] == 1:
            self.pad = (1, 1, 0, 1)
        else:
            self.pad = (0, 1, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        h = h + (x if self.conv_shortcut is None else self.conv_shortcut(x))
        if self.downsample_conv is not None:
            h = self.downsample_conv(F.pad(h, self.pad))
        return h


class DownEncoder2D(nn.Module):
    """conv_in, one :class:`ResnetBlock2D` per level, GroupNorm + ReLU out."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        channels = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        ins = (channels[0],) + channels[:-1]
        self.down_blocks = nn.ModuleList(
            ResnetBlock2D(i, o, f, cfg.norm_num_groups) for i, o, f in zip(ins, channels, cfg.downsample_factors)
        )
        self.norm_out = nn.GroupNorm(cfg.norm_num_groups, channels[-1], eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return F.relu(self.norm_out(x))


class SyncNet(nn.Module):
    """``forward(frames [B,48,128,256], mel [B,1,80,52])`` → unit ``(visual, audio)`` embeddings."""

    def __init__(self, config: SyncNetConfig = OFFICIAL) -> None:
        super().__init__()
        self.config = config
        self.audio_encoder = DownEncoder2D(config.audio)
        self.visual_encoder = DownEncoder2D(config.visual)
        self.eval()

    def embed_visual(self, frames: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual_encoder(frames).flatten(1), dim=1)

    def embed_audio(self, mel: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.audio_encoder(mel).flatten(1), dim=1)

    def forward(self, frames: torch.Tensor, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_visual(frames), self.embed_audio(mel)


def load_syncnet(path: Path, config: SyncNetConfig = OFFICIAL) -> SyncNet:
    """The official checkpoint (``{"state_dict": ...}`` or a bare state dict), loaded strictly.

    ``weights_only`` loading runs no pickled code; a missing file raises
    :class:`WeightsMissing` naming it and how to fetch it.
    """
    if not path.is_file():
        raise WeightsMissing(
            f"SyncNet weights not found: {WEIGHTS_PATH} under the models folder",
            hint="run `python scripts/download_weights.py --with-syncnet`, or score with `--syncnet tiny` "
            "(random weights: checks the path, says nothing about sync)",
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    model = SyncNet(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def tiny_syncnet(seed: int = 0) -> SyncNet:
    """Seeded random-init :data:`TINY` SyncNet (same inputs, few channels)."""
    torch.manual_seed(seed)
    return SyncNet(TINY)

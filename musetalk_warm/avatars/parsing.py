"""BiSeNet face parsing (upstream ``face_parsing``): a lower-face map for the blend mask.

The network is BiSeNet with a ResNet-18 context path and a feature-fusion module,
19 CelebAMask-HQ classes; its parameter names match the public checkpoint
``79999_iter.pth`` so it loads strictly. Weights load lazily on first use.
That checkpoint holds the whole network, ResNet-18 backbone included, so the
``resnet18-5c106cde.pth`` upstream also reads (only to initialise the backbone
before overwriting it) is not needed.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import WeightsMissing

ParsingMode = Literal["jaw", "raw", "neck"]
CHECKPOINT = "79999_iter.pth"
NUM_CLASSES = 19
PARSE_SIZE = 512
SKIN, NOSE, MOUTH, UPPER_LIP, LOWER_LIP, NECK = 1, 10, 11, 12, 13, 14
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


class ConvBNReLU(nn.Module):
    """Conv (no bias) → BatchNorm → ReLU; parameters ``conv.*``, ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1×1 projection (``downsample``) when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class ResNet18(nn.Module):
    """ResNet-18 trunk returning the 1/8, 1/16 and 1/32 feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        for index, (cin, cout, stride) in enumerate(widths, start=1):
            self.add_module(f"layer{index}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class AttentionRefinement(nn.Module):
    """Features reweighted per channel by a pooled sigmoid attention."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))


class ContextPath(nn.Module):
    """ResNet-18 with global context, refined and upsampled to 1/8 and 1/16."""

    def __init__(self) -> None:
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, kernel=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        context = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))
        up32 = self.arm32(feat32) + F.interpolate(context, feat32.shape[2:], mode="nearest")
        up32 = self.conv_head32(F.interpolate(up32, feat16.shape[2:], mode="nearest"))
        up16 = self.arm16(feat16) + up32
        up16 = self.conv_head16(F.interpolate(up16, feat8.shape[2:], mode="nearest"))
        return feat8, up16, up32


class FeatureFusion(nn.Module):
    """Concatenated spatial and context features with squeeze-excitation attention."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, kernel=1)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat + feat * atten


class OutputHead(nn.Module):
    """3×3 ConvBNReLU then a 1×1 classifier (``conv.*``, ``conv_out.*``)."""

    def __init__(self, cin: int, mid: int, classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """BiSeNet as in ``face_parsing``: the 1/8 ResNet features stand in for the spatial path."""

    def __init__(self, classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = OutputHead(256, 256, classes)
        self.conv_out16 = OutputHead(128, 64, classes)
        self.conv_out32 = OutputHead(128, 64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B,classes,H,W]`` of the main head (the auxiliary heads train only)."""
        feat8, context8, _ = self.cp(x)
        logits = self.conv_out(self.ffm(feat8, context8))
        return F.interpolate(logits, x.shape[2:], mode="bilinear", align_corners=True)


def jaw_kernel() -> np.ndarray:
    """Upstream's 33×33 dilation kernel: a cone widening 1..21 over rows 10..20, then 21 wide."""
    kernel = np.zeros((33, 33), np.uint8)
    for row in range(10, 33):
        half = min(row - 10, 10)
        kernel[row, 16 - half : 16 + half + 1] = 1
    return kernel


def cheek_mask(left_width: int = 90, right_width: int = 90) -> np.ndarray:
    """255 on the outer columns (``0..256-left`` and ``256+right..511``) of the 512² map."""
    mask = np.zeros((PARSE_SIZE, PARSE_SIZE), np.uint8)
    mask[:, : PARSE_SIZE // 2 - left_width + 1] = 255
    mask[:, PARSE_SIZE // 2 + right_width :] = 255
    return mask


def labels_to_mask(labels: np.ndarray, mode: ParsingMode = "jaw", cheeks: np.ndarray | None = None) -> np.ndarray:
    """uint8 0/255 map from a 512² BiSeNet label map, by upstream's ``mode`` rule."""
    lab = labels.astype(np.int32)
    if mode == "raw":
        keep = np.isin(lab, (SKIN, MOUTH, UPPER_LIP, LOWER_LIP))
    elif mode == "neck":
        keep = np.isin(lab, (SKIN, MOUTH, UPPER_LIP, LOWER_LIP, NECK))
    elif mode == "jaw":
        cheeks = cheek_mask() if cheeks is None else cheeks
        skin = np.where(lab == SKIN, 255, 0).astype(np.uint8)
        # cv2 correlates: skin spreads up to 16 px upwards (±10 wide) and 6 px down.
        dilated = cv2.dilate(skin, jaw_kernel())
        eroded = cv2.erode(dilated, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3)), iterations=2)
        region = (eroded & cheeks) | (dilated & ~cheeks)
        keep = ((region == 255) & (lab != NOSE)) | np.isin(lab, (MOUTH, UPPER_LIP, LOWER_LIP))
    else:
        raise ValueError(f"unknown parsing mode {mode!r}")
    return np.where(keep, 255, 0).astype(np.uint8)


class FaceParser:
    """Lazily loaded BiSeNet on ``device``; ``segment`` gives upstream's parsing mask."""

    def __init__(self, models_dir: str | Path, device: str | torch.device = "cpu", subdir: str = "face-parse-bisent") -> None:
        self.weights = Path(models_dir) / subdir / CHECKPOINT
        self.device = torch.device(device)
        self._net: BiSeNet | None = None
        self._lock = threading.Lock()
        self._cheeks = cheek_mask()

    @property
    def available(self) -> bool:
        """Whether the checkpoint is on disk (nothing is loaded)."""
        return self.weights.is_file()

    def _load(self) -> BiSeNet:
        with self._lock:
            if self._net is None:
                if not self.weights.is_file():
                    raise WeightsMissing(
                        f"face parsing weights {self.weights.parent.name}/{CHECKPOINT} not found",
                        hint="download 79999_iter.pth (face-parsing.PyTorch / MuseTalk's download script) "
                        "into the models directory, or use mask_source=landmarks",
                    )
                net = BiSeNet()
                state = torch.load(self.weights, map_location="cpu", weights_only=True)
                net.load_state_dict(state, strict=True)
                self._net = net.to(self.device).eval()
            return self._net

    @torch.inference_mode()
    def labels(self, face: Image.Image) -> np.ndarray:
        """``[512,512]`` class labels of an RGB image (resized BILINEAR, ImageNet-normalised)."""
        net = self._load()
        pixels = np.asarray(face.convert("RGB").resize((PARSE_SIZE, PARSE_SIZE), Image.BILINEAR), np.float32)
        x = torch.from_numpy(((pixels / 255.0 - _MEAN) / _STD).transpose(2, 0, 1)).unsqueeze(0)
        logits = net(x.to(self.device))[0]
        return logits.argmax(0).cpu().numpy().astype(np.uint8)

    def segment(self, face_large: Image.Image, mode: ParsingMode = "jaw") -> np.ndarray:
        """uint8 ``[h,w]`` face-region map (255 = replace) of ``face_large``, at its size.

        The 512² map is resized back with PIL's BICUBIC, as upstream's
        ``mask.resize(face_large.size)``.
        """
        mask = labels_to_mask(self.labels(face_large), mode, self._cheeks)
        return np.asarray(Image.fromarray(mask).resize(face_large.size, Image.BICUBIC))

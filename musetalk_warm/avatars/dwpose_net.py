"""DWPose's whole-body network (RTMPose-l, 133 keypoints, 288x384 input) in plain torch.

``dw-ll_ucoco_384.pth`` is an mmpose ``TopdownPoseEstimator``: a CSPNeXt-P5
backbone (deepen 1.0, widen 1.0, expand 0.5, channel attention, SiLU, BN with
eps 1e-5 as the config's ``SyncBN``) and an ``RTMCCHead`` (7x7 conv, ScaleNorm +
Linear, one gated attention unit, SimCC ``cls_x`` / ``cls_y`` at split ratio 2).
Module names follow mmcv/mmdet/mmpose so the checkpoint's ``backbone.*`` /
``head.*`` keys load strictly. Only inference is built (no dropout, no drop path).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INPUT_SIZE = (288, 384)  # (w, h) of the network input
SPLIT_RATIO = 2.0  # SimCC bins per input pixel
NUM_KEYPOINTS = 133
_BN_EPS = 1e-5  # the config's norm_cfg=dict(type='SyncBN') replaces CSPNeXt's default eps 1e-3


class ConvBN(nn.Module):
    """mmcv ``ConvModule``: bias-free conv, ``bn``, SiLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=_BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.bn(self.conv(x)))


class DepthwiseSeparable(nn.Module):
    """mmcv ``DepthwiseSeparableConvModule``: depthwise then pointwise, each with BN + SiLU."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvBN(cin, cin, kernel, groups=cin)
        self.pointwise_conv = ConvBN(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class CSPNeXtBlock(nn.Module):
    """3x3 conv, 5x5 depthwise-separable conv, optional identity."""

    def __init__(self, channels: int, add_identity: bool) -> None:
        super().__init__()
        self.conv1 = ConvBN(channels, channels, 3)
        self.conv2 = DepthwiseSeparable(channels, channels, 5)
        self.add_identity = add_identity

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class ChannelAttention(nn.Module):
    """Global average pool, 1x1 conv with bias, hard sigmoid, channel-wise scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * F.hardsigmoid(self.fc(x.mean(dim=(2, 3), keepdim=True)))


class CSPLayer(nn.Module):
    """Two 1x1 branches (one through the blocks), concatenated, attended, fused by a 1x1 conv."""

    def __init__(self, channels: int, num_blocks: int, add_identity: bool) -> None:
        super().__init__()
        mid = channels // 2  # expand_ratio 0.5
        self.main_conv = ConvBN(channels, mid, 1)
        self.short_conv = ConvBN(channels, mid, 1)
        self.final_conv = ConvBN(2 * mid, channels, 1)
        self.blocks = nn.Sequential(*(CSPNeXtBlock(mid, add_identity) for _ in range(num_blocks)))
        self.attention = ChannelAttention(2 * mid)

    def forward(self, x: Tensor) -> Tensor:
        both = torch.cat((self.blocks(self.main_conv(x)), self.short_conv(x)), dim=1)
        return self.final_conv(self.attention(both))


class SPPBottleneck(nn.Module):
    """1x1 conv, max pools of 5/9/13 concatenated with their input, 1x1 conv."""

    def __init__(self, channels: int, kernels: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        mid = channels // 2
        self.conv1 = ConvBN(channels, mid, 1)
        self.poolings = nn.ModuleList(nn.MaxPool2d(k, 1, k // 2) for k in kernels)
        self.conv2 = ConvBN(mid * (len(kernels) + 1), channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x, *(pool(x) for pool in self.poolings)], dim=1))


class CSPNeXt(nn.Module):
    """CSPNeXt-P5 at deepen/widen 1.0; returns the stride-32 map (out_indices=(4,))."""

    # (in, out, blocks, add_identity, spp) per stage
    STAGES = ((64, 128, 3, True, False), (128, 256, 6, True, False),
              (256, 512, 6, True, False), (512, 1024, 3, False, True))

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvBN(3, 32, 3, 2), ConvBN(32, 32, 3), ConvBN(32, 64, 3))
        for i, (cin, cout, blocks, identity, spp) in enumerate(self.STAGES, start=1):
            layers: list[nn.Module] = [ConvBN(cin, cout, 3, 2)]
            if spp:
                layers.append(SPPBottleneck(cout))
            layers.append(CSPLayer(cout, blocks, identity))
            self.add_module(f"stage{i}", nn.Sequential(*layers))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for i in range(1, len(self.STAGES) + 1):
            x = getattr(self, f"stage{i}")(x)
        return x


class ScaleNorm(nn.Module):
    """``x / max(|x| / sqrt(dim), eps) * g`` over the last axis."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=self.eps) * self.g


class Scale(nn.Module):
    """Element-wise learned scale (the GAU's residual branch)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class GatedAttentionUnit(nn.Module):
    """mmpose ``RTMCCBlock`` as configured: self-attention, SiLU, no bias, no relative bias, no RoPE."""

    def __init__(self, dims: int = 256, s: int = 128, expansion: int = 2) -> None:
        super().__init__()
        self.e, self.s = dims * expansion, s
        self.ln = ScaleNorm(dims)
        self.uv = nn.Linear(dims, 2 * self.e + s, bias=False)
        self.gamma = nn.Parameter(torch.ones(2, s))
        self.beta = nn.Parameter(torch.zeros(2, s))
        self.o = nn.Linear(self.e, dims, bias=False)
        self.res_scale = Scale(dims)

    def forward(self, x: Tensor) -> Tensor:
        u, v, base = torch.split(F.silu(self.uv(self.ln(x))), [self.e, self.e, self.s], dim=2)
        qk = base.unsqueeze(2) * self.gamma + self.beta  # [B, K, 2, s]
        q, k = qk.unbind(dim=2)
        kernel = torch.square(F.relu(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(self.s)))
        return self.res_scale(x) + self.o(u * torch.bmm(kernel, v))


class RTMCCHead(nn.Module):
    """Stride-32 features -> per-keypoint SimCC logits over 576 x-bins and 768 y-bins."""

    def __init__(self, in_channels: int = 1024, hidden: int = 256) -> None:
        super().__init__()
        w, h = INPUT_SIZE
        self.final_layer = nn.Conv2d(in_channels, NUM_KEYPOINTS, 7, padding=3)
        tokens = (w // 32) * (h // 32)
        self.mlp = nn.Sequential(ScaleNorm(tokens), nn.Linear(tokens, hidden, bias=False))
        self.gau = GatedAttentionUnit(hidden)
        self.cls_x = nn.Linear(hidden, int(w * SPLIT_RATIO), bias=False)
        self.cls_y = nn.Linear(hidden, int(h * SPLIT_RATIO), bias=False)

    def forward(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.gau(self.mlp(torch.flatten(self.final_layer(feats), 2)))
        return self.cls_x(tokens), self.cls_y(tokens)


class DWPoseNet(nn.Module):
    """``[B,3,384,288]`` normalised RGB -> ``([B,133,576], [B,133,768])`` SimCC logits."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = CSPNeXt()
        self.head = RTMCCHead()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.backbone(x))

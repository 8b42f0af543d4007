"""GFPGAN v1 "clean" (``GFPGANv1Clean``): a U-Net encoder steering a StyleGAN2 decoder with SFT.

Module and parameter names follow the official ``gfpganv1_clean_arch.py`` so that
``GFPGANv1.4.pth`` (``params_ema``) loads with ``strict=True``. Only inference is
kept: no intermediate RGB outputs (``toRGB`` exists for the state dict only), no
style mixing or truncation. The decoder uses its stored
noise buffers, as ``randomize_noise=False`` upstream: the same frame always gives
the same face, so a video does not shimmer.

The architecture is written here rather than imported from spandrel because spandrel
(0.0.4 to 0.4.2, as checked) requires torchvision and imports it on import, and the
only torchvision for torch 2.13 on PyPI is a CUDA build: beside the CPU torch
this project pins it fails to import ("operator torchvision::nms does not exist"),
and its mere presence then breaks transformers' Whisper and diffusers' VAE imports.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_SQRT2 = math.sqrt(2.0)


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def _resample(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


def _channels(multiplier: float, narrow: float) -> dict[int, int]:
    """Channels per resolution, as upstream's ``channels`` dict."""
    wide = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * multiplier, 128: 128 * multiplier,
            256: 64 * multiplier, 512: 32 * multiplier, 1024: 16 * multiplier}
    return {res: int(c * narrow) for res, c in wide.items()}


class NormStyleCode(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's style-modulated convolution (bilinear up-sampling, no bias)."""

    def __init__(self, cin: int, cout: int, kernel: int, style: int, demodulate: bool = True,
                 upsample: bool = False) -> None:
        super().__init__()
        self.cout, self.demodulate, self.upsample = cout, demodulate, upsample
        self.modulation = nn.Linear(style, cin, bias=True)
        self.weight = nn.Parameter(torch.randn(1, cout, cin, kernel, kernel) / math.sqrt(cin * kernel**2))
        self.padding = kernel // 2

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        weight = self.weight * self.modulation(style).view(b, 1, c, 1, 1)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(b, self.cout, 1, 1, 1)
        if self.upsample:
            x = _resample(x, 2.0)
        h, w = x.shape[2:]
        k = weight.shape[-1]
        out = F.conv2d(x.reshape(1, b * c, h, w), weight.view(b * self.cout, c, k, k), padding=self.padding, groups=b)
        return out.view(b, self.cout, *out.shape[2:])


class StyleConv(nn.Module):
    def __init__(self, cin: int, cout: int, style: int, upsample: bool = False) -> None:
        super().__init__()
        self.modulated_conv = ModulatedConv2d(cin, cout, 3, style, upsample=upsample)
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength
        self.bias = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = self.modulated_conv(x, style) * _SQRT2
        return _lrelu(out + self.weight * noise + self.bias)


class ToRGB(nn.Module):
    def __init__(self, cin: int, style: int, upsample: bool = True) -> None:
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv2d(cin, 3, 1, style, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is None:
            return out
        return out + (_resample(skip, 2.0) if self.upsample else skip)


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, size, size))


class StyleGAN2GeneratorCSFT(nn.Module):
    """The StyleGAN2 decoder; SFT scales/shifts modulate half the channels after each up-sampling conv."""

    def __init__(self, out_size: int, style: int, num_mlp: int, multiplier: float, narrow: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [NormStyleCode()]
        for _ in range(num_mlp):
            layers += [nn.Linear(style, style, bias=True), nn.LeakyReLU(0.2)]
        self.style_mlp = nn.Sequential(*layers)  # unused with latent input; in the state dict
        ch = _channels(multiplier, narrow)
        self.constant_input = ConstantInput(ch[4], size=4)
        self.style_conv1 = StyleConv(ch[4], ch[4], style)
        self.to_rgb1 = ToRGB(ch[4], style, upsample=False)
        log_size = int(math.log2(out_size))
        self.num_layers = (log_size - 2) * 2 + 1
        self.style_convs, self.to_rgbs, self.noises = nn.ModuleList(), nn.ModuleList(), nn.Module()
        for i in range(self.num_layers):
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise{i}", torch.randn(1, 1, res, res))
        cin = ch[4]
        for i in range(3, log_size + 1):
            cout = ch[2**i]
            self.style_convs.append(StyleConv(cin, cout, style, upsample=True))
            self.style_convs.append(StyleConv(cout, cout, style))
            self.to_rgbs.append(ToRGB(cout, style))
            cin = cout

    def forward(self, latent: torch.Tensor, conditions: list[torch.Tensor]) -> torch.Tensor:
        noise = [getattr(self.noises, f"noise{i}") for i in range(self.num_layers)]
        out = self.constant_input.weight.repeat(latent.shape[0], 1, 1, 1)
        out = self.style_conv1(out, latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for conv1, conv2, noise1, noise2, to_rgb in zip(
            self.style_convs[::2], self.style_convs[1::2], noise[1::2], noise[2::2], self.to_rgbs, strict=True
        ):
            out = conv1(out, latent[:, i], noise1)
            if i < len(conditions):
                same, sft = torch.split(out, out.size(1) // 2, dim=1)
                out = torch.cat([same, sft * conditions[i - 1] + conditions[i]], dim=1)
            out = conv2(out, latent[:, i + 1], noise2)
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip


class ResBlock(nn.Module):
    """Residual block with bilinear down- (0.5) or up-sampling (2)."""

    def __init__(self, cin: int, cout: int, factor: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, 1, 1)
        self.conv2 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _lrelu(self.conv2(_resample(_lrelu(self.conv1(x)), self.factor)))
        return out + self.skip(_resample(x, self.factor))


def _sft_branch(channels: int) -> nn.Sequential:
    """One SFT condition (scale or shift) from a U-Net feature map."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(channels, channels, 3, 1, 1)
    )


class GFPGANv1Clean(nn.Module):
    """GFPGAN v1.3/v1.4: ``different_w``, ``input_is_latent`` and ``sft_half`` as released.

    ``forward`` maps ``[B,3,S,S]`` RGB in ``[-1, 1]`` to the restored face, same range.
    ``narrow`` < 1 makes a small network with the same key layout (for tests).
    """

    def __init__(self, out_size: int = 512, style: int = 512, multiplier: float = 2, narrow: float = 1,
                 num_mlp: int = 8) -> None:
        super().__init__()
        self.out_size, self.style = out_size, style
        self.log_size = int(math.log2(out_size))
        ch = _channels(multiplier, narrow * 0.5)  # the U-Net has half the decoder's channels
        self.conv_body_first = nn.Conv2d(3, ch[out_size], 1)
        cin = ch[out_size]
        self.conv_body_down = nn.ModuleList()
        for i in range(self.log_size, 2, -1):
            self.conv_body_down.append(ResBlock(cin, ch[2 ** (i - 1)], 0.5))
            cin = ch[2 ** (i - 1)]
        self.final_conv = nn.Conv2d(cin, ch[4], 3, 1, 1)
        self.conv_body_up, self.toRGB = nn.ModuleList(), nn.ModuleList()
        self.condition_scale, self.condition_shift = nn.ModuleList(), nn.ModuleList()
        cin = ch[4]
        for i in range(3, self.log_size + 1):
            cout = ch[2**i]
            self.conv_body_up.append(ResBlock(cin, cout, 2.0))
            self.toRGB.append(nn.Conv2d(cout, 3, 1))
            self.condition_scale.append(_sft_branch(cout))
            self.condition_shift.append(_sft_branch(cout))
            cin = cout
        self.final_linear = nn.Linear(ch[4] * 16, (self.log_size * 2 - 2) * style)
        self.stylegan_decoder = StyleGAN2GeneratorCSFT(out_size, style, num_mlp, multiplier, narrow)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        feat = _lrelu(self.conv_body_first(x))
        for down in self.conv_body_down:
            feat = down(feat)
            skips.insert(0, feat)
        feat = _lrelu(self.final_conv(feat))
        latent = self.final_linear(feat.flatten(1)).view(x.shape[0], -1, self.style)
        conditions: list[torch.Tensor] = []
        branches = zip(self.conv_body_up, self.condition_scale, self.condition_shift, strict=True)
        for skip, (up, scale, shift) in zip(skips, branches, strict=True):
            feat = up(feat + skip)
            conditions += [scale(feat), shift(feat)]
        return self.stylegan_decoder(latent, conditions)

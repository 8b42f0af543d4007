"""MuseTalk v1.5 models: official weights in the upstream layout, or the seeded ``tiny`` preset.

`load_models` builds a frozen :class:`Models` once; `encode_latents`, `unet_step`
and `decode_latents` are upstream's VAE/UNet steps (``musetalk/models/{unet,vae}.py``),
batched and bit-for-bit in fp32 (see docs/NUMERICS.md). ``Models.whisper`` is the
Whisper *encoder* (``WhisperModel.encoder``): upstream never uses the decoder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import pickle
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import SafetensorError
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ..config import ModelSettings
from ..errors import ConfigError, WeightsMissing

CROP_SIZE = 256
LATENT_SIZE = 32
DOWNLOAD_HINT = "Run `python scripts/download_weights.py` to fetch them"
LatentSampling = Literal["mode", "sample"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FINGERPRINT_CHUNK = 1 << 20

# Small configs with the official interfaces (8→4 channel UNet on 32² latents,
# 4-channel VAE latents at 1/8 scale, 4-layer Whisper encoder on 3000 mel frames).
_TINY_AUDIO_DIM = 32
_TINY_UNET = dict(
    sample_size=LATENT_SIZE,
    in_channels=8,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=2,
    cross_attention_dim=_TINY_AUDIO_DIM,
)
_TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(4, 8, 8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=CROP_SIZE,
)
_TINY_WHISPER = dict(
    d_model=_TINY_AUDIO_DIM,
    encoder_layers=4,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    num_mel_bins=80,
    max_source_positions=1500,
    # The decoder is only written by save_upstream_layout; keep it minimal.
    decoder_layers=1,
    decoder_attention_heads=2,
    decoder_ffn_dim=64,
    vocab_size=64,
    max_target_positions=32,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
)


class PositionalEncoding(nn.Module):
    """Upstream ``PositionalEncoding``: sin on even dims, cos on odd, base 10000.

    The position is the token index inside the 50-token prompt, so every frame
    gets the same table.
    """

    pe: torch.Tensor

    def __init__(self, d_model: int, max_len: int = 5000) -> None:
        super().__init__()
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.size(1)]


@dataclass(frozen=True, eq=False)
class Models:
    """Everything the render path needs, on one device in one dtype.

    ``model_id`` identifies all weights (cache manifests); ``vae_id`` identifies
    the VAE alone, the only model avatar latents depend on.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    whisper: WhisperEncoder
    feature_extractor: WhisperFeatureExtractor
    pe: PositionalEncoding
    device: torch.device
    dtype: torch.dtype
    model_id: str
    vae_id: str
    latent_sampling: LatentSampling = "mode"

    @property
    def audio_dim(self) -> int:
        """Width D of the Whisper features and of the UNet's cross-attention."""
        return int(self.whisper.config.d_model)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"models.device: unknown device {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"models.device is {name!r} but no CUDA device is available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → fp16 on CUDA (as upstream realtime), fp32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _required(settings: ModelSettings) -> list[tuple[str, ...]]:
    """Official files, each as its accepted names (the first is the one downloaded)."""
    vae, whisper = settings.vae_dir, settings.whisper_dir
    return [
        (settings.unet_config,),
        (settings.unet_weights,),
        (f"{vae}/config.json",),
        (f"{vae}/diffusion_pytorch_model.safetensors", f"{vae}/diffusion_pytorch_model.bin"),
        (f"{whisper}/config.json",),
        (f"{whisper}/pytorch_model.bin", f"{whisper}/model.safetensors"),
        (f"{whisper}/preprocessor_config.json",),
    ]


def missing_weights(settings: ModelSettings) -> list[Path]:
    """Official MuseTalk files absent under ``settings.models_dir``, as relative paths."""
    return [
        Path(names[0])
        for names in _required(settings)
        if not any(settings.path(name).is_file() for name in names)
    ]


def _present(settings: ModelSettings, prefix: str = "") -> list[Path]:
    found = []
    for names in _required(settings):
        hits = [settings.path(n) for n in names if n.startswith(prefix) and settings.path(n).is_file()]
        found.extend(hits[:1])
    return found


def _fingerprint(paths: Iterable[Path]) -> str:
    """Short hash of names, sizes and the first and last MiB of each file.

    Reading 3.4 GB at every start would be slow; any retrained or truncated
    checkpoint differs in these bytes or in its size.
    """
    digest = hashlib.sha256()
    for path in paths:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size};".encode())
        with path.open("rb") as handle:
            if size <= 2 * _FINGERPRINT_CHUNK:
                digest.update(handle.read())
            else:
                digest.update(handle.read(_FINGERPRINT_CHUNK))
                handle.seek(size - _FINGERPRINT_CHUNK)
                digest.update(handle.read())
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def _readable(name: str) -> Iterator[None]:
    """Turn a failure to read weight files (truncated, corrupt, not tensors) into WeightsMissing."""
    try:
        yield
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        raise WeightsMissing(
            f"{name} could not be loaded ({type(exc).__name__}); the files may be incomplete. {DOWNLOAD_HINT}."
        ) from exc


def _load_unet(settings: ModelSettings) -> UNet2DConditionModel:
    """``UNet2DConditionModel(**musetalk.json)`` + strict ``load_state_dict`` of unet.pth."""
    with _readable(f"{settings.unet_weights} (with {settings.unet_config})"):
        config = json.loads(settings.path(settings.unet_config).read_text())
        state = torch.load(settings.path(settings.unet_weights), weights_only=True, map_location="cpu")
        # Built on the meta device: a random init of 850 M parameters would be thrown away.
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        unet.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*unet.parameters(), *unet.buffers())):  # a tensor outside the state dict
        raise WeightsMissing(f"{settings.unet_weights} does not hold every UNet tensor. {DOWNLOAD_HINT}.")
    return unet


def load_models(settings: ModelSettings) -> Models:
    """Load the official weights (never from the network), or the ``tiny`` preset.

    ``musetalk`` and ``auto`` read the upstream layout under ``settings.models_dir``
    and raise :class:`WeightsMissing` naming absent files (callers choosing ``lite``
    for ``auto`` check :func:`missing_weights` first). Device ``auto`` is cuda when
    available; dtype ``auto`` is fp16 on CUDA, fp32 elsewhere.
    """
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if settings.renderer == "tiny":
        return tiny_models(settings.tiny_seed, device, dtype=dtype, latent_sampling=settings.latent_sampling)
    if settings.renderer == "lite":
        raise ConfigError("renderer 'lite' uses no neural models; there is nothing to load")
    missing = missing_weights(settings)
    if missing:
        names = ", ".join(p.as_posix() for p in missing)
        raise WeightsMissing(
            f"MuseTalk weights missing: {names}. {DOWNLOAD_HINT}.",
            hint="or point models.models_dir at a folder in the upstream layout",
        )
    unet = _load_unet(settings)
    with _readable(f"{settings.vae_dir}/"):
        vae = AutoencoderKL.from_pretrained(
            settings.path(settings.vae_dir), local_files_only=True, low_cpu_mem_usage=False
        )
    whisper_dir = settings.path(settings.whisper_dir)
    with _readable(f"{settings.whisper_dir}/"):
        whisper = WhisperModel.from_pretrained(whisper_dir, local_files_only=True).encoder
        extractor = WhisperFeatureExtractor.from_pretrained(whisper_dir, local_files_only=True)
    label = Path(settings.unet_weights).parent.name or "unet"
    vae_files = _present(settings, settings.vae_dir + "/")
    return _assemble(
        unet,
        vae,
        whisper,
        extractor,
        device,
        dtype,
        model_id=f"{label}:{_fingerprint(_present(settings))}",
        vae_id=f"{Path(settings.vae_dir).name}:{_fingerprint(vae_files)}",
        latent_sampling=settings.latent_sampling,
    )


def _assemble(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    whisper: WhisperEncoder,
    extractor: WhisperFeatureExtractor,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    model_id: str,
    vae_id: str,
    latent_sampling: LatentSampling,
) -> Models:
    d_model = int(whisper.config.d_model)
    if unet.config.cross_attention_dim != d_model:
        raise ConfigError(
            f"UNet cross_attention_dim {unet.config.cross_attention_dim} != Whisper d_model {d_model}"
        )
    device = torch.device(device)
    pe = PositionalEncoding(d_model)
    for module in (unet, vae, whisper, pe):
        # nn.Module.to: diffusers' override logs a spurious fp32 warning on every cast.
        nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)
    return Models(
        unet=unet,
        vae=vae,
        whisper=whisper,
        feature_extractor=extractor,
        pe=pe,
        device=device,
        dtype=dtype,
        model_id=model_id,
        vae_id=vae_id,
        latent_sampling=latent_sampling,
    )


def random_models(
    unet_config: dict,
    vae_config: dict,
    whisper_config: dict,
    seed: int = 0,
    device: torch.device | str = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
    latent_sampling: LatentSampling = "mode",
    name: str = "random",
) -> Models:
    """Randomly initialised models of the given architectures (seeded; global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        whisper = WhisperEncoder(WhisperConfig(**whisper_config))
    return _assemble(
        unet,
        vae,
        whisper,
        WhisperFeatureExtractor(),
        device,
        dtype,
        model_id=f"{name}:seed{seed}",
        vae_id=f"{name}-vae:seed{seed}",
        latent_sampling=latent_sampling,
    )


def tiny_models(
    seed: int = 0,
    device: torch.device | str = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
    latent_sampling: LatentSampling = "mode",
) -> Models:
    """Randomly initialised small models with the official interfaces (fast on CPU).

    The same seed gives identical weights; the global torch RNG is left untouched.
    """
    return random_models(
        _TINY_UNET, _TINY_VAE, _TINY_WHISPER, seed, device,
        dtype=dtype, latent_sampling=latent_sampling, name="tiny",
    )


def save_upstream_layout(models: Models, root: Path) -> None:
    """Write ``models`` as the official files: musetalkV15/, sd-vae/, whisper/ under ``root``."""
    unet_dir = root / "musetalkV15"
    unet_dir.mkdir(parents=True, exist_ok=True)
    (unet_dir / "musetalk.json").write_text(models.unet.to_json_string())
    state = {k: v.detach().cpu().contiguous() for k, v in models.unet.state_dict().items()}
    torch.save(state, unet_dir / "unet.pth")
    models.vae.save_pretrained(root / "sd-vae", safe_serialization=True)
    # The official whisper/ folder holds a full WhisperModel; its decoder is never used.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        full = WhisperModel(models.whisper.config)
    full.encoder.load_state_dict(models.whisper.state_dict())
    full.save_pretrained(root / "whisper")
    models.feature_extractor.save_pretrained(root / "whisper")


@functools.cache
def _crop_lut() -> torch.Tensor:
    """Upstream preprocess_img for each 8-bit value: /255 in float64, fp32, (x-0.5)/0.5."""
    x = torch.from_numpy(np.arange(256) / 255.0).float()
    return (x - 0.5) / 0.5


def prepare_crops(crops_bgr: np.ndarray, half_mask: bool) -> torch.Tensor:
    """``[B,256,256,3]`` uint8 BGR → ``[B,3,256,256]`` fp32 RGB in [-1,1] (upstream preprocess_img).

    With ``half_mask`` rows 128..255 are zeroed before normalising, so they are -1.0.
    """
    crops = np.asarray(crops_bgr)
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3):
        expected = f"uint8 [B,{CROP_SIZE},{CROP_SIZE},3]"
        raise ValueError(f"crops must be {expected}, got {crops.dtype} {crops.shape}")
    rgb = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1]))
    x = _crop_lut()[rgb.long()].permute(0, 3, 1, 2).contiguous()
    if half_mask:
        x[:, :, CROP_SIZE // 2 :] = (0.0 - 0.5) / 0.5
    return x


def _vae_latents(models: Models, x: torch.Tensor) -> torch.Tensor:
    dist = models.vae.encode(x.to(models.device, models.dtype)).latent_dist
    z = dist.mode() if models.latent_sampling == "mode" else dist.sample()
    return models.scaling_factor * z


def encode_latents(models: Models, crops_bgr: np.ndarray, batch_size: int = 1) -> np.ndarray:
    """UNet input latents ``[B,8,32,32]`` float32: cat(masked crop, full crop) × scaling factor.

    ``batch_size`` 1 reproduces upstream bit for bit (it encodes one crop at a
    time); larger batches are faster on a GPU but convolution kernels chosen per
    batch shape may change the last bits.
    """
    crops = np.asarray(crops_bgr)
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(crops), batch_size):
            part = crops[start : start + batch_size]
            masked = _vae_latents(models, prepare_crops(part, half_mask=True))
            full = _vae_latents(models, prepare_crops(part, half_mask=False))
            chunks.append(torch.cat([masked, full], dim=1).float().cpu().numpy())
    if not chunks:
        return np.zeros((0, 8, LATENT_SIZE, LATENT_SIZE), np.float32)
    return np.concatenate(chunks)


def unet_step(models: Models, latents: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """One UNet pass at timestep 0: ``[B,8,32,32]`` latents + ``[B,50,D]`` prompts → ``[B,4,32,32]``."""
    with torch.inference_mode():
        latents = torch.as_tensor(latents).to(models.device, models.dtype)
        prompts = torch.as_tensor(prompts).to(models.device, models.dtype)
        timesteps = torch.tensor([0], device=models.device)
        return models.unet(latents, timesteps, encoder_hidden_states=models.pe(prompts)).sample


def images_to_bgr(images: torch.Tensor) -> np.ndarray:
    """Upstream decode post-processing: ``[B,3,H,W]`` RGB in [-1,1] → ``[B,H,W,3]`` uint8 BGR.

    ``(x/2+0.5).clamp(0,1)`` in the model dtype, then fp32 ×255, round half to
    even (torch.round, like numpy's), uint8 — done on the device so only bytes
    cross to the host.
    """
    return bgr_bytes(images).cpu().numpy()


def bgr_bytes(images: torch.Tensor) -> torch.Tensor:
    """:func:`images_to_bgr` without the host copy: ``[B,H,W,3]`` uint8 BGR on the images' device."""
    x = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
    return (x * 255).round().to(torch.uint8).flip(-1)


def use_fast_kernels(models: Models) -> None:
    """SDPA attention in the UNet and the VAE (same arithmetic as the default processors).

    Channels-last convolutions were measured slower on an H200 (UNet + VAE decode at
    batch 64: 230 vs 304 fps), so the default memory format stays.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    models.unet.set_attn_processor(AttnProcessor2_0())
    models.vae.set_attn_processor(AttnProcessor2_0())


def decode_latents(models: Models, latents: torch.Tensor) -> np.ndarray:
    """``[B,4,32,32]`` predicted latents → ``[B,256,256,3]`` uint8 BGR faces."""
    with torch.inference_mode():
        z = torch.as_tensor(latents).to(models.device, models.dtype)
        return images_to_bgr(models.vae.decode((1 / models.scaling_factor) * z).sample)

"""One typed settings object: YAML file < environment < explicit overrides (CLI).

Sections are frozen pydantic models; unknown keys and bad values raise
:class:`~musetalk_warm.errors.ConfigError` with the offending key named.
Environment variables use the prefix ``MUSETALK_WARM_`` and ``__`` between
section and key, e.g. ``MUSETALK_WARM_RENDER__BATCH_SIZE=8``.
"""

from __future__ import annotations

import math
import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from .errors import ConfigError

DEFAULT_CONFIG = Path("configs/inference/realtime_live.yaml")
ENV_PREFIX = "MUSETALK_WARM_"
ENV_CONFIG = f"{ENV_PREFIX}CONFIG"
_YAML_PATH: ContextVar[Path | None] = ContextVar("yaml_path", default=None)


AAC_FRAME = 1024  # samples per AAC-LC frame
MAX_QUANTUM_S = 1.0


def clip_quantum(fps: int, rate: int) -> int:
    """Output samples in the shortest clip that is a whole number of video frames and AAC frames.

    Every clip is padded with silence to a multiple of this, so appended clips stay
    gapless and in sync (320 ms at 25 fps with 16 or 48 kHz, 160 ms with 32 kHz).
    """
    if rate % fps:
        raise ConfigError(f"media.audio_rate {rate} is not a whole number of samples per frame at {fps} fps")
    return math.lcm(rate // fps, AAC_FRAME)


def check_quantum(fps: int, rate: int, what: str) -> None:
    """ConfigError when ``what`` at ``fps`` would pad every clip by more than ``MAX_QUANTUM_S``."""
    seconds = clip_quantum(fps, rate) / rate
    if seconds > MAX_QUANTUM_S:
        raise ConfigError(
            f"{what} at {fps} fps with media.audio_rate {rate} would pad every "
            f"clip to a multiple of {seconds:.2f} s (whole video and AAC frames)",
            hint="use 25 fps (16000, 32000 or 48000 Hz) or 30 fps (48000 Hz)",
        )


# upstream: the plain PIL alpha paste of upstream MuseTalk (no edge refinement).
BlendMode = Literal["feather", "poisson", "upstream"]
# Face detection + 68 landmarks at prep (avatars/landmarks.py): face_alignment is an extra,
# face_alignment and dwpose need their weights.
FaceBackend = Literal["mediapipe", "face_alignment", "dwpose"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Section):
    """Where the weights live and how to run them."""

    models_dir: Path = Path("models")
    unet_config: str = "musetalkV15/musetalk.json"
    unet_weights: str = "musetalkV15/unet.pth"
    vae_dir: str = "sd-vae"
    whisper_dir: str = "whisper"
    face_parsing_dir: str = "face-parse-bisent"
    # face-alignment's S3FD and 2DFAN4 checkpoints (avatar.face_backend: face_alignment).
    face_alignment_dir: str = "face-alignment"
    # DWPose's whole-body checkpoint, upstream's landmarks (avatar.face_backend: dwpose).
    dwpose_weights: str = "dwpose/dw-ll_ucoco_384.pth"
    gfpgan_weights: str = "GFPGANv1.4.pth"
    # auto: MuseTalk when its weights are present, else the weightless lite renderer.
    renderer: Literal["auto", "musetalk", "tiny", "lite"] = "auto"
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # Upstream draws latent_dist.sample() from an unseeded RNG; the mean is deterministic.
    latent_sampling: Literal["mode", "sample"] = "mode"
    tiny_seed: int = 0
    # The UNet + VAE decode path: auto = compile on CUDA (graphs if compiling fails), eager on CPU;
    # graphs = CUDA graphs per batch bucket; compile = torch.compile under the graphs (about
    # 1.5 minutes on a first start, cached in compile_cache_dir).
    accelerate: Literal["auto", "eager", "graphs", "compile"] = "auto"
    batch_buckets: tuple[int, ...] = (1, 4, 8, 16, 32, 64)
    compile_cache_dir: Path = Path("models/.compile-cache")
    # What compile covers: the VAE decoder (most of the time) and optionally the UNet (slow to compile).
    compile_modules: tuple[Literal["unet", "decoder"], ...] = ("decoder",)
    # auto = NHWC convolutions when compiling (Inductor fuses GroupNorm in it), the default layout else.
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"

    @field_validator("batch_buckets")
    @classmethod
    def _buckets(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or min(value) < 1:
            raise ValueError("batch_buckets must be one or more positive batch sizes")
        return tuple(sorted(set(value)))

    def path(self, relative: str) -> Path:
        """A weight path under ``models_dir``."""
        return self.models_dir / relative


class AvatarSettings(_Section):
    """Which avatar to serve and how to prepare it (SEED.md §9)."""

    avatar_id: str = "demo"
    # None: the built-in demo avatar (a real face photo with gentle head motion).
    video_path: Path | None = None
    bbox_shift: int = 0
    extra_margin: int = 10
    preparation: bool = False
    fps: int = Field(25, ge=1, le=60)
    face_backend: FaceBackend = "mediapipe"
    parsing_mode: Literal["jaw", "raw", "neck"] = "jaw"
    mask_source: Literal["auto", "parsing", "landmarks"] = "auto"
    cache_dir: Path = Path("results/avatars")
    # Frames are stored as RGB H.264 at this CRF: 0 is lossless, 4 about 50 dB PSNR.
    cache_crf: int = Field(6, ge=0, le=51)
    # Prepared avatars held decoded in memory at once (least recently used dropped); 0 = no cap.
    max_loaded: int = Field(4, ge=0)
    max_frames: int = Field(0, ge=0)
    demo_seconds: float = Field(8.0, gt=0, le=60)
    # POST /avatars: the longest source video accepted (frames are held decoded while preparing).
    max_upload_seconds: float = Field(30.0, gt=0, le=600)

    @field_validator("avatar_id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        return safe_name(value, "avatar_id")


class OneEuroSettings(_Section):
    min_cutoff: float = Field(gt=0)
    beta: float = Field(ge=0)
    d_cutoff: float = Field(1.0, gt=0)


class RenderSettings(_Section):
    """Batching, compositing and stabilisation (SPEC §3)."""

    batch_size: int = Field(16, ge=1, le=256)
    composite_workers: int = Field(2, ge=1, le=64)
    # Feather paste-back on the accelerator (CUDA only; other blend modes composite on the CPU).
    gpu_composite: bool = True
    # Live sessions: GFPGAN (models.gfpgan_weights) restores every generated face before it is pasted.
    live_enhance: bool = False
    blend_mode: BlendMode = "feather"
    upper_boundary_ratio: float = Field(0.5, ge=0, le=1)
    expand: float = Field(1.5, ge=1.0, le=3.0)
    blur_ratio: float = Field(0.1, gt=0, le=0.5)
    one_euro_enabled: bool = True
    one_euro_center: OneEuroSettings = OneEuroSettings(min_cutoff=1.5, beta=0.10)
    one_euro_size: OneEuroSettings = OneEuroSettings(min_cutoff=0.5, beta=0.02)
    jump_reset_px: float = Field(12.0, gt=0)
    scale_lock_enabled: bool = True
    scale_lock_frames: int = Field(50, ge=1)
    affine_enabled: bool = True
    subpixel_enabled: bool = True
    # Frames whose audio is silent (voice activity) show the source mouth, ramped over this many frames.
    silence_source_enabled: bool = True
    silence_ramp_frames: int = Field(3, ge=0, le=25)


class MediaSettings(_Section):
    """One encoder configuration shared by every clip of a session."""

    video_codec: str = "libx264"
    crf: int = Field(20, ge=0, le=51)
    preset: str = "veryfast"
    # x264 threads per stream; 0 = x264's own choice (≈1.5× the cores, too many with many sessions).
    encoder_threads: int = Field(0, ge=0, le=64)
    gop_seconds: float = Field(1.0, gt=0)
    audio_rate: int = 48000
    audio_bitrate: int = 96000

    @field_validator("audio_rate")
    @classmethod
    def _aac_rate(cls, value: int) -> int:
        # Only these give whole AAC and video frames within a short clip quantum at 25 fps.
        if value not in (16000, 32000, 48000):
            raise ValueError("audio_rate must be one of 16000, 32000, 48000")
        return value


class TTSSettings(_Section):
    engine: Literal["espeak", "openai"] = "espeak"
    voice: str = "en-us"
    speed_wpm: int = Field(165, ge=80, le=450)
    openai_url: str | None = None
    openai_model: str = "tts-1"
    openai_voice: str = "alloy"
    openai_api_key: str | None = None


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    sessions_dir: Path = Path("results/sessions")
    default_session: str = "default"
    reset_policy: Literal["archive", "delete"] = "archive"
    max_text_chars: int = Field(2000, ge=1)
    max_upload_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    max_audio_seconds: float = Field(120.0, gt=0)
    auth_token: str | None = None
    # Browser origins (scheme://host[:port]) allowed besides the page's own: CORS and the Origin check.
    cors_origins: tuple[str, ...] = ()
    # Host header names accepted besides loopback and `host`; "*" accepts any (behind a proxy that checks it).
    allowed_hosts: tuple[str, ...] = ()
    auth_cookie_seconds: int = Field(8 * 3600, ge=60)
    signed_url_seconds: int = Field(3600, ge=10)
    max_sessions: int = Field(200, ge=1)
    max_jobs: int = Field(32, ge=1)
    max_jobs_per_session: int = Field(4, ge=1)
    retry_after_seconds: int = Field(5, ge=1)
    archives_keep: int = Field(20, ge=0)
    archives_max_age_days: float = Field(30.0, ge=0)
    archives_max_bytes: int = Field(1024**3, ge=0)
    llm_url: str | None = None
    llm_model: str = "gpt-4o-mini"
    llm_api_key: str | None = None


class IceServer(_Section):
    """A STUN or TURN server for WebRTC (as the browser's RTCIceServer)."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None


class LiveSettings(_Section):
    """Live sessions: the per-session clock, speech planning, admission, the record."""

    max_sessions: int = Field(16, ge=1)
    # Speech frames requested ahead of the clock while speaking, and the fewest ticks
    # between an utterance's arrival and its first frame (more when batches are slow).
    lead_frames: int = Field(12, ge=2, le=250)
    start_lead_frames: int = Field(1, ge=1, le=250)
    blend_frames: int = Field(4, ge=1, le=25)
    max_batch: int = Field(16, ge=1, le=256)
    # Share of the measured frame capacity that speaking sessions may book.
    utilisation: float = Field(0.85, gt=0, le=1)
    retry_after_s: int = Field(2, ge=1)
    record: bool = True
    record_idle: bool = False
    record_clip_s: float = Field(4.0, gt=0, le=60)
    subscriber_frames: int = Field(50, ge=1)
    # Streamed PCM: features are recomputed every this many frames of new audio.
    pcm_hop_frames: int = Field(4, ge=1)
    # A session without viewers that stays idle this long is stopped (0: never).
    idle_timeout_s: float = Field(600.0, ge=0)
    # Transports. No ICE servers: host candidates only (loopback and LAN); add STUN/TURN
    # for viewers behind NAT. Both peers get the same list.
    ice_servers: tuple[IceServer, ...] = ()
    webrtc_video_codec: Literal["H264", "VP8"] = "H264"
    max_webrtc_peers: int = Field(64, ge=1)
    # The browser microphone: this long without audio ends the utterance.
    mic_gap_s: float = Field(0.4, gt=0, le=10)
    # fMP4 over WebSocket (Media Source Extensions): frames per fragment.
    mse_fragment_frames: int = Field(3, ge=1, le=50)
    # One x264 thread per viewer's encoder: with many streams at once, x264's own threads
    # only oversubscribe the cores.
    encoder_threads: int = Field(1, ge=0, le=64)
    # Worker processes encoding every viewer's stream (0: threads of the server process).
    # Threads share the interpreter lock, ~450-480 frames/s of 720p in all; processes scale with cores.
    encoder_processes: int = Field(0, ge=0, le=64)


class Settings(BaseSettings):
    """Every setting of the product, in sections."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        env_ignore_empty=True,
    )

    models: ModelSettings = ModelSettings()
    avatar: AvatarSettings = AvatarSettings()
    render: RenderSettings = RenderSettings()
    media: MediaSettings = MediaSettings()
    tts: TTSSettings = TTSSettings()
    server: ServerSettings = ServerSettings()
    live: LiveSettings = LiveSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest priority first: explicit overrides (CLI), environment, YAML file.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_path = _YAML_PATH.get()
        if yaml_path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_path))
        return tuple(sources)


def safe_name(value: str, what: str) -> str:
    """Refuse ids that could escape a directory or need quoting."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value) or ".." in value:
        raise ValueError(f"{what} must be 1-64 letters, digits, '_', '-' or '.', got {value!r}")
    return value


def apply_assignments(overrides: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """Add ``SECTION.KEY=VALUE`` strings (values parsed as YAML scalars) to nested ``overrides``."""
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or "." not in name:
            raise ConfigError(f"expected SECTION.KEY=VALUE, got {item!r}")
        section, key = name.split(".", 1)
        overrides.setdefault(section, {})[key] = yaml.safe_load(raw)
    return overrides


def _check_yaml(path: Path) -> None:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def load_settings(
    config_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings` from YAML, then env vars, then ``overrides``.

    ``config_path`` defaults to ``$MUSETALK_WARM_CONFIG`` or
    ``configs/inference/realtime_live.yaml`` when that file exists.
    ``overrides`` is a nested dict such as ``{"render": {"batch_size": 8}}``.
    """
    chosen = config_path or os.environ.get(ENV_CONFIG)
    path = Path(chosen) if chosen else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if path is not None:
        _check_yaml(path)
    token = _YAML_PATH.set(path)
    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {_describe(exc)}") from exc
    finally:
        _YAML_PATH.reset(token)

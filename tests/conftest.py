"""Shared fixtures: real generated speech, a real face photo, seeded RNG."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pytest
import soundfile as sf
import soxr

if TYPE_CHECKING:
    from musetalk_warm.config import Settings

def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests need CUDA: they run on the GPU box and are skipped elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not keywords: they hold folder names
            item.add_marker(skip)


SPEECH_TEXT = "Hello there. This is a short test of the talking head, with a pause, and then more words."


def espeak_wav(path: Path, text: str = SPEECH_TEXT) -> Path:
    """Synthesize ``text`` to a 22.05 kHz wav with espeak-ng."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.fail("espeak-ng is not installed (apt-get install espeak-ng); .ci/run installs it")
    subprocess.run([exe, "-v", "en-us", "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few seconds of real synthetic speech with a pause, as a wav file."""
    return espeak_wav(tmp_path_factory.mktemp("speech") / "speech.wav")


@pytest.fixture(scope="session")
def speech_16k(speech_wav: Path) -> np.ndarray:
    """The speech fixture as 16 kHz mono float32."""
    data, rate = sf.read(str(speech_wav), dtype="float32", always_2d=True)
    return soxr.resample(data.mean(axis=1), rate, 16000).astype(np.float32)


@pytest.fixture(scope="session")
def face_bgr() -> np.ndarray:
    """A real face photo (scikit-image's public-domain astronaut portrait), BGR uint8 512x512."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])


# The astronaut's face (jaw points 0..16) is this wide in the 512 px portrait (mediapipe, 2x upscaled).
PORTRAIT_FACE_WIDTH = 92.7


def face_in_frame(face_bgr: np.ndarray, face_width: float, frame_size: tuple[int, int],
                  at: tuple[int, int]) -> tuple[np.ndarray, float]:
    """A ``(width, height)`` frame: textured background, the portrait scaled so its face is
    ``face_width`` px wide, its top-left corner at ``at`` (cut at the frame's edges); and the scale."""
    width, height = frame_size
    scale = face_width / PORTRAIT_FACE_WIDTH
    portrait = cv2.resize(face_bgr, None, fx=scale, fy=scale,
                          interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    noise = np.random.default_rng(1).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    frame = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    x0, y0 = at
    h, w = min(portrait.shape[0], height - y0), min(portrait.shape[1], width - x0)
    frame[y0 : y0 + h, x0 : x0 + w] = portrait[:h, :w]
    return frame, scale


def make_settings(root: Path, **sections: dict) -> "Settings":
    """Settings rooted in ``root`` (caches, sessions) with a short demo avatar, plus overrides."""
    from musetalk_warm.config import load_settings

    base: dict[str, dict] = {
        "avatar": {"cache_dir": str(root / "avatars"), "demo_seconds": 1.2},
        # TestClient sends Host: testserver.
        "server": {"sessions_dir": str(root / "sessions"), "allowed_hosts": ["testserver"]},
        "models": {"models_dir": str(root / "models"), "renderer": "lite"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return load_settings(None, base)


@pytest.fixture(scope="session")
def tiny_models():
    """Seeded random-init MuseTalk-shaped models (UNet, VAE, Whisper) on CPU."""
    from musetalk_warm.models.musetalk import tiny_models as build

    return build(seed=0)


def ffprobe(path: Path) -> dict[str, dict[str, str]]:
    """Per stream type: codec, duration, packet count and sample rate, as ffprobe (not our code) reads them."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_packets", "-show_entries",
         "stream=codec_type,codec_name,duration,nb_read_packets,sample_rate", "-of", "json", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout
    return {s["codec_type"]: s for s in json.loads(out)["streams"]}


def decodes(path: Path) -> bool:
    """True when ffmpeg decodes the whole file without an error."""
    proc = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "null", "-"],
                          capture_output=True, text=True)
    return proc.returncode == 0 and not proc.stderr.strip()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

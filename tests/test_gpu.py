"""GPU checks (run on a CUDA machine: ``python -m pytest -m gpu``); skipped where no GPU exists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from musetalk_warm.models.features import audio_prompts
from musetalk_warm.models.musetalk import decode_latents, encode_latents, tiny_models, unet_step

pytestmark = pytest.mark.gpu


def _run(models, crops: np.ndarray, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    latents = encode_latents(models, crops)
    prompts = audio_prompts(models, audio, 25)[: len(crops)]
    faces = decode_latents(models, unet_step(models, torch.from_numpy(latents), prompts))
    return latents, faces


def test_cuda_matches_cpu_in_fp32_and_fp16_stays_close() -> None:
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (4, 256, 256, 3), dtype=np.uint8)
    t = np.arange(16000) / 16000
    audio = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    cpu_latents, cpu_faces = _run(tiny_models(0, "cpu"), crops, audio)
    gpu_latents, gpu_faces = _run(tiny_models(0, "cuda"), crops, audio)
    np.testing.assert_allclose(gpu_latents, cpu_latents, atol=1e-3)
    assert np.abs(gpu_faces.astype(int) - cpu_faces.astype(int)).max() <= 2

    half_latents, half_faces = _run(tiny_models(0, "cuda", dtype=torch.float16), crops, audio)
    assert half_faces.dtype == np.uint8 and half_faces.shape == cpu_faces.shape
    assert np.abs(half_latents - cpu_latents).mean() < 0.05
    assert np.abs(half_faces.astype(int) - cpu_faces.astype(int)).mean() < 3

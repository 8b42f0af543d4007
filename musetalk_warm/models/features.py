"""Audio conditioning: Whisper hidden states → per-frame ``[N,50,D]`` prompts.

Upstream ``musetalk/utils/audio_processor.py`` step for step (UPSTREAM_NOTES §A):
30 s segments through the feature extractor and the Whisper encoder, all hidden
states stacked, trimmed to the audio's length at 50 Hz, zero-padded, then a
10-step window per video frame laid out time-major. The positional encoding is
added in :func:`musetalk_warm.models.musetalk.unet_step`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..media.audio import SAMPLE_RATE, num_frames
from ..errors import AudioError
from .musetalk import Models

FEATURE_RATE = 50  # Whisper encoder steps per second
SEGMENT_SAMPLES = 30 * SAMPLE_RATE
PAD_LEFT = PAD_RIGHT = 2  # upstream audio_padding_length_left / _right
WINDOW = 2 * (PAD_LEFT + PAD_RIGHT + 1)  # feature steps per video frame


def feature_steps(n_samples: int) -> int:
    """Whisper steps kept for ``n_samples`` of 16 kHz audio: ``floor(n·50/16000)`` (exact integers)."""
    return n_samples * FEATURE_RATE // SAMPLE_RATE


def _mono(audio16k: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio16k, dtype=np.float32)
    if audio.ndim != 1:
        raise AudioError(f"audio must be mono 1-D samples, got shape {audio.shape}")
    return audio


def whisper_hidden_states(models: Models, audio16k: np.ndarray) -> torch.Tensor:
    """All encoder hidden states of 16 kHz mono audio, ``[T50, L, D]`` (L = layers + 1).

    Each 30 s segment gets its own log-mel (normalised over its padded window)
    and its own attention context, as upstream; the log-mel is cast to the
    models' dtype as upstream realtime does.
    """
    audio = _mono(audio16k)
    if audio.size == 0:
        raise AudioError("audio is empty")
    segments = []
    with torch.inference_mode():
        for start in range(0, audio.size, SEGMENT_SAMPLES):
            mel = models.feature_extractor(
                audio[start : start + SEGMENT_SAMPLES], sampling_rate=SAMPLE_RATE, return_tensors="pt"
            ).input_features
            out = models.whisper(mel.to(models.device, models.dtype), output_hidden_states=True)
            segments.append(torch.stack(out.hidden_states, dim=2))
    return torch.cat(segments, dim=1)[0, : feature_steps(audio.size)]


def frame_prompts(hidden: torch.Tensor, n_frames: int, fps: int) -> torch.Tensor:
    """Per-frame windows ``[n_frames, WINDOW*L, D]`` over ``hidden`` ``[T50, L, D]``.

    Rows are padded with ``ceil(50/fps)*2`` zero steps on the left and
    ``ceil(50/fps)*6`` on the right (more only where a window would run past
    them, which upstream does not handle); frame ``i`` takes padded steps
    ``[floor(i*50/fps), +10)``. Row ``k*L + l`` of a window is step ``k``, layer ``l``.
    """
    if n_frames < 1:
        raise AudioError("audio is shorter than one video frame")
    steps, layers, dim = hidden.shape
    multiplier = FEATURE_RATE / fps
    padding = math.ceil(multiplier)
    starts = np.floor(np.arange(n_frames) * multiplier).astype(np.int64)
    left = padding * PAD_LEFT
    right = max(padding * 3 * PAD_RIGHT, int(starts[-1]) + WINDOW - left - steps)
    padded = torch.cat([hidden.new_zeros(left, layers, dim), hidden, hidden.new_zeros(right, layers, dim)])
    index = torch.from_numpy(starts[:, None] + np.arange(WINDOW)).to(hidden.device)
    return padded[index].reshape(n_frames, WINDOW * layers, dim)


def audio_prompts(models: Models, audio16k: np.ndarray, fps: int) -> torch.Tensor:
    """UNet audio prompts ``[num_frames, 50, D]`` for 16 kHz mono float32 audio."""
    audio = _mono(audio16k)
    n_frames = num_frames(audio.size, fps)
    if n_frames < 1:
        raise AudioError(
            f"audio is too short: {1000 * audio.size / SAMPLE_RATE:.0f} ms is less than one "
            f"video frame ({1000 / fps:.0f} ms at {fps} fps)"
        )
    return frame_prompts(whisper_hidden_states(models, audio), n_frames, fps)

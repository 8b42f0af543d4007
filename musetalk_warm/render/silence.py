"""Silence shows the source mouth: voice activity per video frame, blended at the edges.

MuseTalk does not close the mouth in pauses; frames whose audio is silent
show the avatar's own crop instead of the generated face, with a short ramp
into and out of each pause so the cut does not pop. Voice activity comes from
silero-vad (its model ships inside the wheel; loaded once, on first use).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np

from ..errors import DependencyMissing
from ..media.audio import SAMPLE_RATE

_CHUNK = 512  # samples per silero-vad step at 16 kHz (32 ms)
THRESHOLD = 0.5
_lock = threading.Lock()  # the model is stateful across chunks


@functools.lru_cache(maxsize=1)
def _vad() -> Any:
    try:
        from silero_vad import load_silero_vad
    except ImportError as exc:
        raise DependencyMissing(
            "silence detection needs silero-vad", hint="pip install silero-vad (a default dependency)"
        ) from exc
    return load_silero_vad()


def speech_probability(audio16k: np.ndarray) -> np.ndarray:
    """Speech probability of each 32 ms chunk of 16 kHz mono audio."""
    import torch

    audio = np.asarray(audio16k, dtype=np.float32)
    count = -(-len(audio) // _CHUNK)
    chunks = np.pad(audio, (0, count * _CHUNK - len(audio))).reshape(count, _CHUNK)
    model = _vad()
    with _lock, torch.no_grad():
        model.reset_states()
        probs = [float(model(torch.from_numpy(chunk), SAMPLE_RATE)) for chunk in chunks]
    return np.array(probs, dtype=np.float32)


def speech_frames(audio16k: np.ndarray, fps: int, count: int, *, hangover_s: float = 0.1) -> np.ndarray:
    """``bool [count]``: video frames within ``hangover_s`` of a voiced chunk.

    The hangover keeps short stops (plosive closures, word gaps) rendered.
    """
    probs = speech_probability(audio16k) if len(audio16k) else np.zeros(0, np.float32)
    voiced = np.flatnonzero(probs >= THRESHOLD)
    centres = (np.arange(count) + 0.5) / fps
    if voiced.size == 0:
        return np.zeros(count, dtype=bool)
    starts, ends = voiced * _CHUNK / SAMPLE_RATE, (voiced + 1) * _CHUNK / SAMPLE_RATE
    near = (centres[:, None] >= starts[None, :] - hangover_s) & (centres[:, None] <= ends[None, :] + hangover_s)
    return near.any(axis=1)


def source_weights(speech: np.ndarray, ramp: int) -> np.ndarray:
    """``float32 [n]`` share of the source crop per frame: 1 in silence, 0 in speech,
    a linear ramp over ``ramp`` frames on the silent side of every boundary."""
    speech = np.asarray(speech, dtype=bool)
    n = len(speech)
    if not speech.any():
        return np.ones(n, np.float32)
    # Distance (in frames) from each frame to the nearest speech frame.
    idx = np.flatnonzero(speech)
    pos = np.searchsorted(idx, np.arange(n))
    left = np.abs(np.arange(n) - idx[np.clip(pos - 1, 0, len(idx) - 1)])
    right = np.abs(idx[np.clip(pos, 0, len(idx) - 1)] - np.arange(n))
    dist = np.minimum(left, right)
    return np.clip(dist / (ramp + 1), 0.0, 1.0).astype(np.float32)


def hold_weights(audio16k: np.ndarray, fps: int, count: int, ramp: int) -> np.ndarray:
    """``float32 [count]`` share of the source mouth per video frame of ``audio16k`` (1 in silence)."""
    return source_weights(speech_frames(audio16k, fps, count), ramp)


def hold_source(faces: np.ndarray, sources: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Blend each generated face towards its source crop by ``weights`` (0 leaves it as is)."""
    weights = np.asarray(weights, np.float32)
    if not np.any(weights > 0):
        return faces
    w = weights[:, None, None, None]
    mixed = np.rint(faces.astype(np.float32) * (1.0 - w) + sources.astype(np.float32) * w)
    return mixed.astype(np.uint8)

"""SyncNet scores of a clip: AV offset, LSE-D (distance) and LSE-C (confidence).

As LatentSync's ``eval/syncnet`` computes them (after ``syncnet_python``): for
each video window and each audio shift ``k`` in ``[-vshift, vshift]`` frames,
the L2 distance between the window's visual embedding and the audio embedding
``k`` frames later; the distances are averaged over windows per shift. LSE-D is
the smallest mean distance, LSE-C the median minus that minimum, and the AV
offset ``vshift - argmin`` (negative: the sound comes after the lips). Pairs
whose audio window falls outside the clip are left out of the mean (upstream
pads with zeros, which biases the ends of the curve).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .mel import MEL_PER_SECOND, SILENCE, melspectrogram
from .syncnet import SyncNet


@dataclass(frozen=True)
class SyncScore:
    """``distances[j]``: mean distance at audio shift ``j - vshift`` frames."""

    av_offset: int
    lse_d: float
    lse_c: float
    windows: int
    vshift: int
    distances: list[float]

    def as_dict(self) -> dict:
        return asdict(self)


def pair_distances(visual: np.ndarray, audio: np.ndarray, starts: np.ndarray, vshift: int) -> np.ndarray:
    """``[W, 2*vshift+1]`` distances of visual window ``w`` (at frame ``starts[w]``) to
    audio window ``starts[w] + k``; NaN where that audio window does not exist."""
    shifts = np.arange(-vshift, vshift + 1)
    index = np.asarray(starts)[:, None] + shifts[None, :]
    valid = (index >= 0) & (index < len(audio))
    picked = audio[np.clip(index, 0, len(audio) - 1)]
    dist = np.linalg.norm(visual[:, None, :] - picked, axis=2)
    return np.where(valid, dist, np.nan)


def score_embeddings(visual: np.ndarray, audio: np.ndarray, starts: np.ndarray, vshift: int) -> SyncScore:
    """The scores from per-window embeddings (``audio`` has one row per start frame)."""
    dist = pair_distances(visual, audio, starts, vshift)
    mean = np.nanmean(dist, axis=0)
    best = int(np.nanargmin(mean))
    low = float(mean[best])
    return SyncScore(
        av_offset=vshift - best, lse_d=round(low, 4), lse_c=round(float(np.nanmedian(mean)) - low, 4),
        windows=len(starts), vshift=vshift, distances=[round(float(d), 4) for d in mean],
    )


def audio_windows(audio16k: np.ndarray, fps: int, count: int, width: int) -> np.ndarray:
    """``[count, 1, 80, width]``: the mel columns from frame ``s`` on, for ``s < count``
    (column ``int(80 * s / fps)``, as upstream's dataset cuts them; silence past the end)."""
    mel = melspectrogram(audio16k)
    mel = np.pad(mel, ((0, 0), (0, width)), constant_values=SILENCE)
    firsts = (MEL_PER_SECOND * np.arange(count) / fps).astype(np.int64)
    return np.stack([mel[None, :, a : a + width] for a in firsts])


def visual_windows(faces_rgb: np.ndarray, starts: np.ndarray, num_frames: int) -> np.ndarray:
    """``[W, 3*num_frames, H/2, W]`` lower halves of ``num_frames`` faces from each start, in [-1, 1]."""
    x = faces_rgb.astype(np.float32) / 127.5 - 1.0  # [T, H, W, 3]
    lower = x[:, x.shape[1] // 2 :].transpose(0, 3, 1, 2)  # [T, 3, H/2, W]
    return np.stack([lower[s : s + num_frames].reshape(-1, *lower.shape[2:]) for s in starts])


def sync_score(
    model: SyncNet, faces_rgb: np.ndarray, audio16k: np.ndarray, fps: int, *,
    vshift: int = 15, stride: int = 1, batch: int = 8,
) -> SyncScore:
    """Score aligned face crops ``[T, R, R, 3]`` (RGB uint8, R = the model's resolution)
    against 16 kHz audio; video windows every ``stride`` frames."""
    import torch

    n = model.config.num_frames
    if len(faces_rgb) < n:
        raise ValueError(f"need at least {n} frames, got {len(faces_rgb)}")
    starts = np.arange(0, len(faces_rgb) - n + 1, stride)
    count = len(faces_rgb) - n + 1
    mels = audio_windows(audio16k, fps, count, model.config.mel_window)
    with torch.no_grad():
        audio = np.concatenate([
            model.embed_audio(torch.from_numpy(mels[i : i + batch])).numpy() for i in range(0, count, batch)
        ])
        visual = np.concatenate([
            model.embed_visual(torch.from_numpy(visual_windows(faces_rgb, starts[i : i + batch], n))).numpy()
            for i in range(0, len(starts), batch)
        ])
    return score_embeddings(visual, audio, starts, vshift)

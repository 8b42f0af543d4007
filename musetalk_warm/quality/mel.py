"""The Wav2Lip mel spectrogram that LatentSync's SyncNet was trained on.

16 kHz audio, pre-emphasis 0.97, 800-sample Hann STFT every 200 samples
(80 columns per second, centred with zero padding), 80 Slaney mel bands over
55–7600 Hz, dB relative to 20 dB, mapped from [-100, 0] dB onto [-4, 4].
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.signal import lfilter

N_FFT, HOP, N_MELS = 800, 200, 80
MEL_PER_SECOND = 16000 // HOP
SILENCE = -4.0  # the value of a column of digital silence


@functools.lru_cache(maxsize=1)
def _mel_basis() -> np.ndarray:
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=N_MELS, min_frequency=55.0, max_frequency=7600.0,
        sampling_rate=16000, norm="slaney", mel_scale="slaney",
    ).T.astype(np.float64)


def melspectrogram(audio16k: np.ndarray) -> np.ndarray:
    """``float32 [80, 1 + len // 200]`` normalised log-mel spectrogram."""
    x = lfilter([1.0, -0.97], [1.0], np.asarray(audio16k, dtype=np.float64))
    x = np.pad(x, (N_FFT // 2, N_FFT // 2))
    count = 1 + (len(x) - N_FFT) // HOP
    frames = x[np.arange(count)[:, None] * HOP + np.arange(N_FFT)[None, :]]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    magnitude = np.abs(np.fft.rfft(frames * window, axis=1)).T
    db = 20 * np.log10(np.maximum(1e-5, _mel_basis() @ magnitude)) - 20.0
    return np.clip(8.0 * (db + 100.0) / 100.0 - 4.0, -4.0, 4.0).astype(np.float32)

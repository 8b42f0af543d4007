"""Chunked (streamed) audio features against whole-clip features (docs/NUMERICS.md, "Streamed audio")."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from musetalk_warm.live.utterance import LOOKAHEAD_FRAMES, Utterance
from musetalk_warm.voice.phonemes import Phone
from musetalk_warm.models.features import audio_prompts
from musetalk_warm.render.lite import LiteRenderer

FPS = 25
HOP = 4  # live.pcm_hop_frames


def streamed(condition: Callable[[np.ndarray, int], Any], audio: np.ndarray) -> list:
    """Conditioning as a live PCM stream computes it: one frame of audio at a time, updated every hop."""

    async def run() -> list:
        async def cond(window: np.ndarray, fps: int, phones: Sequence[Phone] | None) -> Sequence[Any]:
            return condition(window, fps)

        utt = Utterance(FPS, 48000)
        for start in range(0, audio.size, 640):
            utt.add_audio(audio[start : start + 640], np.zeros(1920, np.float32))
            if utt.audio_frames - utt.ready_frames >= HOP + 2:
                await utt.update_conditioning(cond)
        utt.end()
        await utt.update_conditioning(cond)
        return utt.cond

    return asyncio.run(run())


def relative_error(chunked: torch.Tensor, whole: torch.Tensor) -> np.ndarray:
    """Per frame, ‖chunked − whole‖ / ‖whole‖ over the frame's [50, D] prompt."""
    diff = (chunked - whole).flatten(1).norm(dim=1)
    return (diff / whole.flatten(1).norm(dim=1).clamp_min(1e-12)).numpy()


def test_whole_utterances_condition_exactly_as_clips(tiny_models, speech_16k: np.ndarray) -> None:
    """A TTS sentence arrives whole: one conditioning call over the padded utterance, as a clip gets."""
    audio = speech_16k[: 16000 * 3 + 123]

    async def run() -> list:
        async def cond(window: np.ndarray, fps: int, phones: Sequence[Phone] | None) -> Sequence[Any]:
            return audio_prompts(tiny_models, window, fps)

        utt = Utterance(FPS, 48000, tail_frames=3)
        utt.add_audio(audio, np.zeros(audio.size * 3, np.float32))
        utt.end()
        await utt.update_conditioning(cond)
        return utt.cond

    live = torch.stack(asyncio.run(run()))
    padded = np.pad(audio, (0, (76 + 3) * 640 - audio.size))  # whole frames plus the silent tail
    assert torch.equal(live, audio_prompts(tiny_models, padded, FPS))


def test_chunked_whisper_features_stay_close_to_whole_clip(tiny_models, speech_16k: np.ndarray) -> None:
    audio = speech_16k
    whole = audio_prompts(tiny_models, audio, FPS)
    chunked = torch.stack(streamed(lambda a, fps: audio_prompts(tiny_models, a, fps), audio))
    chunked = chunked[: len(whole)]  # the stream ends on a whole frame (at most one more)
    assert chunked.shape == whole.shape
    err = relative_error(chunked, whole)
    # Numbers quoted in docs/NUMERICS.md (tiny random Whisper, 25 fps, 4-frame hop).
    inner = err[:-LOOKAHEAD_FRAMES]
    print(f"whisper chunked vs whole: median {np.median(inner):.2e} p95 {np.percentile(inner, 95):.2e} "
          f"max {inner.max():.2e}; last frames {np.round(err[-LOOKAHEAD_FRAMES:], 3)}")
    assert np.median(inner) < 1e-3 and inner.max() < 0.02
    # Not identical: a frame is computed before the audio after its look-ahead exists, and the
    # encoder attends over its whole window (and the log-mel is normalised over it).
    assert inner.max() > 1e-5


def test_chunked_lite_openness_stays_close_to_whole_clip(speech_16k: np.ndarray) -> None:
    lite = LiteRenderer()
    whole = lite.condition(speech_16k, FPS)
    chunked = np.asarray(streamed(lite.condition, speech_16k))[: len(whole)]
    assert chunked.shape == whole.shape
    diff = np.abs(chunked - whole)
    print(f"lite chunked vs whole openness: mean {diff.mean():.4f} p95 {np.percentile(diff, 95):.4f} max {diff.max():.4f}")
    assert diff.mean() < 0.1

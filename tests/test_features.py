"""Audio conditioning: frame count, upstream windowing, Whisper hidden states, PE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from musetalk_warm.errors import AudioError
from musetalk_warm.models.features import (
    audio_prompts,
    feature_steps,
    frame_prompts,
    num_frames,
    whisper_hidden_states,
)
from musetalk_warm.models.musetalk import Models, tiny_models

LAYERS, DIM = 5, 3


@pytest.fixture(scope="module")
def tiny() -> Models:
    return tiny_models(seed=0)


def coded_hidden(steps: int) -> torch.Tensor:
    """Hidden states whose values name their position: (t+1)*100 + layer*10 + d (never 0)."""
    t = torch.arange(steps).view(-1, 1, 1)
    layer = torch.arange(LAYERS).view(1, -1, 1)
    d = torch.arange(DIM).view(1, 1, -1)
    return ((t + 1) * 100 + layer * 10 + d).float()


def decode_step(window: torch.Tensor, slot: int) -> int | None:
    """Unpadded time step of ``slot`` in a [50, DIM] window, or None for a zero (padding) slot."""
    rows = window[slot * LAYERS : (slot + 1) * LAYERS]
    if torch.all(rows == 0):
        return None
    return int(rows[0, 0].item()) // 100 - 1


def test_counts_for_3_37_seconds() -> None:
    n = 53920  # 3.37 s at 16 kHz
    assert feature_steps(n) == 168  # 168.5 rounded down
    assert num_frames(n, 25) == 84  # 84.25
    assert num_frames(n, 30) == 101  # 101.1
    assert num_frames(639, 25) == 0 and num_frames(640, 25) == 1


def test_windows_at_25_fps_start_at_2i_minus_4() -> None:
    out = frame_prompts(coded_hidden(168), 84, 25)
    assert out.shape == (84, 50, DIM)
    for i, first in [(0, -4), (1, -2), (2, 0), (10, 16), (50, 96), (83, 162)]:
        steps = [decode_step(out[i], k) for k in range(10)]
        expected = [t if 0 <= t < 168 else None for t in range(first, first + 10)]
        assert steps == expected, i


def test_padding_rows_are_zero_and_hit_only_edge_frames() -> None:
    out = frame_prompts(coded_hidden(168), 84, 25)
    zero_slots = {
        (i, k) for i in range(84) for k in range(10) if torch.all(out[i, k * LAYERS : (k + 1) * LAYERS] == 0)
    }
    # Frame i covers steps 2i-4 .. 2i+5; steps < 0 or >= 168 are the zero padding.
    left = {(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)}
    right = {(82, 8), (82, 9), (83, 6), (83, 7), (83, 8), (83, 9)}
    assert zero_slots == left | right
    assert torch.count_nonzero(out[2:82]) == 80 * 50 * DIM


def test_window_is_time_major() -> None:
    hidden = coded_hidden(168)
    out = frame_prompts(hidden, 84, 25)
    i = 20  # steps 36..45
    for k in range(10):
        for layer in range(LAYERS):
            assert torch.equal(out[i, k * LAYERS + layer], hidden[2 * i - 4 + k, layer])


def test_windows_at_30_fps() -> None:
    out = frame_prompts(coded_hidden(168), 101, 30)
    assert out.shape == (101, 50, DIM)
    # start = floor(i*50/30) padded rows, 4 of them left padding (ceil(50/30) = 2 per side unit)
    for i, start in [(0, 0), (1, 1), (3, 5), (10, 16), (100, 166)]:
        first = start - 4
        steps = [decode_step(out[i], k) for k in range(10)]
        assert steps == [t if 0 <= t < 168 else None for t in range(first, first + 10)], i


@pytest.mark.parametrize("fps", [50, 60])
def test_high_fps_windows_stay_in_bounds(fps: int) -> None:
    n = 16000  # 1 s: 50 steps
    out = frame_prompts(coded_hidden(feature_steps(n)), num_frames(n, fps), fps)
    assert out.shape == (fps, 50, DIM)
    last = fps - 1
    first = math.floor(last * 50 / fps) - 2  # ceil(50/fps) = 1: two rows of left padding
    steps = [decode_step(out[last], k) for k in range(10)]
    assert steps == [t if 0 <= t < 50 else None for t in range(first, first + 10)]


def test_whisper_hidden_states_of_a_4_layer_encoder(tiny: Models, speech_16k: np.ndarray) -> None:
    audio = speech_16k[:24000]  # 1.5 s
    hidden = whisper_hidden_states(tiny, audio)
    assert hidden.shape == (75, 5, tiny.audio_dim)

    # Rebuild each entry from the encoder's parts (attention sees all 1500 steps).
    enc = tiny.whisper
    mel = tiny.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        x = F.gelu(enc.conv2(F.gelu(enc.conv1(mel)))).permute(0, 2, 1) + enc.embed_positions.weight
        expected = [x]
        for layer in enc.layers:
            expected.append(layer(expected[-1], attention_mask=None))
        raw_last = expected.pop()
        expected.append(enc.layer_norm(raw_last))
    for index, state in enumerate(expected):
        assert torch.allclose(hidden[:, index], state[0, :75], atol=1e-5), index
    # The last entry is layer 3's output after the final norm; the raw output is not kept.
    assert not torch.allclose(hidden[:, 4], raw_last[0, :75], atol=1e-2)


def test_audio_over_30_s_is_processed_in_segments(tiny: Models, speech_16k: np.ndarray) -> None:
    audio = np.resize(speech_16k, 31 * 16000)
    hidden = whisper_hidden_states(tiny, audio)
    assert hidden.shape[0] == 1550
    first = whisper_hidden_states(tiny, audio[:480000])
    second = whisper_hidden_states(tiny, audio[480000:])
    assert first.shape[0] == 1500 and second.shape[0] == 50
    assert torch.equal(hidden, torch.cat([first, second]))


def test_audio_prompts_shape_and_content(tiny: Models, speech_16k: np.ndarray) -> None:
    audio = speech_16k[:53920]
    prompts = audio_prompts(tiny, audio, fps=25)
    assert prompts.shape == (84, 50, tiny.audio_dim)
    hidden = whisper_hidden_states(tiny, audio)
    # frame 10 covers steps 16..25; row k*5+l is step k, layer l
    assert torch.equal(prompts[10].view(10, 5, -1), hidden[16:26])


@pytest.mark.parametrize("samples", [0, 1, 639])
def test_audio_shorter_than_one_frame_is_refused(tiny: Models, samples: int) -> None:
    with pytest.raises(AudioError, match="too short"):
        audio_prompts(tiny, np.zeros(samples, np.float32), fps=25)


def test_one_frame_of_audio_is_enough(tiny: Models) -> None:
    prompts = audio_prompts(tiny, np.zeros(640, np.float32), fps=25)
    assert prompts.shape == (1, 50, tiny.audio_dim)


def test_stereo_audio_is_refused(tiny: Models) -> None:
    with pytest.raises(AudioError, match="mono"):
        audio_prompts(tiny, np.zeros((2, 16000), np.float32), fps=25)

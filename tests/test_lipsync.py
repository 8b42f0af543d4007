"""SyncNet scoring: the official key layout, the mel, the offset search and confidence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk_warm.errors import WeightsMissing
from musetalk_warm.quality.mel import melspectrogram
from musetalk_warm.quality.mouth import frame_rms, mouth_opening, pearson
from musetalk_warm.quality.sync import audio_windows, pair_distances, score_embeddings, sync_score
from musetalk_warm.quality.syncnet import OFFICIAL, TINY, SyncNet, load_syncnet, tiny_syncnet

FPS = 25


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_official_layout_loads_strictly_from_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    state = SyncNet(TINY).state_dict()
    assert "visual_encoder.down_blocks.7.downsample_conv.weight" in state
    assert "audio_encoder.down_blocks.0.conv_shortcut.weight" not in state  # 4 -> 4 channels: none
    assert "audio_encoder.down_blocks.2.conv_shortcut.weight" in state  # 4 -> 8 channels
    path = tmp_path / "latentsync_syncnet.pt"
    torch.save({"state_dict": state, "global_step": 7}, path)
    model = load_syncnet(path, TINY)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    # A checkpoint from another architecture is refused, not half-loaded.
    del state["visual_encoder.norm_out.weight"]
    torch.save({"state_dict": state}, path)
    with pytest.raises(RuntimeError, match="norm_out"):
        load_syncnet(path, TINY)


def test_missing_weights_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsMissing, match="syncnet/latentsync_syncnet.pt") as info:
        load_syncnet(tmp_path / "nope.pt")
    assert "download_weights.py --with-syncnet" in str(info.value)


def test_official_shapes_give_one_vector_per_window() -> None:
    # Upstream's inputs: 16 lower-half RGB frames [48,128,256] and 52 mel columns [1,80,52].
    model = tiny_syncnet()
    v, a = model(torch.zeros(2, 48, 128, 256), torch.zeros(3, 1, 80, 52))
    assert v.shape == (2, 8) and a.shape == (3, 8)
    assert torch.allclose(v.norm(dim=1), torch.ones(2)) and torch.allclose(a.norm(dim=1), torch.ones(3))
    assert OFFICIAL.visual.block_out_channels[-1] == OFFICIAL.audio.block_out_channels[-1] == 2048


def test_mel_has_80_columns_a_second_and_maps_silence_to_minus_4() -> None:
    assert melspectrogram(np.zeros(16000)).shape == (80, 81)
    assert np.all(melspectrogram(np.zeros(3200)) == -4.0)
    t = np.arange(16000) / 16000
    mel = melspectrogram(0.5 * np.sin(2 * np.pi * 1000 * t))
    assert mel.max() > 0 and mel[:, 40].argmax() == np.argmax(mel[:, 40])
    low = melspectrogram(0.5 * np.sin(2 * np.pi * 300 * t))[:, 40].argmax()
    assert low < mel[:, 40].argmax()  # higher pitch, higher band


@pytest.mark.parametrize("delay", [-4, 0, 3, 7])
def test_offset_search_finds_a_known_shift(delay: int) -> None:
    # Audio embedding of frame s+delay matches visual window s; everything else is unrelated.
    rng = np.random.default_rng(delay + 10)
    frames, vshift = 120, 10
    audio = _unit(rng.standard_normal((frames, 32)))
    starts = np.arange(15, frames - 15)
    visual = _unit(audio[starts + delay] + 0.3 * rng.standard_normal((len(starts), 32)))
    score = score_embeddings(visual, audio, starts, vshift)
    assert score.av_offset == -delay  # LatentSync's sign: the sound comes `delay` frames after the lips
    assert len(score.distances) == 2 * vshift + 1
    assert score.lse_d == pytest.approx(min(score.distances), abs=1e-4)
    assert score.lse_c == pytest.approx(np.median(score.distances) - min(score.distances), abs=1e-3)
    assert score.lse_c > 0.3  # unrelated unit vectors sit ~sqrt(2) apart, noisy matches ~1


def test_unrelated_streams_have_no_confidence() -> None:
    rng = np.random.default_rng(5)
    audio = _unit(rng.standard_normal((200, 64)))
    starts = np.arange(200)
    score = score_embeddings(_unit(rng.standard_normal((200, 64))), audio, starts, 8)
    assert score.lse_c < 0.05 and score.lse_d == pytest.approx(np.sqrt(2), abs=0.05)


def test_pair_distances_skip_audio_outside_the_clip() -> None:
    audio = _unit(np.eye(6)[:5])
    dist = pair_distances(audio[[0, 4]], audio, np.array([0, 4]), 2)
    assert np.isnan(dist[0, :2]).all() and dist[0, 2] == 0 and np.isnan(dist[1, 3:]).all()
    assert dist[1, 2] == 0 and dist[1, 1] == pytest.approx(np.sqrt(2))


def test_delaying_the_audio_shifts_its_windows_by_the_delay() -> None:
    # Audio delayed by 5 frames (0.2 s = 16 mel columns exactly) gives at frame s+5 the
    # window that frame s had, so the offset search sees the delay as a 5-frame shift.
    rng = np.random.default_rng(0)
    model = tiny_syncnet()
    frames, vshift, d = 60, 8, 5
    faces = rng.integers(0, 256, (frames, 256, 256, 3), dtype=np.uint8)
    audio = (0.2 * rng.standard_normal(frames * 640)).astype(np.float32)
    delayed = np.concatenate([np.zeros(d * 640, np.float32), audio])[: len(audio)]
    w_plain = audio_windows(audio, FPS, 40, 52)
    w_late = audio_windows(delayed, FPS, 40, 52)
    np.testing.assert_array_equal(w_late[d + 2 : 30], w_plain[2 : 30 - d])
    plain = sync_score(model, faces, audio, FPS, vshift=vshift, stride=4)
    late = sync_score(model, faces, delayed, FPS, vshift=vshift, stride=4)
    assert plain.windows == late.windows == len(range(0, frames - 15, 4))
    assert np.all(np.isfinite(plain.distances)) and plain.distances != late.distances


def test_mouth_opening_and_energy_correlation() -> None:
    lm = np.zeros((2, 68, 2), np.float32)
    lm[:, 27] = (50, 0)
    lm[:, 8] = (50, 100)
    lm[1, [67, 66, 65], 1] = 8.0  # lower inner lip 8 px below the upper: 8 % of the face height
    np.testing.assert_allclose(mouth_opening(lm), [0.0, 0.08])
    audio = np.concatenate([np.zeros(640), 0.5 * np.ones(640), np.zeros(640)])
    np.testing.assert_allclose(frame_rms(audio, FPS, 3), [0, 0.5, 0])
    assert pearson(np.array([0, 1, 0.0]), frame_rms(audio, FPS, 3)) == pytest.approx(1.0)
    assert pearson(np.ones(3), np.arange(3.0)) == 0.0


def test_score_command_names_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from musetalk_warm.cli import main

    assert main(["score", str(tmp_path / "none.mp4"), "--syncnet", "tiny"]) == 2
    assert "clip not found: none.mp4" in capsys.readouterr().err
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    assert main(["score", str(clip), "--models-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "syncnet/latentsync_syncnet.pt" in err and str(tmp_path) not in err

"""The weightless lite renderer on a real face photo and real synthetic speech."""

from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np
import pytest
import soxr

from musetalk_warm.avatars.cache import CROP_SIZE, Avatar
from musetalk_warm.errors import AudioError
from musetalk_warm.media.audio import num_frames
from musetalk_warm.avatars.landmarks import detect_landmarks
from musetalk_warm.quality.articulation import CLOSED, articulation, mouth_width
from musetalk_warm.quality.clip import track_faces
from musetalk_warm.quality.mouth import mouth_opening
from musetalk_warm.render.lite import LiteRenderer, crop_landmarks
from musetalk_warm.render.visemes import phone_shape, shapes_from_phones
from musetalk_warm.voice.phonemes import Phone, speak_with_phones
from musetalk_warm.avatars.stabilise import box_transform, boxes_center_size

SR = 16000
FPS = 25


def _v15_box(lm: np.ndarray, extra_margin: int = 10) -> np.ndarray:
    """Upstream v1.5 face box from iBUG-68 landmarks (bbox_shift 0)."""
    y2 = lm[:, 1].max()
    y1 = 2 * lm[29, 1] - y2
    return np.array([lm[:, 0].min(), y1, lm[:, 0].max(), y2 + extra_margin]).astype(np.int32)


@pytest.fixture(scope="module")
def avatar(face_bgr: np.ndarray) -> Avatar:
    """Three frames of the astronaut: as shot, shifted, and slightly zoomed out."""
    lm0 = detect_landmarks(face_bgr)
    assert lm0 is not None
    moves = [np.float32([[1, 0, 0], [0, 1, 0]]), np.float32([[1, 0, 6], [0, 1, 4]]),
             cv2.getRotationMatrix2D((256.0, 256.0), 3.0, 0.92)]
    frames, marks, boxes, crops = [], [], [], []
    for m in moves:
        frame = cv2.warpAffine(face_bgr, m, face_bgr.shape[1::-1], flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT)
        lm = (lm0 @ m[:, :2].T + m[:, 2]).astype(np.float32)
        box = _v15_box(lm)
        x1, y1, x2, y2 = box
        crop = cv2.resize(frame[y1:y2, x1:x2], (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LANCZOS4)
        frames.append(frame), marks.append(lm), boxes.append(box), crops.append(crop)
    n = len(frames)
    centers, sizes = boxes_center_size(np.stack(boxes))
    return Avatar(
        avatar_id="astronaut", fps=FPS, frames=np.stack(frames), boxes=np.stack(boxes),
        landmarks=np.stack(marks), crops=np.stack(crops), latents=None,
        masks=tuple(np.zeros((2, 2), np.uint8) for _ in range(n)), crop_boxes=np.stack(boxes),
        placements=np.stack([box_transform(c, s) for c, s in zip(centers, sizes)]),
    )


def test_crop_landmarks_follow_the_placement(avatar: Avatar) -> None:
    box, lm = avatar.boxes[1].astype(np.float64), avatar.landmarks[1].astype(np.float64)
    size = box[2:] - box[:2]
    # Raw-box placement: the box's corner is the crop's origin, scaled by 256 / size.
    np.testing.assert_allclose(crop_landmarks(avatar, np.array([1]))[0], (lm - box[:2]) * 256 / size, atol=1e-3)
    # A placement moved by (3, -2) px moves the points the other way in the crop.
    moved = avatar.placements.copy()
    moved[1, :, 2] += (3.0, -2.0)
    shifted = replace(avatar, placements=moved)
    expected = (lm - box[:2] - (3.0, -2.0)) * 256 / size
    np.testing.assert_allclose(crop_landmarks(shifted, np.array([1]))[0], expected, atol=1e-3)


def _regions(avatar: Avatar, idx: int) -> tuple[tuple[slice, slice], int, tuple[int, int]]:
    """Mouth/jaw box, last row above the nose, jaw side columns (crop coordinates)."""
    lm = crop_landmarks(avatar, np.array([idx]))[0]
    mouth = (slice(int(lm[33, 1]), int(lm[8, 1]) + 1), slice(int(lm[48, 0]) - 5, int(lm[54, 0]) + 6))
    return mouth, int(lm[31:36, 1].min()), (int(math.floor(lm[4, 0])), int(math.ceil(lm[12, 0])))


def _generate(renderer: LiteRenderer, avatar: Avatar, cond: np.ndarray, batch: int = 16) -> np.ndarray:
    src = avatar.source_index(np.arange(len(cond)))
    starts = range(0, len(cond), batch)
    parts = [renderer.generate(avatar, cond[i : i + batch], src[i : i + batch]) for i in starts]
    return np.concatenate(parts)


@pytest.mark.parametrize("fps", [25, 30])
def test_condition_has_one_value_per_video_frame(fps: int) -> None:
    rng = np.random.default_rng(0)
    renderer = LiteRenderer()
    for length in (0, 1, 533, 639, 640, 16000, 16001, 53920, 12345):
        audio = (0.1 * rng.standard_normal(length)).astype(np.float32)
        cond = renderer.condition(audio, fps)
        assert cond.shape == (math.floor(length / SR * fps), 3) == (num_frames(length, fps), 3)
        assert cond.dtype == np.float32
        assert np.all((cond[:, [0, 2]] >= 0) & (cond[:, [0, 2]] <= 1))
        assert np.all(np.abs(cond[:, 1]) <= 1)


def test_condition_refuses_multichannel_audio() -> None:
    with pytest.raises(AudioError):
        LiteRenderer().condition(np.zeros((2, 16000), np.float32), FPS)


def test_silence_and_quiet_noise_keep_the_source_mouth(avatar: Avatar) -> None:
    renderer = LiteRenderer()
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(2 * SR)
    quiet = (noise / np.sqrt(np.mean(noise**2)) * 10 ** (-60 / 20)).astype(np.float32)  # -60 dBFS RMS
    for audio in (np.zeros(2 * SR, np.float32), quiet):
        cond = renderer.condition(audio, FPS)
        assert len(cond) == 2 * FPS and np.all(cond == 0)
        faces = _generate(renderer, avatar, cond)
        src = avatar.crops[avatar.source_index(np.arange(len(cond)))]
        assert np.array_equal(faces, src)


def test_mouth_change_follows_speech_energy(avatar: Avatar, speech_16k: np.ndarray) -> None:
    renderer = LiteRenderer()
    cond = renderer.condition(speech_16k, FPS)
    faces = _generate(renderer, avatar, cond)
    src_idx = avatar.source_index(np.arange(len(cond)))
    change = np.empty(len(cond))
    for i, (face, s) in enumerate(zip(faces, src_idx)):
        mouth, _, _ = _regions(avatar, int(s))
        change[i] = np.abs(face[mouth].astype(np.int16) - avatar.crops[s][mouth]).mean()
    bounds = (np.arange(len(cond) + 1) * SR / FPS).astype(int)
    rms = np.array([np.sqrt(np.mean(speech_16k[a:b] ** 2)) for a, b in zip(bounds[:-1], bounds[1:])])
    r = np.corrcoef(change, rms)[0, 1]
    print(f"lite: Pearson r(mouth change, frame RMS) = {r:.3f} over {len(cond)} frames")
    assert r > 0.5
    # The speech moves the mouth, and the trailing silence leaves it shut.
    assert change.max() > 10
    assert rms[-1] < 1e-4 and change[-1] == 0


def test_openness_moves_only_the_lower_face(avatar: Avatar) -> None:
    renderer = LiteRenderer()
    previous = np.zeros(len(avatar))
    rest = renderer.params.rest  # the smallest opening rendered
    for level in (rest, 0.25, 0.5, 1.0):
        faces = renderer.generate(avatar, np.full(len(avatar), level, np.float32), np.arange(len(avatar)))
        assert faces.shape == (len(avatar), CROP_SIZE, CROP_SIZE, 3) and faces.dtype == np.uint8
        for i, face in enumerate(faces):
            src = avatar.crops[i]
            mouth, nose_row, (left, right) = _regions(avatar, i)
            assert np.array_equal(face[:nose_row], src[:nose_row])  # upper face untouched
            assert np.array_equal(face[:, : left - 1], src[:, : left - 1])  # beyond the jaw sides
            assert np.array_equal(face[:, right + 2 :], src[:, right + 2 :])
            change = np.abs(face[mouth].astype(np.int16) - src[mouth]).mean()
            assert change > previous[i]
            previous[i] = change
            if level == rest:
                assert change < 3  # the slightest opening is a slight change: no pops
    assert np.all(previous > 15)  # fully open: a clear change (grey levels, mouth/jaw box mean)


def test_open_mouth_shows_a_dark_cavity(avatar: Avatar) -> None:
    open_face = LiteRenderer().generate(avatar, np.ones(1, np.float32), np.zeros(1, np.int64))[0]
    lm = crop_landmarks(avatar, np.array([0]))[0]
    x = int(lm[62, 0])
    column = slice(x - 3, x + 4)
    # Below the parted lips (lower inner lip moved down) the interior is dark.
    rows = slice(int(lm[66, 1]), int(lm[66, 1]) + 8)
    src_luma = cv2.cvtColor(avatar.crops[0], cv2.COLOR_BGR2GRAY)[rows, column].mean()
    new_luma = cv2.cvtColor(open_face, cv2.COLOR_BGR2GRAY)[rows, column].mean()
    assert new_luma < 0.5 * src_luma


def test_generate_is_deterministic_and_handles_empty_batches(avatar: Avatar) -> None:
    renderer = LiteRenderer()
    cond = np.array([0.0, 0.3, 0.9], np.float32)
    idx = np.array([2, 0, 1])
    first = renderer.generate(avatar, cond, idx)
    assert np.array_equal(first, LiteRenderer().generate(avatar, cond, idx))
    assert np.array_equal(first[0], avatar.crops[2])
    empty = renderer.generate(avatar, np.zeros(0, np.float32), np.zeros(0, np.int64))
    assert empty.shape == (0, CROP_SIZE, CROP_SIZE, 3)


def _band_noise(rng: np.random.Generator, low: float, high: float, seconds: float, dbfs: float) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(int(seconds * SR)))
    freqs = np.fft.rfftfreq(int(seconds * SR), 1 / SR)
    x = np.fft.irfft(spectrum * ((freqs >= low) & (freqs <= high)), int(seconds * SR))
    return (x / np.sqrt(np.mean(x**2)) * 10 ** (dbfs / 20)).astype(np.float32)


def test_hiss_opens_less_than_voiced_band_energy() -> None:
    rng = np.random.default_rng(2)
    hiss = _band_noise(rng, 4000, 7500, 1.0, -20)
    voiced = _band_noise(rng, 300, 3000, 1.0, -20)
    cond = LiteRenderer().condition(np.concatenate([hiss, voiced]), FPS)[:, 0]
    assert cond[5:FPS].mean() < 0.5 * cond[FPS + 5 :].mean()


def test_mouth_anticipates_onsets_and_releases_slowly() -> None:
    onset = int(1.02 * SR)  # frame 24's window ends at 1.005 s: silent; frame 25 hears the onset
    vowel = _band_noise(np.random.default_rng(3), 300, 3000, 0.5, -20)
    audio = np.concatenate([np.zeros(onset, np.float32), vowel, np.zeros(SR, np.float32)])
    cond = LiteRenderer().condition(audio, FPS)[:, 0]
    assert cond[23] == 0 and 0 < cond[24] < cond[25]
    end = math.floor((onset + len(vowel)) / SR * FPS)
    tail = cond[end + 1 :]
    assert tail[0] > 0.1 and np.all(np.diff(tail) <= 0)  # closes over a few frames, not at once
    assert np.all(tail[8:] == 0)


def test_espeak_reports_phonemes_that_tile_its_audio() -> None:
    audio, rate, phones = speak_with_phones("Bob moved the blue boots.")
    assert audio.dtype == np.float32 and rate > 8000 and np.abs(audio).max() > 0.05
    symbols = [p.symbol for p in phones]
    assert symbols[:3] == ["b", "0", "b"] and "u:" in symbols
    assert all(a.end == b.start for a, b in zip(phones, phones[1:]))
    assert phones[-1].end == pytest.approx(len(audio) / rate)
    # The vowel of "Bob" is loud, the closure before its second b is not.
    vowel, stop = phones[1], phones[2]
    rms = [np.sqrt(np.mean(audio[int(p.start * rate) : int(p.end * rate)] ** 2)) for p in (vowel, stop)]
    assert rms[0] > 3 * rms[1]


def test_a_bilabial_shorter_than_a_frame_still_gets_a_closed_frame() -> None:
    phones = [Phone("a", 0.0, 0.21), Phone("p", 0.21, 0.225), Phone("a", 0.225, 0.5)]
    shapes = shapes_from_phones(phones, FPS, 12)
    assert shapes[:, 2].max() == 1.0 and np.flatnonzero(shapes[:, 2] == 1.0).size == 1
    assert phone_shape("m") == (0.0, 0.0, 1.0) and phone_shape("_:") == (0.0, 0.0, 0.0)
    assert phone_shape("u:")[1] == 1.0 and phone_shape("i:")[1] == -1.0


def test_mouth_shapes_measured_by_landmarks(avatar: Avatar) -> None:
    """Open, closed, rounded and spread shapes as mediapipe sees them on the rendered crops."""
    shapes = np.array([[0, 0, 0], [1, 0, 0], [0, 0, 1], [0.4, 1, 0], [0.4, -1, 0]], np.float32)
    faces = LiteRenderer().generate(avatar, shapes, np.zeros(len(shapes), np.int64))
    lm = track_faces(faces)
    opening, width = mouth_opening(lm), mouth_width(lm)
    print("opening", opening.round(4), "width", width.round(4))
    assert opening[1] > opening[0] + 0.02  # jaw drop
    assert opening[2] < CLOSED  # lips pressed together
    assert width[3] < width[0] - 0.03 and width[4] > width[0] + 0.02  # rounded narrower, spread wider


def test_lite_articulates_espeak_speech(avatar: Avatar) -> None:
    """On espeak sentences, landmarks on the output against the phoneme timings."""
    audio, rate, phones = speak_with_phones("Bob moved the blue boots. We keep the peace. My mom bought a map.")
    audio = soxr.resample(audio, rate, SR).astype(np.float32)
    renderer = LiteRenderer()
    for hint in (phones, None):
        found = articulation(track_faces(_generate(renderer, avatar, renderer.condition(audio, FPS, hint))), phones, FPS)
        print("phonemes" if hint else "spectral", found)
        assert found["rounded_vowels"] >= 4 and found["spread_vowels"] >= 4 and found["bilabials"] >= 8
        assert found["rounded_narrower"] >= 0.8 and found["spread_wider"] >= 0.8
        if hint is not None:
            assert found["bilabial_closed"] >= 0.8

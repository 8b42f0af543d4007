"""Avatar preparation: the upstream box rule, the cache, the no-op rule, sources, latents."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest

from conftest import face_in_frame
from musetalk_warm.avatars.cache import Avatar, load_avatar, save_avatar
from musetalk_warm.render.blend import composite
from musetalk_warm.config import Settings
from musetalk_warm.avatars.demo import demo_frames
from musetalk_warm.errors import AvatarCacheError, ConfigError, FaceNotFound
from musetalk_warm.avatars.landmarks import Detection, MediapipeDetector
from musetalk_warm.avatars.masks import crop_box
from musetalk_warm.avatars.prep import face_box, load_or_prepare, prepare_avatar, with_margin
from musetalk_warm.avatars.stabilise import box_transform, crop_face, placed_box

SECONDS, FPS = 1.0, 12  # 12 small demo frames keep each prep near a second


class CountingDetector:
    """The real mediapipe detector, counting its calls; ``noise_px`` adds detector jitter."""

    name = "mediapipe"

    def __init__(self, noise_px: float = 0.0, seed: int = 0) -> None:
        self.inner = MediapipeDetector(video=True)
        self.calls = 0
        self.noise_px = noise_px
        self.rng = np.random.default_rng(seed)

    def detect(self, frame_bgr: np.ndarray) -> Detection | None:
        self.calls += 1
        found = self.inner.detect(frame_bgr)
        if found is None or not self.noise_px:
            return found
        jitter = self.rng.normal(0.0, self.noise_px, found.landmarks.shape).astype(np.float32)
        return Detection(found.landmarks + jitter, found.box)


STABILISERS_OFF = {"one_euro_enabled": False, "scale_lock_enabled": False, "affine_enabled": False,
                   "subpixel_enabled": False}


def settings_for(cache: Path, batch_size: int = 5, render: dict[str, Any] | None = None, **avatar: Any) -> Settings:
    opts = {"cache_dir": cache, "demo_seconds": SECONDS, "fps": FPS, **avatar}
    return Settings(avatar=opts, render={"batch_size": batch_size, **(render or {})})


def hand_landmarks(y29: float = 150.0, chin: float = 220.0, x_min: float = 100.0) -> np.ndarray:
    """A face-like point set: x from x_min to x_min + 100, y from 90 to the chin."""
    lm = np.zeros((68, 2), np.float32)
    lm[:, 0] = np.linspace(x_min, x_min + 100, 68)
    lm[:, 1] = np.linspace(90, chin - 10, 68)
    lm[8] = (x_min + 50, chin)
    lm[29] = (x_min + 50, y29)
    return lm


# --- the upstream box rule (get_landmark_and_bbox + v1.5 margin) -------------------

def test_box_from_landmarks() -> None:
    box, fallback = face_box(hand_landmarks(), (1.0, 2.0, 3.0, 4.0))
    # y1 = 2 * 150 - 220 = 80; x from the extremes; y2 the chin.
    assert box == (100, 80, 200, 220) and not fallback


def test_bbox_shift_moves_the_top_by_twice_the_shift() -> None:
    base, _ = face_box(hand_landmarks(), (0, 0, 1, 1))
    for shift in (-7, 5):
        box, _ = face_box(hand_landmarks(), (0, 0, 1, 1), bbox_shift=shift)
        assert box[1] - base[1] == 2 * shift and (box[0], box[2], box[3]) == (base[0], base[2], base[3])


def test_bbox_shift_moves_point_29_itself() -> None:
    # Shifting 29 below the chin makes it the lowest point (upstream's in-place view):
    # centre 300 = max -> y1 = y2 = 300 -> empty box -> detector box.
    box, fallback = face_box(hand_landmarks(), (10.5, 20.9, 300.2, 310.0), bbox_shift=150)
    assert fallback and box == (10, 20, 300, 310)


def test_top_is_clamped_at_zero() -> None:
    box, fallback = face_box(hand_landmarks(y29=100, chin=260), (0, 0, 1, 1))
    assert box == (100, 0, 200, 260) and not fallback  # 2 * 100 - 260 < 0


def test_negative_x1_uses_the_clipped_detector_box() -> None:
    box, fallback = face_box(hand_landmarks(x_min=-5.0), (-3.7, 12.2, 99.9, 240.5))
    assert fallback and box == (0, 12, 99, 240)


def test_landmarks_are_truncated_to_int32() -> None:
    lm = hand_landmarks(y29=150.9, chin=220.7, x_min=99.8)
    box, _ = face_box(lm, (0, 0, 1, 1))
    assert box == (99, 2 * 150 - 220, 199, 220)
    # -0.6 truncates to 0, which is not negative: no fallback.
    box, fallback = face_box(hand_landmarks(x_min=-0.6), (5, 5, 9, 9))
    assert box[0] == 0 and not fallback


def test_extra_margin_is_clamped_at_the_frame_height() -> None:
    assert with_margin((1, 2, 3, 100), 10, 480) == (1, 2, 3, 110)
    assert with_margin((1, 2, 3, 475), 10, 480) == (1, 2, 3, 480)


# --- end to end on the demo avatar ---------------------------------------------------

@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CountingDetector, Any]:
    cache = tmp_path_factory.mktemp("avatars")
    detector = CountingDetector()
    avatar = prepare_avatar(settings_for(cache), detector=detector, progress=False)
    return cache, detector, avatar


def psnr(error: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / max(float(np.mean(np.square(error, dtype=np.float32))), 1e-9)))


def test_demo_prep_writes_a_complete_cache(demo_cache: tuple[Path, CountingDetector, Any]) -> None:
    cache, detector, avatar = demo_cache
    n = round(SECONDS * FPS)
    assert detector.calls == n and len(avatar) == n
    folder = cache / "demo"
    assert {p.name for p in folder.iterdir()} == {"frames.mkv", "crops.mkv", "arrays.safetensors", "manifest.json"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format_version"] == 4 and manifest["avatar_id"] == "demo"
    assert manifest["frames_codec"] == {"codec": "libx264rgb", "preset": "medium", "crf": 6,
                                        "bytes": (folder / "frames.mkv").stat().st_size,
                                        "crops_bytes": (folder / "crops.mkv").stat().st_size}
    assert (manifest["fps"], manifest["num_frames"], manifest["frame_size"]) == (FPS, n, [512, 512])
    assert manifest["source"]["kind"] == "demo" and len(manifest["source"]["sha256"]) == 64
    assert manifest["vae_id"] is None and manifest["has_latents"] is False
    params = manifest["params"]
    assert params["bbox_shift"] == 0 and params["extra_margin"] == 10 and params["mask_source"] == "landmarks"
    assert (params["expand"], params["blur_ratio"], params["face_backend"]) == (1.5, 0.1, "mediapipe")
    assert manifest["versions"]["mediapipe"] and manifest["faceless_frames"] == []
    assert params["stabilise"]["affine_enabled"] and params["stabilise"]["one_euro_center"]["min_cutoff"] == 1.5

    frames = demo_frames(SECONDS, FPS)
    # Frames come back from the near-lossless codec: 50 dB, no pixel off by more than a few levels.
    error = avatar.frames.astype(np.float32) - frames
    assert psnr(error) >= 49.5 and np.abs(error).max() <= 16
    for i in (0, n - 1):
        x1, y1, x2, y2 = avatar.boxes[i]
        assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512
        lm = avatar.landmarks[i]
        assert y2 == int(lm[:, 1].max()) + 10 and x1 == int(lm[:, 0].min())  # chin + extra_margin
        # The crop was cut at the stabilised placement (a few pixels at most from the raw box) and
        # comes back from the near-lossless codec as the frames do.
        t = avatar.placements[i]
        crop_error = avatar.crops[i].astype(np.float32) - crop_face(frames[i], t)
        assert psnr(crop_error) >= 49.5 and np.abs(crop_error).max() <= 16
        assert np.abs(np.subtract(placed_box(t), avatar.boxes[i])).max() <= 8
        # The mask sits on the placed face box.
        assert tuple(avatar.crop_boxes[i]) == crop_box(placed_box(t))
        cx1, cy1, cx2, cy2 = avatar.crop_boxes[i]
        assert cx2 - cx1 == cy2 - cy1 == avatar.masks[i].shape[0] == avatar.masks[i].shape[1]
        assert avatar.masks[i].max() == 255 and not avatar.masks[i][: (cy2 - cy1) // 2 - 20].any()
    assert avatar.latents is None


def test_reload_equals_saved_and_is_fast(demo_cache: tuple[Path, CountingDetector, Any]) -> None:
    cache, _, avatar = demo_cache
    t0 = time.perf_counter()
    loaded = load_avatar("demo", cache)
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0  # 30 frames on 2 busy cores; the benchmark measures it properly
    for name in ("frames", "boxes", "landmarks", "crops", "crop_boxes", "placements"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(avatar, name))
    assert len(loaded.masks) == len(avatar.masks)
    assert all(np.array_equal(m, k) for m, k in zip(loaded.masks, avatar.masks))
    assert loaded.manifest == avatar.manifest and loaded.fps == FPS


def test_second_run_is_a_no_op_and_force_redoes(demo_cache: tuple[Path, CountingDetector, Any]) -> None:
    cache, _, avatar = demo_cache
    detector = CountingDetector()
    again = prepare_avatar(settings_for(cache), detector=detector, progress=False)
    assert detector.calls == 0
    np.testing.assert_array_equal(again.boxes, avatar.boxes)
    forced = prepare_avatar(settings_for(cache), detector=detector, force=True, progress=False)
    assert detector.calls == len(avatar)
    np.testing.assert_array_equal(forced.frames, avatar.frames)


def test_changed_bbox_shift_redoes_prep(tmp_path: Path) -> None:
    base = prepare_avatar(settings_for(tmp_path), progress=False)
    detector = CountingDetector()  # a fresh one: a video detector carries its tracking state
    shifted = prepare_avatar(settings_for(tmp_path, bbox_shift=-4), detector=detector, progress=False)
    assert detector.calls == len(base)
    assert shifted.manifest["params"]["bbox_shift"] == -4
    # Same landmarks: the top edge moves up by 2 x 4 px, the rest stays.
    np.testing.assert_array_equal(shifted.boxes[:, 1], base.boxes[:, 1] - 8)
    np.testing.assert_array_equal(shifted.boxes[:, [0, 2, 3]], base.boxes[:, [0, 2, 3]])


def test_no_face_raises_face_not_found(tmp_path: Path) -> None:
    image = tmp_path / "wall.png"
    rng = np.random.default_rng(3)
    cv2.imwrite(str(image), cv2.GaussianBlur(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), (9, 9), 3))
    with pytest.raises(FaceNotFound) as err:
        prepare_avatar(settings_for(tmp_path / "c", video_path=image), progress=False)
    assert "wall.png" in err.value.message and str(tmp_path) not in str(err.value)
    assert not (tmp_path / "c" / "demo" / "manifest.json").exists()


def write_image(folder: Path, image_bgr: np.ndarray) -> Path:
    """``image_bgr`` as ``portrait.png`` in ``folder``."""
    path = folder / "portrait.png"
    cv2.imwrite(str(path), image_bgr)
    return path


def test_still_image_source(tmp_path: Path, face_bgr: np.ndarray) -> None:
    image = write_image(tmp_path, face_bgr)
    avatar = prepare_avatar(settings_for(tmp_path / "c", video_path=image, avatar_id="still"), progress=False)
    assert len(avatar) == 1 and avatar.manifest["source"]["kind"] == "image"
    np.testing.assert_array_equal(avatar.frames[0], face_bgr)
    x1, y1, x2, y2 = avatar.boxes[0]
    assert 170 < x1 < 190 and 250 < x2 < 280 and y2 > 170  # around the face of the portrait


def write_video(path: Path, frames: np.ndarray) -> Path:
    """``frames`` (BGR) as an H.264 mp4 at ``FPS``."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt, stream.options = "yuv420p", {"crf": "12", "preset": "ultrafast"}
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        out.mux(stream.encode())
    return path


def test_video_file_source(tmp_path: Path) -> None:
    frames = demo_frames(SECONDS, FPS)
    frames[5:7] = 128  # two frames without a face (a cut to grey)
    video = write_video(tmp_path / "avatar.mp4", frames)
    avatar = prepare_avatar(settings_for(tmp_path / "c", video_path=video, avatar_id="vid"), progress=False)
    assert len(avatar) == len(frames) and avatar.manifest["source"]["kind"] == "video"
    assert avatar.manifest["source"]["name"] == "avatar.mp4"
    assert np.abs(avatar.frames.astype(np.int16) - frames).mean() < 4  # lossy, same pictures
    # Faceless frames reuse the nearest frame's box and landmarks, and the manifest says so.
    assert avatar.manifest["faceless_frames"] == [5, 6]
    np.testing.assert_array_equal(avatar.boxes[5], avatar.boxes[4])
    np.testing.assert_array_equal(avatar.boxes[6], avatar.boxes[7])
    np.testing.assert_array_equal(avatar.landmarks[6], avatar.landmarks[7])
    demo = prepare_avatar(settings_for(tmp_path / "d"), progress=False)
    faces = [i for i in range(len(frames)) if i not in (5, 6)]
    assert np.abs(avatar.boxes[faces] - demo.boxes[faces]).max() <= 3
    capped = prepare_avatar(settings_for(tmp_path / "c", video_path=video, avatar_id="vid", max_frames=5),
                            progress=False)
    assert len(capped) == 5


def test_small_face_in_a_full_hd_video(tmp_path: Path, face_bgr: np.ndarray) -> None:
    # A wide shot: an 85 px face in 1920x1080, drifting 2 px a frame.
    frame, scale = face_in_frame(face_bgr, 85, (1920, 1080), (900, 400))
    frames = np.stack([np.roll(frame, 2 * i, axis=1) for i in range(6)])
    video = write_video(tmp_path / "wide.mp4", frames)
    avatar = prepare_avatar(settings_for(tmp_path / "c", video_path=video, avatar_id="wide"), progress=False)
    assert len(avatar) == 6 and avatar.manifest["faceless_frames"] == []
    reference = prepare_avatar(settings_for(tmp_path / "c", video_path=write_image(tmp_path, face_bgr),
                                            avatar_id="large"), progress=False)
    for i in range(6):
        # The box is the large face's box scaled into the frame, within 3 px (the face is 85 px).
        expected = (reference.boxes[0] - (0, 0, 0, 10)) * scale + (900 + 2 * i, 400, 900 + 2 * i, 410)
        assert np.abs(avatar.boxes[i] - expected).max() <= 3, i
        assert avatar.crops[i].shape == (256, 256, 3)


def test_latents_are_the_encoder_of_the_crops(tmp_path: Path) -> None:
    from musetalk_warm.models.musetalk import encode_latents, tiny_models

    models = tiny_models(seed=0)
    encoder = partial(encode_latents, models)
    detector = CountingDetector()
    settings = settings_for(tmp_path, batch_size=2, max_frames=3)
    lite = prepare_avatar(settings, detector=detector, progress=False)
    assert lite.latents is None and detector.calls == 3
    # Weights installed later: only the latents are computed, no detection.
    avatar = prepare_avatar(settings, encoder=encoder, vae_id=models.vae_id, detector=detector, progress=False)
    assert detector.calls == 3
    assert avatar.latents is not None and avatar.latents.shape == (3, 8, 32, 32)
    assert avatar.latents.dtype == np.float32
    # Batches of render.batch_size (2 + 1), each exactly the encoder's output.
    expected = np.concatenate([encode_latents(models, avatar.crops[i : i + 2]) for i in (0, 2)])
    np.testing.assert_array_equal(avatar.latents, expected)
    assert np.abs(expected).mean() > 0.01  # a real VAE output, not zeros
    assert avatar.manifest["vae_id"] == models.vae_id and avatar.manifest["has_latents"]
    np.testing.assert_array_equal(avatar.boxes, lite.boxes)
    # The lite renderer reuses the cache as it is, latents included.
    again = prepare_avatar(settings, detector=detector, progress=False)
    assert detector.calls == 3 and again.latents is not None


def test_encoder_needs_a_vae_id(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vae_id"):
        prepare_avatar(settings_for(tmp_path), encoder=lambda crops: crops, progress=False)


# --- cache errors ----------------------------------------------------------------------

def test_missing_cache_says_how_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(AvatarCacheError) as err:
        load_avatar("bank_avatar_1", tmp_path)
    text = str(err.value)
    assert "musetalk-warm prep --avatar-id bank_avatar_1" in text and str(tmp_path) not in text


def test_unreadable_or_half_written_cache(demo_cache: tuple[Path, CountingDetector, Any], tmp_path: Path) -> None:
    _, _, avatar = demo_cache
    save_avatar(avatar, tmp_path)
    manifest = tmp_path / "demo" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(AvatarCacheError, match="format"):
        load_avatar("demo", tmp_path)
    manifest.write_text("{not json")
    with pytest.raises(AvatarCacheError):
        load_avatar("demo", tmp_path)
    manifest.write_text(json.dumps(data))
    (tmp_path / "demo" / "arrays.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(AvatarCacheError, match="damaged"):
        load_avatar("demo", tmp_path)
    manifest.unlink()  # a save interrupted before its manifest
    with pytest.raises(AvatarCacheError, match="not been prepared"):
        load_avatar("demo", tmp_path)


def test_load_or_prepare_never_detects_without_preparation(tmp_path: Path, face_bgr: np.ndarray) -> None:
    image = write_image(tmp_path, face_bgr)
    detector = CountingDetector()
    settings = settings_for(tmp_path / "c", video_path=image, avatar_id="p")
    with pytest.raises(AvatarCacheError):
        load_or_prepare(settings, detector=detector, progress=False)
    assert detector.calls == 0
    prepared = settings_for(tmp_path / "c", video_path=image, avatar_id="p", preparation=True)
    assert len(load_or_prepare(prepared, detector=detector, progress=False)) == 1
    assert len(load_or_prepare(settings, detector=detector, progress=False)) == 1
    assert detector.calls == 1


def test_an_existing_cache_is_loaded_as_it_is(tmp_path: Path, face_bgr: np.ndarray) -> None:
    """An avatar prepared from a photo is never re-prepared from the demo for lack of a video path."""
    image = write_image(tmp_path, face_bgr)
    detector = CountingDetector()
    prepare_avatar(settings_for(tmp_path, video_path=image, avatar_id="alice"), detector=detector, progress=False)
    manifest = tmp_path / "alice" / "manifest.json"
    before = manifest.read_bytes()
    avatar = load_or_prepare(settings_for(tmp_path, avatar_id="alice"), detector=detector, progress=False)
    assert len(avatar) == 1 and avatar.frames.shape[1:3] == face_bgr.shape[:2]
    assert detector.calls == 1 and manifest.read_bytes() == before
    with pytest.raises(AvatarCacheError, match="musetalk-warm prep --avatar-id bob --video-path"):
        load_or_prepare(settings_for(tmp_path, avatar_id="bob"), detector=detector, progress=False)
    with pytest.raises(ConfigError, match="only 'demo' is the demo"):
        prepare_avatar(settings_for(tmp_path, avatar_id="alice"), detector=detector, force=True, progress=False)
    assert detector.calls == 1 and manifest.read_bytes() == before


def test_force_prep_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scripts.force_prep import main

    config = tmp_path / "c.yaml"
    config.write_text(f"avatar:\n  cache_dir: {tmp_path / 'avatars'}\n  demo_seconds: 0.5\n  fps: 8\n")
    assert main(["--config", str(config), "--renderer", "lite"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["avatar_id"] == "demo" and summary["frames"] == 4 and summary["latents"] is False
    assert summary["cache"].endswith("demo") and (tmp_path / "avatars" / "demo" / "manifest.json").is_file()
    # Only the id "demo" is the built-in avatar: another id needs its own source.
    assert main(["--config", str(config), "--avatar-id", "cli", "--renderer", "lite"]) == 2
    assert "--video-path" in capsys.readouterr().err and not (tmp_path / "avatars" / "cli").exists()
    assert main(["--config", str(config), "--video-path", str(tmp_path / "nope.mp4")]) == 2
    assert "nope.mp4" in capsys.readouterr().err


def test_bisenet_masks_when_its_checkpoint_exists(tmp_path: Path) -> None:
    import torch
    from PIL import Image

    from musetalk_warm.avatars.masks import blend_mask
    from musetalk_warm.avatars.parsing import BiSeNet, FaceParser

    folder = tmp_path / "models" / "face-parse-bisent"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(BiSeNet().state_dict(), folder / "79999_iter.pth")  # seeded, untrained
    settings = Settings(
        models={"models_dir": tmp_path / "models", "device": "cpu"},
        avatar={"cache_dir": tmp_path / "c", "demo_seconds": SECONDS, "fps": FPS, "max_frames": 2},
    )
    avatar = prepare_avatar(settings, progress=False)
    assert avatar.manifest["params"]["mask_source"] == "parsing"
    assert avatar.manifest["params"]["parsing_mode"] == "jaw"
    parser = FaceParser(tmp_path / "models", "cpu")
    for i in range(2):
        box = placed_box(avatar.placements[i])  # the mask follows the placed face
        # Prep parsed the frames it read, before they were coded into the cache.
        body = Image.fromarray(np.ascontiguousarray(demo_frames(SECONDS, FPS)[i][:, :, ::-1]))
        segment = parser.segment(body.crop(tuple(int(v) for v in avatar.crop_boxes[i])), "jaw")
        mask, _ = blend_mask(avatar.frames.shape[1:], box, segment)
        np.testing.assert_array_equal(avatar.masks[i], mask)


def test_parsing_without_its_checkpoint_names_the_file(tmp_path: Path) -> None:
    from musetalk_warm.errors import WeightsMissing

    settings = Settings(
        models={"models_dir": tmp_path / "models", "device": "cpu"},
        avatar={"cache_dir": tmp_path / "c", "demo_seconds": SECONDS, "fps": FPS, "max_frames": 1,
                "mask_source": "parsing"},
    )
    with pytest.raises(WeightsMissing, match="79999_iter.pth"):
        prepare_avatar(settings, progress=False)


# --- placements: crop, paste and mask agree ---------------------------------------------

def _round_trip_error(avatar: Avatar, crop_of: Callable[[int], np.ndarray] | None = None) -> float:
    """Mean |frame - paste of the unmodified crop| over the mask (grey levels, all frames)."""
    errors = []
    for i in range(len(avatar)):
        crop = avatar.crops[i] if crop_of is None else crop_of(i)
        out = composite(avatar.frames[i], crop, avatar.placements[i], avatar.masks[i], avatar.crop_boxes[i],
                        "upstream", subpixel=True)
        x1, y1, x2, y2 = avatar.crop_boxes[i]
        inside = avatar.masks[i] > 0
        diff = np.abs(out[y1:y2, x1:x2].astype(np.int16) - avatar.frames[i][y1:y2, x1:x2])
        errors.append(diff[inside].mean())
    return float(np.mean(errors))


@pytest.mark.parametrize("render", [STABILISERS_OFF, {}], ids=["raw", "stabilised"])
def test_pasting_the_unmodified_crop_reproduces_the_frame(tmp_path: Path, render: dict[str, Any]) -> None:
    # Detector jitter of about 2 px on the boxes: the placement differs from the raw box.
    detector = CountingDetector(noise_px=1.5, seed=4)
    avatar = prepare_avatar(settings_for(tmp_path, render=render), detector=detector, progress=False)
    if render:
        raw = np.stack([box_transform((b[:2] + b[2:]) / 2, b[2:] - b[:2]) for b in avatar.boxes.astype(float)])
        np.testing.assert_array_equal(avatar.placements, raw)
    else:
        moved = np.abs(np.array([placed_box(t) for t in avatar.placements]) - avatar.boxes)
        assert moved.max() >= 2  # stabilisation really moved the boxes
    # Crop at prep and paste at render use one map: the round trip is a resampling only.
    assert _round_trip_error(avatar) < 0.5  # measured about 0.13 grey levels
    if not render:
        # A crop cut from the raw box but pasted at the stabilised placement is visibly off.
        def raw_crop(i: int) -> np.ndarray:
            x1, y1, x2, y2 = avatar.boxes[i]
            return cv2.resize(avatar.frames[i][y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4)

        assert _round_trip_error(avatar, raw_crop) > 2.0  # measured about 5 grey levels


def test_with_stabilisers_off_the_crop_is_upstreams(tmp_path: Path) -> None:
    avatar = prepare_avatar(settings_for(tmp_path, render=STABILISERS_OFF, max_frames=4), progress=False)
    for i in range(len(avatar)):
        x1, y1, x2, y2 = avatar.boxes[i]
        expected = cv2.resize(avatar.frames[i][y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4)
        # Both come back through the near-lossless codec; a box one pixel off is ~25 dB.
        assert psnr(avatar.crops[i].astype(np.float32) - expected) >= 45
        assert tuple(avatar.crop_boxes[i]) == crop_box((x1, y1, x2, y2))


def test_stabiliser_settings_are_part_of_the_cache_key(tmp_path: Path) -> None:
    base = prepare_avatar(settings_for(tmp_path, max_frames=6), progress=False)
    for render in ({"affine_enabled": False}, {"subpixel_enabled": False},
                   {"one_euro_center": {"min_cutoff": 1.0, "beta": 0.1}}):
        detector = CountingDetector()
        changed = prepare_avatar(settings_for(tmp_path, render=render, max_frames=6), detector=detector,
                                 progress=False)
        assert detector.calls == len(base), render  # re-prepared
        key = next(iter(render))
        stored = changed.manifest["params"]["stabilise"][key]
        assert render[key].items() <= stored.items() if isinstance(stored, dict) else stored == render[key]
        again = prepare_avatar(settings_for(tmp_path, render=render, max_frames=6), detector=detector,
                               progress=False)
        assert detector.calls == len(base)  # unchanged settings: a no-op
        np.testing.assert_array_equal(again.placements, changed.placements)
        if key != "one_euro_center":  # One-Euro does not act under affine tracking
            assert not np.array_equal(changed.placements, base.placements)
    # The blend mode is chosen per request: it does not re-prepare.
    detector = CountingDetector()
    render = {"one_euro_center": {"min_cutoff": 1.0, "beta": 0.1}, "blend_mode": "poisson"}
    prepare_avatar(settings_for(tmp_path, render=render, max_frames=6), detector=detector, progress=False)
    assert detector.calls == 0

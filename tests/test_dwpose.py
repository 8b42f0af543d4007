"""The dwpose backend (plain-torch RTMPose-l whole-body) on random-init checkpoints in mmpose's layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk_warm.avatars.dwpose import (
    FACE,
    FLIP_INDICES,
    DWPoseDetector,
    center_scale,
    decode,
    load_dwpose,
    simcc_maximum,
    warp_matrix,
)
from musetalk_warm.avatars.dwpose_net import DWPoseNet
from musetalk_warm.avatars.landmarks import make_detector
from musetalk_warm.avatars.prep import prepare_avatar
from musetalk_warm.config import ModelSettings, Settings

# COCO-WholeBody's flip_indices as mmpose derives them from configs/_base_/datasets/coco_wholebody.py
# (ubody2d.py gives the same list).
MMPOSE_FLIP_INDICES = (
    [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15, 20, 21, 22, 17, 18, 19]
    + [39, 38, 37, 36, 35, 34, 33, 32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 49, 48, 47, 46, 45, 44, 43, 42, 41, 40]
    + [50, 51, 52, 53, 58, 57, 56, 55, 54, 68, 67, 66, 65, 70, 69, 62, 61, 60, 59, 64, 63]
    + [77, 76, 75, 74, 73, 72, 71, 82, 81, 80, 79, 78, 87, 86, 85, 84, 83, 90, 89, 88]
    + list(range(112, 133)) + list(range(91, 112))
)


class HistoryBuffer:
    """Like mmengine's message-hub buffers: an object ``weights_only`` refuses to build."""

    def __init__(self) -> None:
        self.data = np.arange(4.0)


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random-init state dict in the checkpoint's ``backbone.*`` / ``head.*`` layout.

    The SimCC rows of bins outside the middle half of the input are zeroed, so each
    keypoint's maxima fall inside the middle of the box (where a trained model puts
    a face), which keeps the points on the photo.
    """
    torch.manual_seed(seed)
    state = DWPoseNet().state_dict()
    for axis in ("cls_x", "cls_y"):
        weight = state[f"head.{axis}.weight"]
        bins = weight.shape[0]
        weight[: bins // 4].zero_()
        weight[3 * bins // 4 :].zero_()
    return state


def seeded_state(seed: int = 3) -> dict[str, torch.Tensor]:
    """Every tensor drawn from one seeded generator in key order, BN statistics and scales
    included (independent of module construction order, so mmpose's model can take it too)."""
    g = torch.Generator().manual_seed(seed)
    state = DWPoseNet().state_dict()
    for key, value in sorted(state.items()):
        if not value.is_floating_point():
            continue
        noise = torch.randn(value.shape, generator=g)
        if key.endswith("running_var"):
            value.copy_(torch.rand(value.shape, generator=g) * 2 + 0.05)
        elif key.endswith(("running_mean", "bias", "beta")):
            value.copy_(noise * 0.1)
        elif key.endswith(("bn.weight", ".g", "scale", "gamma")):
            value.copy_(1 + noise * 0.1)
        else:  # conv / linear weights at fan-in scale
            value.copy_(noise / value[0].numel() ** 0.5)
    return state


def reference_frames(face_bgr: np.ndarray) -> dict[str, np.ndarray]:
    """The photo, and the photo in a 1280x720 grey frame (no resampling: library-independent)."""
    wide = np.full((720, 1280, 3), 90, dtype=np.uint8)
    wide[100:612, 600:1112] = face_bgr
    return {"photo": face_bgr, "wide": wide}


def write_checkpoint(root: Path, state: dict[str, torch.Tensor], **extra: object) -> Path:
    """``root/dwpose/dw-ll_ucoco_384.pth`` as mmengine saves it: weights, metadata, message hub, optimizer."""
    path = root / ModelSettings().dwpose_weights
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "meta": {"epoch": 270, "dataset_meta": {"sigmas": np.full(133, 0.025, dtype=np.float32)}},
        "state_dict": state,
        "message_hub": {"log_scalars": {"train/loss": HistoryBuffer()}},
        "optimizer": {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(32, 3, 3, 3)}},
                      "param_groups": [{"lr": 2e-4, "params": [0]}]},
        **extra,
    }
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("models")
    state = random_state()
    write_checkpoint(root, state)
    return root, state


def test_random_checkpoint_loads_through_the_real_loader_and_runs(
        saved: tuple[Path, dict[str, torch.Tensor]], face_bgr: np.ndarray) -> None:
    root, state = saved
    path = root / ModelSettings().dwpose_weights
    with pytest.raises(pickle.UnpicklingError):  # the metadata is why the loader needs stand-ins
        torch.load(path, weights_only=True)
    detector = make_detector("dwpose", models=ModelSettings(models_dir=root, device="cpu"))
    assert isinstance(detector, DWPoseDetector) and detector.name == "dwpose"
    points, scores = detector.keypoints(face_bgr)
    loaded = detector._net.state_dict() if detector._net is not None else {}
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # Random weights: no real face points, but 133 of them in frame pixels, on the photo.
    height, width = face_bgr.shape[:2]
    assert points.shape == (133, 2) and scores.shape == (133,)
    assert np.isfinite(points).all() and (scores > 0).all()
    assert (points >= 0).all() and (points[:, 0] < width).all() and (points[:, 1] < height).all()
    found = detector.detect(face_bgr)
    assert found is not None
    assert found.landmarks.shape == (68, 2) and found.landmarks.dtype == np.float32
    np.testing.assert_array_equal(found.landmarks, points[FACE].astype(np.float32))
    x1, y1, x2, y2 = found.box
    assert (x1, y1, x2, y2) == pytest.approx((*points[FACE].min(axis=0), *points[FACE].max(axis=0)))
    # Deterministic, also for a fresh detector.
    again = DWPoseDetector(path).keypoints(face_bgr)
    np.testing.assert_array_equal(again[0], points)
    np.testing.assert_array_equal(again[1], scores)
    detector.close()


def test_the_flip_test_averages_the_mirror(saved: tuple[Path, dict[str, torch.Tensor]],
                                           face_bgr: np.ndarray) -> None:
    root, _ = saved
    path = root / ModelSettings().dwpose_weights
    flipped, _ = DWPoseDetector(path, flip_test=True).keypoints(face_bgr)
    plain, _ = DWPoseDetector(path, flip_test=False).keypoints(face_bgr)
    assert flipped.shape == plain.shape and not np.array_equal(flipped, plain)


def test_frames_in_one_batch_equal_frames_one_by_one(saved: tuple[Path, dict[str, torch.Tensor]],
                                                     face_bgr: np.ndarray) -> None:
    """Prep hands DWPose frames in batches (one network call each); every frame keeps its own warp."""
    import cv2

    root, _ = saved
    detector = DWPoseDetector(root / ModelSettings().dwpose_weights)
    wide = np.full((360, 640, 3), 90, np.uint8)
    wide[40:296, 192:448] = cv2.resize(face_bgr, (256, 256))
    frames = [face_bgr, wide, np.ascontiguousarray(face_bgr[:, ::-1])]
    batched = detector.keypoints_many(frames)
    for frame, (points, scores) in zip(frames, batched, strict=True):
        alone, alone_scores = detector.keypoints(frame)
        assert points.shape == (133, 2)
        np.testing.assert_allclose(points, alone, atol=1e-3)
        np.testing.assert_allclose(scores, alone_scores, atol=1e-4)
    assert not np.allclose(batched[0][0], batched[1][0])  # different frames, different points
    many = detector.detect_many(frames)
    assert [d is None for d in many] == [detector.detect(f) is None for f in frames]
    # Prep takes a GPU detector's frames in batches: same detections, progress told per batch.
    from musetalk_warm.avatars.prep import _detect_all

    assert detector.batch_frames == 1  # CPU: frame by frame (faster there)
    video = np.stack([cv2.resize(f, (320, 240)) for f in frames * 2])
    told: list[int] = []
    one, _ = _detect_all(video, Settings(), None, detector, False, lambda stage, done, total: told.append(done))  # type: ignore[arg-type]
    detector.batch_frames = 4
    told_batched: list[int] = []
    batched_found, _ = _detect_all(video, Settings(), None, detector, False,  # type: ignore[arg-type]
                                   lambda stage, done, total: told_batched.append(done))
    assert told == [1, 2, 3, 4, 5, 6] and told_batched == [4, 6]
    for a, b in zip(one, batched_found, strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)


def test_low_face_scores_give_none(saved: tuple[Path, dict[str, torch.Tensor]], face_bgr: np.ndarray) -> None:
    root, _ = saved
    assert DWPoseDetector(root / ModelSettings().dwpose_weights, min_face_score=1e9).detect(face_bgr) is None


def test_strict_keys_and_distillation_prefixes(tmp_path: Path) -> None:
    state = random_state(1)
    # A distillation checkpoint: the student is taken, the teacher dropped.
    write_checkpoint(tmp_path, {**{f"student.{k}": v for k, v in state.items()},
                                "teacher.backbone.stem.0.conv.weight": torch.zeros(1)})
    net = load_dwpose(tmp_path / ModelSettings().dwpose_weights)
    assert torch.equal(net.state_dict()["head.cls_y.weight"], state["head.cls_y.weight"])
    # Keys the network does not have, or lacks, are refused.
    write_checkpoint(tmp_path, {**state, "head.extra.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="head.extra.weight"):
        load_dwpose(tmp_path / ModelSettings().dwpose_weights)
    del state["head.gau.gamma"]
    write_checkpoint(tmp_path, state)
    with pytest.raises(RuntimeError, match="head.gau.gamma"):
        load_dwpose(tmp_path / ModelSettings().dwpose_weights)


def test_center_scale_is_mmpose_whole_frame_box() -> None:
    center, scale = center_scale((0.0, 0.0, 1280.0, 720.0))
    np.testing.assert_allclose(center, (640.0, 360.0))
    np.testing.assert_allclose(scale, (1600.0, 1600.0 / 0.75), rtol=1e-6)  # 1.25 x, then 288:384
    _, tall = center_scale((100.0, 50.0, 200.0, 450.0))
    np.testing.assert_allclose(tall, (375.0, 500.0))  # height-bound: width widened to 3/4 of it


def test_affine_round_trips_within_half_a_pixel() -> None:
    center, scale = center_scale((0.0, 0.0, 1280.0, 720.0))
    forward, back = warp_matrix(center, scale), warp_matrix(center, scale, inverse=True)
    np.testing.assert_allclose(forward @ (*center, 1.0), (144.0, 192.0), atol=1e-3)  # centre -> input centre
    points = np.random.default_rng(0).uniform((-100, -100), (1380, 820), (200, 2))
    inside = np.c_[points, np.ones(len(points))] @ forward.T
    again = np.c_[inside, np.ones(len(inside))] @ back.T
    assert np.abs(again - points).max() < 0.5
    # The decoder's closed form is the same inverse.
    np.testing.assert_allclose(inside / (288, 384) * scale + center - 0.5 * scale, points, atol=0.5)


def test_simcc_decoding_finds_the_constructed_peak() -> None:
    simcc_x = np.full((3, 576), -1.0, dtype=np.float32)
    simcc_y = np.full((3, 768), -1.0, dtype=np.float32)
    simcc_x[0, 301], simcc_y[0, 499] = 0.9, 0.6  # keypoint 0: score is the smaller maximum
    simcc_x[1, 10], simcc_y[1, 20] = 0.4, 0.8
    locs, scores = simcc_maximum(simcc_x, simcc_y)  # keypoint 2 never rises above 0
    np.testing.assert_array_equal(locs, [[301, 499], [10, 20], [-1, -1]])
    np.testing.assert_allclose(scores, [0.6, 0.4, -1.0])
    center, scale = np.array([640.0, 360.0], np.float32), np.array([1600.0, 1600 / 0.75], np.float32)
    points, _ = decode(simcc_x, simcc_y, center, scale)
    # bin / 2 is the input pixel; input pixel -> frame: / (288, 384) * scale + centre - scale / 2
    np.testing.assert_allclose(points[0], (150.5 / 288 * 1600 - 160, 249.5 / 384 * scale[1] + 360 - scale[1] / 2),
                               rtol=1e-6)


def test_flip_indices_are_coco_wholebody() -> None:
    assert list(FLIP_INDICES) == MMPOSE_FLIP_INDICES
    assert all(FLIP_INDICES[FLIP_INDICES[i]] == i for i in range(133))


def test_config_selects_the_backend(tmp_path: Path) -> None:
    settings = Settings(avatar={"face_backend": "dwpose"},
                        models={"models_dir": tmp_path, "dwpose_weights": "pose/other.pth", "device": "cpu"})
    detector = make_detector(settings.avatar.face_backend, models=settings.models)
    assert isinstance(detector, DWPoseDetector) and detector.weights == tmp_path / "pose" / "other.pth"
    with pytest.raises(ValueError):
        Settings(avatar={"face_backend": "openpose"})


@pytest.mark.slow  # a whole prep of one photo (lite renderer): ~13 s here
def test_prep_runs_the_backend_chosen_in_the_config(saved: tuple[Path, dict[str, torch.Tensor]],
                                                     tmp_path: Path, face_bgr: np.ndarray) -> None:
    import cv2

    from musetalk_warm.avatars.prep import face_box, with_margin

    root, _ = saved
    image = tmp_path / "portrait.png"
    cv2.imwrite(str(image), face_bgr)
    settings = Settings(avatar={"cache_dir": tmp_path / "c", "video_path": image, "avatar_id": "p",
                                "face_backend": "dwpose"},
                        models={"models_dir": root, "device": "cpu", "renderer": "lite"})
    avatar = prepare_avatar(settings, progress=False)
    assert avatar.manifest["params"]["face_backend"] == "dwpose"
    found = DWPoseDetector(root / ModelSettings().dwpose_weights).detect(face_bgr)
    assert found is not None
    box, _ = face_box(found.landmarks, found.box)
    assert tuple(avatar.boxes[0]) == with_margin(box, 10, face_bgr.shape[0])


def test_matches_mmpose_inference_topdown(tmp_path: Path, face_bgr: np.ndarray) -> None:
    """Against mmpose 1.3.2's ``inference_topdown`` with upstream's config (scripts/dwpose_reference.py)."""
    reference = np.load(Path(__file__).parent / "data" / "dwpose_mmpose_reference.npz")
    detector = DWPoseDetector(write_checkpoint(tmp_path, seeded_state()))
    for name, frame in reference_frames(face_bgr).items():
        points, scores = detector.keypoints(frame)
        expected = reference[f"{name}_keypoints"]
        # Bit-equal here; elsewhere a near-tie of two SimCC bins may move a point by one bin.
        one_bin = np.abs(points - expected).max(axis=1) <= 1e-3 + 0.5 * 2133.4 / 384
        assert one_bin.all() and (points == expected).all(axis=1).mean() >= 0.98
        np.testing.assert_allclose(scores, reference[f"{name}_scores"], rtol=1e-4)

"""The face_alignment backend (S3FD + FAN) on random-init checkpoints in the official key layout."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from musetalk_warm.avatars.fan import FAN_WEIGHTS, S3FD_WEIGHTS, FaceAlignmentDetector
from musetalk_warm.avatars.landmarks import make_detector
from musetalk_warm.avatars.prep import prepare_avatar
from musetalk_warm.config import ModelSettings, Settings
from musetalk_warm.errors import DependencyMissing, WeightsMissing

# S3FD's score heads, finest (stride 4) to coarsest (stride 128); conv3_3 has 3 background
# channels (max-out) and the face channel last.
S3FD_HEADS = ("conv3_3", "conv4_3", "conv5_3", "fc7", "conv6_2", "conv7_2")


def s3fd_state(firing: str = "conv7_2") -> dict[str, torch.Tensor]:
    """A random-init S3FD state dict whose only face scores come from the ``firing`` head.

    Left random, S3FD calls thousands of boxes faces and FAN (seconds a face on this
    CPU) would run on each; with the score heads set to constant biases the
    ``firing`` head's anchors are the only faces (conv7_2's overlap: one is left after NMS).
    """
    from face_alignment.detection.sfd.net_s3fd import s3fd

    state = s3fd().state_dict()
    for head in S3FD_HEADS:
        prefix = f"{head}_norm_mbox" if head.startswith(("conv3", "conv4", "conv5")) else f"{head}_mbox"
        state[f"{prefix}_conf.weight"].zero_()
        state[f"{prefix}_conf.bias"].zero_()
        state[f"{prefix}_conf.bias"][-1] = 12.0 if head == firing else -12.0  # the face logit
        state[f"{prefix}_loc.weight"].zero_()  # boxes are the anchors themselves
        state[f"{prefix}_loc.bias"].zero_()
    return state


def write_checkpoints(root: Path, s3fd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The two checkpoints under ``root/face-alignment`` as face-alignment names them; the FAN state."""
    from face_alignment.models import FAN

    folder = root / ModelSettings().face_alignment_dir
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    fan = FAN(4).state_dict()
    torch.save(s3fd, folder / S3FD_WEIGHTS)
    torch.save(fan, folder / FAN_WEIGHTS)
    return fan


@pytest.mark.slow  # one FAN forward and numba's compile of face-alignment's heatmap decoding: ~1 min here
def test_random_checkpoints_load_through_the_real_loader_and_run(tmp_path: Path, face_bgr: np.ndarray) -> None:
    torch.manual_seed(1)
    s3fd = s3fd_state()
    fan = write_checkpoints(tmp_path, s3fd)
    detector = make_detector("face_alignment", models=ModelSettings(models_dir=tmp_path, device="cpu"))
    assert isinstance(detector, FaceAlignmentDetector) and detector.name == "face_alignment"
    photo = cv2.resize(face_bgr, (128, 128), interpolation=cv2.INTER_AREA)
    found = detector.detect(photo)
    model = detector._model
    for loaded, saved in ((model.face_alignment_net.state_dict(), fan),
                          (model.face_detector.face_detector.state_dict(), s3fd)):
        assert loaded.keys() == saved.keys()
        assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    # Random weights: garbage points, but one face (the fired anchor) in frame pixels.
    assert found is not None
    assert found.landmarks.shape == (68, 2) and found.landmarks.dtype == np.float32
    assert np.isfinite(found.landmarks).all()
    x1, y1, x2, y2 = found.box
    # A conv7_2 anchor: 4 strides (512 px) wide, centred on a cell of its 128 px grid.
    assert (x2 - x1, y2 - y1) == pytest.approx((512.0, 512.0))
    assert ((x1 + x2) / 2 - 64) % 128 == pytest.approx(0.0) and ((y1 + y2) / 2 - 64) % 128 == pytest.approx(0.0)
    detector.close()


def test_no_face_scores_give_none(tmp_path: Path, face_bgr: np.ndarray) -> None:
    write_checkpoints(tmp_path, s3fd_state(firing="none"))
    detector = make_detector("face_alignment", models=ModelSettings(models_dir=tmp_path, device="cpu"))
    assert detector.detect(cv2.resize(face_bgr, (128, 128))) is None


@pytest.mark.parametrize(("backend", "named"), [
    ("face_alignment", [f"face-alignment/{S3FD_WEIGHTS}", f"face-alignment/{FAN_WEIGHTS}"]),
    ("dwpose", ["dwpose/dw-ll_ucoco_384.pth", "scripts/download_weights.py"]),
])
def test_missing_weights_are_named(backend: str, named: list[str], tmp_path: Path, face_bgr: np.ndarray) -> None:
    # Chosen in the config, the backend is what prep runs, and it says what is missing.
    image = tmp_path / "portrait.png"
    cv2.imwrite(str(image), face_bgr)
    settings = Settings(avatar={"cache_dir": tmp_path / "c", "video_path": image, "avatar_id": "p",
                                "face_backend": backend},
                        models={"models_dir": tmp_path / "models", "device": "cpu"})
    with pytest.raises(WeightsMissing) as err:
        prepare_avatar(settings, progress=False)
    message = str(err.value)
    assert all(name in message for name in named), message
    assert str(tmp_path) not in message and err.value.status_code == 503


def test_missing_package_names_the_extra(tmp_path: Path, face_bgr: np.ndarray,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "face_alignment", None)  # as if not installed
    with pytest.raises(DependencyMissing) as err:
        FaceAlignmentDetector(tmp_path).detect(face_bgr)
    assert "musetalk-warm[faces]" in str(err.value)

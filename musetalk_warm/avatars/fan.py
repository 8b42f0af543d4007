"""The ``face_alignment`` face backend: S3FD detector + 2D FAN, native iBUG-68 points.

The seed's force prep ran this pair. It is an optional extra
(``pip install 'musetalk-warm[faces]'``, face-alignment 1.5.0) and reads its two
official checkpoints from ``models/<models.face_alignment_dir>/`` under the
names face-alignment itself downloads them as; nothing is fetched at run time.
The package is imported, and the weights loaded, on the first frame.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import DependencyMissing, WeightsMissing
from .landmarks import Detection

# face-alignment 1.5.0's checkpoint names (the basenames of its download URLs).
S3FD_WEIGHTS = "s3fd-619a316812.pth"
FAN_WEIGHTS = "2DFAN4-11f355bf06.pth.tar"


def load_face_alignment(weights_dir: Path, device: str) -> Any:
    """A ``face_alignment.FaceAlignment`` (2D, large FAN, S3FD) built from the local checkpoints.

    Raises :class:`DependencyMissing` without the package and :class:`WeightsMissing`
    naming the files that are absent.
    """
    try:
        import face_alignment
    except ImportError as exc:
        raise DependencyMissing(
            "the face_alignment face backend is not installed",
            hint="pip install 'musetalk-warm[faces]', or set avatar.face_backend: mediapipe",
        ) from exc
    import torch

    missing = [name for name in (S3FD_WEIGHTS, FAN_WEIGHTS) if not (weights_dir / name).is_file()]
    if missing:
        raise WeightsMissing(
            f"face_alignment weights {', '.join(f'{weights_dir.name}/{name}' for name in missing)} not found",
            hint="fetch them with scripts/download_weights.py --with-face-alignment, "
            "or set avatar.face_backend: mediapipe",
        )

    class LocalFaceAlignment(face_alignment.FaceAlignment):  # type: ignore[misc, name-defined]
        """FaceAlignment whose FAN comes from the local checkpoint instead of its download URL."""

        def _load_native(self, network_name: str, network_size: int, device: str, dtype: Any) -> Any:
            net = face_alignment.models.FAN(network_size)
            state = torch.load(weights_dir / FAN_WEIGHTS, map_location=device, weights_only=True)
            net.load_state_dict(state)
            return net.to(device, dtype=dtype).eval()

    return LocalFaceAlignment(
        face_alignment.LandmarksType.TWO_D,
        device=device,
        flip_input=False,
        face_detector="sfd",
        face_detector_kwargs={"path_to_detector": str(weights_dir / S3FD_WEIGHTS)},
        # torch.compile costs minutes per start and caches outside the models directory.
        compile=False,
    )


class FaceAlignmentDetector:
    """S3FD + 2D FAN (native iBUG-68) on the largest face of each frame."""

    name = "face_alignment"

    def __init__(self, weights_dir: Path, device: str = "cpu") -> None:
        self.weights_dir = weights_dir
        self.device = device
        self._model: Any = None

    def detect(self, frame_bgr: np.ndarray) -> Detection | None:
        """Landmarks of the largest face in ``frame_bgr``."""
        if self._model is None:
            self._model = load_face_alignment(self.weights_dir, self.device)
        rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No faces were detected")
            landmarks, _, boxes = self._model.get_landmarks_from_image(rgb, return_bboxes=True)
        if not landmarks:
            return None
        spans = [np.ptp(lm[:, 0]) * np.ptp(lm[:, 1]) for lm in landmarks]
        best = int(np.argmax(spans))
        x1, y1, x2, y2 = (float(v) for v in boxes[best][:4])
        return Detection(landmarks=np.asarray(landmarks[best][:, :2], dtype=np.float32), box=(x1, y1, x2, y2))

    def close(self) -> None:
        """Drop the networks."""
        self._model = None

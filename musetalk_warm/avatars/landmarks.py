"""Face detection and 68-point landmarks in iBUG-300W order.

The default backend is mediapipe FaceMesh (its tflite models ship inside the
wheel, so it works offline); its 478 mesh points are mapped onto the 68 iBUG
positions by :data:`MEDIAPIPE_TO_IBUG68`. ``face_alignment`` is an optional
backend for users who have it installed (it downloads its S3FD detector and
FAN weights on first use). Nothing is loaded at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import cv2
import numpy as np

from ..errors import DependencyMissing

# FaceMesh index for each iBUG-68 point. Frame left/right as seen in the image
# (iBUG point 0 is on the image's left, i.e. the subject's right side).
# Jaw 0..16: the face-oval points at equal arc length from eye level (127/356)
# down to the chin (152), 8 steps a side.
# Brows 17..26: upper brow edge, outer -> inner, then inner -> outer.
# Nose 27..30: the midline from between the eyes (168) to the tip (4), spaced
# in thirds so 29 (the v1.5 box centre) sits on the lower bridge as in iBUG;
# 31..35: the nostril base, left wing -> subnasale (2) -> right wing.
# Eyes 36..47: each eye clockwise from its outer (36) / inner (42) corner,
# lids at 3/8 and 5/8 of the FaceMesh lid contour.
# Mouth 48..59: outer lip clockwise from the left corner (61); 60..67: inner lip.
MEDIAPIPE_TO_IBUG68: tuple[int, ...] = (
    # jaw 0-16
    127, 234, 132, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 361, 454, 356,
    # brows 17-21, 22-26
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    # nose bridge 27-30, nostril base 31-35
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    # eyes 36-41, 42-47
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    # outer lip 48-59
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    # inner lip 60-67
    78, 81, 13, 311, 308, 402, 14, 178,
)

Backend = Literal["mediapipe", "face_alignment"]


@dataclass(frozen=True)
class Detection:
    """One face: ``landmarks`` ``[68,2]`` float32 iBUG-68 points in frame pixels;
    ``box`` the detector's ``(x1, y1, x2, y2)`` face box (the fallback box)."""

    landmarks: np.ndarray
    box: tuple[float, float, float, float]


class LandmarkDetector(Protocol):
    """Finds the main face of a BGR uint8 frame, or returns ``None``."""

    name: str

    def detect(self, frame_bgr: np.ndarray) -> Detection | None: ...


class MediapipeDetector:
    """mediapipe FaceMesh mapped to iBUG-68.

    ``video=True`` tracks the face across consecutive frames (smoother points,
    no re-detection per frame); use one detector per video. ``video=False``
    treats every frame as an unrelated photo.
    """

    name = "mediapipe"

    def __init__(self, *, video: bool = True, min_confidence: float = 0.5) -> None:
        self.video = video
        self.min_confidence = min_confidence
        self._mesh: Any = None

    def _face_mesh(self) -> Any:
        if self._mesh is None:
            from mediapipe.python.solutions import face_mesh

            self._mesh = face_mesh.FaceMesh(
                static_image_mode=not self.video,
                max_num_faces=1,
                # Refined lips and eyes give better mouth corners for the box and mask.
                refine_landmarks=True,
                min_detection_confidence=self.min_confidence,
                min_tracking_confidence=self.min_confidence,
            )
        return self._mesh

    def detect(self, frame_bgr: np.ndarray) -> Detection | None:
        """Landmarks of the most prominent face in ``frame_bgr``."""
        height, width = frame_bgr.shape[:2]
        rgb = np.ascontiguousarray(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB))
        result = self._face_mesh().process(rgb)
        if not result.multi_face_landmarks:
            return None
        mesh = result.multi_face_landmarks[0].landmark
        points = np.array([(p.x * width, p.y * height) for p in mesh], dtype=np.float32)
        x1, y1 = points.min(axis=0)
        x2, y2 = points.max(axis=0)
        return Detection(
            landmarks=points[list(MEDIAPIPE_TO_IBUG68)],
            box=(float(x1), float(y1), float(x2), float(y2)),
        )

    def close(self) -> None:
        """Free the FaceMesh graph."""
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None


class FaceAlignmentDetector:
    """The ``face_alignment`` package (S3FD detector + 2D FAN, native iBUG-68)."""

    name = "face_alignment"

    def __init__(self, device: str | None = None) -> None:
        self.device = device
        self._model: Any = None

    def _fan(self) -> Any:
        if self._model is None:
            try:
                import face_alignment
            except ImportError as exc:
                raise DependencyMissing(
                    "the face_alignment landmark backend is not installed",
                    hint="pip install face-alignment (it downloads its detector "
                    "weights on first use), or set avatar.landmark_backend: mediapipe",
                ) from exc
            import torch

            types = face_alignment.LandmarksType
            two_d = getattr(types, "TWO_D", None) or getattr(types, "_2D")
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._model = face_alignment.FaceAlignment(two_d, device=device, flip_input=False)
        return self._model

    def detect(self, frame_bgr: np.ndarray) -> Detection | None:
        """Landmarks of the largest face in ``frame_bgr``."""
        rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
        found = self._fan().get_landmarks_from_image(rgb, return_bboxes=True)
        landmarks, _, boxes = found if isinstance(found, tuple) else (found, None, None)
        if not landmarks:
            return None
        spans = [np.ptp(lm[:, 0]) * np.ptp(lm[:, 1]) for lm in landmarks]
        best = int(np.argmax(spans))
        points = np.asarray(landmarks[best][:, :2], dtype=np.float32)
        if boxes is not None and len(boxes) > best:
            x1, y1, x2, y2 = (float(v) for v in boxes[best][:4])
        else:
            (x1, y1), (x2, y2) = points.min(axis=0), points.max(axis=0)
        return Detection(landmarks=points, box=(float(x1), float(y1), float(x2), float(y2)))

    def close(self) -> None:
        """Drop the networks."""
        self._model = None


def make_detector(
    backend: Backend = "mediapipe", *, video: bool = True
) -> MediapipeDetector | FaceAlignmentDetector:
    """A detector for ``backend``; ``video`` enables frame-to-frame tracking where supported."""
    if backend == "mediapipe":
        return MediapipeDetector(video=video)
    if backend == "face_alignment":
        return FaceAlignmentDetector()
    raise ValueError(f"unknown landmark backend {backend!r}")


def detect_landmarks(frame_bgr: np.ndarray, backend: Backend = "mediapipe") -> np.ndarray | None:
    """``[68,2]`` float32 iBUG-68 landmarks of one photo, or ``None`` without a face."""
    detector = make_detector(backend, video=False)
    try:
        found = detector.detect(frame_bgr)
    finally:
        detector.close()
    return None if found is None else found.landmarks

"""Face detection and 68-point landmarks in iBUG-300W order.

The default backend is mediapipe FaceMesh (its tflite models ship inside the
wheel, so it works offline); its 478 mesh points are mapped onto the 68 iBUG
positions by :data:`MEDIAPIPE_TO_IBUG68`. Faces too small for FaceMesh's own
detector (wide and full-body shots) are found with mediapipe's full-range
detector and their landmarks taken on an enlarged window. ``face_alignment``
(S3FD + FAN, :mod:`musetalk_warm.avatars.fan`) and ``dwpose`` (upstream's DWPose
whole-body model in plain torch, :mod:`musetalk_warm.avatars.dwpose`) are optional backends.
Nothing is loaded at import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from ..config import FaceBackend, ModelSettings

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


@dataclass(frozen=True)
class Detection:
    """One face: ``landmarks`` ``[68,2]`` float32 iBUG-68 points in frame pixels;
    ``box`` the detector's ``(x1, y1, x2, y2)`` face box (the fallback box)."""

    landmarks: np.ndarray
    box: tuple[float, float, float, float]


class LandmarkDetector(Protocol):
    """Finds the main face of a BGR uint8 frame, or returns ``None``; ``close`` frees it."""

    name: str

    def detect(self, frame_bgr: np.ndarray) -> Detection | None: ...

    def close(self) -> None: ...


# FaceMesh finds faces with its short-range detector, which misses faces under about a
# tenth of the frame's width (a 100 px face in 1280x720). Those are searched with the
# full-range detector on square tiles, then FaceMesh runs on an enlarged window around them.
_SEARCH_TILE = 720  # px: the full-range detector is reliable down to faces ~10 % of its input
_SEARCH_OVERLAP = 0.25  # of a tile: a face narrower than this is whole in some tile
_WINDOW_SCALE = 3.0  # window side / face side: room to move, and the face a third of it
_WINDOW_SIDE = 384  # px: windows smaller than this are enlarged to it, never shrunk


@dataclass(frozen=True)
class _Window:
    """A square ``side`` px region at ``(x0, y0)`` of a frame (it may reach past the edges)."""

    x0: float
    y0: float
    side: float

    @classmethod
    def around(cls, box: tuple[float, float, float, float]) -> "_Window":
        x1, y1, x2, y2 = box
        side = _WINDOW_SCALE * max(x2 - x1, y2 - y1)
        return cls((x1 + x2 - side) / 2, (y1 + y2 - side) / 2, side)

    @property
    def scale(self) -> float:
        return max(1.0, _WINDOW_SIDE / self.side)

    def cut(self, frame_bgr: np.ndarray) -> np.ndarray:
        """The window as an image, black past the frame's edges."""
        s = self.scale
        size = round(self.side * s)
        matrix = np.array([[s, 0.0, -self.x0 * s], [0.0, s, -self.y0 * s]])
        return cv2.warpAffine(frame_bgr, matrix, (size, size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT)

    def holds(self, box: tuple[float, float, float, float]) -> bool:
        """Whether a face ``box`` still sits well inside, at about the size the window was made for."""
        x1, y1, x2, y2 = box
        margin = self.side / 8
        inside = (x1 > self.x0 + margin and y1 > self.y0 + margin
                  and x2 < self.x0 + self.side - margin and y2 < self.y0 + self.side - margin)
        return inside and self.side / 5 < max(x2 - x1, y2 - y1) < self.side / 2


def _tile_starts(length: int, tile: int) -> list[int]:
    """Evenly spaced starts of ``tile``-long tiles covering ``length`` with at least the overlap."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile * (1 - _SEARCH_OVERLAP))) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


class MediapipeDetector:
    """mediapipe FaceMesh mapped to iBUG-68, small faces included.

    ``video=True`` tracks the face across consecutive frames (smoother points,
    no re-detection per frame); use one detector per video. ``video=False``
    treats every frame as an unrelated photo. A face FaceMesh does not find in
    the whole frame is searched with the full-range detector and its landmarks
    taken on an enlarged window around it, mapped back to frame pixels; in a
    video the window stays put (and the face tracked in it) while the face
    stays well inside.
    """

    name = "mediapipe"

    def __init__(self, *, video: bool = True, min_confidence: float = 0.5) -> None:
        self.video = video
        self.min_confidence = min_confidence
        self._mesh: Any = None
        self._window_mesh: Any = None
        self._window_mesh_for: _Window | None = None
        self._finder: Any = None
        self._window: _Window | None = None

    def _new_mesh(self) -> Any:
        from mediapipe.python.solutions import face_mesh

        return face_mesh.FaceMesh(
            static_image_mode=not self.video,
            max_num_faces=1,
            # Refined lips and eyes give better mouth corners for the box and mask.
            refine_landmarks=True,
            min_detection_confidence=self.min_confidence,
            min_tracking_confidence=self.min_confidence,
        )

    def detect(self, frame_bgr: np.ndarray) -> Detection | None:
        """Landmarks of the most prominent face in ``frame_bgr``."""
        if self._window is None:
            if self._mesh is None:
                self._mesh = self._new_mesh()
            found = _mesh_points(self._mesh, frame_bgr, 1.0, (0.0, 0.0))
            if found is not None:
                return found
        found = self._in_window(frame_bgr) if self._window is not None else None
        if found is None:
            self._window = self._search(frame_bgr)
            found = self._in_window(frame_bgr) if self._window is not None else None
        if found is None or not self.video:
            self._window = None
        elif not self._window.holds(found.box):
            self._window = _Window.around(found.box)
        return found

    def _in_window(self, frame_bgr: np.ndarray) -> Detection | None:
        window = self._window
        assert window is not None
        if self._window_mesh is not None and self._window_mesh_for is not window:
            # A moved window moves the face in it: tracking starts afresh.
            self._window_mesh.close()
            self._window_mesh = None
        if self._window_mesh is None:
            self._window_mesh, self._window_mesh_for = self._new_mesh(), window
        return _mesh_points(self._window_mesh, window.cut(frame_bgr), window.scale, (window.x0, window.y0))

    def _search(self, frame_bgr: np.ndarray) -> _Window | None:
        """A window around the largest face the full-range detector finds on overlapping tiles."""
        if self._finder is None:
            from mediapipe.python.solutions import face_detection

            self._finder = face_detection.FaceDetection(
                model_selection=1, min_detection_confidence=self.min_confidence
            )
        height, width = frame_bgr.shape[:2]
        tile = min(height, width, _SEARCH_TILE)
        boxes = []
        for y0 in _tile_starts(height, tile):
            for x0 in _tile_starts(width, tile):
                part = cv2.cvtColor(frame_bgr[y0 : y0 + tile, x0 : x0 + tile], cv2.COLOR_BGR2RGB)
                for found in self._finder.process(np.ascontiguousarray(part)).detections or ():
                    rel = found.location_data.relative_bounding_box
                    x1, y1 = x0 + rel.xmin * tile, y0 + rel.ymin * tile
                    boxes.append((x1, y1, x1 + rel.width * tile, y1 + rel.height * tile))
        if not boxes:
            return None
        return _Window.around(max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])))

    def close(self) -> None:
        """Free the mediapipe graphs."""
        for graph in (self._mesh, self._window_mesh, self._finder):
            if graph is not None:
                graph.close()
        self._mesh = self._window_mesh = self._finder = None
        self._window = None


def _mesh_points(mesh: Any, image_bgr: np.ndarray, scale: float, origin: tuple[float, float]) -> Detection | None:
    """FaceMesh on ``image_bgr`` (a frame, or a window of one at ``origin`` seen at ``scale``), in frame pixels."""
    height, width = image_bgr.shape[:2]
    result = mesh.process(np.ascontiguousarray(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)))
    if not result.multi_face_landmarks:
        return None
    mesh_points = result.multi_face_landmarks[0].landmark
    points = np.array([(p.x * width, p.y * height) for p in mesh_points], dtype=np.float32)
    points = points / scale + np.asarray(origin, dtype=np.float32)
    x1, y1 = points.min(axis=0)
    x2, y2 = points.max(axis=0)
    return Detection(
        landmarks=points[list(MEDIAPIPE_TO_IBUG68)],
        box=(float(x1), float(y1), float(x2), float(y2)),
    )


def make_detector(backend: FaceBackend = "mediapipe", *, video: bool = True,
                  models: ModelSettings | None = None) -> LandmarkDetector:
    """A detector for ``backend``; ``video`` enables frame-to-frame tracking where supported.

    ``models`` says where weights live and on which device to run (defaults when omitted).
    """
    if backend == "mediapipe":
        return MediapipeDetector(video=video)
    if backend == "face_alignment":
        from ..models.musetalk import resolve_device
        from .fan import FaceAlignmentDetector

        models = models or ModelSettings()
        return FaceAlignmentDetector(models.path(models.face_alignment_dir), str(resolve_device(models.device)))
    if backend == "dwpose":
        from ..models.musetalk import resolve_device
        from .dwpose import DWPoseDetector

        models = models or ModelSettings()
        return DWPoseDetector(models.path(models.dwpose_weights), str(resolve_device(models.device)))
    raise ValueError(f"unknown face backend {backend!r}")


def detect_landmarks(frame_bgr: np.ndarray, backend: FaceBackend = "mediapipe",
                     models: ModelSettings | None = None) -> np.ndarray | None:
    """``[68,2]`` float32 iBUG-68 landmarks of one photo, or ``None`` without a face."""
    detector = make_detector(backend, video=False, models=models)
    try:
        found = detector.detect(frame_bgr)
    finally:
        detector.close()
    return None if found is None else found.landmarks

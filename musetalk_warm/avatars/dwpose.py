"""The ``dwpose`` face backend: upstream's DWPose whole-body landmarks without mmcv/mmpose.

Upstream (``musetalk/utils/preprocessing.py``) calls ``inference_topdown(model, frame)``
with no boxes, so the whole frame is the person box, and takes the 68 face points
``keypoints[0][23:91]``. This module runs the same top-down pipeline on the
plain-torch port of the network (:mod:`.dwpose_net`), loaded strictly from the
official ``models/dwpose/dw-ll_ucoco_384.pth``:

1. box -> centre and scale, scale x 1.25 (``GetBBoxCenterScale``), widened or
   heightened to 288:384 (``TopdownAffine``);
2. mmpose's ``get_warp_matrix`` (three points, ``cv2.getAffineTransform`` in
   float32), ``cv2.warpAffine`` bilinear to 288x384 on the BGR frame, black outside;
3. BGR -> RGB, ``(x - mean) / std``;
4. the network on the input and on its horizontal mirror (the config's
   ``flip_test=True``): the mirror's logits have their keypoints swapped by the
   COCO-WholeBody flip indices and their x-bins reversed, then both are averaged;
5. SimCC decoding (``get_simcc_maximum``): argmax over 576 x-bins and 768 y-bins,
   divided by the split ratio 2; the score is the *smaller* of the two maxima and
   a point whose score is <= 0 gets location -1;
6. back to frame pixels: ``p / input_size * scale + centre - scale / 2``.

Upstream also runs S3FD, but only to decide that a frame has no face and as a
fallback box when the landmark box is degenerate. This backend does not: a frame
has a face when the mean score of the 68 face points reaches ``min_face_score``,
and the fallback box is the face points' bounding box (see docs/NUMERICS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import WeightsMissing
from .dwpose_net import INPUT_SIZE, SPLIT_RATIO, DWPoseNet
from .landmarks import Detection

DWPOSE_WEIGHTS = "dwpose/dw-ll_ucoco_384.pth"
MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)  # RGB
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
BBOX_PADDING = 1.25
FACE = slice(23, 91)  # the 68 iBUG points inside the 133 COCO-WholeBody keypoints


def _ibug_mirror(i: int) -> int:
    """The iBUG-68 point that ``i`` becomes in the mirrored face."""
    eyes = {36: 45, 37: 44, 38: 43, 39: 42, 40: 47, 41: 46}
    eyes.update({v: k for k, v in eyes.items()})
    for lo, hi in ((0, 16), (17, 26), (31, 35), (48, 54), (55, 59), (60, 64), (65, 67)):
        if lo <= i <= hi:
            return lo + hi - i
    return eyes.get(i, i)  # the nose bridge 27..30 stays


def _flip_indices() -> tuple[int, ...]:
    """COCO-WholeBody's left/right swap: body, feet, face, then the two hands."""
    body = [0] + [i + 1 if i % 2 else i - 1 for i in range(1, 17)]
    feet = [20, 21, 22, 17, 18, 19]
    face = [23 + _ibug_mirror(i) for i in range(68)]
    hands = list(range(112, 133)) + list(range(91, 112))
    return tuple(body + feet + face + hands)


FLIP_INDICES = _flip_indices()


class _Inert:
    """Stands in for every non-torch object pickled beside the weights (mmengine's
    message hub, numpy arrays in the dataset metadata): built from nothing, never used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Takes whatever the pickle passes and keeps none of it."""

    def __setstate__(self, state: Any) -> None:
        """Drops the pickled state: nothing of it is read."""


def read_state_dict(path: Path) -> dict[str, Any]:
    """The network's tensors from an mmpose checkpoint, read with ``weights_only``.

    mmengine saves ``{'meta', 'state_dict', 'message_hub', 'optimizer', ...}``; the
    official 406.9 MB are about three times the 134.6 MB of weights, as with the
    AdamW moments left in. Only ``state_dict`` is kept, and only it is read (the
    file is memory-mapped). The other entries hold objects ``weights_only``
    refuses (numpy arrays, mmengine's buffers): each global the file names is
    allowed only as :class:`_Inert`, so no pickled code runs. A ``module.`` prefix
    is dropped as mmengine does; a distillation checkpoint gives its ``student.``.
    """
    import torch

    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    with torch.serialization.safe_globals([(_Inert, name) for name in unsafe]):
        # mmap: the optimizer's moments (two thirds of the file) are never read.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict):
        raise ValueError(f"{path.name} holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("student.") for k in state):
        state = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    return state


def load_dwpose(path: Path, device: str = "cpu") -> DWPoseNet:
    """The network with the checkpoint at ``path`` loaded strictly, in eval mode.

    Raises :class:`WeightsMissing` naming ``dwpose/dw-ll_ucoco_384.pth`` when absent.
    """
    if not path.is_file():
        raise WeightsMissing(
            f"DWPose weights {path.parent.name}/{path.name} not found",
            hint="fetch them with scripts/download_weights.py, or set avatar.face_backend: mediapipe",
        )
    net = DWPoseNet()
    net.load_state_dict(read_state_dict(path), strict=True)
    return net.to(device).eval()


def center_scale(box: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """mmpose's box centre and padded scale, with the scale fixed to the input's 288:384."""
    x1, y1, x2, y2 = box
    center = np.array([(x1 + x2) * 0.5, (y1 + y2) * 0.5], dtype=np.float32)
    w, h = (x2 - x1) * BBOX_PADDING, (y2 - y1) * BBOX_PADDING
    aspect = INPUT_SIZE[0] / INPUT_SIZE[1]
    scale = np.array([w, w / aspect] if w > h * aspect else [h * aspect, h], dtype=np.float32)
    return center, scale


def warp_matrix(center: np.ndarray, scale: np.ndarray, inverse: bool = False) -> np.ndarray:
    """The 2x3 affine from frame pixels to the 288x384 input (no rotation), as mmpose builds it."""
    out_w, out_h = INPUT_SIZE

    def third(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = a - b  # a - b turned 90 degrees anticlockwise about b
        return b + np.array([-d[1], d[0]], dtype=np.float32)

    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = center
    src[1] = center + np.array([scale[0] * -0.5, 0.0], dtype=np.float32)
    dst[0] = (out_w * 0.5, out_h * 0.5)
    dst[1] = (0.0, out_h * 0.5)
    src[2], dst[2] = third(src[0], src[1]), third(dst[0], dst[1])
    return cv2.getAffineTransform(dst, src) if inverse else cv2.getAffineTransform(src, dst)


def network_input(frame_bgr: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``[3,384,288]`` float32: the warped box, RGB, normalised."""
    warped = cv2.warpAffine(frame_bgr, warp_matrix(center, scale), INPUT_SIZE, flags=cv2.INTER_LINEAR)
    rgb = warped[:, :, ::-1].astype(np.float32)
    return np.ascontiguousarray(((rgb - MEAN) / STD).transpose(2, 0, 1))


def simcc_maximum(simcc_x: np.ndarray, simcc_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bins ``[K,2]`` (float32) of each keypoint's x and y maxima and scores ``[K]``.

    The score is the smaller maximum; keypoints scoring <= 0 get bin -1 (mmpose).
    """
    locs = np.stack((simcc_x.argmax(axis=1), simcc_y.argmax(axis=1)), axis=-1).astype(np.float32)
    scores = np.minimum(simcc_x.max(axis=1), simcc_y.max(axis=1))
    locs[scores <= 0.0] = -1
    return locs, scores


def decode(simcc_x: np.ndarray, simcc_y: np.ndarray, center: np.ndarray,
           scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints ``[K,2]`` in frame pixels and their scores from SimCC logits.

    As mmpose: float32 bins / 2, mapped in float64, stored as float32 (upstream then
    truncates to int32, so the float32 rounding decides points on integer pixels).
    """
    locs, scores = simcc_maximum(simcc_x, simcc_y)
    in_input = locs / np.float32(SPLIT_RATIO)
    points = in_input / np.array(INPUT_SIZE) * scale + center - 0.5 * scale
    return points.astype(np.float32), scores


class DWPoseDetector:
    """DWPose whole-body keypoints on the whole frame; the 68 face points as iBUG-68."""

    name = "dwpose"

    def __init__(self, weights: Path, device: str = "cpu", *, flip_test: bool = True,
                 min_face_score: float = 0.3) -> None:
        self.weights = weights
        self.device = device
        self.flip_test = flip_test
        self.min_face_score = min_face_score
        # Prep hands a GPU frames in batches (one network call for 16); on a CPU a batch measured
        # slower than frame by frame (3 against 5.8 frames/s at 1280x720, 2 cores).
        self.batch_frames = 16 if str(device).startswith("cuda") else 1
        self._net: DWPoseNet | None = None

    def keypoints(self, frame_bgr: np.ndarray,
                  box: tuple[float, float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All 133 keypoints ``[133,2]`` (frame pixels, float32) and scores ``[133]`` in ``box``
        (default: the whole frame, as upstream)."""
        return self.keypoints_many([frame_bgr], [box])[0]

    def keypoints_many(self, frames_bgr: Sequence[np.ndarray],
                       boxes: Sequence[tuple[float, float, float, float] | None] | None = None,
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`keypoints` of several frames in one network call (each frame's own warp)."""
        import torch

        if self._net is None:
            self._net = load_dwpose(self.weights, self.device)
        warps = []
        for frame, box in zip(frames_bgr, boxes or [None] * len(frames_bgr), strict=True):
            height, width = frame.shape[:2]
            warps.append(center_scale(box or (0.0, 0.0, float(width), float(height))))
        x = torch.from_numpy(np.stack([network_input(f, c, s) for f, (c, s) in zip(frames_bgr, warps)]))
        x = x.to(self.device)
        n = len(x)
        with torch.inference_mode():
            if self.flip_test:
                pred_x, pred_y = self._net(torch.cat((x, x.flip(-1))))
                flip = list(FLIP_INDICES)
                pred_x = (pred_x[:n] + pred_x[n:, flip].flip(-1)) * 0.5
                pred_y = (pred_y[:n] + pred_y[n:, flip]) * 0.5
            else:
                pred_x, pred_y = self._net(x)
        xs, ys = pred_x.float().cpu().numpy(), pred_y.float().cpu().numpy()
        return [decode(xs[i], ys[i], *warps[i]) for i in range(n)]

    def detect(self, frame_bgr: np.ndarray) -> Detection | None:
        """The face points of the whole-frame pose, or ``None`` when they score too low."""
        return self.detect_many([frame_bgr])[0]

    def detect_many(self, frames_bgr: Sequence[np.ndarray]) -> list[Detection | None]:
        """:meth:`detect` of several frames in one network call (frames are independent: no tracking)."""
        return [self._face(frame, points, scores)
                for frame, (points, scores) in zip(frames_bgr, self.keypoints_many(frames_bgr), strict=True)]

    def _face(self, frame_bgr: np.ndarray, points: np.ndarray, scores: np.ndarray) -> Detection | None:
        if float(np.mean(scores[FACE])) < self.min_face_score:
            return None
        face = points[FACE]
        height, width = frame_bgr.shape[:2]
        x1, y1 = np.clip(face.min(axis=0), 0, (width, height))
        x2, y2 = np.clip(face.max(axis=0), 0, (width, height))
        return Detection(landmarks=face, box=(float(x1), float(y1), float(x2), float(y2)))

    def close(self) -> None:
        """Drop the network."""
        self._net = None

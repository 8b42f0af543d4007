"""Write tests/data/dwpose_mmpose_reference.npz: mmpose's own DWPose output on seeded weights.

Runs upstream's config (MuseTalk's ``musetalk/utils/dwpose/rtmpose-l_8xb32-270e_coco-ubody-
wholebody-384x288.py``) through ``mmpose.apis.init_model`` + ``inference_topdown`` (no boxes, as
upstream) with ``tests/test_dwpose.py::seeded_state`` loaded, on ``reference_frames``. Not a
project dependency: run it in an environment with mmpose 1.3.2, mmdet 3.3.0, mmengine 0.10.7
and mmcv (the reference was made with mmcv-lite 2.1.0, whose missing compiled ops this model
does not use)::

    python scripts/dwpose_reference.py path/to/rtmpose-l_8xb32-270e_coco-ubody-wholebody-384x288.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main(config: str) -> None:
    from mmpose.apis import inference_topdown, init_model
    from mmpose.structures import merge_data_samples
    from skimage import data

    from test_dwpose import reference_frames, seeded_state

    model = init_model(config, None, device="cpu")
    model.load_state_dict(seeded_state(), strict=True)
    model.eval()
    face_bgr = np.ascontiguousarray(data.astronaut()[:, :, ::-1])
    out: dict[str, np.ndarray] = {}
    for name, frame in reference_frames(face_bgr).items():
        result = merge_data_samples(inference_topdown(model, frame)).pred_instances
        out[f"{name}_keypoints"] = result.keypoints[0].astype(np.float32)
        out[f"{name}_scores"] = result.keypoint_scores[0].astype(np.float32)
    np.savez_compressed(ROOT / "tests" / "data" / "dwpose_mmpose_reference.npz", **out)


if __name__ == "__main__":
    main(sys.argv[1])

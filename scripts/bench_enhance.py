"""What GFPGAN v1.4 costs per frame in the live path (``render.live_enhance``).

The official network (512², channel multiplier 2) with random weights restores
batches of 256² generated faces (resized to 512² and back), as the live
scheduler does before its paste: ms a frame at each batch size, fp32 and fp16.
Writes ``results/bench_enhance.json``.

    .venv/bin/python -m scripts.bench_enhance --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from musetalk_warm.models.musetalk import resolve_device
from musetalk_warm.render.enhance import FaceEnhancer
from musetalk_warm.render.gfpgan import GFPGANv1Clean
from scripts.report import device_name, write_report


def _ms_per_frame(enhancer: FaceEnhancer, faces: torch.Tensor, repeats: int) -> float:
    enhancer.restore_tensor(faces)
    if faces.device.type == "cuda":
        torch.cuda.synchronize(faces.device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        enhancer.restore_tensor(faces)
    if faces.device.type == "cuda":
        torch.cuda.synchronize(faces.device)
    return (time.perf_counter() - t0) * 1000 / (repeats * len(faces))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="results/bench_enhance.json")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    net = GFPGANv1Clean().eval()
    rows: list[dict[str, Any]] = []
    for dtype in (torch.float32, torch.float16) if device.type == "cuda" else (torch.float32,):
        enhancer = FaceEnhancer(net, 512, device, dtype)
        for batch in args.batches:
            faces = torch.randint(0, 256, (batch, 256, 256, 3), dtype=torch.uint8, device=device)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "batch": batch,
                         "ms_per_frame": round(_ms_per_frame(enhancer, faces, args.repeats), 3)})
            print(json.dumps(rows[-1]), flush=True)
    report = {"device": device_name(device),
              "torch": torch.__version__, "network": "GFPGANv1Clean 512², multiplier 2 (random weights)",
              "rows": rows}
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

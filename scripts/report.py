"""Writing a benchmark's JSON report."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch


def write_report(path: str | Path, report: Any) -> Path:
    """``report`` as indented JSON at ``path`` (folders made); says where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return out


def device_name(device: torch.device | str) -> str:
    """The card's name for a CUDA device, else the CPU's."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"

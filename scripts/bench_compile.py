"""Model-path variants on the accelerator: which modules ``torch.compile`` covers, memory format.

Each variant runs in a fresh process with an empty Inductor cache (its first-ever
compile), then the fastest one again on its warm cache (a restart): time to build
the models, to compile and capture every bucket, frames/s per bucket (UNet + VAE
decode to uint8 faces, CUDA graphs) and the largest difference from the eager fp16
path, in grey levels. Writes ``results/bench_compile.json``.

    .venv/bin/python -m scripts.bench_compile --variants graphs decoder decoder-cl all-cl

A ``-tuned`` variant (``graphs-tuned``) is its base with ``torch.backends.cudnn.benchmark``
(cuDNN times its convolution algorithms per shape); on the H200 it changed nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from musetalk_warm.models.musetalk import resolve_device, resolve_dtype
from musetalk_warm.render.accelerator import Accelerator
from scripts.bench_engine import _diff, _inputs, build_models
from scripts.report import device_name

# name → (accelerate mode, compiled modules, channels-last)
BASE_VARIANTS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "graphs": ("graphs", (), False),
    "graphs-cl": ("graphs", (), True),
    "decoder": ("compile", ("decoder",), False),
    "decoder-cl": ("compile", ("decoder",), True),
    "all": ("compile", ("unet", "decoder"), False),
    "all-cl": ("compile", ("unet", "decoder"), True),
}
# Each again with cuDNN's autotuner choosing convolution algorithms per shape ("-tuned"); it
# shares its base variant's compile cache, so run it after the base to time only the tuning.
TUNED = "-tuned"
VARIANTS = BASE_VARIANTS | {name + TUNED: spec for name, spec in BASE_VARIANTS.items()}


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """One process: models, one variant's warm-up of every bucket, its costs and its difference from eager."""
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    models = build_models("official", device, resolve_dtype("auto", device))
    torch.cuda.synchronize(device)
    t_models = time.perf_counter() - t_start
    mode, modules, channels_last = VARIANTS[args.probe]
    # The eager reference first, in the default layout (the variant may switch it).
    latents, prompts = _inputs(models, args.buckets[0])
    reference = Accelerator(models, mode="eager").faces(latents, prompts).clone()
    accel = Accelerator(models, mode=mode, buckets=args.buckets, cache_dir=Path(args.cache_dir),  # type: ignore[arg-type]
                        compile_modules=modules or ("decoder",), channels_last=channels_last)  # type: ignore[arg-type]
    torch.backends.cudnn.benchmark = args.probe.endswith(TUNED)
    t0 = time.perf_counter()
    spent = accel.warmup()
    ready = time.perf_counter() - t_start
    return {
        "variant": args.probe, "models_s": round(t_models, 1), "warmup_s": round(time.perf_counter() - t0, 1),
        "per_bucket_s": spent, "ready_s": round(ready, 1),
        f"vs_eager_fp16_b{args.buckets[0]}": _diff(accel.faces(latents, prompts), reference),
        "buckets": accel.measure(repeats=10).as_dict(),
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
    }


def run_variant(args: argparse.Namespace, name: str, cache_dir: Path, timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "scripts.bench_compile", "--probe", name, "--device", args.device,
           "--cache-dir", str(cache_dir), "--buckets", *map(str, args.buckets)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"variant": name, "error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("PROBE ")]
    if not lines:
        return {"variant": name, "error": done.stderr[-3000:]}
    return json.loads(lines[-1][6:]) | {"process_s": round(time.perf_counter() - t0, 1)}


def best_fps(row: dict[str, Any]) -> float:
    return max((b["fps"] for b in row.get("buckets", {}).values()), default=0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["decoder-cl", "all-cl", "decoder", "graphs"],
                        choices=list(VARIANTS))
    parser.add_argument("--buckets", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per variant's process")
    parser.add_argument("--cache-root", default=None, help="folder for the variants' caches (default: a temp dir)")
    parser.add_argument("--probe", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="results/bench_compile.json")
    args = parser.parse_args(argv)
    if args.probe:
        print("PROBE " + json.dumps(probe(args)), flush=True)
        return 0
    root = Path(args.cache_root or tempfile.mkdtemp(prefix="compile-cache-"))
    report: dict[str, Any] = {
        "device": device_name(args.device),
        "torch": torch.__version__, "buckets": args.buckets, "cold": [], "warm": None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(report, indent=1) + "\n")

    for i, name in enumerate(args.variants):
        base = name.removesuffix(TUNED)
        row = run_variant(args, name, root / base, args.timeout)
        if base != name and base in args.variants[:i]:
            row["compile_cache"] = f"warm, from {base}"
        report["cold"].append(row)
        print(json.dumps(row), flush=True)
        save()
    compiled = [r for r in report["cold"] if "error" not in r and VARIANTS[r["variant"]][0] == "compile"]
    if compiled:
        best = max(compiled, key=best_fps)["variant"]
        report["warm"] = run_variant(args, best, root / best.removesuffix(TUNED), args.timeout)
        print(json.dumps(report["warm"]), flush=True)
        save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Build (or reuse) an avatar cache: ``python -m scripts.force_prep [flags]``.

Flags override the YAML config; prints a JSON summary on stdout (logs go to stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from musetalk_warm.config import Settings, load_settings
from musetalk_warm.errors import MuseTalkWarmError
from musetalk_warm.avatars.prep import prepare_avatar

log = logging.getLogger("force_prep")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.force_prep", description=__doc__)
    parser.add_argument("--config", help="settings YAML (default: configs/inference/realtime_live.yaml)")
    parser.add_argument("--avatar-id", help="cache folder name under avatar.cache_dir")
    parser.add_argument("--video-path", help="avatar video or image (omit for the built-in demo avatar)")
    parser.add_argument("--bbox-shift", type=int, help="moves the face box top by 2x this many pixels")
    parser.add_argument("--fps", type=int, help="frame rate to read the video at")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    parser.add_argument("--renderer", choices=("auto", "musetalk", "tiny", "lite"),
                        help="which models encode the latents (lite: none)")
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The given flags as nested settings overrides."""
    avatar = {key: value for key, value in (
        ("avatar_id", args.avatar_id), ("video_path", args.video_path),
        ("bbox_shift", args.bbox_shift), ("fps", args.fps),
    ) if value is not None}
    found: dict[str, dict[str, Any]] = {"avatar": avatar} if avatar else {}
    if args.renderer:
        found["models"] = {"renderer": args.renderer}
    return found


def latent_encoder(settings: Settings) -> tuple[Callable[[np.ndarray], np.ndarray] | None, str | None]:
    """The configured models' VAE encoder and its id; (None, None) for lite or missing weights."""
    choice = settings.models.renderer
    if choice == "lite":
        return None, None
    from musetalk_warm.models.musetalk import encode_latents, load_models, missing_weights

    if choice == "auto" and missing_weights(settings.models):
        log.info("MuseTalk weights not found: preparing without latents (lite renderer)")
        return None, None
    models = load_models(settings.models)
    return partial(encode_latents, models), models.vae_id


def _relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.name


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        settings = load_settings(args.config, overrides(args))
        encoder, vae_id = latent_encoder(settings)
        avatar = prepare_avatar(settings, encoder=encoder, vae_id=vae_id, force=args.force)
    except MuseTalkWarmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({
        "avatar_id": avatar.avatar_id,
        "frames": len(avatar),
        "latents": avatar.latents is not None,
        "vae_id": avatar.manifest.get("vae_id"),
        "seconds": round(time.perf_counter() - started, 2),
        "cache": _relative(Path(settings.avatar.cache_dir) / avatar.avatar_id),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

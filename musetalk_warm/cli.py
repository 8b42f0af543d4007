"""`musetalk-warm` command line: prep, render, demo, serve.

Each subcommand turns flags into :class:`Settings` overrides and calls the
library; results are printed as JSON, failures as one clear line (exit 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


from .config import Settings, apply_assignments, load_settings
from .errors import BadInput, MuseTalkWarmError

DEMO_TEXT = (
    "Hello! I am a warm talking head. I keep my models loaded, so every new sentence "
    "starts rendering right away, and my lips follow what I say."
)

# flag -> (section, key); every flag is optional and overrides YAML and env.
_FLAGS: dict[str, tuple[str, str, Any]] = {
    "--avatar-id": ("avatar", "avatar_id", str),
    "--video-path": ("avatar", "video_path", str),
    "--bbox-shift": ("avatar", "bbox_shift", int),
    "--fps": ("avatar", "fps", int),
    "--batch-size": ("render", "batch_size", int),
    "--blend-mode": ("render", "blend_mode", str),
    "--renderer": ("models", "renderer", str),
    "--models-dir": ("models", "models_dir", str),
    "--device": ("models", "device", str),
    "--host": ("server", "host", str),
    "--sessions-dir": ("server", "sessions_dir", str),
    "--auth-token": ("server", "auth_token", str),
    "--reset-policy": ("server", "reset_policy", str),
    "--tts-engine": ("tts", "engine", str),
    "--port": ("server", "port", int),
}


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML settings file (default configs/inference/realtime_live.yaml)")
    for flag, (section, key, kind) in _FLAGS.items():
        parser.add_argument(flag, type=kind, dest=f"{section}.{key}", help=f"sets {section}.{key}")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="any other setting, e.g. --set render.subpixel_enabled=false (repeatable)",
    )


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, key = dest.split(".", 1)
            overrides.setdefault(section, {})[key] = value
    return load_settings(args.config, apply_assignments(overrides, args.set))


def _print(data: dict[str, Any]) -> None:
    print(json.dumps(data, indent=2, default=str))


def _cmd_prep(args: argparse.Namespace) -> None:
    from .avatars.prep import prepare_avatar
    from .render.runtime import build_renderer, latent_encoder

    settings = _settings(args)
    t0 = time.perf_counter()
    encoder, vae_id = latent_encoder(build_renderer(settings)[1])
    avatar = prepare_avatar(settings, encoder=encoder, vae_id=vae_id, force=args.force)
    _print({
        "avatar_id": avatar.avatar_id,
        "frames": len(avatar),
        "latents": avatar.latents is not None,
        "cache": str(Path(settings.avatar.cache_dir) / avatar.avatar_id),
        "seconds": round(time.perf_counter() - t0, 2),
    })


def _speech(settings: Settings, text: str | None, audio_path: str | None) -> tuple[Any, int]:
    """(samples, rate) from an audio file or from text via the configured TTS."""
    if audio_path:
        from .media.audio import load_audio_native

        return load_audio_native(Path(audio_path), max_seconds=settings.server.max_audio_seconds)
    from .voice.tts import load_tts

    return load_tts(settings.tts).synthesize(text or DEMO_TEXT)


def _render_to(settings: Settings, out: Path, text: str | None, audio_path: str | None) -> dict[str, Any]:
    from .media.audio import speech_tracks
    from .media.encode import write_clip_mp4
    from .render.runtime import Runtime

    t0 = time.perf_counter()
    runtime = Runtime.load(settings)
    load_s = time.perf_counter() - t0
    try:
        samples, rate = _speech(settings, text, audio_path)
        t1 = time.perf_counter()
        speech16k, track = speech_tracks(samples, rate, settings.media.audio_rate)
        result = runtime.render_clip(speech16k, None, 0, out_audio=track)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_clip_mp4(result.clip, out)
        return {
            "video": str(out),
            "renderer": runtime.renderer_name,
            "device": runtime.device,
            "avatar_id": settings.avatar.avatar_id,
            "frames": result.frames,
            "duration_s": round(result.duration_s, 3),
            "load_s": round(load_s, 2),
            "render_wall_s": round(time.perf_counter() - t1, 2),
            "timings": result.timings,
        }
    finally:
        runtime.close()


def _cmd_render(args: argparse.Namespace) -> None:
    if not args.text and not args.audio:
        raise BadInput("give --text or --audio")
    _print(_render_to(_settings(args), Path(args.out), args.text, args.audio))


def _cmd_demo(args: argparse.Namespace) -> None:
    _print(_render_to(_settings(args), Path(args.out), args.text or DEMO_TEXT, None))


def _cmd_serve(args: argparse.Namespace) -> None:
    from .server import serve

    serve(_settings(args))


def _cmd_score(args: argparse.Namespace) -> None:
    from .quality.clip import score_clip
    from .quality.syncnet import WEIGHTS_PATH, load_syncnet, tiny_syncnet

    clip = Path(args.clip)
    if not clip.is_file():
        raise BadInput(f"clip not found: {clip.name}")
    if args.syncnet == "tiny":
        model, weights = tiny_syncnet(), "tiny (random weights: exercises the path, scores mean nothing)"
    else:
        path = Path(args.syncnet) if args.syncnet else Path(_settings(args).models.models_dir) / WEIGHTS_PATH
        model, weights = load_syncnet(path), path.name
    _print({"syncnet": weights, **score_clip(clip, model, vshift=args.vshift, stride=args.stride)})


def _version() -> str:
    try:
        return version("musetalk-warm")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musetalk-warm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prep", help="build (or reuse) an avatar cache from a video or image")
    prep.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    prep.set_defaults(func=_cmd_prep)

    render = sub.add_parser("render", help="render one clip from text or an audio file")
    render.add_argument("--text")
    render.add_argument("--audio", help="audio file (wav, mp3, ogg, m4a, webm, ...)")
    render.add_argument("--out", default="results/clip.mp4")
    render.set_defaults(func=_cmd_render)

    demo = sub.add_parser("demo", help="the built-in avatar says a sentence -> results/demo/demo.mp4")
    demo.add_argument("--text", help="what to say instead of the built-in sentence")
    demo.add_argument("--out", default="results/demo/demo.mp4")
    demo.set_defaults(func=_cmd_demo)

    serve = sub.add_parser("serve", help="run the warm HTTP server")
    serve.set_defaults(func=_cmd_serve)

    score = sub.add_parser("score", help="lip-sync scores of a clip: SyncNet offset/LSE-C/LSE-D, mouth opening")
    score.add_argument("clip", help="video with its audio track (mp4, mkv, webm, ...)")
    score.add_argument("--syncnet", help="weights file, or 'tiny' for random weights "
                       "(default: MODELS_DIR/syncnet/latentsync_syncnet.pt)")
    score.add_argument("--vshift", type=int, default=15, help="AV offsets searched: -N..N frames")
    score.add_argument("--stride", type=int, default=1, help="score a 16-frame window every N frames")
    score.set_defaults(func=_cmd_score)

    for p in (prep, render, demo, serve, score):
        _add_settings_flags(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``musetalk-warm`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except MuseTalkWarmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.verbose:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

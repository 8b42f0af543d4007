"""The ``musetalk-warm`` command line: prep, render, demo, serve, score, enhance.

Each subcommand turns flags into settings overrides and calls the library;
results are printed as JSON, failures as one clear line (exit 2). Paths are
checked before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any


from .config import ModelSettings, Settings, apply_assignments, load_settings
from .errors import BadInput, ConfigError, MuseTalkWarmError

if TYPE_CHECKING:
    from .voice.tts import Speech

DEMO_TEXT = (
    "Hello! I am a warm talking head. I keep my models loaded, so every new sentence "
    "starts rendering right away, and my lips follow what I say."
)

# flag -> (section, key, type, metavar, help); every flag is optional and overrides YAML and env.
_Flag = tuple[str, str, Any, str, str]
_AVATAR_FLAGS: dict[str, _Flag] = {
    "--avatar-id": ("avatar", "avatar_id", str, "ID",
                    "avatar cache to use (default: demo, the built-in avatar)"),
    "--video-path": ("avatar", "video_path", str, "FILE", "video or image the avatar is prepared from"),
    "--bbox-shift": ("avatar", "bbox_shift", int, "PX", "upstream's bbox_shift: moves the face box's top edge by twice this (px, default 0)"),
    "--fps": ("avatar", "fps", int, "N", "frames per second of the avatar and its videos (default 25)"),
}
_RENDER_FLAGS: dict[str, _Flag] = {
    "--batch-size": ("render", "batch_size", int, "N", "frames generated per batch (default 16)"),
    "--blend-mode": ("render", "blend_mode", str, "MODE", "how the face is pasted back: feather, poisson or upstream (default feather)"),
    "--renderer": ("models", "renderer", str, "NAME",
                   "auto (MuseTalk when its weights are installed, else lite), musetalk, tiny or lite"),
    "--models-dir": ("models", "models_dir", str, "DIR", "folder of the MuseTalk weights (default models)"),
    "--device": ("models", "device", str, "DEVICE", "auto, cpu, cuda or cuda:N (default auto)"),
}
_SERVER_FLAGS: dict[str, _Flag] = {
    "--host": ("server", "host", str, "ADDR", "address to listen on (default 127.0.0.1)"),
    "--port": ("server", "port", int, "PORT", "port to listen on (default 8000)"),
    "--sessions-dir": ("server", "sessions_dir", str, "DIR", "where sessions are kept (default results/sessions)"),
    "--auth-token": ("server", "auth_token", str, "TOKEN", "require this bearer token on every request"),
    "--reset-policy": ("server", "reset_policy", str, "POLICY",
                       "what a reset does with the old session: archive or delete (default archive)"),
}
_TTS_FLAGS: dict[str, _Flag] = {
    "--tts-engine": ("tts", "engine", str, "NAME", "text-to-speech engine: espeak or openai (default espeak)"),
}


def _add_settings_flags(parser: argparse.ArgumentParser, *groups: dict[str, _Flag]) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="YAML settings file (default configs/inference/realtime_live.yaml)")
    for group in groups:
        for flag, (section, key, kind, metavar, text) in group.items():
            parser.add_argument(flag, type=kind, dest=f"{section}.{key}", metavar=metavar, help=text)
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


def _check_paths(settings: Settings, audio_path: str | None = None, *, avatar: bool = True) -> None:
    """Fail on a bad path now, not after the seconds that loading the models takes."""
    from .avatars.prep import check_source, will_prepare

    if audio_path and not Path(audio_path).is_file():
        raise BadInput(f"audio file not found: {Path(audio_path).name}")
    models = settings.models
    explicit = models.renderer == "musetalk" or models.models_dir != ModelSettings().models_dir
    if models.renderer in ("auto", "musetalk") and explicit and not models.models_dir.is_dir():
        raise ConfigError(
            f"models.models_dir: folder not found: {models.models_dir.name}",
            hint="point --models-dir at the weights (scripts/download_weights.py fetches them)",
        )
    if avatar:
        will_prepare(settings)
    else:
        check_source(settings)


def _print(data: dict[str, Any]) -> None:
    print(json.dumps(data, indent=2, default=str))


def _cmd_prep(args: argparse.Namespace) -> None:
    from .avatars.prep import prepare_avatar
    from .render.runtime import build_renderer, latent_encoder

    settings = _settings(args)
    _check_paths(settings, avatar=False)
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


def _speech(settings: Settings, text: str | None, audio_path: str | None) -> Speech:
    """Speech from an audio file, or from text via the configured TTS (with phoneme timings
    where it reports them, so the lite renderer articulates from them)."""
    from .voice.tts import Speech, load_tts

    if audio_path:
        from .media.audio import load_audio_native

        return Speech(*load_audio_native(Path(audio_path), max_seconds=settings.server.max_audio_seconds))
    return load_tts(settings.tts).synthesize_timed(text or DEMO_TEXT)


def _render_to(settings: Settings, out: Path, text: str | None, audio_path: str | None) -> dict[str, Any]:
    from .media.audio import speech_tracks
    from .media.encode import write_clip_mp4
    from .render.runtime import Runtime

    _check_paths(settings, audio_path)
    t0 = time.perf_counter()
    runtime = Runtime.load(settings)
    load_s = time.perf_counter() - t0
    try:
        speech = _speech(settings, text, audio_path)
        t1 = time.perf_counter()
        speech16k, track = speech_tracks(speech.samples, speech.rate, settings.media.audio_rate)
        result = runtime.render_clip(speech16k, None, 0, out_audio=track, phones=speech.phones)
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

    settings = _settings(args)
    _check_paths(settings)
    serve(settings)


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


def _cmd_enhance(args: argparse.Namespace) -> None:
    from .render.enhance import FaceEnhancer, avatar_targets, detected_targets, enhance_video

    src, out = Path(args.src), Path(args.out)
    if not src.is_file():
        raise BadInput(f"video not found: {src.name}")
    settings = _settings(args)
    t0 = time.perf_counter()
    if args.session:
        from .avatars.cache import load_avatar

        # The avatar first: a cache that is not there fails before the weights load.
        targets = avatar_targets(load_avatar(settings.avatar.avatar_id, settings.avatar.cache_dir), args.start_frame)
        enhancer = FaceEnhancer.load(settings)
        result = enhance_video(src, out, enhancer, targets)
    else:
        from .avatars.landmarks import make_detector

        enhancer = FaceEnhancer.load(settings)
        detector = make_detector(settings.avatar.face_backend, video=True, models=settings.models)
        try:
            result = enhance_video(src, out, enhancer, detected_targets(detector, settings))
        finally:
            detector.close()
    _print({"video": str(out), "device": str(enhancer.device), "frames": result.frames,
            "enhanced": result.enhanced, "fps": result.fps, "audio": result.audio,
            "seconds": round(time.perf_counter() - t0, 2)})


def _version() -> str:
    try:
        return version("musetalk-warm")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="musetalk-warm",
        description="A warm MuseTalk talking-head server and its tools. Results are printed as JSON; "
        "errors as one line (exit 2).",
        epilog="Run `musetalk-warm COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prep", help="build (or reuse) an avatar cache from a video or image", description="build (or reuse) an avatar cache from a video or image")
    prep.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    prep.set_defaults(func=_cmd_prep)

    render = sub.add_parser("render", help="render one clip from text or an audio file", description="render one clip from text or an audio file")
    render.add_argument("--text", help="what to say (spoken by the configured TTS)")
    render.add_argument("--audio", metavar="FILE", help="or an audio file to lip-sync (wav, mp3, ogg, m4a, webm, ...)")
    render.add_argument("--out", metavar="FILE", default="results/clip.mp4", help="output MP4 (default %(default)s)")
    render.set_defaults(func=_cmd_render)

    demo = sub.add_parser("demo", help="the avatar (the built-in one by default) says a sentence", description="the avatar (the built-in one by default) says a sentence")
    demo.add_argument("--text", help="what to say instead of the built-in sentence")
    demo.add_argument("--out", metavar="FILE", default="results/demo/demo.mp4", help="output MP4 (default %(default)s)")
    demo.set_defaults(func=_cmd_demo)

    serve = sub.add_parser("serve", help="run the warm HTTP server", description="run the warm HTTP server")
    serve.set_defaults(func=_cmd_serve)

    score = sub.add_parser("score", help="lip-sync scores of a clip: SyncNet offset/LSE-C/LSE-D, mouth opening")
    score.add_argument("clip", help="video with its audio track (mp4, mkv, webm, ...)")
    score.add_argument("--syncnet", help="weights file, or 'tiny' for random weights "
                       "(default: MODELS_DIR/syncnet/latentsync_syncnet.pt)")
    score.add_argument("--vshift", type=int, default=15, help="AV offsets searched: -N..N frames")
    score.add_argument("--stride", type=int, default=1, help="score a 16-frame window every N frames")
    score.set_defaults(func=_cmd_score)

    enhance = sub.add_parser("enhance", help="restore the face of every frame with GFPGAN v1.4 (audio copied)",
                             description="restore the face of every frame with GFPGAN v1.4 "
                             "(models/GFPGANv1.4.pth): a source video before prep (the face found in each "
                             "frame), or with --session a session video (the avatar's placements and masks)")
    enhance.add_argument("src", help="input video (mp4, mkv, mov, ...)")
    enhance.add_argument("out", help="output MP4: H.264, the input's audio stream-copied")
    enhance.add_argument("--session", action="store_true",
                         help="SRC is a session video of --avatar-id: paste with its placements and masks")
    enhance.add_argument("--start-frame", type=int, default=0, metavar="N",
                         help="avatar cycle position of SRC's first frame (with --session; default 0)")
    enhance.set_defaults(func=_cmd_enhance)

    _add_settings_flags(prep, _AVATAR_FLAGS, _RENDER_FLAGS)
    _add_settings_flags(render, _AVATAR_FLAGS, _RENDER_FLAGS, _TTS_FLAGS)
    _add_settings_flags(demo, _AVATAR_FLAGS, _RENDER_FLAGS, _TTS_FLAGS)
    _add_settings_flags(serve, _AVATAR_FLAGS, _RENDER_FLAGS, _TTS_FLAGS, _SERVER_FLAGS)
    _add_settings_flags(score, {"--models-dir": _RENDER_FLAGS["--models-dir"]})
    _add_settings_flags(enhance, _AVATAR_FLAGS, {k: _RENDER_FLAGS[k] for k in ("--models-dir", "--device")})
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

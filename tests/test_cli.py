"""The musetalk-warm command line: real runs on the lite renderer and clear one-line errors."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from musetalk_warm.cli import main
from musetalk_warm.media.decode import probe


def _common(tmp_path: Path) -> list[str]:
    return ["--renderer", "lite", "--set", f"avatar.cache_dir={tmp_path / 'avatars'}", "--set", "avatar.demo_seconds=1.0"]


def test_render_from_an_audio_file(tmp_path: Path, speech_wav: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "clip.mp4"
    assert main(["render", "--audio", str(speech_wav), "--out", str(out), *_common(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    info = probe(out)
    assert report["renderer"] == "lite" and report["frames"] == info.frame_count
    assert info.video_codec == "h264" and info.audio_codec == "aac"
    assert abs(info.audio_duration - info.video_duration) < 1 / 25
    assert report["frames"] >= math.floor(info.audio_duration * 25) - 1


def test_render_passes_phoneme_timings_for_text_only(
    tmp_path: Path, speech_wav: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from musetalk_warm.render.runtime import Runtime

    seen: list = []
    render_clip = Runtime.render_clip

    def recorded(self: Runtime, *args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("phones"))
        return render_clip(self, *args, **kwargs)

    monkeypatch.setattr(Runtime, "render_clip", recorded)
    assert main(["render", "--text", "Bob bought a map.", "--out", str(tmp_path / "t.mp4"), *_common(tmp_path)]) == 0
    assert main(["render", "--audio", str(speech_wav), "--out", str(tmp_path / "a.mp4"), *_common(tmp_path)]) == 0
    capsys.readouterr()
    symbols = [p.symbol for p in seen[0]]
    assert symbols[0] == "b" and "m" in symbols and symbols[-2] == "p"
    assert seen[1] is None  # a recording keeps the spectral path


def test_demo_with_text_and_prep_is_a_noop_the_second_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo.mp4"
    assert main(["demo", "--text", "Hi there.", "--out", str(out), *_common(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == probe(out).frame_count
    manifest = tmp_path / "avatars" / "demo" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert main(["prep", *_common(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == 25
    assert manifest.stat().st_mtime_ns == stamp  # unchanged source and settings: nothing rebuilt


def test_score_runs_on_a_rendered_demo_clip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The whole score path on a real clip: decode, face tracking, mel, SyncNet (random weights)."""
    out = tmp_path / "demo.mp4"
    assert main(["demo", "--text", "Bob moved the blue boots.", "--out", str(out), *_common(tmp_path)]) == 0
    frames = json.loads(capsys.readouterr().out)["frames"]
    assert main(["score", str(out), "--syncnet", "tiny", "--vshift", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["syncnet"].startswith("tiny") and report["frames"] == frames >= 40
    sync = report["sync"]
    assert len(sync["distances"]) == 11 and abs(sync["av_offset"]) <= 5 and sync["windows"] > 0
    assert sync["lse_d"] == pytest.approx(min(sync["distances"]), abs=1e-3)
    mouth = report["mouth"]
    assert mouth["frames_with_face"] == frames and mouth["opening_speech_mean"] > 0


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["render"], "give --text or --audio"),
        (["demo", "--batch-size", "0"], "render.batch_size"),
        (["demo", "--set", "render.nope=1"], "render.nope: unknown setting"),
        (["demo", "--set", "batch_size"], "SECTION.KEY=VALUE"),
        (["render", "--audio", "missing.wav"], "not found"),
        (["prep", "--avatar-id", "someone", "--video-path", "missing.mp4"], "missing.mp4"),
    ],
)
def test_errors_are_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    assert main([*argv, *_common(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err and "Traceback" not in err


def test_help_is_plain_text_and_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from musetalk_warm.cli import build_parser

    for command in ([], ["prep"], ["render"], ["demo"], ["serve"], ["enhance"]):
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([*command, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        # No reStructuredText roles or literals, no metavars made of setting paths.
        assert "`" not in text.replace("`musetalk-warm COMMAND --help`", "") and ":class:" not in text
        assert "AVATAR.AVATAR_ID" not in text and "MODELS." not in text
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings} has no help text"
    assert "--port" in sub.choices["serve"].format_help() and "--port" not in sub.choices["render"].format_help()


def test_a_prepared_avatar_is_rendered_as_it_is(
    tmp_path: Path, face_bgr: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    """`render --avatar-id X` without --video-path renders X's cache; it never re-prepares X from the demo."""
    import cv2

    image = tmp_path / "portrait.png"
    cv2.imwrite(str(image), face_bgr)
    assert main(["prep", "--avatar-id", "alice", "--video-path", str(image), *_common(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == 1
    manifest = tmp_path / "avatars" / "alice" / "manifest.json"
    before = manifest.read_bytes()
    out = tmp_path / "alice.mp4"
    assert main(["demo", "--avatar-id", "alice", "--text", "Hi.", "--out", str(out), *_common(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["avatar_id"] == "alice"
    assert manifest.read_bytes() == before and json.loads(before)["source"]["kind"] == "image"
    assert (probe(out).width, probe(out).height) == face_bgr.shape[1::-1]  # the photo, not the demo


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["demo", "--avatar-id", "nobody"], "musetalk-warm prep --avatar-id nobody --video-path"),
        (["serve", "--avatar-id", "nobody"], "musetalk-warm prep --avatar-id nobody --video-path"),
        (["render", "--text", "Hi.", "--video-path", "gone.mp4"], "gone.mp4"),
        (["prep", "--avatar-id", "nobody"], "--video-path"),
        (["demo", "--renderer", "auto", "--models-dir", "no-such-dir"], "no-such-dir"),
        (["render", "--audio", "missing.wav"], "missing.wav"),
        (["demo", "--config", "missing.yaml"], "missing.yaml"),
    ],
)
def test_bad_paths_fail_before_models_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str], needle: str
) -> None:
    from musetalk_warm.render import runtime

    def no_models(*_: object, **__: object) -> None:
        raise AssertionError("models were loaded before the paths were checked")

    monkeypatch.setattr(runtime, "build_renderer", no_models)
    assert main([argv[0], *_common(tmp_path), *argv[1:]]) == 2  # the case's own flags win
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err
    assert not (tmp_path / "avatars" / "nobody").exists()

"""The musetalk-warm command line: real runs on the lite renderer and clear one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

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

from pathlib import Path

import pytest

from musetalk_warm.config import Settings, load_settings
from musetalk_warm.errors import ConfigError


def test_shipped_yaml_equals_defaults() -> None:
    assert load_settings("configs/inference/realtime_live.yaml") == Settings()


def test_yaml_then_env_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("render:\n  batch_size: 4\n  blend_mode: poisson\navatar:\n  fps: 30\n")
    s = load_settings(cfg)
    assert (s.render.batch_size, s.render.blend_mode, s.avatar.fps) == (4, "poisson", 30)

    monkeypatch.setenv("MUSETALK_WARM_RENDER__BATCH_SIZE", "8")
    s = load_settings(cfg)
    assert s.render.batch_size == 8 and s.render.blend_mode == "poisson"  # env wins, rest of section kept

    s = load_settings(cfg, {"render": {"batch_size": 2}})
    assert s.render.batch_size == 2 and s.avatar.fps == 30


def test_config_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  port: 9001\n")
    monkeypatch.setenv("MUSETALK_WARM_CONFIG", str(cfg))
    assert load_settings().server.port == 9001


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("render:\n  batch_sise: 4\n", "render.batch_sise: unknown setting"),
        ("render:\n  batch_size: 0\n", "render.batch_size"),
        ("render:\n  blend_mode: smear\n", "render.blend_mode"),
        ("media:\n  audio_rate: 22050\n", "audio_rate must be one of"),
        ("avatar:\n  avatar_id: ../etc\n", "avatar_id must be"),
        ("bogus: 1\n", "bogus: unknown setting"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert needle in str(err.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("render: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(listy)


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(Exception):
        s.render.batch_size = 3  # type: ignore[misc]

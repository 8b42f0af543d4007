"""The compact cache's migration from format 2 and the lazy, capped avatar library."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from musetalk_warm.avatars.cache import Avatar, cache_bytes, load_avatar, save_avatar
from musetalk_warm.avatars.library import AvatarLibrary
from musetalk_warm.errors import AvatarCacheError, Conflict, NotFound
from scripts.measure_avatar_cache import write_format2


def small_avatar(avatar_id: str, n: int = 4, seed: int = 0) -> Avatar:
    """A geometric avatar with smooth frames (the library needs no faces)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:96, 0:128]
    frames = np.stack([np.dstack([(xx + 3 * i) % 256, (yy * 2) % 256, np.full_like(xx, 40 * i)])
                       for i in range(n)]).astype(np.uint8)
    placements = np.tile(np.array([[0.25, 0, 16], [0, 0.25, 8]], np.float64), (n, 1, 1))
    masks = tuple(np.clip(rng.normal(128, 60, (48, 48)), 0, 255).astype(np.uint8) for _ in range(n))
    return Avatar(
        avatar_id=avatar_id, fps=25, frames=frames,
        boxes=np.tile(np.array([16, 8, 80, 72], np.int32), (n, 1)),
        landmarks=rng.random((n, 68, 2)).astype(np.float32),
        crops=np.zeros((n, 256, 256, 3), np.uint8), latents=rng.random((n, 8, 32, 32)).astype(np.float32),
        masks=masks, crop_boxes=np.tile(np.array([0, 0, 48, 48], np.int32), (n, 1)),
        placements=placements, manifest={"source": {"kind": "video", "name": f"{avatar_id}.mp4"}},
    )


def test_format2_cache_is_migrated_on_first_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    avatar = small_avatar("old")
    write_format2(avatar, tmp_path)
    before = cache_bytes("old", tmp_path)
    with caplog.at_level("WARNING"):
        loaded = load_avatar("old", tmp_path, frames_crf=0)
    assert "migrated from format 2 to 3" in caplog.text
    assert {p.name for p in (tmp_path / "old").iterdir()} == {"frames.mkv", "arrays.safetensors", "manifest.json"}
    assert json.loads((tmp_path / "old" / "manifest.json").read_text())["format_version"] == 3
    assert cache_bytes("old", tmp_path) < before
    # crf 0 is lossless: every array comes back exactly, masks included.
    for name in ("frames", "boxes", "landmarks", "latents", "crop_boxes", "placements"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(avatar, name))
    assert all(np.array_equal(a, b) for a, b in zip(loaded.masks, avatar.masks, strict=True))
    # The second load reads format 3 as it is.
    np.testing.assert_array_equal(load_avatar("old", tmp_path).frames, avatar.frames)


def test_default_codec_reads_back_near_lossless(tmp_path: Path) -> None:
    avatar = small_avatar("near", n=6)
    save_avatar(avatar, tmp_path)
    frames = load_avatar("near", tmp_path).frames
    error = frames.astype(np.float32) - avatar.frames
    assert 10 * np.log10(255**2 / max(np.mean(error**2), 1e-9)) >= 50 and np.abs(error).max() <= 8


def test_truncated_frames_are_a_damaged_cache(tmp_path: Path) -> None:
    save_avatar(small_avatar("cut"), tmp_path)
    video = tmp_path / "cut" / "frames.mkv"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    with pytest.raises(AvatarCacheError, match="damaged"):
        load_avatar("cut", tmp_path)


def test_library_loads_lazily_and_keeps_an_lru_cap(tmp_path: Path) -> None:
    checked: list[str] = []
    library = AvatarLibrary(tmp_path, max_loaded=2, check=lambda a: checked.append(a.avatar_id))
    pinned = small_avatar("pinned")
    library.add(pinned, pin=True)
    for name in ("a", "b", "c"):
        save_avatar(small_avatar(name, n=2), tmp_path)
    assert library.ids() == ["a", "b", "c", "pinned"] and library.loaded_ids() == ["pinned"]
    a = library.get("a")
    assert library.get("a") is a and checked == ["a"]  # loaded once, then from memory
    library.get("b")
    # Over the cap: the least recently used unpinned avatar goes; the pinned one stays.
    assert library.loaded_ids() == ["pinned", "b"]
    with library.lease("c"):
        # Pinned and leased avatars stay; the cap then drops the one just handed out from memory.
        assert len(library.get("a")) == 2
        assert library.in_use("c") and library.loaded_ids() == ["pinned", "c"]
    assert not library.in_use("c")
    library.get("b")
    assert len(library.loaded_ids()) == 2 and "pinned" in library.loaded_ids()
    info = library.describe("a")
    assert info["num_frames"] == 2 and info["bytes_on_disk"] == cache_bytes("a", tmp_path)
    assert info["source"]["name"] == "a.mp4" and info["vae_id"] is None


def test_library_finds_a_cache_written_later_and_refuses_unknown_ids(tmp_path: Path) -> None:
    library = AvatarLibrary(tmp_path)
    with pytest.raises(NotFound):
        library.get("late")
    save_avatar(replace(small_avatar("late"), manifest={"vae_id": "v"}), tmp_path)
    assert len(library.get("late")) == 4 and library.describe("late")["vae_id"] == "v"
    for bad in ("../late", ".hidden", "a/b"):
        with pytest.raises(NotFound):
            library.get(bad)
        with pytest.raises(NotFound):
            library.describe(bad)


def test_remove_refuses_pinned_and_leased_avatars_and_deletes_free_ones(tmp_path: Path) -> None:
    for avatar_id in ("pinned", "busy", "free"):
        save_avatar(small_avatar(avatar_id), tmp_path)
    library = AvatarLibrary(tmp_path)
    library.add(library.get("pinned"), pin=True)
    with library.lease("busy"):
        for avatar_id, words in (("pinned", "configured avatar"), ("busy", "in use")):
            with pytest.raises(Conflict, match=words):
                library.remove(avatar_id)
            assert (tmp_path / avatar_id / "manifest.json").is_file()
    library.hold("busy")  # a live session's lease
    with pytest.raises(Conflict):
        library.remove("busy")
    library.release("busy")
    library.remove("busy")
    library.get("free")
    library.remove("free")
    assert library.ids() == ["pinned"] and library.loaded_ids() == ["pinned"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".jobs", "pinned"]
    assert list((tmp_path / ".jobs").iterdir()) == []
    with pytest.raises(NotFound):
        library.remove("free")
    with pytest.raises(NotFound):
        library.get("free")

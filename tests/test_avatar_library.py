"""The compact cache: round trip, background decoding, migration of older formats; the capped avatar library."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from safetensors import numpy as st_numpy

from musetalk_warm.avatars.cache import Avatar, cache_bytes, load_avatar, save_avatar
from musetalk_warm.avatars.library import AvatarLibrary
from musetalk_warm.avatars.progressive import Progress, ProgressiveArray
from musetalk_warm.avatars.stabilise import cut_crops
from musetalk_warm.media.framepack import read_frames, write_frames
from musetalk_warm.errors import AvatarCacheError, Conflict, NotFound
from scripts.measure_avatar_cache import write_format2, write_source


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
    assert "migrated from format 2 to 4" in caplog.text
    assert {p.name for p in (tmp_path / "old").iterdir()} == {"frames.mkv", "crops.mkv", "arrays.safetensors",
                                                              "manifest.json"}
    assert json.loads((tmp_path / "old" / "manifest.json").read_text())["format_version"] == 4
    assert cache_bytes("old", tmp_path) < before
    # crf 0 is lossless: every array comes back exactly, masks included; latents to fp16 precision.
    for name in ("frames", "crops", "boxes", "landmarks", "crop_boxes", "placements"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(avatar, name))
    assert all(np.array_equal(a, b) for a, b in zip(loaded.masks, avatar.masks, strict=True))
    assert loaded.latents.dtype == np.float32
    np.testing.assert_allclose(loaded.latents, avatar.latents, rtol=1e-3, atol=1e-4)
    # The second load reads format 3 as it is.
    np.testing.assert_array_equal(load_avatar("old", tmp_path).frames, avatar.frames)


def write_format3(avatar: Avatar, root: Path) -> Path:
    """``avatar`` as format 3 stored it: no crops, fp32 latents, no byte counts in the manifest."""
    folder = save_avatar(avatar, root)
    (folder / "crops.mkv").unlink()
    arrays = st_numpy.load_file(str(folder / "arrays.safetensors"))
    arrays["latents"] = np.ascontiguousarray(avatar.latents, dtype=np.float32)
    st_numpy.save_file(arrays, str(folder / "arrays.safetensors"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(format_version=3, frames_codec={"codec": "libx264rgb", "crf": 4})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_format3_cache_is_migrated_keeping_its_frames(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    avatar = small_avatar("v3")
    folder = write_format3(avatar, tmp_path)
    video = (folder / "frames.mkv").read_bytes()
    before = (folder / "arrays.safetensors").stat().st_size
    with caplog.at_level("WARNING"):
        loaded = load_avatar("v3", tmp_path)
    assert "migrated from format 3 to 4" in caplog.text
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format_version"] == 4 and manifest["frames_codec"]["bytes"] == len(video)
    assert (folder / "frames.mkv").read_bytes() == video  # not coded again
    assert manifest["frames_codec"]["crops_bytes"] == (folder / "crops.mkv").stat().st_size
    assert st_numpy.load_file(str(folder / "arrays.safetensors"))["latents"].dtype == np.float16
    saved = before - (folder / "arrays.safetensors").stat().st_size
    assert abs(saved - avatar.latents.size * 2) < 16  # fp32 -> fp16, give or take the header's digits
    np.testing.assert_allclose(loaded.latents, avatar.latents, rtol=1e-3, atol=1e-4)
    frames = np.asarray(loaded.frames)
    assert np.abs(frames.astype(np.int16) - avatar.frames).max() <= 12
    # The crops are cut once, from the frames as read back, and stored.
    cut = cut_crops(frames, avatar.placements)
    assert np.abs(np.asarray(loaded.crops, np.int16) - cut).max() <= 12


def camera_avatar(avatar_id: str, tmp_path: Path, n: int = 8) -> Avatar:
    """``small_avatar`` with the frames prep reads from a phone video: texture, sensor noise, CRF 23."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:144, 0:176].astype(np.float32)
    base = 128 + 60 * np.sin(xx / 9)[..., None] * np.cos(yy / 13)[..., None] * np.array([1.0, 0.8, 0.6])
    frames = np.stack([np.clip(np.roll(base, 2 * i, axis=1) + rng.normal(0, 1.5, base.shape), 0, 255)
                       for i in range(n)]).astype(np.uint8)
    write_source(tmp_path / "phone.mp4", frames, 25)
    avatar = small_avatar(avatar_id, n)
    frames = read_frames(tmp_path / "phone.mp4", n, 144, 176)
    return replace(avatar, frames=frames, crops=cut_crops(frames, avatar.placements))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    error = np.asarray(a, np.float32) - np.asarray(b, np.float32)
    return float(10 * np.log10(255**2 / max(np.mean(error**2), 1e-9)))


def test_round_trip_meets_the_fidelity_and_size_bounds(tmp_path: Path) -> None:
    avatar = camera_avatar("near", tmp_path)
    folder = save_avatar(avatar, tmp_path)
    loaded = load_avatar("near", tmp_path)
    assert psnr(loaded.frames, avatar.frames) >= 50 and psnr(loaded.crops, avatar.crops) >= 50
    # 0.3 MB per 720p frame is 11 % of its raw 2.76 MB; the coded frames and crops stay under that share.
    coded = (folder / "frames.mkv").stat().st_size + (folder / "crops.mkv").stat().st_size
    assert coded / len(avatar) <= 0.11 * avatar.frames[0].nbytes
    # Masks and arrays come back as saved.
    assert all(np.array_equal(a, b) for a, b in zip(loaded.masks, avatar.masks, strict=True))
    np.testing.assert_array_equal(loaded.landmarks, avatar.landmarks)


def test_truncated_frames_are_a_damaged_cache(tmp_path: Path) -> None:
    save_avatar(small_avatar("cut"), tmp_path)
    video = tmp_path / "cut" / "frames.mkv"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    with pytest.raises(AvatarCacheError, match="damaged"):
        load_avatar("cut", tmp_path)


def test_damage_found_while_decoding_is_raised_by_the_read_that_needs_it(tmp_path: Path) -> None:
    avatar = small_avatar("short")
    folder = save_avatar(avatar, tmp_path)
    with (folder / "frames.mkv").open("wb") as fh:  # a readable video of 2 frames, not 4
        write_frames(fh, avatar.frames[:2], 25, 0)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["frames_codec"]["bytes"] = (folder / "frames.mkv").stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_avatar("short", tmp_path)
    np.testing.assert_array_equal(loaded.frames[1], avatar.frames[1])
    with pytest.raises(AvatarCacheError, match="damaged"):
        loaded.frames[3]
    with pytest.raises(AvatarCacheError, match="damaged"):
        np.asarray(loaded.crops)


def test_progressive_reads_wait_only_for_the_items_they_touch() -> None:
    gates = [threading.Event() for _ in range(3)]
    buffer = np.zeros((3, 2), np.int64)

    def work():
        for i, gate in enumerate(gates):
            gate.wait(5)
            buffer[i] = i + 1
            yield i

    progress = Progress(3, work(), lambda exc: RuntimeError(str(exc)))
    array = ProgressiveArray(buffer, progress)
    assert array.shape == (3, 2) and len(array) == 3 and array.dtype == np.int64 and progress.done == 0
    gates[0].set()
    assert array[0].tolist() == [1, 1] and array[:1].tolist() == [[1, 1]]
    got: list[np.ndarray] = []
    reader = threading.Thread(target=lambda: got.append(array[np.array([0, 2])]))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive() and progress.done == 1  # item 2 is not there yet: the read waits
    gates[1].set()
    gates[2].set()
    reader.join(5)
    assert got[0].tolist() == [[1, 1], [3, 3]] and np.asarray(array).sum() == 12 and array.astype(float).sum() == 12
    assert not (array - buffer).any() and (buffer == array).all()  # operators see the filled array


def test_progressive_work_errors_reach_every_reader() -> None:
    def work():
        yield 0
        raise ValueError("bad frame")

    array = ProgressiveArray(np.zeros((3,)), Progress(3, work(), lambda exc: RuntimeError(f"damaged: {exc}")))
    assert array[0] == 0
    for _ in range(2):
        with pytest.raises(RuntimeError, match="damaged: bad frame"):
            array[-1]


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
def test_stopped_progress_fails_readers_instead_of_hanging() -> None:
    release = threading.Event()

    def work():
        yield 0
        release.wait(5)
        yield 1

    progress = Progress(3, work(), lambda exc: RuntimeError(f"damaged: {exc}"))
    array = ProgressiveArray(np.arange(3), progress)
    assert array[0] == 0
    stopper = threading.Thread(target=progress.stop)
    stopper.start()
    release.set()
    stopper.join(5)
    with pytest.raises(RuntimeError, match="stopped"):
        array[2]

"""Model loading and the VAE/UNet steps, checked against upstream's literal arithmetic."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from musetalk_warm.config import ModelSettings
from musetalk_warm.errors import ConfigError, WeightsMissing
from musetalk_warm.models.features import whisper_hidden_states
from musetalk_warm.models.musetalk import (
    Models,
    PositionalEncoding,
    decode_latents,
    encode_latents,
    images_to_bgr,
    load_models,
    missing_weights,
    prepare_crops,
    save_upstream_layout,
    tiny_models,
    unet_step,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny() -> Models:
    return tiny_models(seed=0)


@pytest.fixture(scope="module")
def crops(face_bgr: np.ndarray) -> np.ndarray:
    """Four real 256² BGR face crops (corners of the astronaut photo)."""
    return np.stack([face_bgr[y : y + 256, x : x + 256] for y in (0, 128) for x in (64, 192)])


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory: pytest.TempPathFactory, tiny: Models) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_upstream_layout(tiny, root)
    return root


def upstream_preprocess(img_bgr: np.ndarray, half_mask: bool) -> torch.Tensor:
    """musetalk/models/vae.py preprocess_img for one ndarray, as written upstream."""
    x = np.asarray([img_bgr[:, :, ::-1]]) / 255.0
    x = torch.squeeze(torch.FloatTensor(np.transpose(x, (3, 0, 1, 2))))
    if half_mask:
        mask = torch.zeros(256, 256)
        mask[:128] = 1
        x = x * (mask > 0.5)
    return ((x - 0.5) / 0.5).unsqueeze(0)


class _NotATensor:
    pass


def _copy_layout(source: Path, root: Path) -> Path:
    shutil.copytree(source, root)
    return root


# --- preprocessing -----------------------------------------------------------------------


def test_prepare_crops_matches_upstream(crops: np.ndarray) -> None:
    for half_mask in (False, True):
        x = prepare_crops(crops, half_mask)
        assert x.shape == (4, 3, 256, 256) and x.dtype == torch.float32
        for i in range(4):
            assert torch.equal(x[i : i + 1], upstream_preprocess(crops[i], half_mask))


def test_masked_half_is_minus_one_and_upper_half_is_normalised_rgb(crops: np.ndarray) -> None:
    x = prepare_crops(crops, half_mask=True)
    assert torch.all(x[:, :, 128:] == -1.0)
    rgb = crops[:, :128, :, ::-1].transpose(0, 3, 1, 2).astype(np.float64)
    assert np.allclose(x[:, :, :128].numpy(), (rgb / 255 - 0.5) / 0.5, rtol=0, atol=1e-7)
    blue = np.zeros((1, 256, 256, 3), np.uint8)
    blue[..., 0] = 255  # BGR blue
    assert prepare_crops(blue, False)[0, :, 0, 0].tolist() == [-1.0, -1.0, 1.0]


def test_prepare_crops_refuses_other_sizes() -> None:
    with pytest.raises(ValueError, match="256"):
        prepare_crops(np.zeros((1, 128, 128, 3), np.uint8), False)


# --- positional encoding ------------------------------------------------------------------


def test_positional_encoding_closed_form() -> None:
    pe = PositionalEncoding(384).pe[0]
    for pos, j in [(0, 0), (1, 0), (7, 3), (49, 100), (25, 191)]:
        angle = pos / 10000 ** (2 * j / 384)
        assert pe[pos, 2 * j].item() == pytest.approx(math.sin(angle), abs=2e-6)
        assert pe[pos, 2 * j + 1].item() == pytest.approx(math.cos(angle), abs=2e-6)


# --- steps --------------------------------------------------------------------------------


def test_step_shapes(tiny: Models, crops: np.ndarray) -> None:
    latents = encode_latents(tiny, crops[:3], batch_size=2)
    assert latents.shape == (3, 8, 32, 32) and latents.dtype == np.float32
    prompts = torch.randn(3, 50, tiny.audio_dim, generator=torch.Generator().manual_seed(1))
    pred = unet_step(tiny, torch.from_numpy(latents), prompts)
    assert pred.shape == (3, 4, 32, 32)
    faces = decode_latents(tiny, pred)
    assert faces.shape == (3, 256, 256, 3) and faces.dtype == np.uint8
    assert encode_latents(tiny, crops[:0]).shape == (0, 8, 32, 32)


def test_encode_latents_masked_then_full_from_the_mean(tiny: Models, crops: np.ndarray) -> None:
    latents = encode_latents(tiny, crops[:2])
    with torch.no_grad():
        for i in range(2):
            for half_mask, channels in ((True, slice(0, 4)), (False, slice(4, 8))):
                dist = tiny.vae.encode(upstream_preprocess(crops[i], half_mask)).latent_dist
                expected = (0.18215 * dist.mode()).numpy()[0]
                assert np.array_equal(latents[i, channels], expected)
    assert not np.array_equal(latents[:, :4], latents[:, 4:])
    # Batching may change the last bits only.
    assert np.allclose(encode_latents(tiny, crops[:2], batch_size=2), latents, atol=1e-5)


def test_sampled_latents_follow_the_torch_rng(tiny: Models, crops: np.ndarray) -> None:
    sampled = dataclasses.replace(tiny, latent_sampling="sample")
    torch.manual_seed(5)
    a = encode_latents(sampled, crops[:1])
    torch.manual_seed(5)
    b = encode_latents(sampled, crops[:1])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, encode_latents(tiny, crops[:1]))


def test_unet_step_adds_pe_at_timestep_zero(tiny: Models, crops: np.ndarray) -> None:
    latents = torch.from_numpy(encode_latents(tiny, crops[:2]))
    prompts = torch.randn(2, 50, tiny.audio_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        table = PositionalEncoding(tiny.audio_dim).pe[:, :50]
        expected = tiny.unet(latents, torch.tensor([0]), encoder_hidden_states=prompts + table).sample
    assert torch.equal(unet_step(tiny, latents, prompts), expected)


def test_decode_matches_upstream_numpy_postprocessing(tiny: Models) -> None:
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        image = tiny.vae.decode((1 / 0.18215) * latents).sample
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
    expected = (image * 255).round().astype("uint8")[..., ::-1]
    assert np.array_equal(decode_latents(tiny, latents), expected)


def test_decode_rounds_half_to_even() -> None:
    # y = x/2+0.5 exactly (y in [0.25, 1]); keep the y whose fp32 product y*255 is exactly k+0.5.
    k = np.arange(64, 255)
    y = ((k + 0.5) / 255).astype(np.float32)
    exact = (y * np.float32(255)) == (k + 0.5)
    k, y = k[exact], y[exact]
    assert len(k) > 20
    x = (y - np.float32(0.5)) * np.float32(2)
    images = torch.from_numpy(x).view(1, 1, -1, 1).expand(1, 3, -1, 1)
    out = images_to_bgr(images)[0, :, 0].astype(int)
    assert np.all(out == out[:, :1])  # all three channels
    # k+0.5 goes to the even neighbour: down for even k, up for odd k.
    assert np.array_equal(out[:, 0], np.where(k % 2 == 0, k, k + 1))
    assert set(out[:, 0] - k) == {0, 1}


# --- tiny preset -----------------------------------------------------------------------------


def test_tiny_models_are_seeded_and_leave_the_global_rng_alone(tiny: Models) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = tiny_models(seed=0)
    assert torch.equal(torch.rand(1), before)
    for a, b in zip(tiny.unet.state_dict().values(), again.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = tiny_models(seed=1)
    assert not torch.equal(tiny.vae.decoder.conv_out.weight, other.vae.decoder.conv_out.weight)
    assert (tiny.model_id, tiny.vae_id) == ("tiny:seed0", "tiny-vae:seed0")


def test_tiny_interfaces_match_the_official_ones(tiny: Models) -> None:
    assert tiny.unet.config.in_channels == 8 and tiny.unet.config.out_channels == 4
    assert tiny.unet.config.cross_attention_dim == tiny.audio_dim
    assert tiny.vae.config.latent_channels == 4 and tiny.scaling_factor == 0.18215
    assert tiny.whisper.config.encoder_layers == 4
    assert tiny.device == torch.device("cpu") and tiny.dtype == torch.float32


# --- official loader path --------------------------------------------------------------------


def test_load_models_from_the_upstream_layout_is_identical(
    tiny: Models,
    official_dir: Path,
    crops: np.ndarray,
    speech_16k: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = load_models(ModelSettings(models_dir=official_dir, renderer="musetalk"))
    assert calls and calls[0]["weights_only"] is True and calls[0]["map_location"] == "cpu"
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32

    latents = encode_latents(tiny, crops[:2])
    assert np.array_equal(encode_latents(loaded, crops[:2]), latents)
    prompts = torch.randn(2, 50, tiny.audio_dim, generator=torch.Generator().manual_seed(4))
    pred = unet_step(tiny, torch.from_numpy(latents), prompts)
    assert torch.equal(unet_step(loaded, torch.from_numpy(latents), prompts), pred)
    assert np.array_equal(decode_latents(loaded, pred), decode_latents(tiny, pred))
    audio = speech_16k[:32000]
    assert torch.equal(whisper_hidden_states(loaded, audio), whisper_hidden_states(tiny, audio))


def test_model_ids_name_the_weights(official_dir: Path, tmp_path: Path) -> None:
    loaded = load_models(ModelSettings(models_dir=official_dir, renderer="musetalk"))
    label, digest = loaded.model_id.split(":")
    assert label == "musetalkV15" and len(digest) == 12
    assert loaded.vae_id.startswith("sd-vae:")

    changed = tmp_path / "models"
    save_upstream_layout(tiny_models(seed=7), changed)
    for part in ("sd-vae", "whisper"):  # same VAE and Whisper, different UNet
        shutil.rmtree(changed / part)
        shutil.copytree(official_dir / part, changed / part)
    other = load_models(ModelSettings(models_dir=changed, renderer="musetalk"))
    assert other.model_id != loaded.model_id and other.vae_id == loaded.vae_id


def test_missing_file_raises_weights_missing_naming_it(official_dir: Path, tmp_path: Path) -> None:
    root = _copy_layout(official_dir, tmp_path / "models")
    (root / "musetalkV15/unet.pth").unlink()
    settings = ModelSettings(models_dir=root, renderer="musetalk")
    assert missing_weights(settings) == [Path("musetalkV15/unet.pth")]
    with pytest.raises(WeightsMissing) as info:
        load_models(settings)
    message = str(info.value)
    assert "musetalkV15/unet.pth" in message and "python scripts/download_weights.py" in message
    assert str(tmp_path) not in message and info.value.status_code == 503


def test_missing_weights_lists_every_absent_file(tmp_path: Path) -> None:
    settings = ModelSettings(models_dir=tmp_path)
    assert [p.as_posix() for p in missing_weights(settings)] == [
        "musetalkV15/musetalk.json",
        "musetalkV15/unet.pth",
        "sd-vae/config.json",
        "sd-vae/diffusion_pytorch_model.safetensors",
        "whisper/config.json",
        "whisper/pytorch_model.bin",
        "whisper/preprocessor_config.json",
    ]
    (tmp_path / "sd-vae").mkdir()
    (tmp_path / "sd-vae/diffusion_pytorch_model.bin").write_bytes(b"x")  # the .bin name is accepted too
    assert Path("sd-vae/diffusion_pytorch_model.safetensors") not in missing_weights(settings)


def test_unet_file_with_code_is_refused_by_weights_only(official_dir: Path, tmp_path: Path) -> None:
    root = _copy_layout(official_dir, tmp_path / "models")
    torch.save({"payload": _NotATensor()}, root / "musetalkV15/unet.pth")
    with pytest.raises(WeightsMissing, match=r"unet\.pth .* could not be loaded \(UnpicklingError\)"):
        load_models(ModelSettings(models_dir=root, renderer="musetalk"))


@pytest.mark.parametrize("name", ["musetalkV15/unet.pth", "sd-vae/diffusion_pytorch_model.safetensors"])
def test_truncated_weights_are_reported_not_crashed(official_dir: Path, tmp_path: Path, name: str) -> None:
    root = _copy_layout(official_dir, tmp_path / "models")
    data = (root / name).read_bytes()
    (root / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsMissing, match="could not be loaded") as info:
        load_models(ModelSettings(models_dir=root, renderer="musetalk"))
    assert name.split("/")[0] in str(info.value) and str(tmp_path) not in str(info.value)


def test_load_models_presets_and_devices() -> None:
    tiny = load_models(ModelSettings(renderer="tiny", tiny_seed=3))
    assert tiny.model_id == "tiny:seed3"
    assert tiny.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError):
        load_models(ModelSettings(renderer="lite"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            load_models(ModelSettings(renderer="tiny", device="cuda"))


# --- scripts/download_weights.py -------------------------------------------------------------


def load_downloader() -> ModuleType:
    """scripts/download_weights.py as a module (scripts/ is not a package)."""
    name = "download_weights"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "download_weights.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_download_plan_and_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dl = load_downloader()
    core = [item.path for item in dl.select("core")]
    assert core == [p.as_posix() for p in missing_weights(ModelSettings(models_dir=tmp_path))]
    everything = {item.path for item in dl.select("all", with_enhance=True)}
    assert {"dwpose/dw-ll_ucoco_384.pth", "face-parse-bisent/79999_iter.pth", "GFPGANv1.4.pth"} <= everything
    assert "GFPGANv1.4.pth" not in {item.path for item in dl.select("all")}
    # The face_alignment backend's checkpoints, under the names and folder it reads them from.
    from musetalk_warm.avatars.fan import FAN_WEIGHTS, S3FD_WEIGHTS

    folder = ModelSettings().face_alignment_dir
    fan = {item.path for item in dl.select("core", with_face_alignment=True)} - set(core)
    assert fan == {f"{folder}/{S3FD_WEIGHTS}", f"{folder}/{FAN_WEIGHTS}"}

    assert dl.main(["--models-dir", str(tmp_path), "--only", "core", "--dry-run"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [row["status"] for row in summary["files"]] == ["would_fetch"] * 7
    assert summary["files"][1]["source"] == "hf://TMElyralab/MuseTalk/musetalkV15/unet.pth"
    assert not any(tmp_path.iterdir())


def test_download_skips_present_files_and_refetches_wrong_sizes(tmp_path: Path) -> None:
    dl = load_downloader()
    good = dl.WeightFile("a/good.bin", "core", 4, "org/repo", "good.bin")
    short = dl.WeightFile("a/short.bin", "core", 6, "org/repo", "short.bin")
    (tmp_path / "a").mkdir()
    (tmp_path / "a/good.bin").write_bytes(b"1234")
    (tmp_path / "a/short.bin").write_bytes(b"123")
    fetched = []

    def fake_fetch(item, root, force):
        fetched.append((item.path, force))
        (root / item.path).write_bytes(b"123456")

    rows = dl.sync(tmp_path, [good, short], fetcher=fake_fetch)
    assert fetched == [("a/short.bin", True)]
    assert [(r["found"], r["status"]) for r in rows] == [("present", "present"), ("wrong_size", "downloaded")]


def test_download_detects_size_and_hash_mismatch(tmp_path: Path) -> None:
    dl = load_downloader()
    sized = dl.WeightFile("x.bin", "core", 10, url="https://example.invalid/x.bin")
    abc_hash = hashlib.sha256(b"abc").hexdigest()
    hashed = dl.WeightFile("y.bin", "core", 3, url="https://example.invalid/y.bin", sha256=abc_hash)

    def wrong_bytes(item, root, force):
        (root / item.path).write_bytes(b"xyz")

    rows = dl.sync(tmp_path, [sized, hashed], fetcher=wrong_bytes)
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert "size 3 != expected 10" in rows[0]["error"] and "SHA-256" in rows[1]["error"]
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "y.bin").exists()


def test_url_download_resumes_with_a_range_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dl = load_downloader()
    payload = bytes(range(256)) * 4
    digest = hashlib.sha256(payload).hexdigest()
    item = dl.WeightFile("w/r.pth", "face", len(payload), url="https://example.invalid/r.pth", sha256=digest)
    (tmp_path / "w").mkdir()
    (tmp_path / "w/r.pth.part").write_bytes(payload[:300])
    seen = []

    class Response(io.BytesIO):
        status = 206

    def fake_urlopen(request, timeout):
        seen.append(request.get_header("Range"))
        start = int(request.get_header("Range").split("=")[1].rstrip("-"))
        return Response(payload[start:])

    monkeypatch.setattr(dl.urllib.request, "urlopen", fake_urlopen)
    rows = dl.sync(tmp_path, [item])
    assert seen == ["bytes=300-"] and rows[0]["status"] == "downloaded"
    assert (tmp_path / "w/r.pth").read_bytes() == payload and not (tmp_path / "w/r.pth.part").exists()

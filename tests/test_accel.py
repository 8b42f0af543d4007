"""Batch buckets, the bucket policy, the bucketed model path and feather paste-back in torch (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_settings

from musetalk_warm.models.musetalk import decode_latents, tiny_models, unet_step
from musetalk_warm.render import blend
from musetalk_warm.render.accelerator import Accelerator
from musetalk_warm.render.buckets import BUCKETS, BucketPolicy, bucket_for, pad_rows, split
from musetalk_warm.render.gpu_composite import GpuCompositor
from musetalk_warm.render.runtime import Runtime


def test_bucket_for_and_split() -> None:
    assert [bucket_for(n) for n in (1, 2, 4, 5, 9, 17, 33, 64, 65)] == [1, 4, 4, 8, 16, 32, 64, 64, 64]
    assert split(150) == [(64, 64), (64, 64), (22, 32)]
    assert split(64) == [(64, 64)]
    assert split(3, (1, 4)) == [(3, 4)]
    assert sum(f for f, _ in split(1000)) == 1000
    with pytest.raises(ValueError):
        bucket_for(0)


def test_pad_rows_repeats_the_last_row() -> None:
    x = np.arange(6).reshape(3, 2)
    padded = pad_rows(x, 8)
    assert padded.shape == (8, 2)
    np.testing.assert_array_equal(padded[:3], x)
    assert (padded[3:] == x[-1]).all()
    with pytest.raises(ValueError):
        pad_rows(x, 2)


def test_policy_covers_due_frames_when_in_time_else_largest_fitting_else_best_throughput() -> None:
    # Fixed 10 ms overhead + 1 ms a frame, so bigger buckets have more frames/s.
    policy = BucketPolicy.linear(0.001, 0.010)
    assert policy.buckets == BUCKETS
    assert policy.choose(3, slack_s=1.0) == 4  # all due frames in one padded batch
    assert policy.choose(40, slack_s=1.0) == 64
    assert policy.choose(40, slack_s=0.030) == 16  # 64 (74 ms) and 32 (42 ms) miss; 16 (26 ms) fits
    assert policy.choose(40, slack_s=0.0) == 64  # late anyway: drain at the best frames/s
    assert policy.choose(1, slack_s=0.0) == 1
    # A bucket that measured slow per frame is not the catch-up choice.
    costs = {1: 0.010, 4: 0.012, 8: 0.100}
    assert BucketPolicy(costs).choose(6, slack_s=0.0) == 4
    assert BucketPolicy(costs).as_dict()["4"] == {"ms": 12.0, "fps": 333.3}
    with pytest.raises(ValueError):
        BucketPolicy({1: 0.0})


def test_bucketed_model_path_equals_the_plain_steps() -> None:
    models = tiny_models(0)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(5, 8, 32, 32, generator=gen)
    prompts = torch.randn(5, 50, models.audio_dim, generator=gen)
    reference = decode_latents(models, unet_step(models, latents, prompts))
    plain = Accelerator(models).run(latents, prompts)
    np.testing.assert_array_equal(plain, reference)
    # 5 frames → padded into a bucket of 8; a bucket of 2 splits them 2+2+1(→2).
    for buckets in ((1, 8), (2,)):
        accel = Accelerator(models, buckets=buckets)
        assert accel.bucket_for(5) == buckets[-1] if buckets == (2,) else 8
        faces = accel.run(latents, prompts)
        assert faces.shape == reference.shape
        assert np.abs(faces.astype(int) - reference).max() <= 1  # batch-size-dependent kernels only
    policy = Accelerator(models, buckets=(1, 4)).measure(repeats=1)
    assert policy.buckets == (1, 4) and all(c > 0 for c in policy.costs_s.values())


def test_warmup_runs_the_largest_bucket_first() -> None:
    """A batch-dynamic compile is tuned for the batch it first sees, so warm-up starts at the top."""
    models = tiny_models(0)
    accel = Accelerator(models, buckets=(1, 4, 8))
    seen: list[int] = []
    step = accel._fn

    def recorded(latents: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        seen.append(len(latents))
        return step(latents, prompts)

    accel._fn = recorded
    assert sorted(accel.warmup()) == [1, 4, 8]
    assert seen == [8, 4, 1]


def test_auto_mode_and_memory_format() -> None:
    from musetalk_warm.errors import ConfigError
    from musetalk_warm.render.accelerator import channels_last, resolve_mode

    assert resolve_mode("auto", torch.device("cpu")) == "eager"
    assert resolve_mode("auto", torch.device("cuda")) == "compile"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_mode("compile", torch.device("cpu"))
    assert channels_last("auto", "compile") and not channels_last("auto", "graphs")
    assert channels_last("channels_last", "graphs") and not channels_last("contiguous", "compile")
    with pytest.raises(ValueError, match="compile_modules"):
        Accelerator(tiny_models(0), mode="compile", compile_modules=("vae",))  # type: ignore[arg-type]


def test_a_failed_compile_falls_back_to_the_plain_modules_in_the_default_layout() -> None:
    models = tiny_models(0)
    gen = torch.Generator().manual_seed(1)
    latents, prompts = torch.randn(3, 8, 32, 32, generator=gen), torch.randn(3, 50, models.audio_dim, generator=gen)
    reference = decode_latents(models, unet_step(models, latents, prompts))
    accel = Accelerator(models, mode="compile", buckets=(1, 4), channels_last=True)
    assert models.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    def broken(*_: object) -> torch.Tensor:
        raise RuntimeError("no compiler")

    accel._fn = broken
    spent = accel.warmup()
    assert accel.mode == "eager" and sorted(spent) == [1, 4]
    assert models.unet.conv_in.weight.is_contiguous()
    assert np.abs(accel.run(latents, prompts).astype(int) - reference).max() <= 1  # padded to 4


@pytest.fixture(scope="module")
def demo_avatar(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    runtime = Runtime.load(make_settings(tmp_path_factory.mktemp("accel"), render={"batch_size": 4}))
    yield runtime.avatar(None)
    runtime.close()


@pytest.mark.parametrize("subpixel", [True, False])
def test_torch_feather_paste_matches_the_cpu_compositor(demo_avatar, subpixel: bool) -> None:  # type: ignore[no-untyped-def]
    avatar = demo_avatar
    rng = np.random.default_rng(1)
    src = np.array([0, 3, 7, len(avatar.frames) - 1, 3])
    # Smooth faces (as a decoder makes), so interpolation rounding stays at a grey level.
    base = avatar.crops[src].astype(np.float32)
    faces = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
    compositor = GpuCompositor("cpu")
    state = compositor.prepare(avatar, subpixel)
    assert compositor.prepare(avatar, subpixel) is state
    assert state.nbytes > avatar.frames.nbytes
    frames = compositor.composite(state, torch.from_numpy(faces), src).frames()
    for frame, face, i in zip(frames, faces, src, strict=True):
        want = blend.composite(avatar.frames[i], face, avatar.placements[i], avatar.masks[i],
                               avatar.crop_boxes[i], "feather", subpixel=subpixel)
        diff = np.abs(frame.astype(int) - want)
        assert diff.max() <= 3 and diff.mean() < 0.05, (diff.max(), diff.mean())
        assert (frame != avatar.frames[i]).any()  # the face was pasted


def test_device_hold_matches_the_host_blend_towards_the_source_mouth(demo_avatar) -> None:  # type: ignore[no-untyped-def]
    from musetalk_warm.render import silence

    avatar = demo_avatar
    src = np.array([1, 4, 6, 2])
    weights = [0.0, 0.25, 1.0, 0.5]
    faces = np.random.default_rng(2).integers(0, 256, (len(src), 256, 256, 3), dtype=np.uint8)
    compositor = GpuCompositor("cpu")
    state = compositor.prepare(avatar)
    held = compositor.hold(state, torch.from_numpy(faces), torch.from_numpy(src), weights).numpy()
    want = silence.hold_source(faces, avatar.crops[src], np.array(weights, np.float32))
    assert np.abs(held.astype(int) - want).max() <= 1
    np.testing.assert_array_equal(held[0], faces[0])  # weight 0: the generated face
    np.testing.assert_array_equal(held[2], avatar.crops[src[2]])  # weight 1: the source mouth
    untouched = torch.from_numpy(faces)
    assert compositor.hold(state, untouched, torch.from_numpy(src), [0.0] * 4) is untouched

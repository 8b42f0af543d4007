"""The frame scheduler: mixed batches, each frame to its own session in order, deadline misses."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from live_support import Rig, build_avatar, drain_frames, live_test_settings, queued, until
from musetalk_warm.avatars.cache import Avatar
from musetalk_warm.config import Settings
from musetalk_warm.live.scheduler import FrameRequest, MaxBatchPolicy
from musetalk_warm.render.lite import LiteRenderer
from musetalk_warm.render.blend import composite_face
from musetalk_warm.render.mixed import FrameJob


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return live_test_settings(tmp_path_factory.mktemp("live-scheduler"), max_batch=6)


@pytest.fixture(scope="module")
def avatar(settings: Settings) -> Avatar:
    return build_avatar(settings)


class CountingRenderer(LiteRenderer):
    """The lite renderer, remembering which sessions' frames (by openness value) each call held."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()

    def generate(self, avatar: Avatar, cond: np.ndarray, src_idx: np.ndarray) -> np.ndarray:
        self.gate.wait()
        self.calls.append(np.asarray(cond).copy())
        return super().generate(avatar, cond, src_idx)


def test_batches_mix_sessions_but_each_gets_its_own_frames_in_order(settings: Settings, avatar: Avatar) -> None:
    renderer = CountingRenderer()
    sessions = {"a": 0.3, "b": 0.9}  # each session's mouth openness: its frames are told apart by it

    async def scenario() -> tuple[dict[str, list[tuple[int, np.ndarray]]], list[FrameRequest]]:
        rig = Rig(settings, renderer)
        loop = asyncio.get_running_loop()
        renderer.gate.clear()  # hold the accelerator so both sessions' requests queue up
        requests = []
        for tick in range(9):
            for name, openness in sessions.items():
                source = int(avatar.source_index(tick))
                requests.append(FrameRequest(name, tick, FrameJob(avatar, source, np.float32(openness)),
                                             deadline=tick / 25, future=loop.create_future()))
        rig.scheduler.submit(requests)
        got: dict[str, list[tuple[int, np.ndarray]]] = {name: [] for name in sessions}
        for request in requests:
            request.future.add_done_callback(
                lambda f, r=request: got[r.session_id].append((r.tick, f.result()))
            )
        renderer.gate.set()
        await asyncio.gather(*(r.future for r in requests))
        await rig.close()
        return got, requests

    got, requests = asyncio.run(scenario())
    # One renderer call can hold both sessions' frames (mixed), and batches respect the policy size.
    assert any({round(float(v), 2) for v in call} == {0.3, 0.9} for call in renderer.calls)
    assert all(len(call) <= 6 for call in renderer.calls)
    for name, openness in sessions.items():
        ticks = [tick for tick, _ in got[name]]
        assert ticks == sorted(ticks) == list(range(9))  # in order
        for tick, frame in got[name]:
            source = int(avatar.source_index(tick))
            own = LiteRenderer().generate(avatar, np.array([openness], np.float32), np.array([source]))[0]
            assert np.array_equal(frame, composite_face(avatar, own, source, settings.render))


def test_earliest_deadline_first(settings: Settings, avatar: Avatar) -> None:
    async def scenario() -> list[float]:
        renderer = CountingRenderer()
        rig = Rig(settings, renderer)
        loop = asyncio.get_running_loop()
        renderer.gate.clear()
        deadlines = [0.5, 0.1, 0.4, 0.2, 0.3, 0.6, 0.05]
        requests = [FrameRequest("s", i, FrameJob(avatar, 0, np.float32(d)), d, loop.create_future())
                    for i, d in enumerate(deadlines)]
        rig.scheduler.submit(requests)
        renderer.gate.set()
        await asyncio.gather(*(r.future for r in requests))
        await rig.close()
        return [float(v) for call in renderer.calls for v in call]

    order = asyncio.run(scenario())
    # The first batch may have started before the rest arrived; everything after is by deadline.
    assert order[1:] == sorted(order[1:])


def test_late_frames_are_counted_misses_and_replaced_by_idle(settings: Settings, avatar: Avatar) -> None:
    renderer = CountingRenderer()

    async def scenario() -> tuple[list, int, float]:
        rig = Rig(settings, renderer)
        session = rig.session("s", avatar)
        sub = session.subscribe()
        renderer.gate.clear()  # the accelerator stalls: nothing comes back in time
        await session.say("Hello there, this frame will be late.")
        await until(lambda: queued(session))
        await rig.tick(30, drain=False)
        frames = drain_frames(sub)
        misses = session.stats.misses
        renderer.gate.set()
        counter = rig.metrics.live_misses._value.get()
        await rig.close()
        return frames, misses, counter

    frames, misses, counter = asyncio.run(scenario())
    late = [f for f in frames if f.speaking]
    assert late and misses == len(late) == counter
    assert [f.index for f in frames] == list(range(len(frames)))  # the clock did not wait
    for f in late:  # the idle frame at the tick's cycle position stands in, with the speech audio
        assert np.array_equal(f.image, avatar.frames[int(avatar.source_index(f.index))])
    assert any(f.audio.any() for f in late)


def test_admission_books_capacity_per_speaking_session(settings: Settings, avatar: Avatar) -> None:
    from musetalk_warm.errors import Overloaded

    async def scenario() -> None:
        rig = Rig(settings)
        scheduler = rig.scheduler
        scheduler.cost.per_frame_s = 0.01  # measured: 100 frames/s, 85 of them bookable
        scheduler.book("a", 25)
        scheduler.book("b", 25)
        scheduler.book("c", 25)
        scheduler.book("a", 25)  # already speaking: no new demand
        with pytest.raises(Overloaded) as info:
            scheduler.book("d", 25)
        assert info.value.status_code == 503 and info.value.retry_after == settings.live.retry_after_s
        scheduler.release("b")
        scheduler.book("d", 25)
        await rig.close()

    asyncio.run(scenario())


def test_policy_is_the_one_place_batch_sizes_are_chosen() -> None:
    from musetalk_warm.live.scheduler import DEADLINE_MARGIN, CostModel

    policy = MaxBatchPolicy(8)
    unmeasured = CostModel()
    assert [policy.batch_size(n, unmeasured, 1.0) for n in (0, 1, 5, 8, 30)] == [1, 1, 5, 8, 8]
    # A close deadline takes only what can be done by then with the margin in hand (at least one
    # frame), from the measured cost of a batch of that size: 4 ms + 1 ms a frame here.
    cost = CostModel()
    cost.observe(1, 0.005)
    cost.observe(8, 0.012)
    assert DEADLINE_MARGIN == 1.5
    assert [policy.batch_size(30, cost, slack) for slack in (-1.0, 0.005, 0.011, 0.015, 1.0)] == [1, 1, 3, 6, 8]


def test_musetalk_batch_mixes_avatars_in_one_call(tmp_path: Path, tiny_models) -> None:
    """Frames of two avatars share one UNet + VAE call and match per-avatar rendering."""
    from dataclasses import replace
    from functools import partial

    import torch

    from musetalk_warm.avatars.prep import load_or_prepare
    from musetalk_warm.models.features import audio_prompts
    from musetalk_warm.models.musetalk import encode_latents
    from musetalk_warm.render.engine import MuseTalkRenderer
    from musetalk_warm.render.mixed import generate_faces

    settings = live_test_settings(tmp_path)
    a = load_or_prepare(settings, encoder=partial(encode_latents, tiny_models), vae_id=tiny_models.vae_id,
                        progress=False)
    b = replace(a, avatar_id="other", latents=np.ascontiguousarray(a.latents[::-1]))
    renderer = MuseTalkRenderer(tiny_models)
    calls = []
    unet = tiny_models.unet.forward
    tiny_models.unet.forward = lambda *args, **kw: calls.append(1) or unet(*args, **kw)
    try:
        cond = audio_prompts(tiny_models, np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1, 25)
        jobs = [FrameJob(a, 0, cond[0]), FrameJob(b, 3, cond[1]), FrameJob(a, 5, cond[2])]
        mixed = generate_faces(renderer, jobs)
        assert len(calls) == 1
        alone_a = renderer.generate(a, torch.stack([cond[0], cond[2]]), np.array([0, 5]))
        alone_b = renderer.generate(b, cond[1:2], np.array([3]))
    finally:
        tiny_models.unet.forward = unet
    for got, want in zip(mixed, [alone_a[0], alone_b[0], alone_a[1]]):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_device_composited_batches_match_the_host_path(tmp_path: Path, tiny_models) -> None:
    """With a compositor (CPU torch here, CUDA in production) a mixed batch comes back finished from
    the device, in job order, equal to host compositing within interpolation rounding; faceless
    source frames fall back to the host, where they are shown untouched."""
    from dataclasses import replace
    from functools import partial

    from musetalk_warm.avatars.prep import load_or_prepare
    from musetalk_warm.models.features import audio_prompts
    from musetalk_warm.models.musetalk import encode_latents
    from musetalk_warm.render.engine import MuseTalkRenderer
    from musetalk_warm.render.gpu_composite import GpuCompositor
    from musetalk_warm.render.mixed import DeviceFrames, generate_faces, hold_silent_faces, render_on_device

    settings = live_test_settings(tmp_path)
    a = load_or_prepare(settings, encoder=partial(encode_latents, tiny_models), vae_id=tiny_models.vae_id,
                        progress=False)
    b = replace(a, avatar_id="other", latents=np.ascontiguousarray(a.latents[::-1]))
    host = MuseTalkRenderer(tiny_models)
    device = MuseTalkRenderer(tiny_models, host.accelerator, GpuCompositor("cpu", latent_dtype=tiny_models.dtype))
    cond = audio_prompts(tiny_models, np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1, 25)
    jobs = [FrameJob(a, 0, cond[0]), FrameJob(b, 3, cond[1]), FrameJob(a, 5, cond[2]), FrameJob(b, 1, cond[3])]
    render = settings.render.model_copy(update={"blend_mode": "feather"})
    assert render_on_device(host, jobs, render) is None  # no compositor: the host pastes
    result = render_on_device(device, jobs, render)
    assert isinstance(result, DeviceFrames)
    frames = result.frames()
    faces = generate_faces(host, jobs)
    assert len(frames) == len(jobs)
    for frame, face, job in zip(frames, faces, jobs, strict=True):
        want = composite_face(job.avatar, face, job.source, render)
        diff = np.abs(frame.astype(int) - want.astype(int))
        assert diff.max() <= 3 and diff.mean() < 0.05, (job.avatar.avatar_id, job.source, diff.max())
    # Silent frames (holding the source mouth) are finished on the device as well.
    held = [replace(job, hold=w) for job, w in zip(jobs, (0.0, 0.5, 1.0, 0.0), strict=True)]
    frames = render_on_device(device, held, render).frames()  # type: ignore[union-attr]
    for frame, face, job in zip(frames, hold_silent_faces(held, faces), held, strict=True):
        diff = np.abs(frame.astype(int) - composite_face(job.avatar, face, job.source, render).astype(int))
        assert diff.max() <= 3 and diff.mean() < 0.05, (job.hold, diff.max())
    # A face restorer (live_enhance) runs on the device's faces before the paste.
    from torch import nn

    from musetalk_warm.render.enhance import FaceEnhancer

    enhancer = FaceEnhancer(nn.Identity(), 512)  # resampling to 512² and back is still a change
    frames = render_on_device(device, jobs, render, enhancer).frames()  # type: ignore[union-attr]
    for frame, face, job in zip(frames, enhancer.restore(np.stack(faces)), jobs, strict=True):
        diff = np.abs(frame.astype(int) - composite_face(job.avatar, face, job.source, render).astype(int))
        assert diff.max() <= 3 and diff.mean() < 0.05
    faceless = replace(a, manifest={**a.manifest, "faceless_frames": [5]})
    assert render_on_device(device, [FrameJob(faceless, 5, cond[0])], render) is None
    assert render_on_device(device, jobs, render.model_copy(update={"blend_mode": "poisson"})) is None


def test_batch_cost_is_interpolated_between_measured_sizes() -> None:
    """Small batches cost more per frame than full ones: planning reads the cost of the batch it
    will get, capacity the most efficient size."""
    from musetalk_warm.live.scheduler import CostModel

    cost = CostModel()
    assert cost.batch_s(4) == 0.0 and cost.per_frame_s is None
    cost.observe(1, 0.012)
    cost.observe(32, 0.128)
    assert cost.per_frame_s == pytest.approx(0.004)  # capacity: 250 frames/s at full batches
    assert cost.batch_s(1) == pytest.approx(0.012)
    assert cost.batch_s(16) == pytest.approx(0.012 + 0.116 * 15 / 31)
    assert cost.batch_s(64) == pytest.approx(0.256)
    cost.observe(32, 0.228)  # slower now: the estimate moves a fifth of the way
    assert cost.batch_s(32) == pytest.approx(0.148)


def test_bucket_policy_takes_the_faster_of_the_buckets_around_a_batch() -> None:
    """With the H200's measured CUDA-graph costs, 10 due frames run as a full 8 (205 frames/s)
    rather than padded to 16 (142 frames/s); 3 run padded to 4 rather than as 1."""
    from musetalk_warm.live.scheduler import BucketBatchPolicy
    from musetalk_warm.render.buckets import BucketPolicy

    from musetalk_warm.live.scheduler import CostModel

    costs = BucketPolicy({1: 0.0116, 4: 0.0235, 8: 0.0392, 16: 0.0705, 32: 0.1374})
    policy = BucketBatchPolicy(32, costs)
    cost = CostModel()
    cost.observe(32, 0.1374)  # live frames cost what the model path does (no paste overhead)
    assert [policy.batch_size(n, cost, 1.0) for n in (1, 3, 4, 10, 16, 20, 40)] == [1, 3, 4, 8, 16, 16, 32]
    # The deadline bounds it (1.5× the cost in hand): only a batch of one is back within 18 ms,
    # a padded 4 (23.5 ms) within 36 ms, an 8 (39 ms) within 60 ms but not a 16 (70 ms).
    assert [policy.batch_size(10, cost, slack) for slack in (0.018, 0.036, 0.060)] == [1, 4, 8]
    assert policy.batch_size(10, cost, 0.0) == 8  # late anyway: the best frames/s up to the covering bucket
    # Live frames measured twice as dear as the model path alone: the deadline bound tightens.
    slow = CostModel()
    slow.observe(32, 2 * 0.1374)
    assert policy.batch_size(10, slow, 0.075) == 4  # a padded 4 as dear as 47 ms: within 75 ms, not 60

"""The shape-stable model path: UNet step + VAE decode at fixed batch buckets.

``Accelerator.faces(latents, prompts)`` turns any number of frames into uint8
BGR faces on the device. Frames are cut into buckets (:mod:`.buckets`), a
partial batch is padded to the next bucket, and each bucket runs as

* ``eager``: the plain modules (no padding unless buckets are given);
* ``graphs``: one CUDA graph per bucket, captured once (no per-kernel launch cost);
* ``compile``: the UNet and/or the VAE decoder (``compile_modules``) through
  ``torch.compile`` (batch-dynamic, so a few compiles cover every bucket), replayed
  as CUDA graphs. Inductor's artefacts go to ``cache_dir``, so a restart reuses them
  instead of compiling again.

``channels_last`` stores both networks' convolutions in NHWC, the layout tensor-core
convolutions read directly; eager GroupNorm is slow in it, Inductor's fused one is not.

All methods are called from one thread (the engine's accelerator thread).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..models.musetalk import Models, bgr_bytes, use_fast_kernels
from .buckets import BucketPolicy, bucket_for, check_buckets, split

log = logging.getLogger(__name__)

AccelMode = Literal["eager", "graphs", "compile"]
Compiled = Literal["unet", "decoder"]
FacesFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_mode(name: str, device: torch.device) -> AccelMode:
    """``auto`` → ``compile`` on CUDA (:meth:`Accelerator.warmup` falls back to ``graphs`` if compiling
    fails), ``eager`` elsewhere; ``graphs`` and ``compile`` need CUDA."""
    if name == "auto":
        return "compile" if device.type == "cuda" else "eager"
    if name in ("graphs", "compile") and device.type != "cuda":
        from ..errors import ConfigError

        raise ConfigError(f"models.accelerate {name!r} needs a CUDA device, not {device}")
    return name  # type: ignore[return-value]


def channels_last(memory_format: str, mode: AccelMode) -> bool:
    """Whether ``models.memory_format`` means NHWC for ``mode`` (``auto``: when compiling)."""
    return memory_format == "channels_last" or (memory_format == "auto" and mode == "compile")


def use_compile_cache(cache_dir: Path) -> None:
    """Point Inductor's and Triton's on-disk caches at ``cache_dir`` (before the first compile)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir.resolve())
    os.environ["TRITON_CACHE_DIR"] = str((cache_dir / "triton").resolve())


class Accelerator:
    """UNet + VAE decode at fixed batch buckets, eager, CUDA-graphed or compiled."""

    def __init__(
        self,
        models: Models,
        *,
        mode: AccelMode = "eager",
        buckets: Sequence[int] | None = None,
        cache_dir: Path | None = None,
        compile_modules: Sequence[Compiled] = ("unet", "decoder"),
        channels_last: bool = False,
    ) -> None:
        self.models = models
        self.mode = mode
        # Eager on the CPU runs any shape; graphs and compiled code only the buckets.
        self.buckets = check_buckets(buckets) if buckets else None
        if mode != "eager" and self.buckets is None:
            from .buckets import BUCKETS

            self.buckets = BUCKETS
        self.compile_s = 0.0
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._pool: tuple[int, int] | None = None
        if mode != "eager" or models.device.type == "cuda":
            use_fast_kernels(models)
        if channels_last:
            models.unet.to(memory_format=torch.channels_last)
            models.vae.to(memory_format=torch.channels_last)
        self._fn: FacesFn = self._eager
        if mode == "compile":
            if cache_dir is not None:
                use_compile_cache(cache_dir)
            unknown = set(compile_modules) - {"unet", "decoder"}
            if unknown or not compile_modules:
                raise ValueError(f"compile_modules must name unet and/or decoder, got {list(compile_modules)}")
            self._unet = torch.compile(models.unet, dynamic=True) if "unet" in compile_modules else models.unet
            self._decoder = (torch.compile(models.vae.decode, dynamic=True) if "decoder" in compile_modules
                             else models.vae.decode)
            self._fn = self._compiled
        self._dim = models.audio_dim

    # One step, two ways: the modules as they are, or their compiled twins.
    def _eager(self, latents: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        return self._step(self.models.unet, self.models.vae.decode, latents, prompts)

    def _compiled(self, latents: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        return self._step(self._unet, self._decoder, latents, prompts)

    def _step(self, unet: Callable, decode: Callable, latents: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        m = self.models
        with torch.inference_mode():
            # A device-side zero, not torch.tensor([0]): no host copy, so it can be graph-captured.
            t = torch.zeros(1, dtype=torch.long, device=latents.device)
            pred = unet(latents, t, encoder_hidden_states=m.pe(prompts)).sample
            return bgr_bytes(decode((1 / m.scaling_factor) * pred).sample)

    def _inputs(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.models
        return (torch.zeros(bucket, 8, 32, 32, device=m.device, dtype=m.dtype),
                torch.zeros(bucket, 50, self._dim, device=m.device, dtype=m.dtype))

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Warm up ``bucket`` (compiling it if need be) on a side stream, then capture it."""
        latents, prompts = self._inputs(bucket)
        side = torch.cuda.Stream(self.models.device)
        side.wait_stream(torch.cuda.current_stream(self.models.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._fn(latents, prompts)
        torch.cuda.current_stream(self.models.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # One memory pool for all buckets: each replay's output is copied out before the next.
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._fn(latents, prompts)
        self._pool = graph.pool()
        return graph, latents, prompts, out

    def warmup(self) -> dict[int, float]:
        """Prepare every bucket (compile, capture); seconds spent on each.

        A compile that fails (no working Triton or C compiler, say) is logged and the
        path falls back to the plain modules in their default layout, CUDA-graphed on CUDA.
        """
        try:
            return self._warm_buckets()
        except Exception as exc:
            if self.mode != "compile":
                raise
            fallback: AccelMode = "graphs" if self.models.device.type == "cuda" else "eager"
            log.warning("compiling the model path failed (%s: %s); running %s", type(exc).__name__, exc, fallback)
            self.mode, self._fn, self._pool = fallback, self._eager, None
            self._graphs.clear()
            self.models.unet.to(memory_format=torch.contiguous_format)
            self.models.vae.to(memory_format=torch.contiguous_format)
            return self._warm_buckets()

    def _warm_buckets(self) -> dict[int, float]:
        spent: dict[int, float] = {}
        # Largest first: a batch-dynamic compile tunes its kernels for the batch it first sees
        # (a batch of 1 is compiled on its own). On an H200 the compiled decoder warmed from
        # the smallest buckets up ran 345 frames/s at batch 32, first compiled at 16: 414.
        for bucket in sorted(self.buckets or (1,), reverse=True):
            t0 = time.perf_counter()
            self._run_bucket(*self._inputs(bucket), bucket, bucket)
            self._sync()
            spent[bucket] = round(time.perf_counter() - t0, 3)
        self.compile_s = sum(spent.values())
        log.info("accelerator %s ready in %.1f s (%s)", self.mode, self.compile_s, spent)
        return spent

    def _sync(self) -> None:
        if self.models.device.type == "cuda":
            torch.cuda.synchronize(self.models.device)

    # Graph inputs are filled in place: inside inference mode whichever thread (and mode) captured them.
    @torch.inference_mode()
    def _run_bucket(self, latents: torch.Tensor, prompts: torch.Tensor, n: int, bucket: int) -> torch.Tensor:
        if self.mode == "eager":
            if n < bucket:
                latents, prompts = _pad(latents, bucket), _pad(prompts, bucket)
            return self._fn(latents, prompts)[:n]
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket)
        graph, static_latents, static_prompts, out = self._graphs[bucket]
        _fill(static_latents, latents)
        _fill(static_prompts, prompts)
        graph.replay()
        return out[:n].clone()

    def faces(self, latents: torch.Tensor | np.ndarray, prompts: torch.Tensor) -> torch.Tensor:
        """``[n,8,32,32]`` latents + ``[n,50,D]`` prompts → ``[n,256,256,3]`` uint8 BGR on the device."""
        m = self.models
        latents = torch.as_tensor(latents).to(m.device, m.dtype, non_blocking=True)
        prompts = torch.as_tensor(prompts).to(m.device, m.dtype, non_blocking=True)
        n = len(latents)
        if self.buckets is None:
            return self._fn(latents, prompts)
        parts, start = [], 0
        for frames, bucket in split(n, self.buckets):
            parts.append(self._run_bucket(latents[start : start + frames], prompts[start : start + frames],
                                          frames, bucket))
            start += frames
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def run(self, latents: torch.Tensor | np.ndarray, prompts: torch.Tensor) -> np.ndarray:
        """:meth:`faces` copied to the host: ``[n,256,256,3]`` uint8 BGR."""
        return self.faces(latents, prompts).cpu().numpy()

    def measure(self, repeats: int = 5) -> BucketPolicy:
        """Seconds per batch of each bucket (median of ``repeats``) as a :class:`BucketPolicy`."""
        costs = {}
        for bucket in self.buckets or (1,):
            latents, prompts = self._inputs(bucket)
            self._run_bucket(latents, prompts, bucket, bucket)
            times = []
            for _ in range(repeats):
                self._sync()
                t0 = time.perf_counter()
                self._run_bucket(latents, prompts, bucket, bucket)
                self._sync()
                times.append(time.perf_counter() - t0)
            costs[bucket] = float(np.median(times))
        return BucketPolicy(costs)

    def bucket_for(self, n: int) -> int:
        """The bucket ``n`` frames run at (``n`` itself on an unbucketed eager path)."""
        return n if self.buckets is None else bucket_for(n, self.buckets)


def _pad(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` grown to ``size`` rows by repeating its last row."""
    return torch.cat([x, x[-1:].expand(size - len(x), *x.shape[1:])])


def _fill(static: torch.Tensor, x: torch.Tensor) -> None:
    """Copy ``x`` into a graph's input buffer, repeating its last row into the padding."""
    n = len(x)
    static[:n].copy_(x)
    if n < len(static):
        static[n:].copy_(x[-1:].expand(len(static) - n, *x.shape[1:]))

"""Fixed batch buckets and the policy that picks one from measured costs.

The accelerated model path runs only at a few batch sizes (compiled kernels and
CUDA graphs are shape-specific); a partial batch is padded up to the next
bucket. :class:`BucketPolicy` turns measured seconds per bucket into the choice
a frame scheduler makes each time it forms a batch: cover every due frame when
that meets the earliest deadline, otherwise the largest bucket that still does,
and under overload the bucket with the best throughput.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

BUCKETS: tuple[int, ...] = (1, 4, 8, 16, 32, 64)


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Buckets as a sorted tuple of distinct positive sizes (ValueError otherwise)."""
    out = tuple(sorted(set(int(b) for b in buckets)))
    if not out or out[0] < 1:
        raise ValueError(f"batch buckets must be positive sizes, got {list(buckets)}")
    return out


def bucket_for(n: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket holding ``n`` frames (the largest when none does)."""
    if n < 1:
        raise ValueError(f"a batch needs at least one frame, got {n}")
    return next((b for b in buckets if b >= n), buckets[-1])


def split(n: int, buckets: Sequence[int] = BUCKETS) -> list[tuple[int, int]]:
    """``n`` frames as ``(frames, bucket)`` chunks: full largest buckets, then one padded remainder."""
    top = buckets[-1]
    chunks = [(top, top)] * (n // top)
    if n % top:
        chunks.append((n % top, bucket_for(n % top, buckets)))
    return chunks


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """``x`` grown to ``size`` rows by repeating its last row (real data: no NaN or range surprises)."""
    if len(x) > size:
        raise ValueError(f"{len(x)} rows do not fit a bucket of {size}")
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


@dataclass(frozen=True)
class BucketPolicy:
    """Which bucket to run next, from the measured seconds one batch of each bucket takes.

    ``costs_s[b]`` is the wall time of one batch of ``b`` frames on the model path
    (what :meth:`Accelerator.measure` returns); a scheduler calls
    :meth:`choose` with the number of frames due and the time left before the
    earliest of their deadlines, and takes ``min(n_due, bucket)`` frames.
    """

    costs_s: Mapping[int, float]

    def __post_init__(self) -> None:
        if not self.costs_s or any(c <= 0 for c in self.costs_s.values()):
            raise ValueError("a bucket policy needs a positive cost for every bucket")
        object.__setattr__(self, "costs_s", dict(sorted(self.costs_s.items())))

    @classmethod
    def linear(cls, per_frame_s: float, overhead_s: float, buckets: Sequence[int] = BUCKETS) -> BucketPolicy:
        """Costs ``overhead + b·per_frame`` (an estimate before anything was measured)."""
        return cls({b: overhead_s + b * per_frame_s for b in check_buckets(buckets)})

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(self.costs_s)

    def fps(self, bucket: int) -> float:
        """Frames/s of the model path running full batches of ``bucket``."""
        return bucket / self.costs_s[bucket]

    def choose(self, n_due: int, slack_s: float) -> int:
        """The bucket for a batch of up to ``n_due`` frames whose earliest deadline is ``slack_s`` away.

        * the bucket covering all ``n_due`` frames, when it finishes within ``slack_s``;
        * else the largest bucket that finishes in time (the rest wait for the next batch);
        * else (already late) the bucket up to the covering one with the most frames per
          second, so a backlog drains as fast as the device allows.
        """
        cover = bucket_for(n_due, self.buckets)
        if self.costs_s[cover] <= slack_s:
            return cover
        fitting = [b for b in self.buckets if b <= cover and self.costs_s[b] <= slack_s]
        if fitting:
            return fitting[-1]
        return max((b for b in self.buckets if b <= cover), key=self.fps)

    def as_dict(self) -> dict[str, dict[str, float]]:
        """Costs (ms per batch) and frames/s per bucket, for reports."""
        return {str(b): {"ms": round(c * 1000, 3), "fps": round(b / c, 1)} for b, c in self.costs_s.items()}

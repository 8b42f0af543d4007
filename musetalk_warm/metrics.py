"""Prometheus metrics of one server: requests, stage latencies, frames rendered.

Each :class:`Metrics` owns its registry, so several apps (tests, benchmarks) in
one process never collide on metric names.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; spans a cached CPU stage (ms) up to a long GPU clip.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The server's counters and histograms, exported in the Prometheus text format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "musetalk_requests", "HTTP requests by route and status", ["route", "method", "status"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "musetalk_stage_seconds", "Latency of one /speak stage", ["stage"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.frames = Counter("musetalk_frames_rendered", "Video frames rendered", registry=self.registry)
        self.clips = Counter("musetalk_clips", "Clips appended to session videos", registry=self.registry)
        self.speech_seconds = Counter(
            "musetalk_speech_seconds", "Seconds of video produced", registry=self.registry
        )
        self.errors = Counter(
            "musetalk_errors", "Error responses by error code", ["code"], registry=self.registry
        )
        self.live_sessions = Gauge("musetalk_live_sessions", "Live sessions running", registry=self.registry)
        self.live_speaking = Gauge(
            "musetalk_live_speaking", "Live sessions booked for speech", registry=self.registry
        )
        self.live_queue_depth = Gauge(
            "musetalk_live_queue_depth", "Speech frames waiting for the frame scheduler", registry=self.registry
        )
        self.live_frames = Counter(
            "musetalk_live_frames", "Frames emitted by live sessions", ["kind"], registry=self.registry
        )
        self.live_lateness = Histogram(
            "musetalk_live_frame_lateness_seconds", "How late a live tick was emitted after its deadline",
            buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28), registry=self.registry,
        )
        self.live_misses = Counter(
            "musetalk_live_deadline_misses", "Speech frames not rendered by their tick", registry=self.registry
        )
        self.live_batch_seconds = Histogram(
            "musetalk_live_batch_seconds", "Seconds per frame-scheduler batch",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.avatar_preps = Counter(
            "musetalk_avatar_preps", "Avatar preparation jobs finished, by outcome", ["status"],
            registry=self.registry,
        )
        self.avatar_prep_seconds = Histogram(
            "musetalk_avatar_prep_seconds", "Seconds per avatar preparation job",
            buckets=(0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0), registry=self.registry,
        )
        self.ready = Gauge("musetalk_ready", "1 once models and avatars are loaded", registry=self.registry)

    def observe_clip(self, timings: Mapping[str, float], frames: int, duration_s: float) -> None:
        """Record one spoken clip: its per-stage seconds, frames and duration."""
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage).observe(seconds)
        self.frames.inc(frames)
        self.clips.inc()
        self.speech_seconds.inc(duration_s)

    def render(self) -> bytes:
        """The current values in the Prometheus text exposition format."""
        return generate_latest(self.registry)

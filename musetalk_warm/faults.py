"""Crash points for the crash-safety test (``scripts/crash_test.py``).

With ``MUSETALK_WARM_CRASH_AT=<stage>`` in its environment, the process
SIGKILLs itself when an append reaches that stage, so recovery can be tested
on a real kill at an exact moment. Unset (normal use), a crash point is one
environment lookup and does nothing.
"""

from __future__ import annotations

import os
import signal

ENV = "MUSETALK_WARM_CRASH_AT"
# The order an append reaches them in.
STAGES = ("clip_temp", "clip_renamed", "state_written", "video_grown", "index_grown")


def crash_point(stage: str) -> None:
    """Die here, at once and without clean-up, when the environment names ``stage``."""
    if os.environ.get(ENV) == stage:
        os.kill(os.getpid(), signal.SIGKILL)

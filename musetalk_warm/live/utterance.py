"""Utterances: speech that grows while it plays, and its per-frame conditioning.

An utterance holds its speech twice, as 16 kHz samples for the renderer's
conditioning and at the output rate for what the viewer hears, one slice of
``audio_rate // fps`` samples per video frame. Speech from TTS arrives whole;
streamed PCM arrives in chunks, and frame ``i`` is conditioned as soon as the
audio up to frame ``i + LOOKAHEAD_FRAMES`` exists (MuseTalk's Whisper window
reaches two frames ahead), over the audio of its 30 s segment so far (see
docs/NUMERICS.md, "Streamed audio features"). Speech from TTS may carry its
phoneme timings, which go with the audio into the conditioning.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from ..media.audio import SAMPLE_RATE
from ..voice.phonemes import Phone, shifted

LOOKAHEAD_FRAMES = 2
# Voice activity (the source mouth in pauses) is computed over the new frames plus this
# much audio on either side: enough for the pause ramps, without re-reading the whole
# utterance at every hop of a stream.
PAUSE_CONTEXT_FRAMES = 8
SEGMENT_S = 30  # Whisper's input window: the whole-clip path conditions 30 s segments separately

Condition = Callable[[np.ndarray, int, Sequence[Phone] | None], Awaitable[Sequence[Any]]]
Pauses = Callable[[np.ndarray, int, int], Awaitable[np.ndarray]]


def to_int16(audio: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] as int16 PCM."""
    return np.rint(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)


class _Samples:
    """An append-only float32 buffer (amortised O(1) appends, one contiguous view)."""

    def __init__(self) -> None:
        self._data = np.zeros(1024, np.float32)
        self.size = 0

    def extend(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, np.float32).reshape(-1)
        need = self.size + samples.size
        if need > self._data.size:
            grown = np.zeros(max(need, 2 * self._data.size), np.float32)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : need] = samples
        self.size = need

    def view(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.size if stop is None else min(stop, self.size)
        return self._data[start:stop]


class Utterance:
    """One piece of speech of a live session (a sentence of a reply, or a PCM stream)."""

    def __init__(self, fps: int, audio_rate: int, *, text: str | None = None, tail_frames: int = 0) -> None:
        if audio_rate % fps:
            raise ValueError(f"audio rate {audio_rate} is not a whole number of samples per frame at {fps} fps")
        self.id = uuid.uuid4().hex[:12]
        self.text = text
        self.fps = fps
        self.samples_per_frame = audio_rate // fps
        self.tail_frames = tail_frames
        self.speech16k = _Samples()
        self.track = _Samples()
        self.cond: list[Any] = []
        self.hold: list[float] = []  # per frame: share of the source mouth (silence); see render/silence.py
        self.phones: tuple[Phone, ...] | None = None  # spans in seconds from the utterance's start
        self.ended = False
        self.total_frames: int | None = None
        self.started = False
        self.finished = False

    def add_audio(self, speech16k: np.ndarray, track: np.ndarray, phones: Sequence[Phone] | None = None) -> None:
        """Append the same speech at 16 kHz and at the output rate, and the phonemes spoken
        in it (spans from its first sample; they move to where it lands in the utterance)."""
        if self.ended:
            raise ValueError("the utterance has ended")
        if phones is not None:
            self.phones = (self.phones or ()) + shifted(phones, self.speech16k.size / SAMPLE_RATE)
        self.speech16k.extend(speech16k)
        self.track.extend(track)

    def end(self) -> None:
        """No more audio: pad both tracks to whole frames, plus silent tail frames for the fade-out."""
        if self.ended:
            return
        n = max(
            math.ceil(self.speech16k.size * self.fps / SAMPLE_RATE),
            math.ceil(self.track.size / self.samples_per_frame),
        ) + self.tail_frames
        self.speech16k.extend(np.zeros(max(0, -(-n * SAMPLE_RATE // self.fps) - self.speech16k.size), np.float32))
        self.track.extend(np.zeros(n * self.samples_per_frame - self.track.size, np.float32))
        self.total_frames = n
        self.ended = True

    @property
    def audio_frames(self) -> int:
        """Whole video frames of 16 kHz speech received so far."""
        return self.speech16k.size * self.fps // SAMPLE_RATE

    @property
    def ready_frames(self) -> int:
        """Frames whose conditioning is computed."""
        return len(self.cond)

    def hold_at(self, index: int) -> float:
        """Frame ``index``'s share of the source mouth; 0 (the generated mouth) until its pause is read:
        speech never waits for voice activity."""
        return self.hold[index] if index < len(self.hold) else 0.0

    def _target(self) -> int:
        """Frames that can be conditioned now: all once ended, else those with their look-ahead."""
        return (self.total_frames or 0) if self.ended else max(0, self.audio_frames - LOOKAHEAD_FRAMES)

    @property
    def planned_all(self) -> bool:
        return self.ended and self.ready_frames >= (self.total_frames or 0)

    def frame_audio(self, index: int) -> np.ndarray:
        """Frame ``index``'s output samples as int16 (exactly ``samples_per_frame``)."""
        spf = self.samples_per_frame
        out = np.zeros(spf, np.float32)
        part = self.track.view(index * spf, (index + 1) * spf)
        out[: part.size] = part
        return to_int16(out)

    def is_tail(self, index: int) -> bool:
        """Whether frame ``index`` is one of the silent frames after the speech."""
        return self.total_frames is not None and index >= self.total_frames - self.tail_frames

    async def update_conditioning(self, condition: Condition) -> int:
        """Condition every frame whose audio (and look-ahead) has arrived; returns how many were added.

        The window starts where the whole-clip path starts the frame's 30 s segment
        (Whisper's input length, positions included), so a frame differs from its
        whole-clip value only through the audio not yet received; a whole utterance
        (ended, nothing conditioned yet) is conditioned in one call.
        """
        done = len(self.cond)
        target = self._target()
        if target <= done:
            return 0
        segment = SEGMENT_S * self.fps
        first = done - done % segment
        start = first * SAMPLE_RATE // self.fps
        stop = None if self.ended else self.audio_frames * SAMPLE_RATE // self.fps
        window = np.array(self.speech16k.view(start, stop))
        phones = None if self.phones is None else shifted(self.phones, -start / SAMPLE_RATE)
        cond = await condition(window, self.fps, phones)
        self.cond.extend(cond[done - first : target - first])
        return len(self.cond) - done

    async def update_pauses(self, pauses: Pauses, most: int | None = None) -> int:
        """Give up to ``most`` more frames (all that can be, by default) their source-mouth share.

        Voice activity runs over those frames' audio with ``PAUSE_CONTEXT_FRAMES`` of
        what is there on either side, so a short first call lets a reply start while
        the rest of it is read.
        """
        done = len(self.hold)
        target = self._target() if most is None else min(self._target(), done + most)
        if target <= done:
            return 0
        before = min(done, PAUSE_CONTEXT_FRAMES)
        stop = min(target + PAUSE_CONTEXT_FRAMES, self.audio_frames if not self.ended else self.total_frames or 0)
        audio = np.array(self.speech16k.view((done - before) * SAMPLE_RATE // self.fps, stop * SAMPLE_RATE // self.fps))
        hold = await pauses(audio, self.fps, stop - done + before)
        self.hold.extend(float(w) for w in hold[before : before + target - done])
        return len(self.hold) - done

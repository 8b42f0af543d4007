"""The weightless ``lite`` mouth renderer: visemes → jaw, lip-width and closure warps.

Used when MuseTalk's weights are absent. :meth:`LiteRenderer.condition` turns
16 kHz audio into a per-frame mouth shape ``(open, round, close)`` (see
:mod:`.visemes`): the opening follows speech-band amplitude (normalised per clip,
gated, smoothed with a fast attack and slower release and a one-frame
anticipation); rounding and bilabial closure come from espeak-ng's phoneme
timings when the audio was synthesised from text; without them rounding comes
from the spectrum and the lips close only as the energy falls.
:meth:`LiteRenderer.generate` shapes the mouth of each cached 256² face crop:
the lower lip and jaw slide down under a smooth displacement field that is zero
above the lip line, the revealed gap is painted as a soft-edged mouth cavity
with a hint of upper teeth, closure lifts the lower lip onto the upper one, and
rounding narrows (spreading widens) the lips around the mouth centre. Shape
``(0, 0, 0)`` returns the source crop unchanged, so silence keeps the avatar's
own mouth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from ..media.audio import num_frames
from ..avatars.cache import Avatar
from ..errors import AudioError
from ..avatars.stabilise import invert
from .visemes import SHAPE_CHANNELS, Timed, band_levels_db, shapes_from_phones, spectral_rounding


# iBUG-68 indices (frame left to right).
_INNER_UPPER = [60, 61, 62, 63, 64]
_INNER_LOWER = [60, 67, 66, 65, 64]
_OUTER_LIP = list(range(48, 60))
_CHIN = 8
_LOWER_LIP_BOTTOM = 57
_JAW_LEFT, _JAW_RIGHT = 4, 12
_NOSE_BOTTOM, _UPPER_LIP_TOP = 33, 51
# BGR: the mouth interior is a dark, redder tone of the lips; teeth off-white.
_INTERIOR_TINT = np.array([0.85, 0.85, 1.15], dtype=np.float32)
_ENAMEL = np.array([200.0, 210.0, 220.0], dtype=np.float32)


@dataclass(frozen=True)
class LiteParams:
    """Tuning of the lite renderer (defaults chosen by eye on real faces; the jaw range,
    loudness curve and split measured with ``scripts/eval_lipsync.py``).

    Attributes:
        window_s: energy window centred on each video frame.
        band_hz: speech band whose energy opens the mouth (vowels, not hiss).
        gate_dbfs: band level below which the mouth stays shut.
        range_db: levels this far below the clip's loud speech map to 0.
        min_span_db: smallest dB span mapped onto 0..1 (quiet clips don't saturate).
        ref_percentile: percentile of the clip's voiced frames that maps to 1.
        attack_s, release_s: time constants of the opening / closing smoother.
        anticipation: share of the next frame's target already shown.
        rest: openness below this is treated as closed (exactly the source).
        jaw_drop: lower-lip drop at openness 1 (the clip's loud vowels), as a fraction
            of lip-to-chin distance: a wide-open vowel, well above a parted rest mouth.
        chin_follow: share of that drop the chin takes (the blend mask ends at
            the jaw line, so a full chin move would be cut off there).
        teeth: strength of the upper-teeth hint in a mouth that was closed.
        split: where an already-parted mouth opens further, from the upper (0)
            to the lower (1) inner lip. At 1 the lower lip moves away from what the
            source shows between the lips (teeth of a smile stay with the upper jaw);
            lower splits draw a thin dark line across the teeth that landmarks read
            as a mouth closing below its rest opening.
        closure_approach: most openness on the frames either side of a bilabial closure.
        closure_press: pixels (of the 256² crop, at the mouth centre) the lower lip
            rises past the upper inner lip on a closure: pressed lips, which video
            coding and landmarks still read as shut where the source's inner-lip
            points are a pixel or two off (1 px closed 64–91 % of m/b/p through
            /speak on a one-second avatar, 4 px 91–100 %).
        amplitude_exponent: openness is the band amplitude, linear between the
            floor (``range_db`` below the reference) and the reference, raised to this
            power (0: linear in dB, which opens quiet speech nearly as far as loud).
        round_narrow, spread_widen: lip-width change at full rounding / spreading.
        round_s: time constant of the lip-rounding smoother.
        shape_bands: low, first-formant and second-formant bands (Hz) of the
            spectral rounding cue.
    """

    window_s: float = 0.05
    band_hz: tuple[float, float] = (300.0, 3000.0)
    gate_dbfs: float = -50.0
    range_db: float = 22.0
    min_span_db: float = 18.0
    ref_percentile: float = 95.0
    attack_s: float = 0.02
    release_s: float = 0.05
    anticipation: float = 0.5
    rest: float = 0.03
    jaw_drop: float = 0.65
    chin_follow: float = 0.8
    teeth: float = 0.75
    split: float = 1.0
    round_narrow: float = 0.22
    spread_widen: float = 0.15
    round_s: float = 0.04
    shape_bands: tuple[tuple[float, float], ...] = ((80.0, 400.0), (400.0, 1200.0), (1500.0, 3500.0))
    amplitude_exponent: float = 0.7
    closure_approach: float = 0.5
    closure_press: float = 4.0


def _smoothstep(edge0: np.ndarray | float, edge1: np.ndarray | float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / np.maximum(np.asarray(edge1) - edge0, 1e-6), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class LiteRenderer:
    """Mouth renderer without weights, with the same interface as MuseTalk's."""

    name = "lite"

    def __init__(self, params: LiteParams | None = None) -> None:
        self.params = params or LiteParams()

    # ------------------------------------------------------------------ audio
    def condition(self, audio: np.ndarray, fps: int, phones: Sequence[Timed] | None = None) -> np.ndarray:
        """Per-frame mouth shape ``(open, round, close)`` for 16 kHz mono float32 audio.

        ``phones``: the phonemes spoken in ``audio`` with their spans in seconds
        (from :func:`~musetalk_warm.voice.phonemes.speak_with_phones`); without
        them the shape comes from the spectrum. Returns ``float32
        [floor(len(audio)/16000*fps), 3]``; silent frames are exactly 0.
        """
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise AudioError(f"audio must be mono 1-D samples, got shape {audio.shape}")
        if fps < 1:
            raise ValueError(f"fps must be positive, got {fps}")
        n = num_frames(audio.size, fps)
        if n == 0:
            return np.zeros((0, SHAPE_CHANNELS), dtype=np.float32)
        p = self.params
        levels = band_levels_db(audio, fps, n, p.window_s, (p.band_hz, *p.shape_bands))
        target = self._normalise(levels[:, 0])
        voiced = target > 0
        # Articulation leads the sound: show part of the next frame's opening now.
        ahead = np.append(target[1:], 0.0)
        target = np.maximum(target, p.anticipation * ahead)
        openness = self._attack_release(target, fps, p.attack_s, p.release_s)
        openness[openness < p.rest] = 0.0
        if phones is not None:
            # Loudness opens the jaw (scaling it by the phoneme's opening was measured to
            # decouple the mouth from the sound); the phonemes round, spread and close the lips.
            shape = shapes_from_phones(phones, fps, n)
            rounding, close = shape[:, 1], shape[:, 2]
            # The jaw rises into a closure and drops out of it: a wide-open frame next to
            # a closed one is a jump that video coding smears, losing the closure.
            shut = np.flatnonzero(close == 1.0)
            near = np.unique(np.clip(np.concatenate([shut - 1, shut + 1]), 0, n - 1)) if shut.size else shut
            openness[near] = np.minimum(openness[near], p.closure_approach)
        else:
            rounding = np.where(openness > 0, spectral_rounding(levels[:, 1:], voiced), 0.0)
            close = np.zeros(n)
        rounding = self._attack_release(rounding, fps, p.round_s, p.round_s)
        out = np.stack([openness * (1.0 - close), rounding, close], axis=1)
        out[(out[:, 0] == 0) & (out[:, 2] == 0), 1] = 0.0  # at rest: exactly the source mouth
        return out.astype(np.float32)

    def _normalise(self, level: np.ndarray) -> np.ndarray:
        """Clip-relative level → ``[0, 1]``: loud speech opens fully, the gate keeps noise shut."""
        p = self.params
        voiced = level[level > p.gate_dbfs]
        if voiced.size == 0:
            return np.zeros_like(level)
        ref = float(np.percentile(voiced, p.ref_percentile))
        low = max(ref - p.range_db, p.gate_dbfs)
        high = max(ref, low + p.min_span_db)
        x = np.clip((level - low) / (high - low), 0.0, 1.0)
        if p.amplitude_exponent <= 0:
            return x
        # Linear in amplitude between the floor and the reference (the dB scale above lifts
        # quiet frames towards full opening), raised to the exponent.
        span = 10.0 ** ((high - low) / 20.0)
        return ((span**x - 1.0) / (span - 1.0)) ** p.amplitude_exponent

    @staticmethod
    def _attack_release(target: np.ndarray, fps: int, attack_s: float, release_s: float) -> np.ndarray:
        """One-pole smoother, rising with ``attack_s`` and falling with ``release_s``."""
        attack = 1.0 - math.exp(-1.0 / (fps * attack_s))
        release = 1.0 - math.exp(-1.0 / (fps * release_s))
        out = np.empty(len(target), dtype=np.float64)
        state = 0.0
        for i, value in enumerate(target):
            state += (attack if value > state else release) * (value - state)
            out[i] = state
        return out

    # ------------------------------------------------------------------ video
    def generate(self, avatar: Avatar, cond: np.ndarray, src_idx: np.ndarray) -> np.ndarray:
        """``[B,256,256,3]`` uint8 BGR: ``avatar.crops[src_idx[b]]`` shaped by ``cond[b]``.

        ``cond``: ``[B,3]`` shapes ``(open, round, close)``, or ``[B]`` openness alone.
        """
        cond = np.asarray(cond, dtype=np.float32)
        if cond.ndim == 1:
            cond = np.pad(cond[:, None], ((0, 0), (0, SHAPE_CHANNELS - 1)))
        src_idx = np.asarray(src_idx, dtype=np.int64).reshape(-1)
        if cond.shape != (src_idx.size, SHAPE_CHANNELS):
            raise ValueError(f"{cond.shape} mouth shapes for {src_idx.size} source frames")
        faces = np.array(avatar.crops[src_idx], dtype=np.uint8)
        moving = np.flatnonzero(np.any(cond != 0, axis=1))
        if moving.size:
            landmarks = crop_landmarks(avatar, src_idx[moving])
            shape = np.clip(cond[moving], (0.0, -1.0, 0.0), (1.0, 1.0, 1.0)).astype(np.float32)
            faces[moving] = self._shape_mouths(faces[moving], landmarks, shape)
        return faces

    def _shape_mouths(self, faces: np.ndarray, lm: np.ndarray, shape: np.ndarray) -> np.ndarray:
        """Warp and paint a batch of crops (``lm``: ``[B,68,2]`` crop coordinates)."""
        p = self.params
        size = faces.shape[1]
        openness, rounding, close = shape[:, 0], shape[:, 1], shape[:, 2]
        geo = _MouthGeometry.build(lm, size, p)
        top = int(max(0, math.floor(lm[:, _NOSE_BOTTOM, 1].min())))
        ys = np.arange(top, size, dtype=np.float32)[None, :, None] + 0.5
        drop = (openness * p.jaw_drop * geo.lip_to_chin)[:, None, None]
        line, lens, jaw = geo.line[:, None, :], geo.lens[:, None, :], geo.jaw[:, None, :]
        # Lower lip: rows below the lip line slide down by drop*lens; the slope-1
        # ramp samples the line itself in the gap, which the cavity then covers.
        lip = np.minimum(np.maximum(ys - line, 0.0), drop * lens)
        # Jaw: ramps in over the lip thickness (longer towards the cheeks so the
        # skin stretches, never tears). Both ease to chin_follow at the chin and
        # back to 0 at the crop's bottom edge; every ramp that grows has slope
        # <= 1, so the map never folds.
        ramp = np.maximum(geo.ramp[:, None, :], 2.0 * drop * jaw)
        below = _smoothstep(line, line + ramp, ys)
        chin = geo.chin[:, None, None]
        follow = 1.0 - (1.0 - p.chin_follow) * _smoothstep(line, chin, ys)
        fade = 1.0 - _smoothstep(chin, float(size), ys)
        shift = np.maximum(lip, drop * jaw * below) * follow * fade
        # Closure: rows from the upper inner lip down sample from one lip gap
        # lower (closure_press pixels more, so the lips press together), easing out
        # towards the chin.
        gap = np.maximum(geo.lower - geo.upper, 0.0)[:, None, :] + p.closure_press * geo.lens[:, None, :]
        lifted = _smoothstep(geo.upper[:, None, :] - 1.0, geo.upper[:, None, :] + 0.5, ys)
        lifted = lifted * (1.0 - _smoothstep(geo.lip_bottom[:, None, None], chin, ys))
        shift = (1.0 - close)[:, None, None] * shift - close[:, None, None] * gap * lifted
        # Width: columns around the mouth sample further out (rounded, narrower) or further in.
        scale = np.where(rounding > 0, p.round_narrow, p.spread_widen) * rounding
        rows = _smoothstep(lm[:, _NOSE_BOTTOM, 1][:, None, None], lm[:, _UPPER_LIP_TOP, 1][:, None, None], ys)
        rows = rows * (1.0 - _smoothstep(geo.lip_bottom[:, None, None], chin, ys))
        xs = np.arange(size, dtype=np.float32)
        widen = scale[:, None, None] * geo.dx[:, None, :] * geo.width[:, None, :] * rows
        out = faces.copy()
        for b in range(faces.shape[0]):
            map_y = (ys[0] - 0.5 - shift[b]).astype(np.float32)
            map_x = (xs[None, :] + widen[b]).astype(np.float32)
            out[b, top:] = cv2.remap(
                faces[b], map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
            )
        # The chin sits well below the lips, so the gap there is drop * lens;
        # the cavity follows the lips' width warp (at the lip line, rows = 1).
        gap = drop * lens * (1.0 - close)[:, None, None]
        line, gap = (_resample_columns(v, xs + 0.5 + scale[:, None] * geo.dx * geo.width) for v in (line, gap))
        rows, cols = _mouth_window(geo, gap, top, size)
        line, gap = line[..., cols], gap[..., cols]
        ys = ys[:, rows.start - top : rows.stop - top]
        alpha = _cavity_alpha(ys, line, gap)[..., None]
        shade = _cavity_colour(faces, lm, ys, line, gap, geo, cols, p.teeth)
        window = out[:, rows, cols].astype(np.float32)
        out[:, rows, cols] = np.rint(window + alpha * (shade - window)).clip(0, 255).astype(np.uint8)
        return out


def _resample_columns(profile: np.ndarray, at: np.ndarray) -> np.ndarray:
    """``[B,1,W]`` column profiles read at positions ``at`` (``[B,W]``, pixel-centre coordinates)."""
    centres = np.arange(profile.shape[-1], dtype=np.float32) + 0.5
    return np.stack([np.interp(a, centres, v[0]) for v, a in zip(profile, at)])[:, None, :].astype(np.float32)


def _mouth_window(geo: _MouthGeometry, gap: np.ndarray, top: int, size: int) -> tuple[slice, slice]:
    """Rows and columns of the batch's crops that a mouth cavity can cover."""
    # Spread lips reach past the inner corners.
    left = geo.centre - 1.2 * geo.half_width
    right = geo.centre + 1.2 * geo.half_width
    bottom = float((geo.line[:, None, :] + gap).max())
    cols = slice(max(0, int(left.min()) - 2), min(size, int(math.ceil(right.max())) + 2))
    rows = slice(top, min(size, int(math.ceil(bottom)) + 3))
    return rows, cols


def crop_landmarks(avatar: Avatar, src_idx: np.ndarray) -> np.ndarray:
    """``[B,68,2]`` landmarks of source frames ``src_idx`` in 256² crop coordinates.

    Each frame's points go through the inverse of its placement, the map its crop
    was cut with. Landmarks are continuous coordinates (pixel ``j`` spans
    ``[j, j+1]``) and placements map pixel centres, hence the half-pixel shifts.
    """
    out = np.empty((len(src_idx), 68, 2), dtype=np.float32)
    for b, i in enumerate(np.asarray(src_idx, dtype=np.int64)):
        to_crop = invert(avatar.placements[i])
        points = avatar.landmarks[i].astype(np.float64) - 0.5
        out[b] = points @ to_crop[:, :2].T + to_crop[:, 2] + 0.5
    return out


@dataclass(frozen=True)
class _MouthGeometry:
    """Per-face column profiles (``[B,W]``) and scalars (``[B]``) that shape the warp."""

    upper: np.ndarray  # upper inner-lip edge per column
    lower: np.ndarray  # lower inner-lip edge per column
    dx: np.ndarray  # column offset from the mouth centre
    width: np.ndarray  # lip-width warp weight: 1 across the lips, 0 at the jaw sides
    lip_bottom: np.ndarray
    line: np.ndarray  # where the lips part, between the inner-lip edges
    lens: np.ndarray  # lip-gap shape: 1 at the mouth centre, 0 at the inner corners
    jaw: np.ndarray  # jaw weight: 1 under the mouth, 0 at the jaw sides
    ramp: np.ndarray  # rows over which the jaw displacement ramps in
    chin: np.ndarray
    lip_to_chin: np.ndarray
    half_width: np.ndarray  # half the inner mouth width
    centre: np.ndarray

    @classmethod
    def build(cls, lm: np.ndarray, size: int, p: LiteParams) -> _MouthGeometry:
        xs = np.arange(size, dtype=np.float32) + 0.5
        upper = np.stack([_lip_curve(xs, face[_INNER_UPPER]) for face in lm])
        lower = np.stack([_lip_curve(xs, face[_INNER_LOWER]) for face in lm])
        line = upper + p.split * np.maximum(lower - upper, 0.0)
        corners = lm[:, [60, 64], 0]
        centre = corners.mean(axis=1)
        half = np.maximum(np.abs(corners[:, 1] - corners[:, 0]) / 2, 1.0)
        dx = xs[None, :] - centre[:, None]
        lens = np.clip(1.0 - (dx / half[:, None]) ** 2, 0.0, 1.0) ** 0.75
        outer = np.maximum(np.abs(lm[:, 54, 0] - lm[:, 48, 0]) / 2, 1.0)
        left, right = centre - lm[:, _JAW_LEFT, 0], lm[:, _JAW_RIGHT, 0] - centre
        side = np.maximum(np.where(dx < 0, left[:, None], right[:, None]), outer[:, None] + 2.0)
        jaw = 1.0 - _smoothstep(0.8 * outer[:, None], side, np.abs(dx))
        centre_col = np.clip(centre, 0, size - 1).astype(np.int64)
        centre_line = line[np.arange(len(lm)), centre_col]
        thickness = np.maximum(lm[:, _LOWER_LIP_BOTTOM, 1] - centre_line, 4.0)
        ramp = thickness[:, None] + np.maximum(np.abs(dx) - outer[:, None], 0.0)
        chin = lm[:, _CHIN, 1]
        lip_to_chin = np.maximum(chin - centre_line, 1.0)
        # Eases out by the jaw sides (>= outer + 2 px): x + k*dx*width stays monotonic for k <= 0.22.
        width = 1.0 - _smoothstep(0.9 * outer[:, None], side, np.abs(dx))
        return cls(upper, lower, dx, width, lm[:, _LOWER_LIP_BOTTOM, 1], line, lens, jaw, ramp, chin,
                   lip_to_chin, half, centre)


def _lip_curve(xs: np.ndarray, points: np.ndarray) -> np.ndarray:
    """A lip edge through ``points`` as a function of x, flat beyond the corners."""
    order = np.argsort(points[:, 0])
    return np.interp(xs, points[order, 0], points[order, 1]).astype(np.float32)


def _cavity_alpha(ys: np.ndarray, line: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """Soft (≈1.5 px edge) coverage of the revealed gap between the parted lips."""
    soft = 1.2
    top = np.clip((ys - line) / soft + 0.5, 0.0, 1.0)
    bottom = np.clip((line + gap - ys) / soft + 0.5, 0.0, 1.0)
    # Thin gaps (corners, slight openings) read as a shadow, not a hole.
    depth = np.clip(gap / 3.0, 0.0, 1.0)
    return top * bottom * depth


def _cavity_colour(
    faces: np.ndarray, lm: np.ndarray, ys: np.ndarray, line: np.ndarray, gap: np.ndarray,
    geo: _MouthGeometry, cols: slice, teeth: float,
) -> np.ndarray:
    """``[B,R,W,3]`` mouth interior: a dark tone of the lip colour, upper teeth at the top."""
    lips = np.stack([_mean_colour(face, points) for face, points in zip(faces, lm[:, _OUTER_LIP])])
    dx = (np.arange(cols.start, cols.stop, dtype=np.float32) + 0.5)[None, None, :] - geo.centre[:, None, None]
    across = 1.0 - _smoothstep(0.3, 0.9, np.abs(dx) / geo.half_width[:, None, None])
    depth = np.clip((ys - line) / np.maximum(gap, 1.0), 0.0, 1.0)
    # Shadow under the upper teeth and in the corners, a little tongue colour low in the middle.
    light = (0.2 + 0.25 * depth**2) * (0.7 + 0.3 * across)
    tone = light[..., None] * (lips * _INTERIOR_TINT)[:, None, None, :]
    gap_centre = gap.max(axis=2, keepdims=True)
    teeth_height = np.minimum(0.3 * gap_centre, 0.12 * geo.half_width[:, None, None])
    already_open = np.clip((geo.line - geo.upper)[:, cols].max(axis=1) / 3.0, 0.0, 1.0)[:, None, None]
    below_teeth = _smoothstep(0.6, 1.0, (ys - line) / np.maximum(teeth_height, 0.5))
    show = teeth * across * (1.0 - already_open) * (1.0 - below_teeth)
    enamel = _ENAMEL * (0.75 + 0.25 * across[..., None])
    return tone + show[..., None] * (enamel - tone)


def _mean_colour(face: np.ndarray, points: np.ndarray) -> np.ndarray:
    mask = np.zeros(face.shape[:2], dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 255)
    if not mask.any():
        return np.array([60.0, 60.0, 140.0], dtype=np.float32)
    return np.array(cv2.mean(face, mask=mask)[:3], dtype=np.float32)

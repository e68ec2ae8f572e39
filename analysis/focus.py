"""Focus measures of nucleus-channel frames, and the peak of a focus curve.

Two measures, for two questions:

* `gradient_energy` answers "which of these planes of the same field is
  sharpest?" (a z search). It is the Brenner gradient, the mean squared
  difference of pixels two apart: large for sharp edges, falling steeply with
  blur, cheap. Its value depends on what the field holds, so it only compares
  frames of one field.
* `field_sharpness` answers "is this frame, of a field never seen before, in
  focus?" (per-field QC). It compares gradient energy at two scales, which
  cancels how many nuclei the field holds and how bright they are: a blurred
  edge looks alike at 1 and 4 px, a sharp one does not. The value is
  0 (no detail finer than 4 px) to 1 (ideal step edges); in-focus nuclei at
  0.64 um/px give about 0.85.

`flank_peak` locates the peak of a sampled focus curve from its two flanks,
`refine_peak` from the samples around its maximum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from analysis.qc import median_of_ints

__all__ = [
    "FieldSharpness",
    "PeakEstimate",
    "field_sharpness",
    "flank_peak",
    "gradient_energy",
    "refine_peak",
]

#: Fine detail below this many times the noise's own gradient energy is noise.
MIN_DETAIL = 3.0
#: A pixel this many noise sigmas above the median is signal (a nucleus, blurred
#: or not)...
BRIGHT_SIGMAS = 8.0
#: ...and this fraction of signal pixels (about one nucleus) says the field holds
#: something to focus on.
MIN_CONTENT = 1e-4
#: `flank_peak` measures the flanks of a focus curve where it has fallen to
#: between these fractions of its peak: below the rounded top (in the simulated
#: 10x/0.45, 1-1.5 um either side of focus), where log(gradient energy) falls
#: almost linearly with defocus, and above the noise floor.
FLANK_LEVEL = 0.3
FLANK_TOP = 0.6


def gradient_energy(image: np.ndarray) -> float:
    """Brenner focus measure: mean of (I[x+2] - I[x])^2 over the frame (DN^2)."""
    f = np.asarray(image, dtype=np.float32)
    d = f[:, 2:] - f[:, :-2]
    return float(np.mean(d * d))


@dataclass(frozen=True, slots=True)
class FieldSharpness:
    """Sharpness of one frame.

    Attributes
    ----------
    sharpness : float or None
        0..1 (see module docstring); 0 when the frame holds signal but no fine
        detail at all (badly blurred); None when it holds nothing to judge by
        (an empty field).
    detail : float
        Gradient energy at 1 px above the noise's, in units of the noise's.
    content : float
        Fraction of pixels more than `BRIGHT_SIGMAS` noise sigmas above the median.
    """

    sharpness: float | None
    detail: float
    content: float


def _noise_sigma(f: np.ndarray, step: int = 4) -> float:
    """Pixel noise (DN) from second differences of every `step`-th row.

    Second differences cancel background slopes and ramps; for white noise their
    variance is 6 sigma^2. The median absolute value ignores edges.
    """
    sub = f[::step]
    d2 = sub[:, 2:] - 2 * sub[:, 1:-1] + sub[:, :-2]
    return float(1.4826 * np.median(np.abs(d2)) / np.sqrt(6.0))


def _noise_sigma_int(rows: np.ndarray) -> float:
    """`_noise_sigma(rows.astype(float32), step=1)` of integer pixels, the
    median counted rather than sorted (the same float32 value)."""
    v = rows.astype(np.int32)
    d2 = np.abs(v[:, 2:] - 2 * v[:, 1:-1] + v[:, :-2])
    return float(1.4826 * np.float32(median_of_ints(d2)) / np.sqrt(6.0))


#: rows of a frame differenced at a time: a block's float32 differences stay in
#: the core's cache (64 rows of a 1384-px frame: 354 kB)
_BLOCK_ROWS = 64


def _mean_sq_diff(f: np.ndarray, d: int) -> float:
    """Mean squared difference of pixels `d` apart, along rows and columns; the
    differences in float32 whatever `f`'s dtype (cast as ``astype(float32)``
    would), their squares summed by row blocks (a dot product of each block's
    differences with themselves, blocks added in float64): no full-frame
    temporary, so it runs from the cache and not from memory, 3x faster alone
    and more so beside a scan's other threads."""
    rows = max(1, min(_BLOCK_ROWS, f.shape[0]))
    buf = np.empty(rows * f.shape[1], np.float32)

    def mean_sq(x: np.ndarray, y: np.ndarray) -> float:
        n, m = x.shape
        if not n * m:  # no pixels `d` apart this way: no mean, as np.mean
            return math.nan
        total = 0.0
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            v = buf[: (r1 - r0) * m]
            np.subtract(x[r0:r1], y[r0:r1], dtype=np.float32, out=v.reshape(r1 - r0, m))
            total += float(np.dot(v, v))
        return total / (n * m)

    return (mean_sq(f[:, d:], f[:, :-d]) + mean_sq(f[d:], f[:-d])) / 2


def field_sharpness(image: np.ndarray) -> FieldSharpness:
    """How sharp a nucleus-channel frame is, independent of its content.

    With g(d) the mean squared difference of pixels d apart (both axes) less the
    noise's share 2 sigma^2, r = g(4) / (4 g(1)) is 1 for ideal step edges and 4
    for a signal smooth over 4 px; the sharpness is (4 - r) / 3.
    """
    f = np.asarray(image)
    sub = np.asarray(f[::4], dtype=np.float32)  # the only float32 copy: 1/4 rows
    # integer pixels (a camera's): medians by counting, the same values
    counted = f.dtype.kind in "ui" and f.dtype.itemsize <= 2 and min(sub.shape) > 2
    if counted:
        sigma = max(_noise_sigma_int(f[::4]), 1e-6)
        median = np.float32(median_of_ints(f[::4]))
    else:
        sigma = max(_noise_sigma(sub, step=1), 1e-6)
        median = np.median(sub)
    noise2 = 2 * sigma * sigma
    g1 = _mean_sq_diff(f, 1) - noise2
    g4 = _mean_sq_diff(f, 4) - noise2
    detail = g1 / noise2
    content = float(np.mean(sub > median + BRIGHT_SIGMAS * sigma))
    if detail < MIN_DETAIL:
        return FieldSharpness(0.0 if content >= MIN_CONTENT else None, detail, content)
    r = min(max(g4 / (4 * g1), 1.0), 4.0)
    return FieldSharpness((4.0 - r) / 3.0, detail, content)


@dataclass(frozen=True, slots=True)
class PeakEstimate:
    """The peak of a focus curve.

    `z` is None when the curve has no peak to find (`reason` says why).
    """

    z: float | None
    value: float
    reason: str = ""
    #: where more planes would help: -1 below the samples, +1 above, 0 nowhere
    side: int = 0


def _curve(
    zs: Sequence[float], values: Sequence[float], min_contrast: float
) -> tuple[np.ndarray, np.ndarray, int, float] | PeakEstimate:
    """A focus curve sorted by z with its sharpest sample (index, value), or
    the estimate saying why it has no peak to find (too few samples, flat)."""
    z = np.asarray(zs, dtype=float)
    v = np.asarray(values, dtype=float)
    if z.size < 3 or z.size != v.size:
        return PeakEstimate(None, 0.0, "fewer than 3 samples")
    order = np.argsort(z)
    z, v = z[order], v[order]
    i = int(np.argmax(v))
    vmax = float(v[i])
    if not np.isfinite(vmax) or vmax <= 0 or vmax < min_contrast * max(v.min(), 1e-12):
        return PeakEstimate(None, vmax, "no focus signal (flat focus curve)")
    return z, v, i, vmax


def refine_peak(
    zs: Sequence[float], values: Sequence[float], *, min_contrast: float = 1.2
) -> PeakEstimate:
    """Sub-step location of the maximum of focus values sampled at `zs`.

    A Gaussian fitted to the best sample and up to two neighbours on each side
    (a least-squares parabola through their logarithms) gives the peak between
    samples; it is clamped to the span of the best sample's nearest neighbours.
    The curve must rise above its lowest sample by `min_contrast` (a flat curve
    has no focus), and its maximum must not sit at either end of the samples
    (the focus lies outside the searched range).
    """
    curve = _curve(zs, values, min_contrast)
    if isinstance(curve, PeakEstimate):
        return curve
    z, v, i, vmax = curve
    # a maximum at an end, or a plateau reaching one, may hide the peak beyond
    if i == 0 or i == z.size - 1 or max(v[0], v[-1]) >= 0.98 * vmax:
        return PeakEstimate(None, vmax, "sharpest plane at the end of the search")
    lo, hi = max(i - 2, 0), min(i + 3, z.size)
    x, y = z[lo:hi], np.log(np.maximum(v[lo:hi], 1e-12))
    a, b, _ = np.polyfit(x - z[i], y, 2)
    peak = float(z[i]) if a >= 0 else float(z[i] - b / (2 * a))
    x = z[i - 1 : i + 2]
    return PeakEstimate(min(max(peak, float(x[0])), float(x[2])), vmax)


def flank_peak(
    zs: Sequence[float],
    values: Sequence[float],
    *,
    level: float = FLANK_LEVEL,
    top: float = FLANK_TOP,
    min_contrast: float = 1.2,
) -> PeakEstimate:
    """Focus from the two flanks of a focus curve sampled at `zs`.

    On each side of the sharpest sample, the z where the curve crosses a
    common cut is interpolated (linearly in log value) between the samples
    either side of it; focus is the mid-point of the two crossings. The cut is
    `level` times the peak, or higher to reach the lowest sample of either
    side, up to `top` times the peak: so three planes a few um apart around
    focus are often enough. A defocus curve is symmetric, and steep where its
    top is flat, so its flanks place focus to a tenth of a um where a Gaussian
    through the top samples cannot (within the depth of field the top is
    nearly flat).

    Returns z None with `side` -1 or +1 when the curve does not fall below
    `top` times its peak on that side within the samples (a plane further
    that way would find the crossing; when both sides lack it, the one whose
    lowest sample is higher), and with `side` 0 for a flat curve (no focus
    signal) or too few samples.
    """
    curve = _curve(zs, values, min_contrast)
    if isinstance(curve, PeakEstimate):
        return curve
    z, v, i, vmax = curve
    low = float(v[:i].min()) if i > 0 else vmax
    high = float(v[i + 1 :].min()) if i < z.size - 1 else vmax
    cut = max(level * vmax, low, high)
    if cut > top * vmax:
        side = -1 if low >= high else 1
        where = "end of the search" if i in (0, z.size - 1) else "curve's flank"
        beyond = "below" if side < 0 else "above"
        return PeakEstimate(
            None,
            vmax,
            f"sharpest plane at the {where}: "
            f"no plane {beyond} it under {top:g} of its peak",
            side,
        )
    lo = int(np.flatnonzero(v[:i] <= cut)[-1])  # the first samples at or under
    hi = i + 1 + int(np.flatnonzero(v[i + 1 :] <= cut)[0])

    def crossing(out: int, inner: int) -> float:
        a, b = np.log(v[inner]), np.log(max(v[out], 1e-12))
        t = (a - np.log(cut)) / (a - b) if a > b else 1.0
        return float(z[inner] + t * (z[out] - z[inner]))

    peak = (crossing(lo, lo + 1) + crossing(hi, hi - 1)) / 2
    return PeakEstimate(peak, vmax)

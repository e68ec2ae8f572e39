"""Blur of a field and the size of an object under it.

A small bright object imaged slightly out of focus looks as wide as the blur: its
extent at half its own maximum measures the point-spread function (PSF) as much as
the object. Here the PSF is modelled as a Gaussian of width ``s`` (sigma, px) and an
object as a uniform disk of radius ``R`` (px); the blurred disk's radial profile,
relative to its centre, depends on ``x = R / s`` only:

    F(t; x) = integral_0^x rho exp(-(t - rho)^2 / 2) I0e(t rho) d rho,  t = r / s

(the chance that a 2-D unit Gaussian centred at distance ``t`` falls in a disk of
radius ``x``). From it come two dimensionless curves, tabulated once per process:

* ``h(x)``: the half-maximum radius over ``s``; ``R = s * h^-1(r_half / s)``
  deconvolves a measured half-maximum radius analytically (``h(0) = 1.177``: a
  point looks ``2.355 s`` wide);
* ``q(x)``: the edge width between 75 % and 25 % of the maximum over the
  half-maximum radius; for a disk of known shape it gives ``x``, hence ``s``.

`field_blur` measures ``s`` from the field's nuclei (bright, round, hundreds per
field): each nucleus' azimuthally averaged profile gives ``q``, hence ``x`` and
``s = r_half / h(x)``, and the field's blur is the median over nuclei. Any extra
softness of the edges (pixel sampling, the objective's in-focus PSF) is part of
``s``, for nuclei and cytokeratin alike. `object_radius` deconvolves an object's
half-maximum radius with it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from scipy import special

__all__ = [
    "ProfileRadii",
    "blurred_disk_half_radius",
    "deconvolved_radius",
    "field_blur",
    "fit_disk_radius",
    "object_radii",
    "object_radius",
    "prepare",
    "profile_radii",
    "radial_profile",
]

_DX = 0.025  # table step in x = R / s and t = r / s
_X_MAX = 24.0  # beyond this the edge is straight: r_half = R to < 0.2 %


def prepare() -> None:
    """Compute the tables now (0.15-0.25 s, once per process), e.g. while a
    worker process waits for its first field."""
    _all_tables()


@functools.cache
def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x grid, h(x) = r_half / s and q(x) = (r_25 - r_75) / r_half."""
    x, h, q, _ = _all_tables()
    return x, h, q


def _profiles() -> np.ndarray:
    """F(t; x) / F(0; x) on the (t, x) grid, both in steps of `_DX`."""
    return _all_tables()[3]


@functools.cache
def _all_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rho = np.arange(0.0, _X_MAX + _DX / 2, _DX)
    t = np.arange(0.0, _X_MAX + 8.0, _DX)
    rr = rho[None, :]
    # cumulative trapezoid over rho: F(t; x) for every x on the rho grid, 64
    # rows of t at a time (the whole grid at once took 38 MB of temporaries)
    prof = np.zeros((t.size, rho.size))
    for i in range(0, t.size, 64):
        tt = t[i : i + 64, None]
        kern = rr * np.exp(-0.5 * (tt - rr) ** 2) * special.i0e(tt * rr)
        prof[i : i + 64, 1:] = np.cumsum(
            0.5 * (kern[:, 1:] + kern[:, :-1]) * _DX, axis=1
        )
    x = rho
    h = np.empty(x.size)
    q = np.empty(x.size)
    for j in range(x.size):
        if j == 0:  # a point: the Gaussian itself
            h[j] = np.sqrt(2 * np.log(2))
            q[j] = (np.sqrt(2 * np.log(4)) - np.sqrt(2 * np.log(4 / 3))) / h[j]
            continue
        p = prof[:, j] / prof[0, j]
        r = [_crossing(t, p, level) for level in (0.25, 0.5, 0.75)]
        h[j] = r[1]
        q[j] = (r[0] - r[2]) / r[1]
    # normalised profiles; column 0 (a point) is the Gaussian itself
    norm = np.empty_like(prof, dtype=np.float32)
    norm[:, 1:] = prof[:, 1:] / prof[0, 1:]
    norm[:, 0] = np.exp(-0.5 * t * t)
    return x, h, q, norm


def _crossing(t: np.ndarray, p: np.ndarray, level: float) -> float:
    """First t where the decreasing profile p falls below `level` (interpolated)."""
    k = int(np.argmax(p < level))
    if k == 0:
        return float(t[0])
    return float(t[k - 1] + (p[k - 1] - level) / (p[k - 1] - p[k]) * (t[k] - t[k - 1]))


def blurred_disk_half_radius(radius_px: float, sigma_px: float) -> float:
    """Half-maximum radius (px) of a disk of `radius_px` blurred by `sigma_px`."""
    if sigma_px <= 0:
        return radius_px
    x, h, _ = _tables()
    xv = radius_px / sigma_px
    if xv >= x[-1]:
        return radius_px + (h[-1] - x[-1]) * sigma_px
    return float(np.interp(xv, x, h)) * sigma_px


def deconvolved_radius(half_radius_px: float, sigma_px: float) -> float:
    """Radius (px) of the disk whose blurred image has this half-maximum radius.

    0 when the object is no wider than the blur itself (a point)."""
    if sigma_px <= 0:
        return half_radius_px
    x, h, _ = _tables()
    ratio = half_radius_px / sigma_px
    if ratio <= h[0]:
        return 0.0
    if ratio >= h[-1]:
        return half_radius_px - (h[-1] - x[-1]) * sigma_px
    return float(np.interp(ratio, h, x)) * sigma_px


def fit_disk_radius(
    radius: np.ndarray,
    profile: np.ndarray,
    weights: np.ndarray,
    sigma_px: float,
    x_max: float,
) -> float:
    """Radius (px) of the blurred disk that best fits a radial profile.

    Least squares over the whole profile (amplitude free, the disk's radius on
    the table grid up to `x_max` * sigma, refined by a parabola), which uses every
    ring rather than the two around the half-maximum: the precise way for objects
    not much larger than the blur.
    """
    norm = _profiles()
    nx = min(int(x_max / _DX) + 2, norm.shape[1])
    ti = radius / (sigma_px * _DX)
    i0 = np.minimum(ti.astype(np.intp), norm.shape[0] - 2)
    fr = (ti - i0).astype(np.float32)[:, None]
    tmpl = norm[i0, :nx] * (1 - fr) + norm[i0 + 1, :nx] * fr  # (rings, x)
    w = weights.astype(np.float32)[:, None]
    p = profile.astype(np.float32)[:, None]
    pt = (w * p * tmpl).sum(axis=0)
    tt = (w * tmpl * tmpl).sum(axis=0)
    sse = -(pt * pt) / np.maximum(tt, 1e-12)  # up to a constant
    j = int(np.argmin(sse))
    xv = j * _DX
    if 0 < j < nx - 1:
        a, b, c = sse[j - 1], sse[j], sse[j + 1]
        den = a - 2 * b + c
        if den > 0:
            xv += 0.5 * (a - c) / den * _DX
    return float(xv * sigma_px)


class ProfileRadii(tuple[float, float, float, float]):
    """(peak, r_75, r_half, r_25) of a radial profile: the peak level and the
    radii (px) where it falls to 75, 50 and 25 % of the peak (nan if never)."""

    __slots__ = ()

    @property
    def peak(self) -> float:
        return self[0]

    @property
    def half(self) -> float:
        return self[2]

    @property
    def edge_ratio(self) -> float:
        """(r_25 - r_75) / r_half."""
        return (self[3] - self[1]) / self[2] if self[2] > 0 else float("nan")


def _centroid(signal: np.ndarray, mask: np.ndarray) -> tuple[float, float] | None:
    """The signal-weighted centroid (row, col) over `mask`; None when the mask
    is empty or holds no positive signal."""
    rr, cc = np.nonzero(mask)
    return _centroid_of(rr, cc, signal[rr, cc])


def _centroid_of(
    rr: np.ndarray, cc: np.ndarray, values: np.ndarray
) -> tuple[float, float] | None:
    """`_centroid` of the pixels at rows `rr`, columns `cc` with these values."""
    w = np.maximum(values, 0).astype(np.float64)
    tot = float(w.sum())
    if rr.size == 0 or tot <= 0:
        return None
    return float((rr * w).sum() / tot), float((cc * w).sum() / tot)


def radial_profile(
    signal: np.ndarray,
    mask: np.ndarray,
    *,
    allowed: np.ndarray | None = None,
    bin_px: float = 0.5,
    centre: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Azimuthally averaged profile of an object: ring radii (px), ring means and
    pixel counts, about the signal-weighted centroid over `mask`, over rings
    `bin_px` wide of the `allowed` pixels (default: all). Empty rings are left
    out; the centre ring counts as lying at `bin_px` / 2. `centre`: that
    centroid, when the caller has it (`_centroid`)."""
    empty = np.zeros(0)
    centre = centre or _centroid(signal, mask)
    if centre is None:
        return empty, empty, empty
    r0, c0 = centre
    # rows and columns broadcast: the same distances as full index grids give
    h, w = signal.shape
    dist = np.hypot((np.arange(h) - r0)[:, None], (np.arange(w) - c0)[None, :])
    ok = np.ones(signal.shape, bool) if allowed is None else allowed
    b = (dist[ok] / bin_px).astype(np.intp)
    n = np.bincount(b)
    s = np.bincount(b, weights=signal[ok].astype(np.float64))
    good = n > 0
    radius = (np.arange(n.size) + 0.5) * bin_px
    return radius[good], s[good] / n[good], n[good].astype(np.float64)


def profile_radii(
    signal: np.ndarray,
    mask: np.ndarray,
    *,
    allowed: np.ndarray | None = None,
    bin_px: float = 0.5,
) -> ProfileRadii:
    """Peak and 75 / 50 / 25 % radii of an object's azimuthally averaged profile
    (`radial_profile`): its peak is its largest ring mean, and each radius is where
    the profile, going outwards from the peak, first falls below the level
    (interpolated)."""
    return _radii(*radial_profile(signal, mask, allowed=allowed, bin_px=bin_px))


def _line(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of the weighted least-squares line through (x, y),
    weights `w` (a ring's pixel count): ``np.polyfit(x, y, 1, w=np.sqrt(w))``
    to rounding, in closed form (its SVD took most of a profile's time)."""
    sw = float(w.sum())
    xm, ym = float(w @ x) / sw, float(w @ y) / sw
    dx = x - xm
    slope = float(w @ (dx * (y - ym))) / float(w @ (dx * dx))
    return slope, ym - slope * xm


def _radii(
    radius: np.ndarray,
    prof: np.ndarray,
    n: np.ndarray,
    *,
    extent: float | None = None,
) -> ProfileRadii:
    """`profile_radii` of a computed profile. With `extent` (px), each radius
    is where the profile falls below its level for good inside that radius:
    the crossing after the last ring within `extent` still at or above it (a
    textured object, or one dimmer over its nucleus, dips below half inside)."""
    nan = float("nan")
    if prof.size == 0:
        return ProfileRadii((0.0, nan, nan, nan))
    k = int(np.argmax(prof))
    peak = float(prof[k])
    if k <= 1 and prof.size >= 6:
        # peaked at the centre (a small or blurred object): the central rings hold
        # a few pixels each, so the peak is the intercept of a line through the
        # profile against r^2 over its top, where any blurred shape is parabolic
        top = np.flatnonzero(prof >= 0.8 * peak)
        top = top[top == np.arange(top.size)]  # the run from the centre
        if top.size >= 3:
            slope, icpt = _line(radius[top] ** 2, prof[top], n[top])
            if slope < 0:
                peak = icpt
    out = [peak]
    for level in (0.75, 0.5, 0.25):
        target = level * peak
        start = k
        if extent is not None:
            up = np.flatnonzero((prof[k:] >= target) & (radius[k:] <= extent))
            if up.size:
                start = k + int(up[-1])
        below = start - k + np.flatnonzero(prof[start:] < target)
        if not below.size:
            out.append(nan)
            continue
        j = k + int(below[0])
        if j == 0:
            out.append(float(radius[0]))
            continue
        p0, p1 = prof[j - 1], prof[j]
        out.append(
            float(
                radius[j - 1] + (p0 - target) / (p0 - p1) * (radius[j] - radius[j - 1])
            )
        )
    return ProfileRadii(tuple(out))  # type: ignore[arg-type]


def object_radius(
    signal: np.ndarray,
    mask: np.ndarray,
    sigma_px: float,
    *,
    allowed: np.ndarray | None = None,
) -> tuple[float, float]:
    """(radius, half-maximum radius) in px of an object under a blur `sigma_px`.

    The half-maximum radius of the profile, deconvolved analytically; for an
    object not much larger than the blur (where that is ill-conditioned) the
    radius of the blurred disk that best fits the whole profile out to its
    quarter-maximum plus two sigma. nan if the profile never falls to half.
    """
    (r,), half = object_radii(signal, mask, [sigma_px], allowed=allowed)
    return r, half


def object_radii(
    signal: np.ndarray,
    mask: np.ndarray,
    sigmas_px: Sequence[float],
    *,
    allowed: np.ndarray | None = None,
) -> tuple[list[float], float]:
    """`object_radius` under each of several blurs, from one profile: the
    radii, and the half-maximum radius."""
    nan = float("nan")
    centre = _centroid(signal, mask)
    radius, prof, n = radial_profile(signal, mask, allowed=allowed, centre=centre)
    # the half-maximum edge lies inside the detection mask (its threshold is
    # below half of any object's peak): the last crossing within the mask's
    # reach from the centre, not a dip of texture or over the nucleus inside
    reach = None
    if centre is not None:
        rr, cc = np.nonzero(mask)
        reach = float(np.hypot(rr - centre[0], cc - centre[1]).max())
    pr = _radii(radius, prof, n, extent=reach)
    if not np.isfinite(pr.half):
        return [nan] * len(sigmas_px), nan
    out = []
    for sigma_px in sigmas_px:
        r = deconvolved_radius(pr.half, sigma_px)
        if sigma_px > 0 and r < 3 * sigma_px:
            far = (pr[3] if np.isfinite(pr[3]) else pr.half * 1.5) + 2 * sigma_px
            use = radius <= far
            if np.count_nonzero(use) >= 4:
                r = fit_disk_radius(radius[use], prof[use], n[use], sigma_px, 4.0)
        # deconvolution only shrinks (bar the curvature of a large disk's edge)
        out.append(min(r, pr.half + 0.05 * sigma_px))
    return out, pr.half


def field_blur(
    signal: np.ndarray,
    labels: np.ndarray,
    candidates: list[int],
    *,
    min_peak: float,
    max_objects: int = 24,
    boxes: Sequence[tuple[slice, slice] | None] | None = None,
) -> tuple[float, int]:
    """Median blur sigma (px) over the given nuclei, and how many were usable.

    Each candidate label is measured on its own crop, with other labels' pixels
    left out of its profile; one whose peak is below `min_peak` or whose profile
    does not fall to a quarter of its peak within the crop is skipped. At most
    `max_objects`, evenly spread over the candidates, are measured. `boxes`:
    the labels' bounding boxes as ``ndimage.find_objects(labels)`` gives them,
    when the caller has them (else found here, a pass over every pixel).
    """
    x, h, q = _tables()
    if not candidates:
        return float("nan"), 0
    if len(candidates) > max_objects:
        pick = np.linspace(0, len(candidates) - 1, max_objects).round().astype(int)
        candidates = [candidates[i] for i in np.unique(pick)]
    fits: list[tuple[np.ndarray, np.ndarray, np.ndarray, float, float]] = []
    for radius, prof, n in _profiles_of(
        signal, labels, candidates, _boxes(labels, candidates, boxes)
    ):
        pr = _radii(radius, prof, n)
        if not pr.peak >= min_peak or not np.isfinite(pr[3]):
            continue
        ratio = pr.edge_ratio
        if not np.isfinite(ratio):
            continue
        # q falls from 0.77 (a point) towards 0 (a large disk): invert it for a
        # first guess, then fit the whole profile around it
        if ratio >= q[0]:
            xv = 0.0
        elif ratio <= q[-1]:
            xv = float(x[-1])
        else:
            xv = float(np.interp(-ratio, -q, x))
        guess = pr.half / float(np.interp(xv, x, h))
        use = radius <= pr[3] + 2.5 * guess
        fits.append((radius[use], prof[use], n[use], pr.half, guess))
    if not fits:
        return float("nan"), 0
    sigmas = _fit_blurs(fits)
    return float(np.median(sigmas)), len(sigmas)


def _profiles_of(
    signal: np.ndarray,
    labels: np.ndarray,
    ids: Sequence[int],
    boxes: Sequence[tuple[int, int, int, int]],
    bin_px: float = 0.5,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`radial_profile` of each label in `ids` (bounding boxes `boxes`: r0, r1,
    c0, c1) on its own crop, padded by half its height (at least 6 px), over
    its own pixels and the background's (other labels left out): the same
    values, the crops' pixels gathered and binned together (two dozen nuclei
    a field: the per-call cost of small arrays was the time)."""
    hh, ww = labels.shape
    b = np.array(boxes, np.intp).reshape(-1, 4)
    pad = np.maximum(6, (b[:, 1] - b[:, 0]) // 2)
    a0, a1 = np.maximum(b[:, 0] - pad, 0), np.minimum(b[:, 1] + pad, hh)
    b0, b1 = np.maximum(b[:, 2] - pad, 0), np.minimum(b[:, 3] + pad, ww)
    hs, ws = a1 - a0, b1 - b0
    sizes = hs * ws
    group = np.repeat(np.arange(len(ids)), sizes)
    within = np.arange(group.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    wg = ws[group]
    rr, cc = within // wg, within % wg  # in each crop, raster order
    flat = (a0[group] + rr) * ww + (b0[group] + cc)
    lab = labels.ravel()[flat]
    sig = signal.ravel()[flat]
    own = lab == np.asarray(ids)[group]
    ok = own | (lab == 0)
    out = []
    # each crop's centroid as `_centroid` takes it: sums over its own pixels
    ends = np.cumsum(sizes)
    starts = ends - sizes
    centres = np.full((len(ids), 2), np.nan)
    for k in range(len(ids)):
        sel = np.flatnonzero(own[starts[k] : ends[k]]) + starts[k]
        c = _centroid_of(rr[sel], cc[sel], sig[sel])
        if c is not None:
            centres[k] = c
    g = group[ok]
    dist = np.hypot(rr[ok] - centres[g, 0], cc[ok] - centres[g, 1])
    has = np.isfinite(centres[:, 0])
    keep = has[g]
    bins = (dist[keep] / bin_px).astype(np.intp)
    g = g[keep]
    width = int(bins.max()) + 1 if bins.size else 1
    key = g * width + bins
    n_all = np.bincount(key, minlength=len(ids) * width).reshape(len(ids), width)
    s_all = np.bincount(
        key, weights=sig[ok][keep].astype(np.float64), minlength=len(ids) * width
    ).reshape(len(ids), width)
    radius_all = (np.arange(width) + 0.5) * bin_px
    empty = np.zeros(0)
    for k in range(len(ids)):
        if not has[k]:
            out.append((empty, empty, empty))
            continue
        n = n_all[k]
        good = n > 0
        out.append(
            (radius_all[good], s_all[k][good] / n[good], n[good].astype(np.float64))
        )
    return out


def _fit_blurs(
    fits: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, float, float]],
) -> list[float]:
    """Blur sigma (px) of the blurred disk that best fits each profile
    ``(radius, prof, n, half, guess)`` with this half-maximum radius, searched
    from half to twice `guess`.

    All profiles in one set of array operations (a field's nuclei at once: the
    per-call cost of two dozen small fits, not their arithmetic, was the
    time); each value is computed as for a profile alone: the same operations
    element by element, and each profile's sums over its own rows in order."""
    x, h, _ = _tables()
    norm = _profiles()
    sizes = np.array([f[0].size for f in fits])
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    group = np.repeat(np.arange(len(fits)), sizes)
    radius = np.concatenate([f[0] for f in fits])
    prof = np.concatenate([f[1] for f in fits])
    n = np.concatenate([f[2] for f in fits])
    half = np.array([f[3] for f in fits], np.float64)
    guess = np.array([f[4] for f in fits], np.float64)
    steps = np.exp(np.linspace(np.log(0.5), np.log(2.0), 33))
    sig = guess[:, None] * steps[None, :]  # (profiles, 33)
    ratio = half[:, None] / sig
    xv = np.interp(ratio, h, x, left=0.0, right=x[-1])  # the disk for each sigma
    ti = radius[:, None] / (sig[group] * _DX)
    i0 = np.minimum(ti.astype(np.intp), norm.shape[0] - 2)
    ft = ti - i0
    xi = xv / _DX
    j0g = np.minimum(xi.astype(np.intp), norm.shape[1] - 2)
    fx = (xi - j0g)[group]
    j0 = j0g[group]
    # the four table values about each point, gathered by flat index (a 2-D
    # gather of two index arrays is several times slower), the weights once
    flat, width = norm.ravel(), norm.shape[1]
    at = i0 * width + j0
    gt, gx = 1 - ft, 1 - fx
    tmpl = (
        flat[at] * gt * gx
        + flat[at + width] * ft * gx
        + flat[at + 1] * gt * fx
        + flat[at + width + 1] * ft * fx
    )
    w = n[:, None]
    p = prof[:, None]
    # each profile's sums over its own rows, added in order as ``sum(axis=0)``
    # adds them (not `np.add.reduceat`, which adds in another order): rows
    # padded with zeros to one length, summed along that axis
    within = np.arange(group.size) - starts[group]
    pad = np.zeros((len(fits), int(sizes.max()), steps.size))
    pad[group, within] = w * p * tmpl
    pt = pad.sum(axis=1)
    pad[group, within] = w * tmpl * tmpl
    tt = pad.sum(axis=1)
    sse = -(pt * pt) / np.maximum(tt, 1e-12)
    k = np.argmin(sse, axis=1)
    ls = np.log(sig)
    rows = np.arange(len(fits))
    best = ls[rows, k]
    inner = (k > 0) & (k < steps.size - 1)
    kk = np.clip(k, 1, steps.size - 2)
    a, b, c = sse[rows, kk - 1], sse[rows, kk], sse[rows, kk + 1]
    den = a - 2 * b + c
    step = ls[:, 1] - ls[:, 0]
    ok = inner & (den > 0)
    best[ok] += 0.5 * (a[ok] - c[ok]) / den[ok] * step[ok]
    return [float(np.exp(v)) for v in best]  # as each was: np.exp of a scalar


def _boxes(
    labels: np.ndarray,
    ids: list[int],
    boxes: Sequence[tuple[slice, slice] | None] | None = None,
) -> list[tuple[int, int, int, int]]:
    from scipy import ndimage

    sl = boxes if boxes is not None else ndimage.find_objects(labels, max(ids))
    out = []
    for i in ids:
        s = sl[i - 1]
        assert s is not None
        out.append((s[0].start, s[0].stop, s[1].start, s[1].stop))
    return out

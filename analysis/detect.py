"""CTC detection in one 4-channel field, by the CellSearch definition.

Pipeline (every threshold in `DetectionSettings`):

1. per channel: smooth background and robust noise (`estimate_background`);
   signal = pixels - background; SNR = signal / noise;
2. spillover compensation: the DNA (DAPI) and cytokeratin (PE) dyes bleed into
   the CD45 and marker channels. Each fraction is estimated from the field's own
   single-stain objects (cytokeratin fragments without DNA; nuclei without
   cytokeratin) as a low quantile of the ratio, with a configured default when a
   field has too few, and subtracted (after segmentation, which uses only the
   DAPI and PE channels);
3. masks: nuclei where the DAPI SNR (per pixel) exceeds `nucleus_snr`;
   the field's blur (Gaussian sigma, px) is fitted to the radial profiles of
   its single nuclei (`analysis.psf.field_blur`, median over up to
   `blur_max_nuclei`; `default_blur_px` when fewer than `blur_min_nuclei`);
   cytokeratin (CK) where the smoothed PE SNR exceeds `ck_snr`; cytokeratin a
   few times the noise, which that per-pixel threshold breaks into grains, is
   added where PE averaged over 6 x 6 px exceeds `ck_smooth_snr` around a
   nucleus, below `ck_dim_peak_snr` and beyond the blurred halo of anything
   brighter (so also a dim cell touching a bright one in a cluster);
   connected components; specks below `min_object_area_um2` dropped. A DNA
   speck that small on the slope of something brighter (a brighter pixel of
   another DNA component within 2 px of its brightest: `_wing_specks`) is a
   nucleus' blurred edge cut off by noise, not a nucleus of its own;
4. every CK region is a candidate. When several nuclei lie inside one CK region
   (touching cells of a cluster) the region is split among them by a watershed
   seeded at the nuclei (not at such specks, which still count against the
   limit of nuclei a cluster can hold); a non-convex nucleus (two merged
   nuclei) is split at its distance-map peaks first. A region holding debris
   (or the rim) reports it and is split again without it (`_peel`): the
   debris is one more seed of that watershed, so its glow stays its own and
   a cell beside it keeps its own body;
5. candidates are classified in the order of the definition: debris (saturated in
   two channels, or bright in every channel: also the cartridge rim; or a faint
   glow across the object in every non-DNA channel (medians) about as strong
   as its cytokeratin, the halo of debris or of the rim: `debris_halo_snr`,
   `debris_halo_fraction`; or, peeled off debris, each stain's channel
   standing to its cytokeratin at least `debris_halo_fraction` as high as in
   the band just beyond the debris: the colour of the debris' glow) -> nucleus
   cut by the field's edge with its centre beyond it (abutting fields: a cell
   is counted in the field holding its nucleus' centre, which sees most of it,
   so each cell counts once: `_centre_beyond_edge`; overlapping fields are
   joined by `analysis.stitch`) -> less cytokeratin over the cell than
   `ck_smooth_snr` (a part of a region split among its nuclei) -> no nucleus
   (CK fragment) -> nucleus mostly outside the CK area -> not larger than 4 um
   (a whole object: also with the field's blur taken `blur_uncertainty` larger,
   ``diameter_low_um``) -> a cluster's part (its size cut by its neighbours'
   borders) whose own whole nucleus, deconvolved with the blur taken
   `blur_uncertainty` smaller, is under `min_cluster_nucleus_um`: a small
   CK+DAPI object pressed against a cell ->
   CD45-positive (double positive: on the membrane band; or there at
   `max_cd45_dim_snr` and comparable to a dim cell's cytokeratin, more than
   its bleed-through; or around the nucleus, where a leukocyte under a CK
   fragment has it) -> not round to oval -> CTC;
   for a CTC the marker channel (FITC) is reported positive or not. The size
   is the object's, not the blur's: the half-maximum radius of its CK profile
   (its last fall below half within the mask's reach) deconvolved with the
   field's blur (`analysis.psf.object_radius`; reported as ``diameter_um``,
   the raw half-maximum size as ``diameter_halfmax_um``);
6. nuclei outside CK regions (hundreds per field) are measured in one vectorised
   pass: leukocytes when CD45 is present on them, else OTHER.

Coordinates are (row, col) pixels of the field; distances in um use the pixel size.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import cc3d
import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError, cKDTree
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from analysis.background import estimate_background, levels_at
from analysis.fieldio import MIN_FIELD_PX
from analysis.psf import deconvolved_radius, field_blur, object_radii
from analysis.settings import CUT_REASON, DetectionSettings

__all__ = [
    "CUT_REASON",
    "DEFAULT_ROLES",
    "LABELS",
    "FieldDetections",
    "detect_field",
    "resolve_roles",
]

#: Labels an object can get.
LABELS = ("CTC", "WBC", "CK_FRAGMENT", "DOUBLE_POSITIVE", "DEBRIS", "OTHER")

#: More nuclei than this in one cytokeratin region is no cluster of cells.
_MAX_CLUSTER_NUCLEI = 20

#: Smoothing (Gaussian sigma, px) of a dim object's cytokeratin before its size
#: is measured (and then deconvolved with the blur).
_DIM_SMOOTH_PX = 1.5

#: Pixels of a cell this bright in cytokeratin (noise units) measure its own
#: bleed-through into CD45 when the field cannot.
_BLEED_MIN_SNR = 20.0

#: Channel name -> role of the default assay.
DEFAULT_ROLES: dict[str, str] = {
    "DAPI": "nucleus",
    "FITC": "marker",
    "PE": "epithelial",
    "APC": "leukocyte",
}


@dataclass
class FieldDetections:
    """Result of `detect_field`.

    Attributes
    ----------
    objects : list of dict
        One row per object: ``row``, ``col`` (centroid, pixels), ``label``,
        ``reason``, ``score``, ``marker_positive`` and the features.
    background, noise : dict
        Per channel name: median background level and noise (DN).
    spillover : dict
        Bleed-through ``"SOURCE->TARGET"`` of the DNA and cytokeratin dyes into
        the other channels, as used.
    spillover_measured : dict
        The coefficients this field could measure itself (enough single-stain
        objects); a caller pools them over a cartridge.
    blur_px : float
        The field's blur (Gaussian sigma, px) that object sizes were corrected
        for, measured on `blur_nuclei` of its nuclei (0 nuclei: the assay's
        `default_blur_px`).
    maxima : dict
        Per channel name: its largest pixel value.
    """

    objects: list[dict[str, Any]] = field(default_factory=list)
    background: dict[str, float] = field(default_factory=dict)
    noise: dict[str, float] = field(default_factory=dict)
    spillover: dict[str, float] = field(default_factory=dict)
    spillover_measured: dict[str, float] = field(default_factory=dict)
    blur_px: float = 0.0
    blur_nuclei: int = 0
    maxima: dict[str, float] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(LABELS, 0)
        for o in self.objects:
            out[o["label"]] += 1
        return out


def resolve_roles(
    channel_names: Sequence[str], roles: Mapping[str, str] | None = None
) -> dict[str, int]:
    """Map each role to a channel index; raise ValueError naming what is missing."""
    roles = dict(DEFAULT_ROLES if roles is None else roles)
    names = list(channel_names)
    out = {role: names.index(name) for name, role in roles.items() if name in names}
    missing = [f"{n} ({r})" for n, r in roles.items() if r != "marker" and r not in out]
    if missing:
        raise ValueError(
            f"channels {', '.join(missing)} not found; the field has "
            f"{', '.join(names) or 'no named channels'}"
        )
    return out


# ---------------------------------------------------------------------- shape


def _grow(mask: np.ndarray, n: int = 1) -> np.ndarray:
    """``ndimage.binary_dilation(mask, iterations=n)`` for n >= 1 (the
    4-neighbour cross, nothing beyond the array) by shifted ORs: the same
    mask, 5-20x faster."""
    mask = mask.astype(bool, copy=False)
    for _ in range(n):
        out = mask.copy()
        out[1:] |= mask[:-1]
        out[:-1] |= mask[1:]
        out[:, 1:] |= mask[:, :-1]
        out[:, :-1] |= mask[:, 1:]
        mask = out
    return mask


def _shrink(mask: np.ndarray, n: int = 1) -> np.ndarray:
    """``ndimage.binary_erosion(mask, iterations=n)`` for n >= 1 (the
    4-neighbour cross; beyond the array counts as background, so the border
    pixels go) by shifted ANDs: the same mask, a fraction of the time."""
    mask = mask.astype(bool, copy=False)
    if not mask.size:
        return mask.copy()
    for _ in range(n):
        out = mask.copy()
        out[1:] &= mask[:-1]
        out[:-1] &= mask[1:]
        out[:, 1:] &= mask[:, :-1]
        out[:, :-1] &= mask[:, 1:]
        out[[0, -1], :] = False
        out[:, [0, -1]] = False
        mask = out
    return mask


def _shape(mask: np.ndarray) -> tuple[float, float, float]:
    """(eccentricity, minor/major axis ratio, solidity) of a 2-D mask."""
    rr, cc = np.nonzero(mask)
    n = rr.size
    if n < 3:
        return 0.0, 1.0, 1.0
    # the moments as ``rr.var()``, ``cc.var()`` and the mean of the products
    # take them (mean, deviations, their products' sum over n), the
    # deviations found once
    dr, dc = rr - rr.mean(), cc - cc.mean()
    ecc, ratio = _ellipse(
        (dr * dr).sum() / n + 1 / 12,
        (dc * dc).sum() / n + 1 / 12,
        float((dr * dc).sum() / n),
    )
    edge = mask & ~_shrink(mask)
    er, ec = np.nonzero(edge)
    # each edge pixel's four corners, corner by corner (the order the hull is
    # given them in)
    m = er.size
    corners = np.empty((4 * m, 2), er.dtype)
    for k, (up, left) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        corners[k * m : (k + 1) * m, 0] = er + up
        corners[k * m : (k + 1) * m, 1] = ec + left
    try:
        hull_area = ConvexHull(corners).volume
    except QhullError:
        return ecc, ratio, 1.0
    return ecc, ratio, min(1.0, n / hull_area)


def _ellipse(vr: Any, vc: Any, cov: Any) -> tuple[Any, Any]:
    """Eccentricity and axis ratio from second moments (scalars or arrays)."""
    tr = vr + vc
    det = vr * vc - cov * cov
    disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0))
    big, small = tr / 2 + disc, np.maximum(tr / 2 - disc, 1e-9)
    ratio = np.sqrt(small / big)
    return np.sqrt(np.maximum(0, 1 - ratio * ratio)), ratio


def _core(mask: np.ndarray, signal: np.ndarray) -> np.ndarray:
    """The part of `mask` at or above half its own peak, holes filled: an object's
    extent without the blur halo that a fixed detection threshold includes.

    The signal is smoothed over the scale of granular staining, in proportion
    to the object (sigma = radius / 5, 0.5 to 2 px, so a small object is not
    widened), and the peak is its 90th percentile, so texture does not punch
    holes into the extent.
    """
    return _core_peak(mask, signal)[0]


def _core_peak(mask: np.ndarray, signal: np.ndarray) -> tuple[np.ndarray, float]:
    """`_core` and the peak it was cut at (0 for an empty mask)."""
    n = int(np.count_nonzero(mask))
    if not n:
        return mask, 0.0
    sigma = min(2.0, max(0.5, 0.2 * math.sqrt(n / math.pi)))
    smooth = ndimage.gaussian_filter(signal, sigma)
    peak = float(_quantile(smooth[mask], 90 / 100))
    return _fill_holes(mask & (smooth >= 0.5 * peak)), peak


def _inside(part: np.ndarray, area: np.ndarray) -> float:
    """Fraction of `part` inside `area`."""
    n = int(np.count_nonzero(part))
    return round(int(np.count_nonzero(part & area)) / n, 3) if n else 0.0


def _bbox(mask: np.ndarray, pad: int) -> tuple[slice, slice]:
    """Bounding box of a non-empty mask, padded, clipped to the mask's shape."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (
        slice(max(rows[0] - pad, 0), min(rows[-1] + pad + 1, h)),
        slice(max(cols[0] - pad, 0), min(cols[-1] + pad + 1, w)),
    )


def _by_label(
    lab: np.ndarray, idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The labelled pixels `idx` (flat indices, raster order) grouped by label.

    Returns the flat indices sorted by label (raster order within a label),
    the start of each label's run in them and the labels, in increasing order.
    Sorting the few labelled pixels replaces full-frame passes over the label
    image (`ndimage.find_objects`, `np.bincount` of every pixel: 3-8 ms each).
    """
    labels = lab.ravel()[idx]
    order = np.argsort(labels, kind="stable")
    sel, labels = idx[order], labels[order]
    if not sel.size:
        return sel, np.zeros(0, np.intp), labels
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    return sel, starts, labels[starts]


#: a speck of the DNA mask within this many px (Chebyshev) of a brighter pixel
#: of another DNA component lies on that component's slope (`_wing_specks`)
_WING_PX = 2


def _wing_specks(
    lab: np.ndarray,
    pixels: tuple[np.ndarray, np.ndarray, np.ndarray],
    dna: np.ndarray,
    min_px: int,
) -> set[int]:
    """Labels of the DNA mask's specks that are no nucleus of their own.

    A blurred nucleus' edge falls through the mask's threshold over a few px,
    and noise there leaves pixels above it cut off from the nucleus: specks
    smaller than `min_px`. Such a speck lies on a brighter slope: a pixel of
    another DNA component (a nucleus, or a brighter speck) within `_WING_PX`
    of its brightest is brighter still. A nucleus of its own, however small
    or dim, is the brightest DNA within `_WING_PX` of its peak, and stays.
    Left in, a speck inside a cytokeratin body beside a leukocyte made that
    body a cell with its nucleus inside."""
    sel, starts, ids = pixels
    if not sel.size:
        return set()
    size = np.diff(np.r_[starts, sel.size])
    small = np.flatnonzero(size < min_px)
    if not small.size:
        return set()
    h, w = lab.shape
    flat_lab, flat_dna = lab.ravel(), dna.ravel()
    # each small speck's brightest pixel, the first in raster order if tied:
    # the specks' pixels one after another, `group` telling whose
    n = size[small]
    group = np.repeat(np.arange(small.size), n)
    first = np.r_[0, np.cumsum(n)[:-1]]
    pix = sel[np.repeat(starts[small] - first, n) + np.arange(group.size)]
    val = flat_dna[pix]
    top = val == np.repeat(np.maximum.reduceat(val, first), n)
    _, at = np.unique(group[top], return_index=True)
    peaks = pix[np.flatnonzero(top)[at]]
    pr, pc = _rowcol(peaks, w)
    d = np.arange(-_WING_PX, _WING_PX + 1)
    rr = np.clip(pr[:, None, None] + d[None, :, None], 0, h - 1)
    cc = np.clip(pc[:, None, None] + d[None, None, :], 0, w - 1)
    nb = (rr * w + cc).reshape(small.size, -1)
    own = ids[small][:, None]
    other = (flat_lab[nb] > 0) & (flat_lab[nb] != own)
    brighter = flat_dna[nb] > flat_dna[peaks][:, None]
    return set(ids[small[(other & brighter).any(axis=1)]].tolist())


def _rowcol(flat: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.divmod(flat, width)`` of flat pixel indices: rows and columns, in
    half its time (one integer division, not two)."""
    rows = flat // width
    return rows, flat - rows * width


def _boxes(
    sel: np.ndarray, starts: np.ndarray, ids: np.ndarray, n: int, width: int
) -> list[tuple[slice, slice] | None]:
    """`ndimage.find_objects` of a label image with `n` labels, from its
    pixels grouped by label (`_by_label`)."""
    out: list[tuple[slice, slice] | None] = [None] * n
    if not sel.size:
        return out
    rr, cc = _rowcol(sel, width)
    ends = np.r_[starts[1:], sel.size] - 1
    r0, r1 = rr[starts].tolist(), rr[ends].tolist()  # raster order: first, last
    c0 = np.minimum.reduceat(cc, starts).tolist()
    c1 = np.maximum.reduceat(cc, starts).tolist()
    for k, i in enumerate(ids.tolist()):
        out[i - 1] = (slice(r0[k], r1[k] + 1), slice(c0[k], c1[k] + 1))
    return out


def _max3(a: np.ndarray) -> np.ndarray:
    """``ndimage.maximum_filter(a, 3)`` (3 x 3, edges reflected) of a 2-D array
    by pairwise maxima: the same values, a fifth of the time."""
    if min(a.shape) < 2:
        return ndimage.maximum_filter(a, 3)
    out = a
    for axis in (0, 1):
        lo = [slice(None)] * 2
        hi = [slice(None)] * 2
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        pair = np.maximum(out[tuple(lo)], out[tuple(hi)])  # i and i + 1
        res = np.empty_like(a)
        first, last, mid = [slice(None)] * 2, [slice(None)] * 2, [slice(None)] * 2
        first[axis], last[axis], mid[axis] = slice(0, 1), slice(-1, None), slice(1, -1)
        res[tuple(first)] = pair[tuple(first)]
        res[tuple(last)] = pair[tuple(last)]
        np.maximum(pair[tuple(lo)], pair[tuple(hi)], out=res[tuple(mid)])
        out = res
    return out


def _box3_sum(a: np.ndarray) -> np.ndarray:
    """The sum over each 3 x 3 neighbourhood of a 2-D float32 array (edges
    reflected, as ``9 * ndimage.uniform_filter(a, 3)``): row sums, then column
    sums, in float32 (to its rounding, not to the last bit; a third of the
    time: scipy's filter adds in float64 line by line)."""
    if min(a.shape) < 2:
        return 9 * ndimage.uniform_filter(a, 3)
    rows = np.empty_like(a)
    np.add(a[:-2], a[1:-1], out=rows[1:-1])
    rows[1:-1] += a[2:]
    np.add(a[0], a[0], out=rows[0])
    rows[0] += a[1]
    np.add(a[-2], a[-1], out=rows[-1])
    rows[-1] += a[-1]
    out = np.empty_like(a)
    np.add(rows[:, :-2], rows[:, 1:-1], out=out[:, 1:-1])
    out[:, 1:-1] += rows[:, 2:]
    np.add(rows[:, 0], rows[:, 0], out=out[:, 0])
    out[:, 0] += rows[:, 1]
    np.add(rows[:, -2], rows[:, -1], out=out[:, -1])
    out[:, -1] += rows[:, -1]
    return out


def _mean4(
    tl: np.ndarray, bl: np.ndarray, tr: np.ndarray, br: np.ndarray
) -> np.ndarray:
    """The mean of a 2 x 2 bin's four pixels as float32, added in this order
    (the order fixes the rounding: both binnings use it)."""
    out = tl.astype(np.float32)
    out += bl
    out += tr
    out += br
    out *= 0.25
    return out


def _at_least(a: np.ndarray, level: float) -> np.ndarray:
    """``a >= level``; integer pixels are compared in their own dtype with the
    smallest integer at or above `level` (not cast to float64 first)."""
    if a.dtype.kind in "ui" and math.isfinite(level):
        info = np.iinfo(a.dtype)
        at = math.ceil(level)
        if info.min < at <= info.max:
            return a >= a.dtype.type(at)
    return a >= level


def _minus(raw: np.ndarray, level: np.ndarray) -> np.ndarray:
    """``raw - level`` as float32: the same values as ``np.subtract(raw, level,
    dtype=np.float32)`` in half its time (no mixed-type loop)."""
    out = raw.astype(np.float32)
    out -= level
    return out


def _box2_above(a: np.ndarray, threshold: np.float32) -> np.ndarray:
    """Where the mean of each 2 x 2 neighbourhood of `a` (float32) exceeds
    `threshold` > 0 (same shape; the last row/col repeat).

    Only neighbourhoods holding a pixel above the threshold can (rounded sums
    are monotonic: four values at most t sum to at most 4 t), so the sums are
    taken there alone, in the order the mean was taken, and compared with 4 x
    the threshold (scaling by a power of two is exact): the mean's mask, for a
    few percent of the pixels instead of four full-frame passes. Those
    neighbourhoods are looked for only in the rows that can hold one (a
    field's cytokeratin lies in a fifth of its rows or less).
    """
    t = np.float32(threshold)
    w = a.shape[1]
    hot = a > t
    lit = np.asarray(hot.any(axis=1))
    rows = np.flatnonzero(lit[:-1] | lit[1:])  # a neighbourhood's top row
    pair = hot[rows]
    pair |= hot[rows + 1]
    del hot
    maybe = pair[:, :-1] | pair[:, 1:]
    k, j = _rowcol(np.flatnonzero(maybe), w - 1)
    i = rows[k]
    p = i * w + j  # top-left pixel of each such neighbourhood in `a`
    flat = a.ravel()
    s = flat[p] + flat[p + w]
    s += flat[p + 1]
    s += flat[p + w + 1]
    out = np.zeros(a.shape, bool)
    above = s > np.float32(4) * t
    out[i[above], j[above]] = True
    out[-1, :-1] = out[-2, :-1]
    out[:, -1] = out[:, -2]
    return out


#: a nucleus cut by a field's top or left edge is counted there when its depth
#: in the field exceeds half its chord on the edge by at least the first (px),
#: one cut by the bottom or right edge when by at least the second. The two
#: fields' depths add up to the nucleus' height, which exceeds the chord by
#: 0-1 px (a digital, thresholded disk), so of two abutting fields one keeps it.
_EDGE_KEEP_PX = (1.5, -0.5)


def _centre_beyond_edge(
    nucleus: np.ndarray, sub: tuple[slice, slice], frame: tuple[int, int]
) -> bool:
    """Whether the centre of a nucleus cut by the frame's edge lies beyond it:
    the cell is then counted in the field next door, which sees more of it.

    Both fields see the same chord `c` of the nucleus along their common edge
    and each its own depth `h` of it (for a round nucleus of radius R whose
    centre lies d inside: h = R + d and c = 2 sqrt(R^2 - d^2), so h >= c / 2
    exactly on the centre's side). A field keeps the nucleus when its depth
    exceeds half the chord by `_EDGE_KEEP_PX` (the first at its top or left
    edge, the second at its bottom or right edge): of two abutting fields one
    keeps it, the one that sees most of it, except within about a pixel of
    the centre lying on their common edge, where the two masks' rounding may
    make both or neither keep it. `nucleus`: the mask over the frame's
    region `sub`.
    """
    h, w = frame
    on_edge = (sub[0].start == 0, sub[1].start == 0, sub[0].stop == h, sub[1].stop == w)
    if not any(on_edge):
        return False
    rows = np.flatnonzero(nucleus.any(axis=1))
    cols = np.flatnonzero(nucleus.any(axis=0))
    if not rows.size:
        return False
    first, last = _EDGE_KEEP_PX
    sides = (  # (touches the edge, depth, chord, keep from)
        (sub[0].start == 0 and rows[0] == 0, rows[-1] + 1, nucleus[0], first),
        (sub[1].start == 0 and cols[0] == 0, cols[-1] + 1, nucleus[:, 0], first),
        (
            sub[0].stop == h and rows[-1] == nucleus.shape[0] - 1,
            nucleus.shape[0] - rows[0],
            nucleus[-1],
            last,
        ),
        (
            sub[1].stop == w and cols[-1] == nucleus.shape[1] - 1,
            nucleus.shape[1] - cols[0],
            nucleus[:, -1],
            last,
        ),
    )
    return any(
        touches and depth - np.count_nonzero(chord) / 2 < keep
        for touches, depth, chord, keep in sides
    )


#: the sectors of `_ring_cover`, and the ring pixels a sector needs to count
_RING_SECTORS, _RING_SECTOR_MIN_PX = 8, 3


def _ring_cover(
    ring: np.ndarray,
    nucleus: np.ndarray,
    snr: np.ndarray,
    level: float,
    *,
    ck: np.ndarray | None = None,
    ratio: float = 0.0,
    every: bool = False,
) -> float:
    """The fraction of the angular sectors around the nucleus (about its
    centroid) whose ring pixels' median `snr` reaches `level`, over the
    sectors holding at least a few ring pixels (with `every`: over all the
    sectors, so a ring cut short, e.g. by the field's edge, cannot light
    them all); nan when none holds them. With `ck` (cytokeratin in the same
    units as `snr`) a sector counts only where its median `snr` is also at
    least `ratio` times its median `ck`.

    A leukocyte's CD45 membrane encircles its own nucleus; the membrane of a
    leukocyte pressed against a cell lights the ring on that side only. A
    cell's cytokeratin bleeds a few percent of itself into CD45 all around its
    nucleus: genuine CD45 is comparable to the cytokeratin where it lies."""
    nr, nc = np.nonzero(nucleus)
    rr, cc = np.nonzero(ring)
    angle = np.arctan2(rr - nr.mean(), cc - nc.mean())
    sector = ((angle + np.pi) / (2 * np.pi) * _RING_SECTORS).astype(int)
    sector = np.minimum(sector, _RING_SECTORS - 1)
    size = np.bincount(sector, minlength=_RING_SECTORS)
    median = _medians_by(snr[rr, cc], sector, size)
    under = None if ck is None else _medians_by(ck[rr, cc], sector, size)
    lit = counted = 0
    for k in np.flatnonzero(size >= _RING_SECTOR_MIN_PX).tolist():
        counted += 1
        m = median[k]
        lit += m >= level and (under is None or m >= ratio * under[k])
    if not counted:
        return float("nan")
    return round(lit / (_RING_SECTORS if every else counted), 3)


def _median(a: np.ndarray) -> Any:
    """``np.median(a)`` of a 1-D floating array, without its overhead (a
    dozen calls a cell): the middle value, or the two middle values' sum in
    the array's type halved (`_medians_by`); NaN when it holds one."""
    n = a.size
    if a.dtype.kind != "f" or a.ndim != 1 or not n:
        return np.median(a)
    k = n // 2
    if n % 2:
        part = np.partition(a, [k, n - 1])
        mid = part[k]
    else:
        part = np.partition(a, [k - 1, k, n - 1])
        mid = (part[k - 1] + part[k]) / a.dtype.type(2)
    return part[-1] if np.isnan(part[-1]) else mid


def _quantile(a: np.ndarray, q: float) -> Any:
    """``np.quantile(a, q)`` (its default, linear method) of a 1-D floating
    array, without its overhead, as numpy 2 takes it: the order statistics
    about ``(n - 1) q`` (the last one from there on) and between them
    ``lo + d g``, or ``hi - d (1 - g)`` from g = 0.5 on, in the array's
    type (d = hi - lo); NaN when the array holds one.
    `test_quantiles_are_numpys` compares them."""
    n = a.size
    if a.dtype.kind != "f" or a.ndim != 1 or not n or not 0 <= q <= 1:
        return np.quantile(a, q)
    v = (n - 1) * q
    lo = math.floor(v)
    if v >= n - 1:
        lo = hi = -1
    else:
        hi = lo + 1
    part = np.partition(a, sorted({lo % n, hi % n, n - 1}))
    if np.isnan(part[-1]):
        return part[-1]
    gamma = v - lo
    x, y = part[lo], part[hi]
    d = y - x
    return y - d * (1 - gamma) if gamma >= 0.5 else x + d * gamma


def _medians_by(values: np.ndarray, group: np.ndarray, size: np.ndarray) -> list[float]:
    """``float(np.median(values[group == k]))`` for each k with ``size[k]``
    (``np.bincount(group)``) values, from one sort instead of one call per
    group: a floating median is the middle value or the mean of the two, as
    `np.median` takes it (their sum in the values' type, halved; NaN when the
    group holds one); nan for an empty group."""
    if values.dtype.kind != "f":  # (not asked for: the loop it replaces)
        return [
            float(np.median(values[group == k])) if n else float("nan")
            for k, n in enumerate(size.tolist())
        ]
    v = values[np.lexsort((values, group))]
    start = np.cumsum(size) - size
    lo = np.minimum(start + (size - 1) // 2, max(v.size - 1, 0))
    hi = np.minimum(start + size // 2, max(v.size - 1, 0))
    if not v.size:
        return [float("nan")] * size.size
    mid = np.where(lo == hi, v[lo], (v[lo] + v[hi]) / 2)
    nan = np.bincount(group, weights=np.isnan(values), minlength=size.size) > 0
    mid[nan | (size == 0)] = np.nan
    return mid.tolist()


#: rows of a mask with nothing in them, at least this many in a row, part its
#: labelling into bands (`_label`); shorter gaps are labelled through
_LABEL_GAP_ROWS = 16


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """``ndimage.label(mask)`` of a 2-D mask (4-connected): the same int32
    labels, numbered in raster order, from cc3d (3 times faster on a full
    frame). 4-connected only: cc3d 4.1.1's 8-connected 2-D labelling marks
    some background pixels (`test_labels_are_scipys_labels` compares them).

    Only the bands of rows that hold the mask are labelled (a field's
    cytokeratin mask lies in a few percent of its rows): no component crosses
    an empty row, and a band's components all come before the next band's in
    raster order, so each band's labels follow on from the last band's."""
    if mask.size == 0:
        return np.zeros(mask.shape, np.int32), 0
    # cc3d numbers a column-major array's components column by column
    mask = np.ascontiguousarray(mask)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.zeros(mask.shape, np.int32), 0
    cut = np.flatnonzero(np.diff(rows) > _LABEL_GAP_ROWS)
    starts = rows[np.r_[0, cut + 1]].tolist()
    stops = (rows[np.r_[cut, rows.size - 1]] + 1).tolist()
    if sum(stops) - sum(starts) > mask.shape[0] // 2:  # most of it: in one go
        starts, stops = [0], [mask.shape[0]]
    out: np.ndarray | None = None
    n = 0
    for a, b in zip(starts, stops, strict=True):
        band, k = cc3d.connected_components(
            mask[a:b],
            connectivity=4,
            binary_image=True,
            return_N=True,
            out_dtype=np.uint32,
        )
        band = band.view(np.int32)
        if b - a == mask.shape[0]:
            return band, int(k)
        if out is None:
            out = np.zeros(mask.shape, np.int32)
        if n:
            np.add(band, n, out=band, where=band > 0)
        out[a:b] = band
        n += int(k)
    assert out is not None
    return out, n


def _areas(lab: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Pixels of each label 1..n of `lab` (the labels of `mask`), counted over
    the mask's pixels alone (index 0: 0)."""
    return np.bincount(lab.ravel()[np.flatnonzero(mask)], minlength=n + 1)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes(mask)``: the background components (4-connected)
    that do not touch the border are holes. One labelling instead of dilating
    the border inwards until nothing changes (2-4x faster on large regions)."""
    if not mask.size:
        return mask.astype(bool, copy=True)
    bg, n = _label(~mask)
    filled = np.ones(n + 1, bool)
    for edge in (bg[0], bg[-1], bg[:, 0], bg[:, -1]):
        filled[edge] = False
    if not filled[1:].any():  # no holes: the mask itself (no pass over `bg`)
        return mask.astype(bool, copy=True)
    filled[0] = True
    return filled[bg]


def _split_nucleus(mask: np.ndarray, min_dist_px: int) -> np.ndarray:
    """Labels of a merged nucleus mask split at its distance-map peaks."""
    dist = ndimage.distance_transform_edt(mask)
    peaks = peak_local_max(
        dist, min_distance=min_dist_px, labels=mask.astype(int), exclude_border=False
    )
    if len(peaks) < 2:
        return mask.astype(np.int32)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=mask)


def _dna_peaks(image: np.ndarray, mask: np.ndarray, min_dist: int) -> np.ndarray:
    """The peaks of `image` within `mask` at least `min_dist` px apart (Chebyshev),
    highest first: ``peak_local_max(image, min_distance=min_dist, labels=mask,
    exclude_border=False)``, except that a flat top counts once.

    Every pixel of a plateau (a saturated or featureless blob) is a candidate
    of the local-maximum test; spacing them out one by one costs seconds to
    minutes on a large blob. Here each 8-connected set of candidates (equal
    values, as each lies in the others' windows) is reduced first to its
    first pixel in raster order, the one the spacing step would keep.
    Candidates closer than `min_dist` are always tied (each is the maximum of
    the other's window), so the result differs from skimage's only where
    values are tied: plateaus, and equal values near one.
    """
    mask = mask.astype(bool, copy=False)
    if image.dtype.kind != "f":
        image = image.astype(np.float64)
    img = np.where(mask, image, -np.inf).astype(image.dtype, copy=False)
    top = ndimage.maximum_filter(img, size=2 * min_dist + 1, mode="nearest")
    cand = (img == top) & mask
    if cand[mask].all():  # a featureless blob: no peak but its isolated pixels
        cand = mask & ~_grow(_shrink(mask))  # the opening
    cand &= img > image.min()
    lab, n = ndimage.label(cand, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.empty((0, 2), np.intp)
    flat = lab.ravel()
    idx = np.flatnonzero(flat)
    _, first = np.unique(flat[idx], return_index=True)
    at = idx[first]  # one pixel a plateau, in raster order
    at = at[np.argsort(-img.ravel()[at], kind="stable")]
    pts = np.column_stack(np.unravel_index(at, img.shape))
    if len(pts) < 2:
        return pts
    near = cKDTree(pts).query_ball_point(pts, r=min_dist - 0.5, p=np.inf)
    rejected = np.zeros(len(pts), bool)
    for i, others in enumerate(near):
        if not rejected[i]:
            rejected[[j for j in others if j != i]] = True
    return pts[~rejected]


def _split_dna(
    mask: np.ndarray, dna: np.ndarray, min_dist_px: int, depth: float, min_px: float
) -> tuple[np.ndarray, int]:
    """Pieces of a nucleus blob at its DNA peaks: ``(labels, n)``, n = 0 when
    it is one nucleus.

    The peaks of the lightly smoothed DNA signal at least `min_dist_px` apart
    seed a watershed of the blob. It counts as several nuclei only when every
    piece has at least `min_px` pixels and the signal between each two
    touching pieces dips below `depth` times the lower of their peaks: blur
    merges two nuclei with a valley between them, while the texture of one
    nucleus makes only shallow peaks.
    """
    smooth = ndimage.gaussian_filter(dna, 1.0)
    peaks = _dna_peaks(smooth, mask, min_dist_px)
    if len(peaks) < 2:
        return mask.astype(np.int32), 0
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    pieces = watershed(-smooth, markers, mask=mask)
    n = len(peaks)
    if np.bincount(pieces.ravel(), minlength=n + 1)[1:].min() < min_px:
        return mask.astype(np.int32), 0
    top = smooth[tuple(peaks.T)]
    for a in range(1, n + 1):
        edge = _grow(pieces == a) & (pieces > a)
        for b in np.unique(pieces[edge]).tolist():
            saddle = float(smooth[edge & (pieces == b)].max())
            if saddle > depth * min(top[a - 1], top[b - 1]):
                return mask.astype(np.int32), 0
    return pieces, n


# ---------------------------------------------------------------------- main


def detect_field(
    field: np.ndarray,
    channel_names: Sequence[str],
    *,
    pixel_size_um: float,
    settings: DetectionSettings | None = None,
    roles: Mapping[str, str] | None = None,
    saturation: float | None = None,
) -> FieldDetections:
    """Find and classify the objects of one field.

    Parameters
    ----------
    field : ndarray, shape (C, Y, X)
        Any integer (or float) dtype; raw camera values.
    channel_names : sequence of str, length C
        Names of the channels, matched against `roles`.
    pixel_size_um : float
        Pixel size in the sample plane.
    settings : DetectionSettings, optional
        Thresholds; defaults follow the CellSearch definition.
    roles : mapping, optional
        Channel name -> ``nucleus`` / ``epithelial`` / ``leukocyte`` / ``marker``;
        default DAPI / PE / APC / FITC.
    saturation : float, optional
        Saturating pixel value; default the dtype maximum for integers.

    Returns
    -------
    FieldDetections
    """
    st = settings or DetectionSettings()
    if field.ndim != 3 or field.shape[0] != len(channel_names):
        raise ValueError(
            f"field must be (C, Y, X) with C = {len(channel_names)}, "
            f"got shape {field.shape}"
        )
    if min(field.shape[1:]) < MIN_FIELD_PX:  # as a field file must be
        raise ValueError(
            f"a field must be at least {MIN_FIELD_PX} x {MIN_FIELD_PX} px, got "
            f"{field.shape[1]} x {field.shape[2]}"
        )
    if not pixel_size_um > 0:
        raise ValueError(f"pixel size must be positive, got {pixel_size_um}")
    idx = resolve_roles(channel_names, roles)
    if saturation is None:
        saturation = (
            float(np.iinfo(field.dtype).max)
            if field.dtype.kind in "ui"
            else float(np.nanmax(field))
        )
    ctx = _Field(field, list(channel_names), idx, st, pixel_size_um, saturation)
    return ctx.run()


class _Field:
    """The arrays of one field and the per-object measurements on them.

    Full-frame signal is computed only for the two mask channels (nucleus and
    cytokeratin); the others are computed where they are needed (object crops,
    nucleus pixels), which keeps a field within a few full-frame passes.
    """

    def __init__(
        self,
        raw: np.ndarray,
        names: list[str],
        idx: dict[str, int],
        st: DetectionSettings,
        px: float,
        saturation: float,
    ) -> None:
        self.raw, self.names, self.idx, self.st, self.px = raw, names, idx, st, px
        self.saturation = saturation
        n_ch, self.h, self.w = raw.shape
        tops = [raw[c].max() for c in range(n_ch)]
        #: the channels that reach saturation anywhere (most fields: one or
        #: none); `sat` counts only these, a channel whose maximum stays below
        #: the level adds nothing to any pixel
        self._sat_channels = [c for c in range(n_ch) if not tops[c] < saturation]
        bgs = [
            estimate_background(raw[c], block=st.background_block_px)
            for c in range(n_ch)
        ]
        self.noise = np.array([b.noise for b in bgs], np.float32)
        self.e, self.n, self.lk = idx["epithelial"], idx["nucleus"], idx["leukocyte"]
        self.m = idx.get("marker")
        self.full = {c: bgs[c].subtract_from(raw[c]) for c in (self.n, self.e)}
        # the mask channels' levels are read again only 2 x 2-sampled
        # (`_binned_signal`): that quarter, not full frames of float32, each
        # computed when first asked (`_quarter`: the detector asks for PE's)
        self._level_quarter: dict[int, np.ndarray] = {}
        #: the other channels' backgrounds, whose levels are computed where they
        #: are read (crops, pixels: `_level`), never as full-frame maps
        self.bgs = bgs
        self.spill: dict[tuple[int, int], float] = {}  # (source, target) -> coef
        self.unknown_spill: set[int] = set()  # channels with no measured/given coef
        self.result = FieldDetections(
            background={
                nm: float(_median(b.grid.ravel()))
                for nm, b in zip(names, bgs, strict=True)
            },
            noise={nm: float(v) for nm, v in zip(names, self.noise, strict=True)},
            maxima={nm: float(t) for nm, t in zip(names, tops, strict=True)},
        )
        self.min_px = max(1, round(st.min_object_area_um2 / (px * px)))
        #: `_split_dna` of each nucleus blob near a CK region, by nucleus label
        self._dna_pieces: dict[int, tuple[np.ndarray | None, int]] = {}
        #: the CK region being measured: its crop, signals and saturation counts
        self._region: (
            tuple[tuple[slice, slice], dict[int, np.ndarray], np.ndarray] | None
        ) = None

    def sig(self, c: int, where: Any, *, flat: bool = False) -> np.ndarray:
        """Background-subtracted, spillover-compensated signal of channel `c` at
        `where` (a crop of slices, or flat pixel indices with ``flat=True``)."""
        if c in self.full:
            return self.full[c].ravel()[where] if flat else self.full[c][where]
        if flat:
            v = _minus(self.raw[c].ravel()[where], self._level(c, where))
        else:
            v = _minus(self.raw[c][where], self._level(c, where))
        for src in (self.e, self.n):
            if coef := self.spill.get((src, c), 0.0):
                dye = self.full[src].ravel()[where] if flat else self.full[src][where]
                v -= np.float32(coef) * np.maximum(dye, 0)
        return v

    def _sig_all(self, where: Any, *, flat: bool = False) -> list[np.ndarray]:
        """`sig` of every channel at `where`: the same values, with the mask
        channels' signals (and their positive parts, the spillover's source)
        read once for all channels, and flat pixels' rows and columns found
        once."""
        full = {c: v.ravel()[where] if flat else v[where] for c, v in self.full.items()}
        dye: dict[int, np.ndarray] = {}
        others = [c for c in range(len(self.names)) if c not in full]
        if flat:  # each pixel's block row and weights found once
            levels = dict(
                zip(
                    others,
                    levels_at([self.bgs[c] for c in others], *_rowcol(where, self.w)),
                    strict=True,
                )
            )
        else:
            levels = {c: self.bgs[c].level_at(*where) for c in others}
        out = []
        for c in range(len(self.names)):
            if c in full:
                out.append(full[c])
                continue
            level = levels[c]
            if flat:
                v = _minus(self.raw[c].ravel()[where], level)
            else:
                v = _minus(self.raw[c][where], level)
            for src in (self.e, self.n):
                if coef := self.spill.get((src, c), 0.0):
                    if src not in dye:
                        dye[src] = np.maximum(full[src], 0)
                    v -= np.float32(coef) * dye[src]
            out.append(v)
        return out

    def _level(self, c: int, where: np.ndarray | tuple[slice, slice]) -> np.ndarray:
        """The background level of a channel other than the mask channels at
        `where`: flat pixel indices, or a crop of slices."""
        if isinstance(where, tuple):
            return self.bgs[c].level_at(*where)
        rows, cols = _rowcol(where, self.w)
        return self.bgs[c].level_at(rows, cols)

    def _quarter(self, c: int) -> np.ndarray:
        """A mask channel's level at every other pixel of every other row
        (`Background.sampled`), computed once."""
        if c not in self._level_quarter:
            self._level_quarter[c] = self.bgs[c].sampled(2)
        return self._level_quarter[c]

    def _binned_signal(self, c: int, h2: int, w2: int) -> np.ndarray:
        """Channel `c` signal averaged over 2 x 2 bins, shape (h2, w2), computed
        at the binned size (a quarter of the full-frame passes)."""

        def bin2(a: np.ndarray) -> np.ndarray:
            if a.dtype.kind in "ui" and a.dtype.itemsize <= 2:
                # small integers: every partial sum is exact in float32, so any
                # order gives the same sums; rows in pairs first (contiguous)
                rows = a[: 2 * h2, : 2 * w2].reshape(h2, 2, 2 * w2)
                pair = rows[:, 0].astype(np.float32)
                pair += rows[:, 1]
                out = pair[:, 0::2] + pair[:, 1::2]
                out *= 0.25
                return out
            return _mean4(
                a[0 : 2 * h2 : 2, 0 : 2 * w2 : 2],
                a[1 : 2 * h2 : 2, 0 : 2 * w2 : 2],
                a[0 : 2 * h2 : 2, 1 : 2 * w2 : 2],
                a[1 : 2 * h2 : 2, 1 : 2 * w2 : 2],
            )

        v = bin2(self.raw[c])
        if c in self.full:  # a mask channel's: kept sampled only
            v -= self._quarter(c)[:h2, :w2]
        else:
            v -= self._level(c, (slice(0, 2 * h2, 2), slice(0, 2 * w2, 2)))
        for src in (self.e, self.n):
            if coef := self.spill.get((src, c), 0.0):
                v -= np.float32(coef) * np.maximum(bin2(self.full[src]), 0)
        return v

    def _binned_at(self, c: int, bins: np.ndarray, w2: int) -> np.ndarray:
        """``_binned_signal(c, h2, w2).ravel()[bins]``, the same values,
        computed at those bins (flat indices) alone."""
        w = self.w
        br, bc = _rowcol(bins, w2)
        p = br * (2 * w) + bc * 2  # each bin's top-left pixel

        def bin2(flat: np.ndarray) -> np.ndarray:
            # `_binned_signal`'s additions (small integers: exact in any order)
            return _mean4(flat[p], flat[p + w], flat[p + 1], flat[p + w + 1])

        v = bin2(self.raw[c].ravel())
        if c in self.full:
            v -= self._quarter(c).ravel()[bins]
        else:
            v -= self._level(c, p)
        for src in (self.e, self.n):
            if coef := self.spill.get((src, c), 0.0):
                v -= np.float32(coef) * np.maximum(bin2(self.full[src].ravel()), 0)
        return v

    def _near_max(self, c: int, bins: np.ndarray, h2: int, w2: int) -> np.ndarray:
        """``_max3(_binned_signal(c, h2, w2)).ravel()[bins]``: the binned
        signal's maximum over each bin's 3 x 3 bins, computed only at `bins`
        and their neighbours (a field's nuclei cover a few percent of it)."""
        at = np.zeros((h2, w2), bool)
        at.ravel()[bins] = True
        need = np.flatnonzero(_max3(at))
        own = np.flatnonzero(at)
        grid = np.empty(h2 * w2, np.float32)  # read only where computed
        grid[need] = self._binned_at(c, need, w2)
        r, col = _rowcol(own, w2)
        best = grid[own]
        for dr in (-1, 0, 1):
            rr = np.clip(r + dr, 0, h2 - 1) * w2
            for dc in (-1, 0, 1):
                if dr or dc:
                    np.maximum(best, grid[rr + np.clip(col + dc, 0, w2 - 1)], out=best)
        grid[own] = best
        return grid[bins]

    def _signals(
        self, crop: tuple[slice, slice]
    ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Every channel's `sig` and the `sat` counts over `crop`: views into the
        current CK region's own (`_region`) when `crop` lies inside it, so the
        cells of a region do not compute them again (the values are per pixel,
        the same either way)."""
        if self._region is not None:
            outer, sig, sat = self._region
            if all(
                o.start <= c.start and c.stop <= o.stop
                for o, c in zip(outer, crop, strict=True)
            ):
                rel = tuple(
                    slice(c.start - o.start, c.stop - o.start)
                    for o, c in zip(outer, crop, strict=True)
                )
                return {c: v[rel] for c, v in sig.items()}, sat[rel]
        sig = dict(enumerate(self._sig_all(crop)))
        return sig, self.sat(crop)

    def sat(self, where: Any, *, flat: bool = False) -> np.ndarray:
        """Number of saturated channels per pixel at `where` (uint8), over the
        channels that reach saturation somewhere in the field."""
        out = None
        for c in self._sat_channels:
            r = self.raw[c].ravel()[where] if flat else self.raw[c][where]
            hit = _at_least(r, self.saturation).astype(np.uint8)
            out = hit if out is None else out + hit
        if out is None:
            shape = np.shape(where) if flat else self.raw[0][where].shape
            return np.zeros(shape, np.uint8)
        return out

    def _estimate_spillover(
        self,
        nuc_lab: np.ndarray,
        n_nuc: int,
        ck_lab: np.ndarray,
        n_ck: int,
        nuc_idx: np.ndarray,
        ck_idx: np.ndarray,
        both_labels: tuple[np.ndarray, np.ndarray],
    ) -> None:
        """Bleed-through of the two mask dyes (DNA, cytokeratin) into the others.

        Each coefficient comes from the field's single-stain objects: bright
        pixels of cytokeratin objects without any DNA (fragments) for the
        cytokeratin dye, of nuclei without any cytokeratin for the DNA dye;
        saturated pixels are left out. A low quantile of the ratio is used, as
        genuine staining only ever raises it. With fewer than 50 such pixels the
        configured default (an instrument calibration) is used.
        """
        e, n = self.e, self.n
        # which objects hold pixels of the other mask: read at the pixels of
        # both masks (`both_labels`: their nucleus and CK labels), not at every
        # pixel of one; label 0, outside a mask, holds the rest of the other
        on_nuc, on_ck = both_labels
        ck_has_dna = np.bincount(on_ck, minlength=n_ck + 1) > 0
        ck_has_dna[0] = on_ck.size < nuc_idx.size
        dna_has_ck = np.bincount(on_nuc, minlength=n_nuc + 1) > 0
        dna_has_ck[0] = on_nuc.size < ck_idx.size
        controls = {
            e: (ck_lab, ck_has_dna, ck_idx),
            n: (nuc_lab, dna_has_ck, nuc_idx),
        }
        for src, (lab, mixed, idx) in controls.items():
            # only the object's own (labelled) pixels qualify: look at those only
            cand = idx[self.full[src].ravel()[idx] > 50 * self.noise[src]]
            cand = cand[~mixed[lab.ravel()[cand]]]
            if cand.size > 20000:  # plenty: an even subsample keeps this cheap
                cand = cand[:: cand.size // 10000]
            if cand.size:
                cand = cand[self.sat(cand, flat=True) == 0]
            for c in range(len(self.names)):
                if c in controls:
                    continue
                key = f"{self.names[src]}->{self.names[c]}"
                known = key in self.st.spillover
                coef = float(self.st.spillover.get(key, 0.0))
                if cand.size >= 50:
                    known = True
                    raw = _minus(self.raw[c].ravel()[cand], self._level(c, cand))
                    ratio = raw / self.full[src].ravel()[cand]
                    coef = float(np.clip(_quantile(ratio, 0.2), 0.0, 0.3))
                self.spill[(src, c)] = coef
                self.result.spillover[key] = round(coef, 4)
                if cand.size >= 50:
                    self.result.spillover_measured[key] = round(coef, 4)
                if not known:
                    self.unknown_spill.add(c)

    # -------------------------------------------------------------- run

    def run(self) -> FieldDetections:
        st = self.st
        # nuclei are bright and smooth; only textured cytokeratin needs smoothing
        nuc_mask = self.full[self.n] > st.nucleus_snr * self.noise[self.n]
        ck_mask = _box2_above(self.full[self.e], st.ck_snr * self.noise[self.e])
        nuc_lab, n_nuc = _label(nuc_mask)
        # the labelled pixels, grouped by label once: areas and bounding boxes
        # without a pass over every pixel
        nuc_idx = np.flatnonzero(nuc_mask)
        nuc_pixels = _by_label(nuc_lab, nuc_idx)
        wings = _wing_specks(nuc_lab, nuc_pixels, self.full[self.n], self.min_px)
        # each label's pixel count from its run of pixels (labels 1..n_nuc all
        # hold some: no gather of the labels, no count over them)
        nuc_area = np.zeros(n_nuc + 1, np.intp)
        nuc_area[nuc_pixels[2]] = np.diff(np.r_[nuc_pixels[1], nuc_idx.size])
        nuc_area[0] = nuc_lab.size - nuc_idx.size
        self.nuc_lab, self.n_nuc = nuc_lab, n_nuc
        self.nuc_boxes = _boxes(*nuc_pixels, n_nuc, self.w)
        self._measure_blur(nuc_lab, nuc_area, self.nuc_boxes)
        self._add_dim_ck(ck_mask, nuc_mask)
        ck_lab, n_ck = _label(ck_mask)
        ck_idx = np.flatnonzero(ck_mask)
        # the nucleus pixels in the CK mask, and their labels in each
        both = nuc_idx[ck_mask.ravel()[nuc_idx]]
        both_labels = (nuc_lab.ravel()[both], ck_lab.ravel()[both])
        self._estimate_spillover(
            nuc_lab, n_nuc, ck_lab, n_ck, nuc_idx, ck_idx, both_labels
        )
        ck_boxes = _boxes(*_by_label(ck_lab, ck_idx), n_ck, self.w)
        del ck_idx

        # which nuclei overlap which CK region, and by how many pixels
        key = both_labels[0].astype(np.int64) * (n_ck + 1) + both_labels[1]
        keys, counts = np.unique(key, return_counts=True)
        overlaps: dict[int, list[tuple[int, int]]] = {}
        for kk, cnt in zip(keys.tolist(), counts.tolist(), strict=True):
            overlaps.setdefault(kk % (n_ck + 1), []).append((kk // (n_ck + 1), cnt))

        claimed: set[int] = set()
        for k, sl in enumerate(ck_boxes, start=1):
            if sl is None:
                continue
            crop = self._pad(sl, 4)
            region = _fill_holes(ck_lab[crop] == k)
            if np.count_nonzero(region) < self.min_px:
                continue
            near = overlaps.get(k, [])
            # the region's signals once: its cells are measured on views of them
            self._region = None
            self._region = (crop, *self._signals(crop))
            whole, _ = self._intensity(crop, region)
            if (why := self._debris(whole)) is not None:
                # debris (or the rim) with cells beside it: report the debris, then
                # look again at what is left once its pixels are peeled away
                claimed.update(nid for nid, _ in near)
                self.result.objects.append(self._debris_row(whole, region, why))
                local, areas, junk, parts = self._peel(crop, region, nuc_lab[crop])
                # the band just beyond the debris: its glow's colour
                band = _grow(junk, 2) & ~junk & region
                local_wings = _wing_specks(
                    local,
                    _by_label(local, np.flatnonzero(local)),
                    self.full[self.n][crop],
                    self.min_px,
                )
                for sub, nuclei in parts:
                    self._add_region(
                        crop,
                        sub,
                        local,
                        nuclei,
                        areas,
                        set(),
                        debris=(junk, band),
                        wings=local_wings,
                    )
                continue
            self._add_region(
                crop,
                region,
                nuc_lab[crop],
                near,
                nuc_area,
                claimed,
                split=True,
                wings=wings,
            )
        self._region = None
        self.result.objects.extend(self._nuclei_table(nuc_pixels, claimed))
        return self.result

    def _add_dim_ck(self, ck_mask: np.ndarray, nuc_mask: np.ndarray) -> None:
        """Add to `ck_mask` the dim cytokeratin around nuclei that the per-pixel
        threshold breaks into specks.

        Cytokeratin a few times the noise is granular: the 2 x 2 mask keeps only
        its bright grains, which fall apart into fragments with no nucleus and
        nuclei mostly outside them. Averaged over 6 x 6 px (2 x 2 bins, then 3 x 3
        bins) the noise is a sixth, so `ck_smooth_snr` noise units there find
        the whole cell. A region of that mask below `ck_dim_peak_snr` and
        beyond the halo of anything brighter (brighter cells keep their sharper
        2 x 2 outline) that holds a nucleus becomes part of the CK mask.
        """
        st = self.st
        h2, w2 = self.h // 2, self.w // 2
        if h2 < 3 or w2 < 3:
            return
        # the 3 x 3 sum, compared with 9 x each level: the mean's masks
        sm = _box3_sum(self._binned_signal(self.e, h2, w2))
        nine_noise = 9 * float(self.noise[self.e])
        # brighter cytokeratin and its halo: an edge blurred by the field's blur
        # and the 6 x 6 px average falls from the dim peak to `ck_smooth_snr`
        # within about 1.3 of their widths (in 2 x 2 bins). What lies beyond it
        # is dim cytokeratin of its own, also where a dim cell touches a bright
        # one (a cluster) and shares its region of the mask
        low = sm > st.ck_smooth_snr * nine_noise
        nuc2 = nuc_mask[0 : 2 * h2 : 2, 0 : 2 * w2 : 2]
        # a region is kept only where it holds a nucleus: most fields have no
        # nucleus in dim cytokeratin, and then neither halo nor labels are needed
        if not np.any(low & nuc2):
            return
        halo = sm >= st.ck_dim_peak_snr * nine_noise
        for _ in range(
            max(1, round(1.3 * math.hypot(self.blur, 6 / math.sqrt(12)) / 2))
        ):
            halo = _max3(halo)  # 3 x 3 dilation
        low &= ~halo
        seeds = low & nuc2
        if not seeds.any():
            return
        # the regions holding a nucleus, and their bins, read at the mask's
        # bins alone (a few hundred; not gathers over every bin)
        lab, n = _label(low)
        flat = lab.ravel()
        sel = np.bincount(flat[np.flatnonzero(seeds)], minlength=n + 1) > 0
        sel[0] = False
        at = np.flatnonzero(low)
        dim = at[sel[flat[at]]]
        if not dim.size:
            return
        # each such bin's 2 x 2 pixels, set at those bins alone (a few percent
        # of the field; a broadcast OR over every pixel took 2-3 ms)
        br, bc = _rowcol(dim, w2)
        br, bc = 2 * br, 2 * bc
        for dr in (0, 1):
            for dc in (0, 1):
                ck_mask[br + dr, bc + dc] = True

    def _measure_blur(
        self,
        nuc_lab: np.ndarray,
        nuc_area: np.ndarray,
        boxes: Sequence[tuple[slice, slice] | None],
    ) -> None:
        """The field's blur from the profiles of its bright single nuclei."""
        st = self.st
        lo, hi = (a / self.px**2 for a in st.blur_nucleus_area_um2)
        ids = np.flatnonzero((nuc_area >= lo) & (nuc_area <= hi))
        ids = ids[ids > 0]
        sigma, n = field_blur(
            self.full[self.n],
            nuc_lab,
            ids.tolist(),
            min_peak=st.blur_min_peak_snr * float(self.noise[self.n]),
            max_objects=st.blur_max_nuclei,
            boxes=boxes,
        )
        if n < st.blur_min_nuclei:
            sigma, n = st.default_blur_px, 0
        self.blur = float(sigma)
        self.result.blur_px = round(self.blur, 3)
        self.result.blur_nuclei = n

    def _add_region(
        self,
        crop: tuple[slice, slice],
        region: np.ndarray,
        nl: np.ndarray,
        near: list[tuple[int, int]],
        nuc_area: np.ndarray,
        claimed: set[int],
        *,
        split: bool = False,
        debris: tuple[np.ndarray, np.ndarray] | None = None,
        wings: Collection[int] = (),
    ) -> None:
        """Classify one CK region, given the nuclei overlapping it (`nl`: the
        field's nucleus labels over `crop` when `split`, whose merged nuclei
        may then be split: `_split_merged`; `debris`: the debris pixels the
        region was peeled from, `_peel`, and the band just beyond them;
        `wings`: labels of specks that are no nucleus, `_wing_specks`)."""
        inside = [
            nid
            for nid, cnt in near
            if cnt >= self.st.min_nucleus_inside * nuc_area[nid]
        ]
        claimed.update(inside)
        # every DNA spot inside counts against the cluster limit (a region
        # speckled with DNA is no cluster); a speck on another nucleus' slope
        # (`_wing_specks`) is no cell's nucleus, inside it or touching it
        spots = len(inside)
        inside = [nid for nid in inside if nid not in wings]
        near = [(nid, cnt) for nid, cnt in near if nid not in wings]
        touching = [nid for nid, _ in near]
        pieces: list[int] = []
        if split and len(inside) < len(near):
            nl, pieces = self._split_merged(crop, region, nl, near, set(inside))
            inside += pieces
            touching += pieces
            spots += len(pieces)
        self.result.objects.extend(
            self._ck_region(
                crop,
                region,
                nl,
                inside,
                touching,
                debris,
                spots=spots,
                blob_pieces=pieces,
            )
        )

    def _split_merged(
        self,
        crop: tuple[slice, slice],
        region: np.ndarray,
        nl: np.ndarray,
        near: list[tuple[int, int]],
        inside: set[int],
    ) -> tuple[np.ndarray, list[int]]:
        """Nuclei that blur merged into one blob, split where one of them lies
        inside the CK region.

        Two touching nuclei (a cell and a leukocyte beside it) blurred together
        pass the threshold as one blob, mostly outside the cell's cytokeratin,
        though the cell's own nucleus lies inside it. A blob overlapping the
        region is split at its DNA peaks (`_split_dna`); a piece of nucleus
        size with at least `min_nucleus_inside` of it inside the region gets a
        label of its own in a copy of `nl` (returned with the new labels). A
        single nucleus beside cytokeratin has one peak and stays whole.
        """
        st = self.st
        out, new = nl, list[int]()
        min_piece = st.min_nucleus_area_um2 / self.px**2
        # a blob larger than any cell cluster is no set of merged nuclei
        max_blob = st.max_cluster_area_um2 / self.px**2
        for nid, cnt in near:
            if nid in inside or cnt < min_piece * st.min_nucleus_inside:
                continue
            box = self.nuc_boxes[nid - 1]
            if box is None:
                continue
            if nid not in self._dna_pieces:  # one blob may lie near several regions
                nmask = self.nuc_lab[box] == nid
                pieces, n = (
                    (None, 0)
                    if np.count_nonzero(nmask) > max_blob
                    else _split_dna(
                        nmask,
                        self.full[self.n][box],
                        max(2, round(st.nucleus_split_um / self.px)),
                        st.nucleus_split_depth,
                        min_piece,
                    )
                )
                self._dna_pieces[nid] = (pieces if n else None, n)
            pieces, n = self._dna_pieces[nid]
            if pieces is None:  # one nucleus
                continue
            for p in range(1, n + 1):
                # the piece in the crop's coordinates (parts beyond it: outside)
                piece = np.zeros(nl.shape, bool)
                r0, c0 = box[0].start - crop[0].start, box[1].start - crop[1].start
                pr, pc = np.nonzero(pieces == p)
                pr, pc = pr + r0, pc + c0
                ok = (pr >= 0) & (pr < nl.shape[0]) & (pc >= 0) & (pc < nl.shape[1])
                piece[pr[ok], pc[ok]] = True
                if np.count_nonzero(piece & region) < st.min_nucleus_inside * pr.size:
                    continue
                if out is nl:
                    out = nl.copy()
                label = self.n_nuc + 1 + len(new)  # above every label in `nl`
                out[piece] = label
                new.append(label)
        return out, new

    def _peel(
        self, crop: tuple[slice, slice], region: np.ndarray, nl: np.ndarray
    ) -> tuple[
        np.ndarray,
        np.ndarray,
        np.ndarray,
        list[tuple[np.ndarray, list[tuple[int, int]]]],
    ]:
        """Parts of a debris region left after removing its debris-like pixels.

        The nuclei are segmented again without the debris pixels (a nucleus
        touching debris merges with the debris' own DNA signal). Returns that
        local nucleus label image, its labels' areas, the debris pixels (bool
        over `crop`), and each remaining part (bool mask over `crop`) with the
        local nuclei overlapping it, as (id, pixels).
        """
        sig, sat = self._signals(crop)
        # debris-like pixels of the region, judged at its pixels alone
        dimmest = sig[0][region] / self.noise[0]
        for c in range(1, len(self.names)):
            np.minimum(dimmest, sig[c][region] / self.noise[c], out=dimmest)
        junk = np.zeros(region.shape, bool)
        junk[region] = (dimmest >= self.st.debris_all_channel_snr) | (sat[region] >= 2)
        del dimmest
        junk = _grow(junk, 4)
        free = region & ~junk
        rest, n = _label(free)
        size = _areas(rest, free, n)
        clear = (nl > 0) & ~junk
        local, n_local = _label(clear)
        out = []
        for k in np.flatnonzero(size >= self.min_px).tolist():
            if k == 0:
                continue
            part = rest == k
            ids, cnt = np.unique(local[part], return_counts=True)
            nuclei = [(int(i), int(c)) for i, c in zip(ids, cnt, strict=True) if i]
            out.append((part, nuclei))
        return local, _areas(local, clear, n_local), junk, out

    def _colour_beside(
        self, crop: tuple[slice, slice], band: np.ndarray, cell: np.ndarray
    ) -> list[float] | None:
        """Each channel's median signal (noise units) in the 2 px `band` of a
        peeled region just beyond its debris (over `crop`), away from `cell`
        (3 px: the edge of a cell pressed into the debris may fall to the
        debris' share): the colour of the debris' glow, where it glows at
        least as bright as the faintest cytokeratin found (else None)."""
        band = band & ~_grow(cell, 3)
        if np.count_nonzero(band) < self.min_px:
            return None
        sig, _ = self._signals(crop)
        colour = [
            float(_median(sig[c][band])) / float(self.noise[c])
            for c in range(len(self.names))
        ]
        return colour if colour[self.e] >= self.st.ck_smooth_snr else None

    def _debris_row(
        self, f: dict[str, Any], region: np.ndarray, why: str, label: str = "DEBRIS"
    ) -> dict[str, Any]:
        n_px = int(np.count_nonzero(region))
        nan = float("nan")
        f.update(
            area_um2=round(n_px * self.px**2, 2),
            diameter_um=round(2 * math.sqrt(n_px / math.pi) * self.px, 2),
            diameter_halfmax_um=nan,
            diameter_low_um=nan,
            blur_px=round(self.blur, 2),
            ck_texture=nan,
            cd45_snr=nan,
            cd45_ck_ratio=nan,
            cd45_excess_snr=nan,
            cd45_nucleus_snr=nan,
            cd45_nucleus_cover=nan,
            cd45_encircled=nan,
            cd45_membrane_cover=nan,
            marker_snr=nan,
            cluster_size=1,
            nucleus_inside=0.0,
            eccentricity=nan,
            axis_ratio=nan,
            solidity=nan,
        )
        return self._finish(f, label, why)

    def _pad(self, sl: tuple[slice, ...], pad: int) -> tuple[slice, slice]:
        r, c = sl[0], sl[1]
        return (
            slice(max(r.start - pad, 0), min(r.stop + pad, self.h)),
            slice(max(c.start - pad, 0), min(c.stop + pad, self.w)),
        )

    # -------------------------------------------------------------- CK regions

    def _ck_region(
        self,
        crop: tuple[slice, slice],
        region: np.ndarray,
        nl: np.ndarray,
        inside: list[int],
        touching: list[int],
        debris: tuple[np.ndarray, np.ndarray] | None = None,
        *,
        spots: int = 0,
        blob_pieces: Collection[int] = (),
    ) -> list[dict[str, Any]]:
        """One row per cell of a CK region (clusters split among their nuclei;
        `spots`: the DNA spots inside it, specks included; `blob_pieces`:
        labels of nuclei that are pieces of a blob split beside the region,
        `_split_merged`).

        A region peeled from debris (`debris`: its pixels and the band just
        beyond them, bool over `crop`) is split with the debris as one more
        seed: the debris' glow, falling away from it, is its own, and each
        cell keeps its own body; a part with the glow's colour is debris.
        """
        if np.count_nonzero(region) > self.st.max_cluster_area_um2 / self.px**2:
            # far larger than a cluster of cells (e.g. a defocused wall): no split
            f, _ = self._intensity(crop, region)
            return [
                self._debris_row(
                    f, region, "larger than any cell cluster", label="OTHER"
                )
            ]
        if max(len(inside), spots) > _MAX_CLUSTER_NUCLEI:
            f, _ = self._intensity(crop, region)
            return [
                self._debris_row(
                    f, region, "more nuclei than any cell cluster", label="OTHER"
                )
            ]
        markers = np.zeros(region.shape, np.int32)
        n_mark = 0
        # seeds that are pieces of a nucleus blob: their size is the cut's
        cut_seeds: set[int] = set()
        min_dist = max(2, round(2.5 / self.px))
        boxes = ndimage.find_objects(nl)
        for nid in inside:
            box = boxes[nid - 1]  # work on the nucleus' own bounding box
            if box is None:
                continue
            nmask = nl[box] == nid
            if _shape(nmask)[2] < 0.88:  # two touching nuclei, one blob
                pieces = _split_nucleus(nmask, min_dist)
            else:  # or blurred into a convex one: apart where their DNA dips
                pieces, _ = _split_dna(
                    nmask,
                    self.full[self.n][crop][box],
                    max(2, round(self.st.nucleus_split_um / self.px)),
                    self.st.nucleus_split_depth,
                    self.st.min_nucleus_area_um2 / self.px**2,
                )
            n_pieces = int(pieces.max())
            for p in range(1, n_pieces + 1):
                n_mark += 1
                markers[box][pieces == p] = n_mark
                if n_pieces > 1 or nid in blob_pieces:
                    cut_seeds.add(n_mark)
        parts: list[tuple[np.ndarray, np.ndarray | None, int]]
        seeds = n_mark
        if debris is not None and n_mark:
            seeds += 1
            markers[debris[0] & (markers == 0)] = seeds
        if seeds >= 2:
            cells = watershed(
                -self.full[self.e][crop], markers, mask=region | (markers > 0)
            )
            parts = [
                ((cells == p) & region, markers == p, p) for p in range(1, n_mark + 1)
            ]
            parts = [x for x in parts if np.count_nonzero(x[0]) >= self.min_px]
        elif n_mark == 1:
            parts = [(region, markers > 0, 1)]
        else:
            parts = [(region, None, 0)]
        rows = []
        for cell_c, nucleus_c, seed in parts:
            # measure each cell on its own tight crop, not the whole region's
            either = cell_c if nucleus_c is None else cell_c | nucleus_c
            loc = _bbox(either, pad=4)
            sub = (
                slice(crop[0].start + loc[0].start, crop[0].start + loc[0].stop),
                slice(crop[1].start + loc[1].start, crop[1].start + loc[1].stop),
            )
            cell = cell_c[loc]
            nucleus = None if nucleus_c is None else nucleus_c[loc]
            nl_s = nl[loc]
            dapi = self.full[self.n][sub]
            others = (region[loc] | (nl_s > 0)) & ~cell
            if nucleus is not None:
                others &= ~nucleus
            nuc_core = None if nucleus is None else _core(nucleus, dapi)
            f, ck_area = self._measure(
                sub, cell, others, nuc_core, single=len(parts) == 1 and debris is None
            )
            # a cell on the edge of abutting fields is seen in two; it is counted
            # in the field holding its nucleus' centre (overlaps: stitch.py)
            f["_cut"] = nucleus is not None and _centre_beyond_edge(
                nucleus, sub, (self.h, self.w)
            )
            f["cluster_size"] = len(parts)
            # a cluster's part is measured with its neighbours' borders, no
            # disk's edge: its own nucleus (whole, not a piece of a blob) tells
            # whether it is a cell's, or a small CK+DAPI object's touching one
            f["_small_nucleus"] = (
                nuc_core is not None
                and len(parts) > 1
                and seed not in cut_seeds
                and self._largest_diameter_um(nuc_core) < self.st.min_cluster_nucleus_um
            )
            f["_glow_colour"] = (
                None
                if debris is None
                else self._colour_beside(
                    crop,
                    debris[1],
                    cell_c if nucleus_c is None else cell_c | nucleus_c,
                )
            )
            # the nucleus at half its maximum, in the CK area (`_measure`)
            if nuc_core is not None:
                f["nucleus_inside"] = _inside(nuc_core, ck_area)
            elif touching:
                f["nucleus_inside"] = _inside(
                    _core(np.isin(nl_s, touching), dapi), ck_area
                )
            else:
                f["nucleus_inside"] = 0.0
            ecc, ratio, solidity = _shape(cell)
            f.update(
                eccentricity=round(float(ecc), 3),
                axis_ratio=round(float(ratio), 3),
                solidity=round(float(solidity), 3),
            )
            label, reason = self._classify(f, has_nucleus=bool(touching))
            rows.append(self._finish(f, label, reason))
        return rows

    def _largest_diameter_um(self, core: np.ndarray) -> float:
        """The largest a nucleus can be whose half-maximum core is `core`: its
        area's diameter deconvolved with the field's blur taken
        `blur_uncertainty` smaller (`analysis.psf.deconvolved_radius`)."""
        r_half = math.sqrt(np.count_nonzero(core) / math.pi)
        sharpest = self.blur * (1 - self.st.blur_uncertainty)
        return 2 * deconvolved_radius(r_half, sharpest) * self.px

    def _intensity(
        self, crop: tuple[slice, slice], mask: np.ndarray
    ) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
        """Position and per-channel intensity of one object; enough to call debris.

        Returns the features and the channel signals over `crop`.
        """
        # the centroid from the rows' and columns' pixel counts: the means of
        # the pixels' indices (whole sums, exact either way) without listing
        # them (a rim's region: 0.5 ms instead of 2)
        per_row = np.count_nonzero(mask, axis=1)
        area = int(per_row.sum())
        rows = int(per_row @ np.arange(mask.shape[0]))
        cols = int(np.count_nonzero(mask, axis=0) @ np.arange(mask.shape[1]))
        nan = float("nan")
        f: dict[str, Any] = {
            "row": round((rows / area if area else nan) + crop[0].start, 1),
            "col": round((cols / area if area else nan) + crop[1].start, 1),
        }
        sig, sat_crop = self._signals(crop)
        dimmest = None  # per pixel: the lowest SNR over all channels
        inside = []  # each channel's values in the mask
        means = []  # and their means
        for c, name in enumerate(self.names):
            vals = sig[c][mask]
            inside.append(vals)
            total = vals.sum()
            # ``vals.mean()`` from that sum: its type's sum over the count
            # taken in float64, rounded back to the type (as `np.mean` does)
            means.append(total.dtype.type(float(total) / vals.size))
            f[f"{name}_mean"] = round(float(means[-1]), 1)
            f[f"{name}_max"] = round(float(vals.max()), 1)
            f[f"{name}_integrated"] = round(float(total), 0)
            snr = vals / self.noise[c]
            dimmest = snr if dimmest is None else np.minimum(dimmest, snr)
        sat = sat_crop[mask]
        f["saturated_fraction"] = round(float(np.count_nonzero(sat)) / area, 4)
        f["ck_snr"] = round(float(means[self.e]) / float(self.noise[self.e]), 2)
        f["_sat2"] = (
            np.count_nonzero(sat >= 2) > self.st.debris_saturated_fraction * area
        )
        # debris glows in every channel at the same pixels; a cell overlapping a
        # leukocyte is bright in each channel only in its own part
        assert dimmest is not None
        f["_all_bright"] = (
            float(np.count_nonzero(dimmest >= self.st.debris_all_channel_snr)) / area
        )
        # the halo of debris or of the rim glows evenly across the object in every
        # stain's channel; a neighbour's CD45 ring or a cell's own marker membrane
        # lights only part of it: the glow is judged on the medians, computed only
        # where the means already suggest it, and not for an object that is
        # debris already (`_classify` calls it that before it reads the glow; a
        # debris row drops it: `_finish`)
        glow = self._glow(f, {c: None for c in range(len(self.names))})
        if (
            self._debris(f) is None
            and glow >= self.st.debris_halo_snr
            and glow >= self.st.debris_halo_fraction * (f["ck_snr"])
        ):
            # (the DNA channel's median is never asked for)
            glow = self._glow(
                f,
                {
                    c: None if c == self.n else float(_median(v))
                    for c, v in enumerate(inside)
                },
            )
        f["_glow"] = glow
        return f, sig

    def _glow(self, f: Mapping[str, Any], median: Mapping[int, float | None]) -> float:
        """The weakest non-DNA channel's signal over an object, in noise units:
        its mean (`f`), or its median where given."""
        return min(
            (f[f"{name}_mean"] if (v := median[c]) is None else v)
            / float(self.noise[c])
            for c, name in enumerate(self.names)
            if c != self.n
        )

    def _measure(
        self,
        crop: tuple[slice, slice],
        mask: np.ndarray,
        others: np.ndarray | None = None,
        nucleus: np.ndarray | None = None,
        *,
        single: bool = True,
    ) -> tuple[dict[str, Any], np.ndarray]:
        """All features of one candidate cell (bool `mask` over `crop`; `others`:
        pixels of neighbouring cells, left out of its profile; `single`: a whole
        object, not a part of a cluster).

        Also returns the cell's cytokeratin area, without the blur halo that the
        detection threshold includes: its half-maximum core, or the detection
        mask less that halo (`_halo_px`). Cytokeratin over the nucleus is
        dimmer, and where the nucleus sits near the cell's edge that dim part
        is no enclosed hole for the core to fill.
        """
        px, st = self.px, self.st
        f, sig = self._intensity(crop, mask)
        core, peak = _core_peak(mask, self.full[self.e][crop])
        size_px = max(int(np.count_nonzero(core)), 1)
        # the size of the object, not of the blur: the half-maximum radius of its
        # cytokeratin profile, deconvolved with the field's blur (`analysis.psf`)
        allowed = None if others is None else ~others
        ck, blur = self.full[self.e][crop], self.blur
        if f["ck_snr"] < st.ck_dim_peak_snr:
            # dim: its grains and noise would make the profile's peak; smoothing by
            # a known Gaussian adds to the blur in quadrature
            ck = ndimage.gaussian_filter(ck, _DIM_SMOOTH_PX)
            blur = math.hypot(blur, _DIM_SMOOTH_PX)
        # ...and the smallest it can be: a small object's deconvolved size moves
        # several times as much as the blur's error (r dr = -2 sigma dsigma for
        # a small blurred disk), so near the size limit a few percent of blur
        # decide. For a whole object (a cluster's part is cut by an artificial
        # border, not a disk's edge) of at most twice the limit, beyond which no
        # error of the blur brings it near; from the same profile
        sigmas = [blur]
        if single and st.blur_uncertainty > 0:
            sigmas.append(blur * (1 + st.blur_uncertainty))
        radii, half = object_radii(ck, mask, sigmas, allowed=allowed)
        radius = radii[0]
        if math.isfinite(radius) and half > 0:
            scale = (radius / half) ** 2
            diam = float(2 * radius * px)
        else:  # no half-maximum edge in the crop: the core's size
            scale, half = 1.0, math.sqrt(size_px / math.pi)
            diam = 2 * half * px
        f["area_um2"] = round(size_px * scale * px * px, 2)
        f["diameter_um"] = round(diam, 2)
        low = float("nan")
        if (
            len(radii) > 1
            and math.isfinite(radius)
            and diam <= 2 * st.min_ctc_diameter_um
        ):
            r_low = radii[1]
            low = min(2 * r_low * px, diam) if math.isfinite(r_low) else 0.0
        f["diameter_low_um"] = round(low, 2)
        f["diameter_halfmax_um"] = round(2 * half * px, 2)
        f["blur_px"] = round(self.blur, 2)
        ck = sig[self.e][mask]
        f["ck_texture"] = round(float(ck.std() / max(float(ck.mean()), 1e-6)), 3)
        # CD45 sits on the membrane, just inside the cell's edge: the median over a
        # band across the border, so a neighbour's ring touching one side does not
        # make the cell positive
        band = _grow(core) & ~_shrink(core, 3)
        if not band.any():
            band = mask
        apc = float(_median(ndimage.uniform_filter(sig[self.lk], 3)[band]))
        ck_smooth = ndimage.uniform_filter(sig[self.e], 3)
        ck_band = float(_median(ck_smooth[band]))
        f["cd45_snr"] = round(apc / float(self.noise[self.lk]), 2)
        # bleed-through of the cytokeratin dye is a few percent of it; genuine
        # CD45 staining is comparable to the cell's own cytokeratin signal
        f["cd45_ck_ratio"] = round(apc / max(ck_band, float(self.noise[self.e])), 3)
        # CD45 in excess of the cytokeratin dye's bleed-through: when the field
        # could not measure that, it is measured on the cell itself, as a low
        # quantile of CD45 / CK over its bright cytokeratin away from DNA (CD45
        # staining only ever raises the ratio; where there is DNA its own,
        # estimated, bleed-through was taken off CD45 already)
        coef = 0.0
        if self.lk in self.unknown_spill:
            bright = mask & (sig[self.e] > _BLEED_MIN_SNR * float(self.noise[self.e]))
            no_dna = bright & (sig[self.n] < 5 * float(self.noise[self.n]))
            if np.count_nonzero(no_dna) >= 20:
                bright = no_dna
            if np.count_nonzero(bright) >= 20:
                ratio = sig[self.lk][bright] / sig[self.e][bright]
                coef = float(np.clip(_quantile(ratio, 0.1), 0.0, 0.3))
        excess = ndimage.uniform_filter(sig[self.lk] - coef * sig[self.e], 3)
        lk_noise = float(self.noise[self.lk])
        f["cd45_excess_snr"] = round(float(_median(excess[band])) / lk_noise, 2)
        # a leukocyte under a cytokeratin fragment has its CD45 membrane just
        # around its nucleus (`nucleus`: its half-maximum core), inside the CK
        # area, where the band does not look
        # (only there: in a crowded field the ring reaches past the CK area into
        # the membranes of the leukocytes beside the cell)
        ring = around = None
        excess_snr = excess / lk_noise
        # a CD45-positive cell's own membrane is stained all around it, however
        # weakly; a neighbour's membrane touches one side. Counted per sector of
        # the band about the cell's centre, where CD45 is also above the few
        # percent of the cytokeratin there that a wrong measure of its
        # bleed-through leaves (a ring cut by the field's edge lights fewer).
        # With the bleed-through unmeasured, the cell's own low estimate of it
        # leaves most of it: CD45 must then be comparable to the cytokeratin
        unmeasured = self.lk in self.unknown_spill
        # ...nor leukocytes pressed against it on several sides: the band is
        # not read within 5 px of a nucleus outside the cell's mask (a
        # leukocyte's membrane lies between its nucleus and the cell)
        foreign = (self.nuc_lab[crop] > 0) & ~mask
        if nucleus is not None:
            foreign &= ~_grow(nucleus, 2)
        own_band = excess_snr
        if foreign.any():
            own_band = np.where(_grow(foreign, 5), -np.inf, excess_snr)
        ck_lk = ck_smooth / lk_noise  # cytokeratin in CD45's noise units
        f["cd45_membrane_cover"] = _ring_cover(
            band,
            core if core.any() else mask,
            own_band,
            st.min_cd45_membrane_snr,
            ck=ck_lk,
            ratio=st.min_cd45_ratio if unmeasured else st.min_cd45_encircled_ratio,
            every=True,
        )
        if nucleus is not None and nucleus.any():
            around = _grow(nucleus, 2) & ~nucleus
            ring = around & mask
        if ring is not None and ring.any():
            assert nucleus is not None
            f["cd45_nucleus_snr"] = round(float(_median(excess[ring])) / lk_noise, 2)
            f["cd45_nucleus_cover"] = _ring_cover(
                ring, nucleus, excess_snr, st.max_cd45_nucleus_snr
            )
        else:
            f["cd45_nucleus_snr"] = float("nan")
            f["cd45_nucleus_cover"] = float("nan")
        # ...and a leukocyte's own membrane rings its nucleus on every side,
        # also where it reaches past a small CK fragment lying over it: the
        # same ring, not cut to the CK area, lit (CD45 less bleed-through) at
        # the level that makes a CK-negative nucleus a leukocyte's, in nearly
        # all of the 8 sectors (a ring cut by the field's edge lights fewer)
        f["cd45_encircled"] = float("nan")
        if around is not None:
            assert nucleus is not None
            f["cd45_encircled"] = _ring_cover(
                around,
                nucleus,
                excess_snr,
                self.st.wbc_cd45_snr,
                ck=ck_lk,
                ratio=self.st.min_cd45_encircled_ratio,
                every=True,
            )
        if self.m is not None:
            fitc = ndimage.uniform_filter(sig[self.m], 3)[mask]
            f["marker_snr"] = round(
                float(_quantile(fitc, 90 / 100)) / float(self.noise[self.m]), 2
            )
        else:
            f["marker_snr"] = float("nan")
        return f, core | _shrink(mask, self._halo_px(peak, single))

    def _halo_px(self, peak: float, single: bool) -> int:
        """How far a whole object's detection mask reaches past its half-maximum
        edge (px, at least 2): a straight edge of plateau `peak` blurred by the
        field's blur sigma falls to the mask's threshold T at sigma *
        Phi^-1(1 - T / peak) beyond it (1.6 sigma for a peak 20 T). A cluster's
        part is cut by an artificial border, not a blurred edge: 2."""
        t = self.st.ck_snr * float(self.noise[self.e])
        if not single or not peak > 2 * t:
            return 2
        # (a peak far beyond the threshold, say a float image's, stays a number)
        z = NormalDist().inv_cdf(min(1 - t / peak, 1 - 1e-9))
        return max(2, round(self.blur * z))

    def _classify(self, f: dict[str, Any], *, has_nucleus: bool) -> tuple[str, str]:
        st = self.st
        if (why := self._debris(f)) is not None:
            return "DEBRIS", why
        # the faint halo of debris or of the cartridge rim glows in every stain's
        # channel about as much as in cytokeratin; a cell has no CD45 (only a
        # few percent of bleed-through) and any marker on its membrane only
        ck = f[f"{self.names[self.e]}_mean"] / float(self.noise[self.e])
        glow = f.pop("_glow")
        if glow >= st.debris_halo_snr and glow >= st.debris_halo_fraction * ck:
            return "DEBRIS", "faint glow in every channel (debris or rim halo)"
        if self._in_glow(f, ck):
            return "DEBRIS", "in the glow of debris (its colour)"
        if f.pop("_cut"):
            return "OTHER", CUT_REASON
        if f["ck_snr"] < st.ck_smooth_snr:
            # cytokeratin-positive: a part of a region split among its nuclei
            # (or a halo's slope) can hold less cytokeratin than the faintest
            # the detector finds anywhere
            return "OTHER", "no cytokeratin over the cell"
        if not has_nucleus:
            return "CK_FRAGMENT", "no nucleus"
        if f["nucleus_inside"] < st.min_nucleus_inside:
            return "OTHER", "nucleus mostly outside the CK area"
        if f["diameter_um"] <= st.min_ctc_diameter_um:
            return "CK_FRAGMENT", f"not larger than {st.min_ctc_diameter_um:g} um"
        if f["diameter_low_um"] <= st.min_ctc_diameter_um:
            return "CK_FRAGMENT", (
                f"not larger than {st.min_ctc_diameter_um:g} um within the "
                "blur's uncertainty"
            )
        if f.get("_small_nucleus"):
            return "CK_FRAGMENT", (
                f"a cluster's part with a nucleus under "
                f"{st.min_cluster_nucleus_um:g} um"
            )
        # with bleed-through unknown (too few single-stain objects, no pooled or
        # configured value) CD45 must also be comparable to the cell's
        # cytokeratin, which bleed-through never is
        guard = self.lk in self.unknown_spill
        if f["cd45_snr"] >= st.max_cd45_snr and (
            not guard
            or f["cd45_ck_ratio"] >= st.min_cd45_ratio
            or f["cd45_excess_snr"] >= st.max_cd45_snr
        ):
            return "DOUBLE_POSITIVE", "CD45 positive"
        if (
            f["cd45_excess_snr"] >= st.max_cd45_dim_snr
            and f["cd45_ck_ratio"] >= st.min_cd45_ratio
        ):
            # a dim cell bleeds a few percent of its cytokeratin into CD45, not
            # a CD45 signal comparable to it
            return "DOUBLE_POSITIVE", "CD45 positive, comparable to its cytokeratin"
        # all around the nucleus; a ring too small to be cut into sectors
        # (nan) is judged by its median alone
        cover = f["cd45_nucleus_cover"]
        if f["cd45_nucleus_snr"] >= st.max_cd45_nucleus_snr and not (
            cover < st.min_cd45_nucleus_cover
        ):
            return "DOUBLE_POSITIVE", "CD45 positive around the nucleus"
        if f["cd45_encircled"] >= st.min_cd45_encircled:
            return "DOUBLE_POSITIVE", "CD45 all around the nucleus (a leukocyte's)"
        if f["cd45_membrane_cover"] >= st.min_cd45_membrane_cover:
            return "DOUBLE_POSITIVE", "CD45 on the membrane all around the cell"
        if f["diameter_um"] > st.max_ctc_diameter_um:
            return "OTHER", f"larger than {st.max_ctc_diameter_um:g} um"
        # round to oval; a cell split from a cluster has an artificial border on
        # its contact side, so only its axis ratio is judged
        irregular = f["cluster_size"] == 1 and f["solidity"] < st.min_solidity
        if irregular or f["axis_ratio"] < st.min_axis_ratio:
            return "OTHER", "not round to oval"
        return "CTC", "meets the CTC definition"

    def _in_glow(self, f: Mapping[str, Any], ck: float) -> bool:
        """A part peeled from debris whose every stain's channel stands to its
        cytokeratin as in the debris' glow beside it: the glow, not a cell."""
        g = f.get("_glow_colour")
        if g is None or not ck > 0:
            return False
        for c, name in enumerate(self.names):
            if c in (self.n, self.e):
                continue
            if not g[c] > 0:
                return False
            part = f[f"{name}_mean"] / float(self.noise[c]) / ck
            if part < self.st.debris_halo_fraction * g[c] / g[self.e]:
                return False
        return True

    def _debris(self, f: Mapping[str, Any]) -> str | None:
        if f["_sat2"]:
            return "saturated in two or more channels"
        if f["_all_bright"] >= self.st.debris_all_channel_fraction:
            return "bright in every channel"
        return None

    def _finish(self, f: dict[str, Any], label: str, reason: str) -> dict[str, Any]:
        st = self.st
        # the working keys (``_sat2``, ``_glow``, ``_cut``...) end here, whichever
        # rule decided: a verdict may come before the rule that reads one
        for key in [k for k in f if k.startswith("_")]:
            del f[key]
        f["label"] = label
        f["reason"] = reason
        f["marker_positive"] = bool(label == "CTC" and f["marker_snr"] >= st.marker_snr)
        # only cytokeratin candidates are scored against the CTC definition
        cand = not math.isnan(f.get("ck_texture", float("nan")))
        f["score"] = round(ctc_score(f, st), 3) if cand else 0.0
        return f

    # -------------------------------------------------------------- nuclei

    def _nuclei_table(
        self, nuclei: tuple[np.ndarray, np.ndarray, np.ndarray], claimed: set[int]
    ) -> list[dict[str, Any]]:
        """Leukocytes and other CK-negative nuclei, measured in one pass
        (`nuclei`: their pixels grouped by label, `_by_label`)."""
        sel, starts, ids = nuclei
        if not sel.size:
            return []
        st, px = self.st, self.px
        size = np.diff(np.r_[starts, sel.size])
        # the rows are per nucleus: drop the others' pixels before measuring
        # (claimed nuclei include the rim's, often most of the nucleus pixels)
        keep = (size >= self.min_px) & ~np.isin(ids, list(claimed))
        if not keep.any():
            return []
        if not keep.all():
            sel, size = sel[np.repeat(keep, size)], size[keep]
            starts = np.r_[0, np.cumsum(size[:-1])]
        area = size.astype(np.float64)
        pix_r, pix_c = _rowcol(sel, self.w)
        rr, cc = pix_r.astype(np.float64), pix_c.astype(np.float64)
        r0 = np.add.reduceat(rr, starts) / area
        c0 = np.add.reduceat(cc, starts) / area
        dr, dc = (
            rr - np.repeat(r0, area.astype(int)),
            cc - np.repeat(c0, area.astype(int)),
        )
        vr = np.add.reduceat(dr * dr, starts) / area + 1 / 12
        vc = np.add.reduceat(dc * dc, starts) / area + 1 / 12
        cov = np.add.reduceat(dr * dc, starts) / area
        ecc, ratio = _ellipse(vr, vc, cov)
        stats = {}
        dimmest = np.full(sel.size, np.inf, np.float32)
        for c, (name, v) in enumerate(
            zip(self.names, self._sig_all(sel, flat=True), strict=True)
        ):
            stats[name] = (np.add.reduceat(v, starts), np.maximum.reduceat(v, starts))
            dimmest = np.minimum(dimmest, v / self.noise[c])
        all_bright = np.add.reduceat(
            (dimmest >= st.debris_all_channel_snr).astype(np.float64), starts
        )
        # CD45 on the membrane just outside the nucleus: the max of the CD45 signal
        # binned 2 x 2 over a 3 x 3 bin neighbourhood (+-3 px) covers the ring
        h2, w2 = self.h // 2, self.w // 2
        rb = np.minimum(pix_r // 2, h2 - 1)
        cb = np.minimum(pix_c // 2, w2 - 1)
        near = self._near_max(self.lk, rb * w2 + cb, h2, w2)
        cd45 = np.maximum.reduceat(near, starts) / float(self.noise[self.lk])
        sat = self.sat(sel, flat=True)
        sat2 = np.add.reduceat((sat >= 2).astype(np.float64), starts)
        sat_any = np.add.reduceat((sat > 0).astype(np.float64), starts)
        marker = None
        if self.m is not None:
            marker = stats[self.names[self.m]][1] / float(self.noise[self.m])
        # round once, vectorised, then build the rows
        cols: dict[str, list[Any]] = {
            "row": np.round(r0, 1).tolist(),
            "col": np.round(c0, 1).tolist(),
            "area_um2": np.round(area * px * px, 2).tolist(),
            "diameter_um": np.round(2 * np.sqrt(area / np.pi) * px, 2).tolist(),
        }
        for name in self.names:
            s_, mx = stats[name]
            cols[f"{name}_mean"] = np.round(s_ / area, 1).tolist()
            cols[f"{name}_max"] = np.round(mx, 1).tolist()
            cols[f"{name}_integrated"] = np.round(s_, 0).tolist()
        cols["saturated_fraction"] = np.round(sat_any / area, 4).tolist()
        ck_mean = stats[self.names[self.e]][0] / area
        cols["ck_snr"] = np.round(ck_mean / float(self.noise[self.e]), 2).tolist()
        cols["cd45_snr"] = np.round(cd45, 2).tolist()
        cols["marker_snr"] = (
            np.round(marker, 2).tolist()
            if marker is not None
            else [float("nan")] * area.size
        )
        cols["eccentricity"] = np.round(ecc, 3).tolist()
        cols["axis_ratio"] = np.round(ratio, 3).tolist()
        # the rules of `_debris`, then CD45, on every row at once (the same
        # numbers the rows hold); rows built from the columns in one pass
        sat2_hit = sat2 > st.debris_saturated_fraction * area
        bright = all_bright / area
        verdict = np.select(
            [sat2_hit, bright >= st.debris_all_channel_fraction],
            [0, 1],
            np.where(np.array(cols["cd45_snr"]) >= st.wbc_cd45_snr, 2, 3),
        ).tolist()
        # label, reason, then what `_finish` gives a row that is no candidate
        ends = (
            ("DEBRIS", "saturated in two or more channels", False, 0.0),
            ("DEBRIS", "bright in every channel", False, 0.0),
            ("WBC", "nucleus with CD45, no cytokeratin", False, 0.0),
            ("OTHER", "nucleus without CD45 or cytokeratin", False, 0.0),
        )
        nan = float("nan")
        # the features a nucleus without cytokeratin does not have
        fixed = {
            "ck_texture": nan,
            "cd45_ck_ratio": nan,
            "cd45_excess_snr": nan,
            "cd45_nucleus_snr": nan,
            "cd45_nucleus_cover": nan,
            "cd45_encircled": nan,
            "cd45_membrane_cover": nan,
            "diameter_halfmax_um": nan,
            "diameter_low_um": nan,
            "blur_px": round(self.blur, 2),
            "cluster_size": 1,
            "nucleus_inside": 0.0,
            "solidity": nan,
        }
        keys = (*cols, *fixed, "label", "reason", "marker_positive", "score")
        tail = [(*fixed.values(), *end) for end in ends]
        return [
            dict(zip(keys, (*vals, *tail[v]), strict=True))
            for vals, v in zip(zip(*cols.values(), strict=True), verdict, strict=True)
        ]


def ctc_score(f: Mapping[str, Any], st: DetectionSettings) -> float:
    """How clearly an object meets each CTC rule, 0..1 (geometric mean of margins).

    Margins: cytokeratin above its threshold, nucleus inside the CK area, CD45
    below its limit, diameter above 4 um.
    """
    margins = [
        (f["ck_snr"] - st.ck_snr) / (3 * st.ck_snr),
        (f["nucleus_inside"] - st.min_nucleus_inside)
        / max(1 - st.min_nucleus_inside, 1e-6),
        1 - f["cd45_snr"] / st.max_cd45_snr,
        (f["diameter_um"] - st.min_ctc_diameter_um) / max(st.min_ctc_diameter_um, 1e-6),
    ]
    prod = 1.0
    for m in margins:
        prod *= min(1.0, max(float(m), 1e-3))
    return prod ** (1 / len(margins))

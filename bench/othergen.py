"""A second, independent generator of synthetic CTC fields, for checking the detector.

The detector's rules were built and tuned on the project's own simulator
(`simulators`), so scoring it only on that simulator's pictures can hide rules
that fit the simulator rather than the cells. This module draws fields another
way, sharing no code with `simulators`, to see whether the detector holds up on
data drawn differently from the data it was built with.
`bench/bench_detect_other.py` scores the detector on it.

One field is a (4, 1024, 1024) uint16 image, channels DAPI, FITC, PE (cytokeratin)
and APC (CD45), 0.64 um pixels, with its list of true objects. How it differs from
`simulators`:

* PSF: per field either a Moffat (beta 2.2-4.5) or a two-Gaussian core plus wide
  wing (wing 2.5-4 x the core, 8-25 % of the light), width 0.5-2.8 px, slightly
  anisotropic (axis ratio 1-1.25, random angle), applied by FFT convolution;
  the simulator blurs with an isotropic Gaussian.
* Shapes and texture: every cell is a perturbed ellipse (2-3 random angular
  harmonics) rasterised on a 3x supersampled local grid. Cytokeratin is granular
  per cell (smoothed noise, 3-11 bright granules, sometimes a cortical rim) and
  dimmer over the nucleus; nuclei are domed, leukocyte nuclei sometimes 2-4
  lobes; the CD45 of a leukocyte is a patchy membrane ring over a faint
  cytoplasm. The simulator draws soft-edged shapes textured from one shared bank.
* Camera: Poisson photo-electrons on a gain of 0.8-2.0 DN/e plus 4-6 DN Gaussian
  read noise and a 100 DN offset, clipped to 12 bits; per-channel background
  80-200 DN with a linear and a cross gradient; off-centre vignetting of the
  form 1 / (1 + k r^2)^2 (k 0.05-0.25) on signal and background; crosstalk
  PE->APC 2-8 %, DAPI->FITC 1-3 %, PE->FITC 1-5 %; FITC speckles.
* Placement: each field stands alone (no cartridge, no stage coordinates, no rim).
  CTCs (8-16 um, 10x range of bright cytokeratin, a quarter to 40 % dim at 2-6 x
  the PE pixel noise) come singly or in clusters of 2-5 touching cells;
  look-alikes (double-positive cells, CK fragments, small CK+DAPI+ objects, a CK
  blob with a nucleus beside it, free nuclei, debris) are put touching a bright
  CTC 30-70 % of the time; leukocytes fill the rest without overlap.

`render(condition, seed, index)` is deterministic in its arguments: the random
generator is ``np.random.default_rng([seed, index, condition number])``, the
condition number being the position of the condition in `CONDITIONS`. This module
writes no files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve

__all__ = [
    "CHANNELS",
    "CONDITIONS",
    "HEIGHT",
    "KINDS",
    "PIXEL_UM",
    "WIDTH",
    "Condition",
    "make_psf",
    "render",
    "render_with_meta",
]

HEIGHT = WIDTH = 1024
PIXEL_UM = 0.64
CHANNELS = ("DAPI", "FITC", "PE", "APC")
_D, _F, _P, _A = 0, 1, 2, 3
#: kinds of true objects
KINDS = (
    "CTC",
    "WBC",
    "DOUBLE_POSITIVE",
    "CK_FRAGMENT",
    "SMALL_CK_DAPI",
    "NUCLEUS_BESIDE_CK",
    "FREE_NUCLEUS",
    "DEBRIS",
)

H, W = HEIGHT, WIDTH


@dataclass(frozen=True)
class Condition:
    """What a field holds: leukocytes, CTCs and how they come, look-alikes."""

    name: str
    what: str
    #: leukocytes per field
    wbc: int
    #: CTCs per field
    ctc: int
    #: "one": one cluster of 2-4 CTCs; "half": half the CTCs in clusters of 2-5
    clusters: str
    #: fraction of dim CTCs among single ones and among cluster members
    dim_single: float
    dim_cluster: float
    #: look-alikes: multiple of the base counts (`BASE_LOOKALIKES`)
    lookalikes: int
    #: chance that a look-alike is put touching a bright CTC
    touch: float


CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        Condition(
            "baseline",
            "150 WBC, 6 CTCs (one cluster), 1x look-alikes, 30 % touching",
            wbc=150,
            ctc=6,
            clusters="one",
            dim_single=0.25,
            dim_cluster=0.3,
            lookalikes=1,
            touch=0.3,
        ),
        Condition(
            "dense",
            "350 WBC, otherwise baseline",
            wbc=350,
            ctc=6,
            clusters="one",
            dim_single=0.25,
            dim_cluster=0.3,
            lookalikes=1,
            touch=0.3,
        ),
        Condition(
            "lookalikes",
            "3x look-alikes, 70 % touching a bright CTC",
            wbc=150,
            ctc=6,
            clusters="one",
            dim_single=0.25,
            dim_cluster=0.3,
            lookalikes=3,
            touch=0.7,
        ),
        Condition(
            "clusters-dim",
            "8 CTCs, half in clusters, 40 % of cluster members dim",
            wbc=150,
            ctc=8,
            clusters="half",
            dim_single=0.25,
            dim_cluster=0.4,
            lookalikes=1,
            touch=0.3,
        ),
        Condition(
            "all",
            "350 WBC, clusters-dim and lookalikes at once",
            wbc=350,
            ctc=8,
            clusters="half",
            dim_single=0.25,
            dim_cluster=0.4,
            lookalikes=3,
            touch=0.7,
        ),
    )
}

#: look-alikes per field at `Condition.lookalikes` == 1
BASE_LOOKALIKES = {
    "DOUBLE_POSITIVE": 1,
    "CK_FRAGMENT": 2,
    "SMALL_CK_DAPI": 1,
    "NUCLEUS_BESIDE_CK": 2,
    "FREE_NUCLEUS": 1,
    "DEBRIS": 2,
}

_Grid = tuple[tuple[slice, slice], np.ndarray, np.ndarray, int]


def _um(x: float) -> float:
    return x / PIXEL_UM


# --------------------------------------------------------------------- PSF


def make_psf(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """A normalised, slightly anisotropic Moffat or two-Gaussian kernel and its
    parameters ("kind", "width" in px, "aniso", "angle", and "beta" or
    "wing_w"/"wing_f")."""
    width = rng.uniform(0.5, 2.8)  # "sigma-like" width in px
    aniso = rng.uniform(1.0, 1.25)
    ang = rng.uniform(0, math.pi)
    kind = rng.choice(["moffat", "twogauss"])
    r = math.ceil(max(6, 7 * width))
    y, x = np.mgrid[-r : r + 1, -r : r + 1].astype(float)
    u = x * math.cos(ang) + y * math.sin(ang)
    v = -x * math.sin(ang) + y * math.cos(ang)
    q2 = (u / (width * math.sqrt(aniso))) ** 2 + (v * math.sqrt(aniso) / width) ** 2
    desc: dict[str, Any]
    if kind == "moffat":
        beta = rng.uniform(2.2, 4.5)
        # alpha such that the Moffat FWHM equals the Gaussian FWHM of sigma=width
        alpha = 2.3548 / (2 * math.sqrt(2 ** (1 / beta) - 1))
        k = (1 + q2 / alpha**2) ** (-beta)
        desc = {"kind": "moffat", "beta": beta}
    else:
        wing_w = rng.uniform(2.5, 4.0)
        wing_f = rng.uniform(0.08, 0.25)
        core = (1 - wing_f) * np.exp(-q2 / 2) / width**2
        wing = wing_f * np.exp(-q2 / (2 * wing_w**2)) / (width * wing_w) ** 2
        k = core + wing
        desc = {"kind": "twogauss", "wing_w": wing_w, "wing_f": wing_f}
    k /= k.sum()
    desc.update(width=width, aniso=aniso, angle=ang)
    return k, desc


# --------------------------------------------------------------------- shapes


def _local_grid(cy: float, cx: float, R: float, ss: int = 3) -> _Grid | None:
    """Supersampled local grid around (cy, cx) with half size R (px): the frame
    slices, the offsets of the subsamples from the centre, and `ss`."""
    r0 = max(0, math.floor(cy - R - 2))
    r1 = min(H, math.ceil(cy + R + 3))
    c0 = max(0, math.floor(cx - R - 2))
    c1 = min(W, math.ceil(cx + R + 3))
    if r1 <= r0 or c1 <= c0:
        return None
    off = (np.arange(ss) + 0.5) / ss - 0.5
    yy = (np.arange(r0, r1)[:, None] + off[None, :]).ravel()
    xx = (np.arange(c0, c1)[:, None] + off[None, :]).ravel()
    Y, X = np.meshgrid(yy, xx, indexing="ij")
    return (slice(r0, r1), slice(c0, c1)), Y - cy, X - cx, ss


def _down(a: np.ndarray, ss: int) -> np.ndarray:
    h, w = a.shape
    return a.reshape(h // ss, ss, w // ss, ss).mean(axis=(1, 3))


def _blob_field(
    dy: np.ndarray,
    dx: np.ndarray,
    a: float,
    b: float,
    ang: float,
    harm: Sequence[tuple[int, float, float]],
) -> np.ndarray:
    """Normalised radius rho (inside if rho < 1) of a perturbed ellipse."""
    u = dx * math.cos(ang) + dy * math.sin(ang)
    v = -dx * math.sin(ang) + dy * math.cos(ang)
    th = np.arctan2(v / b, u / a)
    rr = np.hypot(u / a, v / b)
    pert = np.ones_like(th)
    for k, amp, ph in harm:
        pert += amp * np.cos(k * th + ph)
    return rr / pert


def _rand_harm(
    rng: np.random.Generator, strength: float, kmax: int = 5
) -> list[tuple[int, float, float]]:
    ks = rng.choice(np.arange(2, kmax + 1), size=rng.integers(2, 4), replace=False)
    return [
        (int(k), rng.uniform(0, strength) / k**0.5, rng.uniform(0, 2 * math.pi))
        for k in ks
    ]


def _smooth_noise(
    shape: tuple[int, ...], rng: np.random.Generator, sigma: float
) -> np.ndarray:
    n = gaussian_filter(rng.standard_normal(shape), sigma)
    s = n.std()
    return n / s if s > 0 else n


# --------------------------------------------------------------------- drawing


class _Field:
    """Emission planes (before blur), the truth list and the occupied circles."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.em = np.zeros((4, H, W), np.float32)  # emission before blur
        self.objs: list[dict[str, Any]] = []  # truth
        self.circles: list[tuple[float, float, float]] = []  # (r, c, radius)

    def free(
        self,
        r: float,
        c: float,
        rad: float,
        margin: float = 1.0,
        ignore: Sequence[int] = (),
    ) -> bool:
        for i, (rr, cc, ra) in enumerate(self.circles):
            if i in ignore:
                continue
            if (rr - r) ** 2 + (cc - c) ** 2 < (margin * (ra + rad)) ** 2:
                return False
        return True

    def rand_pos(
        self, rad: float, margin: float = 1.0, edge: float = 0
    ) -> tuple[float, float] | None:
        for _ in range(300):
            r = self.rng.uniform(edge, H - edge)
            c = self.rng.uniform(edge, W - edge)
            if self.free(r, c, rad, margin):
                return r, c
        return None

    def occupy(self, r: float, c: float, rad: float) -> int:
        self.circles.append((r, c, rad))
        return len(self.circles) - 1

    def add(self, ch: int, sl: tuple[slice, slice], img: np.ndarray) -> None:
        self.em[ch][sl] += img.astype(np.float32)

    # ---- cells

    def draw_nucleus(
        self,
        cy: float,
        cx: float,
        diam: float,
        inten: float,
        lobed: bool = False,
        ang: float | None = None,
    ) -> None:
        rng = self.rng
        R = diam / 2
        g = _local_grid(cy, cx, R * 1.4)
        if g is None:
            return
        sl, dy, dx, ss = g
        if ang is None:
            ang = rng.uniform(0, math.pi)
        if lobed:
            nl = rng.integers(2, 5)
            inside = np.zeros_like(dy)
            for j in range(nl):
                t = ang + 2 * math.pi * j / nl + rng.uniform(-0.4, 0.4)
                oy, ox = 0.45 * R * math.sin(t), 0.45 * R * math.cos(t)
                rho = _blob_field(
                    dy - oy, dx - ox, 0.55 * R, 0.45 * R, t, _rand_harm(rng, 0.08)
                )
                inside = np.maximum(inside, (rho < 1).astype(float))
        else:
            e = rng.uniform(0.8, 1.0)
            rho = _blob_field(dy, dx, R, R * e, ang, _rand_harm(rng, 0.10))
            inside = (rho < 1).astype(float)
            # slight dome
            inside = inside * (1.0 - 0.25 * np.clip(rho, 0, 1) ** 2)
        tex = 1 + 0.25 * _smooth_noise(dy.shape, rng, 1.5 * ss)
        img = _down(inside * np.clip(tex, 0.3, None), ss)
        m = img[img > 0.5 * img.max()].mean() if img.max() > 0 else 1
        self.add(_D, sl, img * inten / m)

    def ck_body(
        self,
        cy: float,
        cx: float,
        a: float,
        b: float,
        ang: float,
        harm: Sequence[tuple[int, float, float]],
        mean: float,
        nuc: tuple[float, float, float] | None = None,
        granular: bool = True,
    ) -> np.ndarray | None:
        """Granular cytokeratin on a perturbed ellipse; nuc=(dy, dx, R) dims the
        part over the nucleus."""
        rng = self.rng
        g = _local_grid(cy, cx, max(a, b) * 1.5)
        if g is None:
            return None
        sl, dy, dx, ss = g
        rho = _blob_field(dy, dx, a, b, ang, harm)
        inside = (rho < 1).astype(float)
        tex = np.ones_like(dy)
        if granular:
            tex = 1 + 0.35 * _smooth_noise(dy.shape, rng, 0.8 * ss)
            # sparse bright granules / filament knots
            ng = rng.integers(3, 12)
            for _ in range(ng):
                t = rng.uniform(0, 2 * math.pi)
                rr = rng.uniform(0.2, 0.95)
                gy, gx = rr * b * math.sin(t), rr * a * math.cos(t)
                amp = rng.uniform(0.5, 2.0)
                sigma = rng.uniform(0.6, 1.5)  # px
                tex += amp * np.exp(-((dy - gy) ** 2 + (dx - gx) ** 2) / (2 * sigma**2))
            # sometimes a brighter rim (cortical CK)
            if rng.random() < 0.5:
                tex += rng.uniform(0.2, 0.8) * np.exp(-(((rho - 0.85) / 0.12) ** 2))
        if nuc is not None:
            ny, nx, nR = nuc
            dn = np.hypot(dy - ny, dx - nx) / nR
            tex = tex * np.where(dn < 1, rng.uniform(0.35, 0.75), 1.0)
        img = _down(inside * np.clip(tex, 0.05, None), ss)
        msk = img > 0.5
        if not msk.any():
            return None
        img = img * mean / img[msk].mean()
        self.add(_P, sl, img)
        return img

    def ctc(
        self,
        cy: float,
        cx: float,
        diam: float,
        ck_mean: float,
        dapi: float,
        kind: str = "CTC",
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        rng = self.rng
        R = diam / 2
        e = rng.uniform(0.7, 1.0)
        ang = rng.uniform(0, math.pi)
        a, b = R / math.sqrt(e), R * math.sqrt(e)
        harm = _rand_harm(rng, 0.12)
        nd = diam * rng.uniform(0.5, 0.7)
        nR = nd / 2
        off = rng.uniform(0, 1) ** 2 * (R - nR) * 0.9  # mostly inside
        t = rng.uniform(0, 2 * math.pi)
        ny, nx = off * math.sin(t), off * math.cos(t)
        self.ck_body(cy, cx, a, b, ang, harm, ck_mean, nuc=(ny, nx, nR))
        self.draw_nucleus(cy + ny, cx + nx, nd, dapi)
        o = {
            "kind": kind,
            "row": cy,
            "col": cx,
            "diam_um": diam * PIXEL_UM,
            "ck_mean": ck_mean,
            "nuc_row": cy + ny,
            "nuc_col": cx + nx,
            "radius": R,
        }
        if extra:
            o.update(extra)
        self.objs.append(o)
        return o

    def wbc(
        self,
        cy: float,
        cx: float,
        diam: float,
        cd45: float,
        dapi: float,
        ck: float = 0.0,
        kind: str = "WBC",
    ) -> None:
        rng = self.rng
        R = diam / 2
        g = _local_grid(cy, cx, R * 1.3)
        if g is None:
            return
        sl, dy, dx, ss = g
        ang = rng.uniform(0, math.pi)
        e = rng.uniform(0.85, 1.0)
        rho = _blob_field(dy, dx, R, R * e, ang, _rand_harm(rng, 0.05))
        # membrane ring ~0.6 um thick, with patchy intensity
        ring = np.exp(-(((rho - 0.93) * R / 0.9) ** 2))
        patch = 1 + 0.3 * _smooth_noise(dy.shape, rng, 2 * ss)
        img = _down(ring * np.clip(patch, 0.2, None), ss)
        img = img * cd45 / max(img.max(), 1e-6)
        self.add(_A, sl, img)
        # faint cytoplasmic CD45
        self.add(_A, sl, _down((rho < 1) * 0.15 * cd45, ss))
        nd = rng.uniform(_um(5), min(_um(8), 0.85 * diam))
        lobed = rng.random() < 0.35
        self.draw_nucleus(
            cy + rng.normal(0, 0.5), cx + rng.normal(0, 0.5), nd, dapi, lobed=lobed
        )
        if ck > 0:
            self.ck_body(cy, cx, R * 0.95, R * 0.95 * e, ang, _rand_harm(rng, 0.05), ck)
        self.objs.append(
            {
                "kind": kind,
                "row": cy,
                "col": cx,
                "diam_um": diam * PIXEL_UM,
                "radius": R,
                "ck_mean": ck,
            }
        )

    def ck_fragment(
        self, cy: float, cx: float, diam: float, mean: float, kind: str = "CK_FRAGMENT"
    ) -> None:
        rng = self.rng
        R = diam / 2
        e = rng.uniform(0.4, 1.0)
        self.ck_body(
            cy,
            cx,
            R / math.sqrt(e),
            R * math.sqrt(e),
            rng.uniform(0, math.pi),
            _rand_harm(rng, 0.25),
            mean,
            granular=diam > 6,
        )
        self.objs.append(
            {
                "kind": kind,
                "row": cy,
                "col": cx,
                "diam_um": diam * PIXEL_UM,
                "radius": R,
                "ck_mean": mean,
            }
        )

    def small_ck_dapi(
        self, cy: float, cx: float, diam: float, ck: float, dapi: float
    ) -> None:
        rng = self.rng
        R = diam / 2
        self.ck_body(
            cy,
            cx,
            R,
            R * rng.uniform(0.7, 1),
            rng.uniform(0, math.pi),
            _rand_harm(rng, 0.1),
            ck,
            granular=False,
        )
        self.draw_nucleus(
            cy + rng.normal(0, 0.3),
            cx + rng.normal(0, 0.3),
            diam * rng.uniform(0.6, 0.9),
            dapi,
        )
        self.objs.append(
            {
                "kind": "SMALL_CK_DAPI",
                "row": cy,
                "col": cx,
                "diam_um": diam * PIXEL_UM,
                "radius": R,
                "ck_mean": ck,
            }
        )

    def debris(self, cy: float, cx: float, diam: float) -> None:
        rng = self.rng
        R = diam / 2
        g = _local_grid(cy, cx, R * 1.8)
        if g is None:
            return
        sl, dy, dx, ss = g
        rho = _blob_field(
            dy,
            dx,
            R,
            R * rng.uniform(0.4, 1),
            rng.uniform(0, math.pi),
            _rand_harm(rng, 0.45, kmax=7),
        )
        inside = (rho < 1).astype(float)
        tex = np.clip(1 + 0.6 * _smooth_noise(dy.shape, rng, 0.7 * ss), 0.1, None)
        base = _down(inside * tex, ss)
        lvl = rng.uniform(800, 3500)
        for ch in range(4):
            self.add(ch, sl, base * lvl * rng.uniform(0.4, 1.2))
        self.objs.append(
            {
                "kind": "DEBRIS",
                "row": cy,
                "col": cx,
                "diam_um": diam * PIXEL_UM,
                "radius": R,
            }
        )

    def free_nucleus(self, cy: float, cx: float, diam: float, dapi: float) -> None:
        self.draw_nucleus(cy, cx, diam, dapi)
        self.objs.append(
            {
                "kind": "FREE_NUCLEUS",
                "row": cy,
                "col": cx,
                "diam_um": diam * PIXEL_UM,
                "radius": diam / 2,
            }
        )

    def nucleus_beside_ck(
        self,
        cy: float,
        cx: float,
        ck_diam: float,
        ck_mean: float,
        nuc_diam: float,
        dapi: float,
        towards: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> tuple[float, float, float]:
        """CK blob centred at (cy, cx), a nucleus touching it, mostly outside;
        `towards`: the angle to put the nucleus at (None: random)."""
        rng = self.rng
        R = ck_diam / 2
        e = rng.uniform(0.7, 1.0)
        ang = rng.uniform(0, math.pi)
        self.ck_body(
            cy,
            cx,
            R / math.sqrt(e),
            R * math.sqrt(e),
            ang,
            _rand_harm(rng, 0.15),
            ck_mean,
        )
        t = rng.uniform(0, 2 * math.pi) if towards is None else towards
        nR = nuc_diam / 2
        d = R + nR * rng.uniform(0.35, 0.75)  # overlap 0.25..0.65 of nuc radius
        ny, nx = cy + d * math.sin(t), cx + d * math.cos(t)
        self.draw_nucleus(ny, nx, nuc_diam, dapi)
        o = {
            "kind": "NUCLEUS_BESIDE_CK",
            "row": cy,
            "col": cx,
            "nuc_row": ny,
            "nuc_col": nx,
            "diam_um": ck_diam * PIXEL_UM,
            "radius": R,
            "ck_mean": ck_mean,
        }
        if extra:
            o.update(extra)
        self.objs.append(o)
        return ny, nx, nR


# --------------------------------------------------------------------- fields


def render(condition: str, seed: int, index: int) -> tuple[np.ndarray, list[dict]]:
    """Field `index` of `seed` under `condition`: the (4, H, W) uint16 image
    (DAPI, FITC, PE, APC) and its true objects.

    Each true object has "kind" (one of `KINDS`), "row", "col" (px, the centre
    of its cytokeratin body or of the cell), "diam_um", "border_cut" (it reaches
    past the frame), most "ck_mean"; a CTC also "dim", "cluster" (-1: single),
    "cluster_size" and its nucleus "nuc_row"/"nuc_col"; a nucleus-beside-CK the
    nucleus position "nuc_row"/"nuc_col", "dim" and "beside_bright"; look-alikes
    placed by a CTC "touching_ctc".
    """
    img, objs, _ = render_with_meta(condition, seed, index)
    return img, objs


def render_with_meta(
    condition: str, seed: int, index: int
) -> tuple[np.ndarray, list[dict], dict[str, Any]]:
    """`render`, plus the field's camera, PSF, crosstalk and vignetting draws."""
    if condition not in CONDITIONS:
        raise ValueError(
            f"unknown condition {condition!r}; known: {', '.join(CONDITIONS)}"
        )
    rng = np.random.default_rng([seed, index, list(CONDITIONS).index(condition)])
    cfg = CONDITIONS[condition]
    fld = _Field(rng)
    # noise model (for setting dim levels)
    gain = rng.uniform(0.8, 2.0)  # DN per photo-electron
    read = rng.uniform(4, 6)
    bgl = rng.uniform(80, 200, size=4)
    noise_pe = math.sqrt(gain * bgl[_P] + read**2)

    def bright_ck() -> float:
        return float(np.exp(rng.uniform(np.log(150), np.log(1500))))  # 10x range

    def dim_ck() -> float:
        return float(rng.uniform(2, 6) * noise_pe)

    def dapi_lvl() -> float:
        return float(rng.uniform(400, 1600))

    def ctc_diam() -> float:
        return _um(rng.uniform(8, 16))

    bright_ctcs: list[dict[str, Any]] = []

    # --- CTC clusters
    n = cfg.ctc
    if cfg.clusters == "one":
        sizes = [int(rng.integers(2, 5))]
    else:
        sizes = []
        left = n // 2
        while left >= 2:
            s = int(min(left, rng.integers(2, 6)))
            if left - s == 1:
                s += 1
            sizes.append(s)
            left -= s
    nsingle = n - sum(sizes)
    for cid, s in enumerate(sizes):
        diams = [ctc_diam() for _ in range(s)]
        dims = [rng.random() < cfg.dim_cluster for _ in range(s)]
        if all(dims):
            dims[0] = False  # at least one bright member
        if s >= 2 and not any(dims) and rng.random() < 0.5:
            dims[-1] = True  # ensure mixing in many clusters
        span = sum(diams) / 2 + max(diams)
        pos = fld.rand_pos(span, edge=span * 0.5)
        if pos is None:
            continue
        cy, cx = pos
        placed: list[tuple[float, float, float]] = []  # (r, c, R)
        for k in range(s):
            R = diams[k] / 2
            if not placed:
                r, c = cy, cx
            else:
                ok = False
                for _ in range(200):
                    j = rng.integers(len(placed))
                    pr, pc, pR = placed[j]
                    d = (pR + R) * rng.uniform(0.6, 0.9)
                    t = rng.uniform(0, 2 * math.pi)
                    r, c = pr + d * math.sin(t), pc + d * math.cos(t)
                    apart = all(
                        (r - qr) ** 2 + (c - qc) ** 2 >= (0.6 * (R + qR)) ** 2
                        for qr, qc, qR in placed
                    )
                    if apart and 0 <= r < H and 0 <= c < W:
                        ok = True
                        break
                if not ok:
                    continue
            placed.append((r, c, R))
            ck = dim_ck() if dims[k] else bright_ck()
            o = fld.ctc(
                r,
                c,
                diams[k],
                ck,
                dapi_lvl(),
                extra={"dim": bool(dims[k]), "cluster": cid, "cluster_size": s},
            )
            if not dims[k]:
                bright_ctcs.append(o)
        for r, c, R in placed:
            fld.occupy(r, c, R * 1.1)
    for _ in range(nsingle):
        d = ctc_diam()
        pos = fld.rand_pos(d / 2 * 1.2, edge=0)
        if pos is None:
            continue
        dim = rng.random() < cfg.dim_single
        o = fld.ctc(
            pos[0],
            pos[1],
            d,
            dim_ck() if dim else bright_ck(),
            dapi_lvl(),
            extra={"dim": bool(dim), "cluster": -1, "cluster_size": 1},
        )
        fld.occupy(pos[0], pos[1], d / 2 * 1.1)
        if not dim:
            bright_ctcs.append(o)

    # --- look-alikes
    def touching_spot(
        rad: float, overlap: tuple[float, float] = (0.85, 1.0)
    ) -> tuple[float, float, float] | None:
        """A position touching a random bright CTC, and its angle (or None)."""
        if not bright_ctcs:
            return None
        for _ in range(60):
            o = bright_ctcs[rng.integers(len(bright_ctcs))]
            d = (o["radius"] + rad) * rng.uniform(*overlap)
            t = rng.uniform(0, 2 * math.pi)
            r, c = o["row"] + d * math.sin(t), o["col"] + d * math.cos(t)
            if 0 <= r < H and 0 <= c < W:
                # must not hit other cells (ignore the host CTC via small margin)
                host = [
                    i
                    for i, (rr, cc, _ra) in enumerate(fld.circles)
                    if (rr - o["row"]) ** 2 + (cc - o["col"]) ** 2 < 4
                ]
                if fld.free(r, c, rad, 1.0, ignore=host):
                    return r, c, t
        return None

    la = {k: v * cfg.lookalikes for k, v in BASE_LOOKALIKES.items()}

    def place(
        rad: float, touch_ok: bool = True, overlap: tuple[float, float] = (0.85, 1.0)
    ) -> tuple[float, float, bool] | None:
        if touch_ok and rng.random() < cfg.touch:
            s = touching_spot(rad, overlap)
            if s is not None:
                fld.occupy(s[0], s[1], rad)
                return s[0], s[1], True
        p = fld.rand_pos(rad * 1.1)
        if p is None:
            return None
        fld.occupy(p[0], p[1], rad)
        return p[0], p[1], False

    for _ in range(la["DOUBLE_POSITIVE"]):
        d = _um(rng.uniform(7, 11))
        p = place(d / 2, touch_ok=False)
        if p:
            fld.wbc(
                p[0],
                p[1],
                d,
                rng.uniform(250, 1500),
                dapi_lvl(),
                ck=bright_ck() * rng.uniform(0.3, 1),
                kind="DOUBLE_POSITIVE",
            )
    for _ in range(la["CK_FRAGMENT"]):
        d = _um(rng.uniform(1, 10))
        p = place(d / 2)
        if p:
            fld.ck_fragment(
                p[0], p[1], d, bright_ck() if rng.random() < 0.7 else dim_ck()
            )
            fld.objs[-1]["touching_ctc"] = p[2]
    for _ in range(la["SMALL_CK_DAPI"]):
        d = _um(rng.uniform(2, 4))
        p = place(d / 2)
        if p:
            fld.small_ck_dapi(
                p[0], p[1], d, rng.uniform(600, 2500), rng.uniform(800, 2500)
            )
            fld.objs[-1]["touching_ctc"] = p[2]
    for _ in range(la["NUCLEUS_BESIDE_CK"]):
        ckd = _um(rng.uniform(5, 12))
        nd = _um(rng.uniform(5, 9))
        dim = rng.random() < 0.5
        ckm = dim_ck() if dim else bright_ck()
        rad = ckd / 2 + nd
        beside = rng.random() < cfg.touch
        done = False
        if beside:
            s = touching_spot(ckd / 2, overlap=(0.8, 1.0))
            if s is not None:
                # put the nucleus on the far side of the blob, or tangentially
                t = (
                    s[2]
                    + rng.choice([0.0, math.pi / 2, -math.pi / 2])
                    + rng.normal(0, 0.3)
                )
                ny, nx, nR = fld.nucleus_beside_ck(
                    s[0],
                    s[1],
                    ckd,
                    ckm,
                    nd,
                    dapi_lvl(),
                    towards=t,
                    extra={"dim": bool(dim), "beside_bright": True},
                )
                fld.occupy(s[0], s[1], ckd / 2)
                fld.occupy(ny, nx, nR)
                done = True
        if not done:
            p = fld.rand_pos(rad * 1.1)
            if p:
                fld.nucleus_beside_ck(
                    p[0],
                    p[1],
                    ckd,
                    ckm,
                    nd,
                    dapi_lvl(),
                    extra={"dim": bool(dim), "beside_bright": False},
                )
                fld.occupy(p[0], p[1], rad)
    for _ in range(la["FREE_NUCLEUS"]):
        d = _um(rng.uniform(5, 9))
        spot = touching_spot(d / 2, overlap=(0.8, 1.0))  # always by a bright CTC
        at = fld.rand_pos(d / 2 * 1.1) if spot is None else spot[:2]
        if at is not None:
            fld.occupy(at[0], at[1], d / 2)
            fld.free_nucleus(at[0], at[1], d, dapi_lvl())
    for _ in range(la["DEBRIS"]):
        d = _um(rng.uniform(2, 15))
        p = place(d / 2, touch_ok=rng.random() < 0.3)
        if p:
            fld.debris(p[0], p[1], d)

    # --- leukocytes
    for _ in range(cfg.wbc):
        d = _um(rng.uniform(7, 11))
        at = fld.rand_pos(d / 2, margin=0.95)
        if at is None:
            continue
        fld.occupy(at[0], at[1], d / 2)
        cd45 = float(np.exp(rng.uniform(np.log(250), np.log(2000))))
        fld.wbc(at[0], at[1], d, cd45, dapi_lvl())

    # --- FITC speckles
    for _ in range(int(rng.integers(5, 30))):
        r, c = rng.uniform(0, H), rng.uniform(0, W)
        g = _local_grid(r, c, 3)
        if g:
            sl, dy, dx, ss = g
            spot = np.exp(-(dy**2 + dx**2) / 2) * rng.uniform(100, 800)
            fld.add(_F, sl, _down(spot, ss))

    out, optics = _image(fld.em, rng, gain, read, bgl)

    # border flag for truth
    for o in fld.objs:
        R = o.get("radius", 5)
        o["border_cut"] = bool(
            o["row"] - R < 0 or o["col"] - R < 0 or o["row"] + R > H or o["col"] + R > W
        )
        o.pop("radius", None)
    meta = {
        "condition": condition,
        "seed": seed,
        "index": index,
        "gain": gain,
        "read": read,
        "bg": [float(b) for b in bgl],
        "noise_pe": noise_pe,
        **optics,
    }
    return out, fld.objs, meta


def _image(
    em: np.ndarray,
    rng: np.random.Generator,
    gain: float,
    read: float,
    bgl: np.ndarray,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Blur, crosstalk, vignetting, background and camera: the uint16 frame."""
    psf, psf_desc = make_psf(rng)
    sig = np.empty_like(em)
    for ch in range(4):
        sig[ch] = fftconvolve(em[ch], psf, mode="same")
    np.clip(sig, 0, None, out=sig)
    # crosstalk
    xt = {
        "PE_APC": rng.uniform(0.02, 0.08),
        "DAPI_FITC": rng.uniform(0.01, 0.03),
        "PE_FITC": rng.uniform(0.01, 0.05),
    }
    sig[_A] += xt["PE_APC"] * sig[_P]
    sig[_F] += xt["DAPI_FITC"] * sig[_D] + xt["PE_FITC"] * sig[_P]
    # vignetting (multiplicative on signal + background), gradient in background
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    cy0, cx0 = H / 2 + rng.uniform(-100, 100), W / 2 + rng.uniform(-100, 100)
    rr2 = ((yy - cy0) ** 2 + (xx - cx0) ** 2) / (0.5 * H) ** 2
    vig_k = rng.uniform(0.05, 0.25)
    vig = 1.0 / (1.0 + vig_k * rr2) ** 2
    out = np.empty((4, H, W), np.uint16)
    ry, rx = yy / H - 0.5, xx / W - 0.5
    for ch in range(4):
        gy, gx = rng.uniform(-0.3, 0.3, size=2)
        grad = 1 + gy * ry + gx * rx + rng.uniform(-0.1, 0.1) * (rx * ry)
        bg = bgl[ch] * grad
        e = np.clip((sig[ch] + bg) * vig, 0, None)
        electrons = rng.poisson(e / gain).astype(np.float32) * gain
        img = 100 + electrons + rng.normal(0, read, size=(H, W)).astype(np.float32)
        out[ch] = np.clip(np.rint(img), 0, 4095).astype(np.uint16)
    optics = {"psf": psf_desc, "crosstalk": xt, "vig_k": vig_k}
    return out, optics

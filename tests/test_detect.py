"""The detector on drawn cells: one test per rule of the CTC definition.

Cells are drawn here, independently of the simulator: soft discs and rings on a
noisy background, blurred like a 10x objective.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.feature import peak_local_max

import analysis.detect as detect_mod
import analysis.psf as psf_mod
from analysis.detect import (
    DEFAULT_ROLES,
    _centre_beyond_edge,
    _dna_peaks,
    _fill_holes,
    _grow,
    _label,
    _shrink,
    detect_field,
    resolve_roles,
)
from analysis.review import review_flag
from analysis.settings import DetectionSettings

PX = 0.64  # um per pixel
NAMES = ["DAPI", "FITC", "PE", "APC"]
D, F, P, A = range(4)


class Canvas:
    """Noise-free stain planes that become a noisy 4-channel field."""

    def __init__(self, size: int = 256, seed: int = 0) -> None:
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.planes = np.zeros((4, size, size), np.float64)
        yy, xx = np.mgrid[0:size, 0:size]
        self.yy, self.xx = yy, xx

    def _disc(
        self, r: float, c: float, diam_um: float, ratio: float = 1.0
    ) -> np.ndarray:
        rad = diam_um / 2 / PX
        d = np.hypot((self.yy - r) / ratio, self.xx - c)
        return np.clip(rad - d + 0.5, 0, 1)

    def _ring(self, r: float, c: float, diam_um: float) -> np.ndarray:
        rad = diam_um / 2 / PX
        d = np.hypot(self.yy - r, self.xx - c)
        return np.clip(1 - np.abs(d - (rad - 1)) / 1.5, 0, 1)

    def cell(
        self,
        r: float,
        c: float,
        *,
        diam_um: float = 12.0,
        ck: float = 800,
        dapi: float = 1500,
        nucleus_um: float | None = None,
        nucleus_at: tuple[float, float] = (0, 0),
        cd45: float = 0,
        fitc: float = 0,
        ratio: float = 1.0,
        texture: bool = True,
    ) -> None:
        """A cell: CK body (textured), DAPI nucleus, CD45 / marker membrane."""
        body = self._disc(r, c, diam_um, ratio)
        if ck and not texture:
            self.planes[P] += ck * body
        elif ck:
            texture = (
                1
                + 0.3
                * ndimage.gaussian_filter(self.rng.standard_normal(body.shape), 1.5)
                * 4
            )
            self.planes[P] += ck * body * np.clip(texture, 0.3, 2)
        if dapi:
            nuc = nucleus_um if nucleus_um is not None else diam_um * 0.6
            self.planes[D] += dapi * self._disc(
                r + nucleus_at[0] / PX, c + nucleus_at[1] / PX, nuc
            )
        if cd45:
            self.planes[A] += cd45 * self._ring(r, c, diam_um)
        if fitc:
            self.planes[F] += fitc * self._ring(r, c, diam_um)

    def leukocyte(self, r: float, c: float, *, cd45: float = 400) -> None:
        self.cell(r, c, diam_um=9.4, ck=0, dapi=1400, nucleus_um=6.5, cd45=cd45)

    def blob(self, r: float, c: float, diam_um: float, levels: tuple) -> None:
        """Debris: the same blob in every channel at the given levels."""
        shape = self._disc(r, c, diam_um, 0.7)
        for ch, level in enumerate(levels):
            self.planes[ch] += level * shape

    def field(
        self,
        *,
        background: float = 80,
        offset: float = 100,
        vignetting: float = 0.0,
        dtype: type = np.uint16,
        top: float = 4095,
        blur: float = 1.0,
    ) -> np.ndarray:
        blurred = ndimage.gaussian_filter(self.planes, (0, blur, blur))
        r2 = ((self.yy - self.size / 2) ** 2 + (self.xx - self.size / 2) ** 2) / (
            self.size / 2
        ) ** 2
        vig = 1 - vignetting * r2
        signal = (blurred + background) * vig
        noisy = signal + np.sqrt(signal / 2 + 9) * self.rng.standard_normal(
            signal.shape
        )
        out = np.clip(noisy + offset, 0, top)
        return out.astype(dtype)


def _detect(field: np.ndarray, **kw) -> list[dict]:
    kw.setdefault("saturation", 4095)
    return detect_field(field, NAMES, pixel_size_um=PX, **kw).objects


def _at(objects: list[dict], r: float, c: float, tol: float = 8) -> dict:
    best = min(objects, key=lambda o: np.hypot(o["row"] - r, o["col"] - c))
    assert np.hypot(best["row"] - r, best["col"] - c) <= tol, best
    return best


def _ctcs(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["label"] == "CTC"]


# ---------------------------------------------------------------- the definition


def test_a_textbook_ctc_is_called() -> None:
    cv = Canvas()
    cv.cell(128, 128)
    objs = _detect(cv.field())
    ctc = _at(objs, 128, 128)
    assert ctc["label"] == "CTC", ctc["reason"]
    assert ctc["nucleus_inside"] > 0.9 and ctc["cd45_snr"] < 3
    assert ctc["diameter_um"] == pytest.approx(12, abs=2)
    assert 0 < ctc["score"] <= 1
    assert len(_ctcs(objs)) == 1


def test_a_dim_ctc_is_still_called() -> None:
    cv = Canvas()
    cv.cell(128, 128, ck=120)  # ~10 x the noise
    ctc = _at(_detect(cv.field()), 128, 128)
    assert ctc["label"] == "CTC", ctc["reason"]


@pytest.mark.parametrize(("fitc", "positive"), [(0, False), (900, True)])
def test_marker_channel_is_reported(fitc: float, positive: bool) -> None:
    cv = Canvas()
    cv.cell(128, 128, fitc=fitc)
    ctc = _at(_detect(cv.field()), 128, 128)
    assert ctc["label"] == "CTC"
    assert ctc["marker_positive"] is positive


def test_ck_fragment_without_nucleus() -> None:
    cv = Canvas()
    cv.cell(128, 128, diam_um=8, dapi=0)
    obj = _at(_detect(cv.field()), 128, 128)
    assert obj["label"] == "CK_FRAGMENT" and obj["reason"] == "no nucleus"


@pytest.mark.parametrize(
    ("diam", "label"),
    [(3.0, "CK_FRAGMENT"), (3.6, "CK_FRAGMENT"), (5.0, "CTC"), (6.0, "CTC")],
)
def test_larger_than_4_um(diam: float, label: str) -> None:
    cv = Canvas()
    cv.cell(128, 128, diam_um=diam, ck=1500, nucleus_um=diam * 0.7)
    obj = _at(_detect(cv.field()), 128, 128)
    assert obj["label"] == label, (obj["diameter_um"], obj["reason"])


@pytest.mark.parametrize(
    ("offset_um", "label"), [(1.0, "CTC"), (7.5, "OTHER"), (10.0, "OTHER")]
)
def test_nucleus_must_lie_mostly_inside_the_ck_area(
    offset_um: float, label: str
) -> None:
    # 12 um cell, 7 um nucleus: at 7.5 um from the centre most of it is outside
    cv = Canvas()
    cv.cell(128, 128, nucleus_um=7, nucleus_at=(0, offset_um))
    obj = _at(_detect(cv.field()), 128, 128)
    assert obj["label"] == label, (obj["nucleus_inside"], obj["reason"])


@pytest.mark.parametrize(
    ("seed", "beside"), [(0, 140), (1, 140), (2, 140), (3, 140), (0, 144)]
)
def test_a_speck_of_a_nucleus_edge_inside_cytokeratin_is_no_nucleus(
    seed: int, beside: int
) -> None:
    # a leukocyte's nucleus just touching a CK body (or just short of it):
    # where its blurred edge crosses the DNA threshold, noise cuts off a pixel
    # above it inside the body (drawn here: a dip below the threshold, then a
    # pixel above it). That speck lies on the nucleus' slope and is no nucleus
    # of its own, inside the body or touching it
    cv = Canvas(seed=seed)
    cv.cell(128, 128, diam_um=9, ck=400, dapi=0)
    cv.cell(128, beside, diam_um=9.4, ck=0, dapi=1400, nucleus_um=7, cd45=300)
    field = cv.field()
    found = detect_field(field, NAMES, pixel_size_um=PX, saturation=4095)
    assert _at(found.objects, 128, 128)["label"] != "CTC"
    noise = found.noise["DAPI"]
    threshold = found.background["DAPI"] + 6 * noise
    row = field[D, 128].astype(float)
    edge = next(x for x in range(128, 150) if row[x] > threshold)
    assert row[edge] > threshold + 10  # room for a speck dimmer than the edge
    field[D, 128, edge - 1] = round(threshold - 3 * noise)
    field[D, 128, edge - 2] = round((threshold + row[edge]) / 2)
    obj = _at(_detect(field), 128, 128)
    assert obj["label"] != "CTC", obj
    assert obj["nucleus_inside"] < 0.5, obj


@pytest.mark.parametrize(
    ("seed", "beside", "debris_col"),
    [(2, 152, 120), (3, 152, 120), (5, 152, 120), (2, 154, 122), (5, 154, 122)],
)
def test_a_speck_of_a_nucleus_edge_is_no_nucleus_in_a_region_peeled_from_debris(
    seed: int, beside: int, debris_col: int
) -> None:
    # the speck of the test above, in a CK body pressed against debris: the
    # region is peeled from the debris and its nuclei labelled again there,
    # where the speck is judged on those labels
    cv = Canvas(seed=seed)
    cv.blob(128, debris_col, 12, (3000, 2000, 2500, 2000))
    cv.cell(128, 140, diam_um=9, ck=400, dapi=0)
    cv.cell(128, beside, diam_um=9.4, ck=0, dapi=1400, nucleus_um=7, cd45=300)
    field = cv.field()
    found = detect_field(field, NAMES, pixel_size_um=PX, saturation=4095)
    noise = found.noise["DAPI"]
    threshold = found.background["DAPI"] + 6 * noise
    row = field[D, 128].astype(float)
    edge = next(x for x in range(140, 170) if row[x] > threshold)
    assert 140 < edge - 2 < 146  # the speck lies inside the body
    field[D, 128, edge - 1] = round(threshold - 3 * noise)
    field[D, 128, edge - 2] = round((threshold + row[edge]) / 2)
    objs = _detect(field)
    assert any(o["label"] == "DEBRIS" for o in objs)
    near = [o for o in _ctcs(objs) if np.hypot(o["row"] - 128, o["col"] - 140) < 15]
    assert not near, near


@pytest.mark.parametrize(("diam_um", "nucleus_frac"), [(2.2, 0.7), (3.0, 0.6)])
def test_a_small_ck_dapi_object_touching_a_cell_is_no_cluster_member(
    diam_um: float, nucleus_frac: float
) -> None:
    # a bright CK+DAPI object under 4 um pressed against a CTC becomes a part
    # of the region split among its nuclei, whose size (cut by the cell's
    # border) is no measure of it; its own nucleus, under 2.5 um, is
    cv = Canvas(seed=2)
    cv.cell(128, 128, diam_um=12, ck=600, dapi=1500, nucleus_um=7)
    c2 = 128 + (6 + diam_um / 2 - 0.4) / PX
    cv.cell(
        128,
        c2,
        diam_um=diam_um,
        ck=2500,
        dapi=2500,
        nucleus_um=diam_um * nucleus_frac,
        texture=False,
    )
    field = cv.field(blur=0.5)
    objs = _detect(field)
    assert [o["col"] for o in _ctcs(objs)] == [pytest.approx(128, abs=3)]
    spot = _at(objs, 128, c2)
    assert spot["label"] == "CK_FRAGMENT" and "nucleus under 2.5 um" in spot["reason"]
    off = _detect(field, settings=DetectionSettings(min_cluster_nucleus_um=0))
    assert len(_ctcs(off)) == 2  # the part alone would pass every other rule


@pytest.mark.parametrize("blur", [0.5, 1.0, 1.5, 2.0, 2.5])
def test_a_cluster_of_small_cells_keeps_every_member(blur: float) -> None:
    # three touching 6 um cells with 3 um nuclei (the smallest of the
    # simulator's): each nucleus is a cell's, at any blur (a limit of 3.5 um
    # loses them all in a sharp field)
    cv = Canvas(seed=1)
    for k in range(3):
        cv.cell(128, 110 + k * 6 * 0.95 / PX, diam_um=6, ck=600, nucleus_um=3)
    ctcs = _ctcs(_detect(cv.field(blur=blur)))
    assert len(ctcs) == 3 and {o["cluster_size"] for o in ctcs} == {3}


@pytest.mark.parametrize(
    ("diam_um", "levels", "glow", "width_px", "seed", "blur"),
    [
        (8, (3000, 2000, 2500, 2000), 0.03, 20, 1, 0.5),
        (8, (3000, 2000, 2500, 2000), 0.03, 20, 1, 1.0),
        (14, (3000, 2500, 3000, 2500), 0.04, 14, 0, 2.5),
    ],
)
def test_a_glow_speckled_with_dna_is_no_cluster(
    diam_um: float, levels: tuple, glow: float, width_px: float, seed: int, blur: float
) -> None:
    # the glow of small debris passes the DNA threshold in a ring of specks on
    # its slope: none is a cell's nucleus, but each counts against the number
    # of nuclei a cluster can hold, and a region holding more is no cluster
    cv = Canvas(seed=seed)
    cv.blob(128, 128, diam_um, levels)
    wing = (1 + (np.hypot(cv.yy - 128, cv.xx - 128) / width_px) ** 2) ** -1.5
    for ch, level in enumerate(levels):
        cv.planes[ch] += glow * level * wing
    objs = _detect(cv.field(blur=blur))
    assert not _ctcs(objs), _ctcs(objs)


@pytest.mark.parametrize("seed", [2, 3, 4, 5])
def test_a_tiny_dim_nucleus_of_its_own_is_a_nucleus(seed: int) -> None:
    # a nucleus whose DNA rises above the threshold at only a pixel or two is
    # still a peak of its own, not a speck of the leukocyte beside the cell
    cv = Canvas(seed=seed)
    cv.cell(128, 128, diam_um=10, ck=600, dapi=30, nucleus_um=5)
    cv.leukocyte(128, 143)
    field = cv.field()
    found = detect_field(field, NAMES, pixel_size_um=PX, saturation=4095)
    threshold = found.background["DAPI"] + 6 * found.noise["DAPI"]
    assert 1 <= np.count_nonzero(field[D, 121:136, 121:135] > threshold) < 4
    assert _at(found.objects, 128, 128)["label"] == "CTC"


def test_double_positive_is_not_a_ctc() -> None:
    cv = Canvas()
    cv.cell(128, 128, diam_um=10, cd45=500)
    obj = _at(_detect(cv.field()), 128, 128)
    assert obj["label"] == "DOUBLE_POSITIVE", obj["reason"]
    assert obj["cd45_snr"] >= DetectionSettings().max_cd45_snr


def test_leukocytes_and_free_nuclei() -> None:
    cv = Canvas()
    cv.leukocyte(60, 60)
    cv.cell(180, 180, diam_um=8, ck=0, dapi=1400, nucleus_um=7)  # free nucleus
    objs = _detect(cv.field())
    assert _at(objs, 60, 60)["label"] == "WBC"
    assert _at(objs, 180, 180)["label"] == "OTHER"
    assert not _ctcs(objs)


def test_not_round_to_oval() -> None:
    cv = Canvas()
    cv.cell(128, 128, diam_um=22, ratio=0.25, nucleus_um=4)
    obj = _at(_detect(cv.field()), 128, 128, tol=15)
    assert obj["label"] == "OTHER" and obj["reason"] == "not round to oval"


# ---------------------------------------------------------------- size and blur

BLURS = (0.5, 1.0, 1.5, 2.0, 2.5)  # Gaussian sigma, px


def _disk_field(
    diameters: list[float], blur: float, *, ck: float, dapi: float, seed: int
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """CK+DAPI+ disks (no texture) in a row of cells, and leukocytes whose nuclei
    tell the detector the field's blur."""
    cv = Canvas(size=448, seed=seed)
    # at sub-pixel positions, as in an image (a disc drawn on the pixel grid's
    # centre samples its soft edge at a few distances only)
    jitter = np.random.default_rng(seed).uniform(-0.5, 0.5, (len(diameters) + 8, 2))
    at = []
    for k, d in enumerate(diameters):
        r, c = 90 + 90 * (k // 4) + jitter[k, 0], 70 + 100 * (k % 4) + jitter[k, 1]
        cv.cell(r, c, diam_um=d, ck=ck, dapi=dapi, nucleus_um=0.6 * d, texture=False)
        at.append((r, c))
    for k in range(8):
        dr, dc = jitter[len(diameters) + k]
        cv.leukocyte(400 + dr, 40 + 52 * k + dc)
    return cv.field(blur=blur), at


@pytest.mark.parametrize("blur", BLURS)
def test_size_of_the_object_not_of_the_blur(blur: float) -> None:
    diameters = [2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0]
    field, at = _disk_field(diameters, blur, ck=2000, dapi=2000, seed=11)
    det = detect_field(field, NAMES, pixel_size_um=PX, saturation=4095)
    # the field's blur, from its nuclei: the drawn blur and the 1 px soft edge
    # of the drawn discs (a box of variance 1/12)
    assert det.blur_nuclei >= 5
    assert det.blur_px == pytest.approx(np.hypot(blur, 12**-0.5), abs=0.2)
    for d, (r, c) in zip(diameters, at, strict=True):
        obj = _at(det.objects, r, c)
        assert obj["diameter_um"] == pytest.approx(d, abs=0.5), (d, obj)


def test_the_blur_of_each_nucleus_is_fitted_as_it_would_be_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the field's nuclei are fitted together (one set of array operations);
    # each one's blur must not depend on the others beside it, nor on their
    # profiles' lengths (nuclei 5-10 um across, so profiles of several lengths)
    seen: list[tuple] = []
    batched = psf_mod._fit_blurs

    def spy(fits):  # type: ignore[no-untyped-def]
        seen.extend(fits)
        return batched(fits)

    monkeypatch.setattr(psf_mod, "_fit_blurs", spy)
    field, _ = _disk_field(
        [7.0, 8.0, 10.0, 12.0, 14.0, 16.0], 1.5, ck=0, dapi=2000, seed=3
    )
    det = detect_field(field, NAMES, pixel_size_um=PX, saturation=4095)
    assert det.blur_nuclei >= 6
    assert len({f[0].size for f in seen}) >= 3
    together = batched(seen)
    alone = [batched([f])[0] for f in seen]
    backwards = batched(seen[::-1])[::-1]
    assert together == alone == backwards
    for s in together:
        assert s == pytest.approx(np.hypot(1.5, 12**-0.5), abs=0.25)


def test_a_profiles_top_line_is_the_weighted_least_squares_line() -> None:
    # the peak of a centre-peaked profile is the intercept of this line
    rng = np.random.default_rng(5)
    for _ in range(500):
        k = int(rng.integers(3, 12))
        x = np.sort(rng.uniform(0, 30, k))
        y = rng.normal(1000, 100, k) - x * rng.uniform(0, 40)
        w = rng.integers(1, 40, k).astype(np.float64)
        slope, icpt = psf_mod._line(x, y, w)
        want = np.polyfit(x, y, 1, w=np.sqrt(w))
        assert slope == pytest.approx(want[0], rel=1e-9, abs=1e-9)
        assert icpt == pytest.approx(want[1], rel=1e-11)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_nuclei_profiles_taken_together_are_each_ones_own(seed: int) -> None:
    # `field_blur` gathers its nuclei's crops into one set of arrays; each
    # profile must be the one `radial_profile` gives that nucleus alone, to
    # the last bit: crops cut by the frame's edge, labels touching, nuclei
    # without positive signal, one label in several pieces
    rng = np.random.default_rng(seed)
    h, w = 90, 120
    signal = rng.normal(0, 30, (h, w)).astype(np.float32)
    labels = np.zeros((h, w), np.int32)
    rr, cc = np.mgrid[:h, :w]
    centres = [(3, 4), (45, 60), (50, 68), (86, 117), (20, 100), (70, 20), (30, 30)]
    for k, (r, c) in enumerate(centres, start=1):
        rad = rng.uniform(2.5, 7)
        disk = (rr - r) ** 2 + (cc - c) ** 2 <= rad * rad
        labels[disk & (labels == 0)] = k
        signal[disk] += rng.uniform(200, 2000) * np.exp(
            -((rr[disk] - r) ** 2 + (cc[disk] - c) ** 2) / (2 * rad * rad)
        )
    signal[labels == 7] = -5.0  # no positive signal: no profile
    labels[10:12, 100:103] = 5  # label 5 in two pieces
    ids = list(range(1, len(centres) + 1))
    boxes = psf_mod._boxes(labels, ids)
    together = psf_mod._profiles_of(signal, labels, ids, boxes)
    for lab, (r0, r1, c0, c1), got in zip(ids, boxes, together, strict=True):
        pad = max(6, (r1 - r0) // 2)
        crop = (
            slice(max(r0 - pad, 0), min(r1 + pad, h)),
            slice(max(c0 - pad, 0), min(c1 + pad, w)),
        )
        own = labels[crop] == lab
        alone = psf_mod.radial_profile(
            signal[crop], own, allowed=own | (labels[crop] == 0)
        )
        for a, b in zip(got, alone, strict=True):
            assert a.dtype == b.dtype
            assert np.array_equal(a, b)
    assert together[6][0].size == 0  # the nucleus without signal
    assert all(p[0].size > 3 for p in together[:6])


def test_a_cell_is_larger_than_4_um_only_within_the_blurs_uncertainty() -> None:
    # whole cells just above 4 um: in a sharp field their size is sure; at 2.5 px
    # of blur a 10 % error of the blur moves their deconvolved size below 4 um,
    # so they are no CTC but shown to the reader as narrowly failing the size
    st = DetectionSettings()
    near = [4.2, 4.4, 4.6, 4.8]
    diameters = [*near, 5.5, 6.0, 7.0, 8.0]
    calls = {}
    for blur in BLURS:
        field, at = _disk_field(diameters, blur, ck=2000, dapi=2000, seed=11)
        for loose in (False, True):
            kw = {"settings": DetectionSettings(blur_uncertainty=0)} if loose else {}
            objs = _detect(field, **kw)
            for d, (r, c) in zip(diameters, at, strict=True):
                calls[blur, loose, d] = _at(objs, r, c)
    for (blur, loose, d), obj in calls.items():
        low, diam = obj["diameter_low_um"], obj["diameter_um"]
        # measured for whole objects up to twice the limit only
        assert np.isnan(low) if loose or diam > 8.0 else low <= diam, obj
        if d >= 5.5:  # never near the limit: a CTC at every blur
            assert obj["label"] == "CTC", (blur, d, obj["reason"])
    for d in near:
        assert calls[0.5, False, d]["label"] == "CTC"
        sure, unsure = calls[2.5, True, d], calls[2.5, False, d]
        assert sure["label"] == "CTC" and sure["diameter_um"] > 4.0
        assert unsure["diameter_um"] == sure["diameter_um"]
        assert unsure["diameter_low_um"] <= st.min_ctc_diameter_um
        assert unsure["label"] == "CK_FRAGMENT"
        assert "uncertainty" in unsure["reason"]
        assert review_flag(unsure, st) == "size"


@pytest.mark.parametrize("blur", [0.5, 1.0, 1.5])
def test_a_cell_dimmer_over_its_nucleus_is_sized_by_its_outer_edge(
    blur: float,
) -> None:
    # an 8.5 um cell whose cytokeratin is a third as bright over its nucleus,
    # with a fleck at the middle 1.6 x as bright as the rest: its profile
    # falls below half inside the cell and rises again; the first fall is no
    # edge (it was measured 2-2.9 um across, a CK fragment, at blurs 0.5-1)
    for seed in range(3):
        cv = Canvas(size=96, seed=seed)
        nuc = cv._disc(48, 48, 5.5)
        cv.planes[P] += 500 * cv._disc(48, 48, 8.5) * (1 - 0.7 * nuc)
        cv.planes[P] += 650 * cv._disc(48, 48, 1.9)
        cv.planes[D] += 1500 * nuc
        obj = _at(_detect(cv.field(blur=blur)), 48, 48)
        assert obj["diameter_um"] == pytest.approx(8.5, abs=0.7), obj
        assert obj["label"] == "CTC", obj["reason"]


@pytest.mark.parametrize("blur", BLURS)
def test_small_ck_dapi_objects_are_never_ctc_at_any_blur(blur: float) -> None:
    diameters = [2.0, 2.5, 3.0, 3.5, 2.0, 2.5, 3.0, 3.5]
    field, at = _disk_field(diameters, blur, ck=3500, dapi=3500, seed=12)
    det = detect_field(field, NAMES, pixel_size_um=PX, saturation=4095)
    for d, (r, c) in zip(diameters, at, strict=True):
        obj = _at(det.objects, r, c)
        assert obj["label"] == "CK_FRAGMENT", (d, obj["diameter_um"], obj["reason"])
        assert "4 um" in obj["reason"]
        if blur == 2.5 and d >= 3.0:  # the blur alone makes them look > 4 um
            assert obj["diameter_halfmax_um"] > 4.0
    assert not _ctcs(det.objects)


# ---------------------------------------------------------------- dense fields


@pytest.mark.parametrize("seed", [5, 6])
def test_dim_ctcs_among_dense_leukocytes_are_found_once(seed: int) -> None:
    # 50 leukocytes on 384 x 384 px is ~ 450 on a full 1384 x 1036 field; the
    # CTCs' cytokeratin is 3-5 x the pixel noise (~7 DN), granular as usual
    cv = Canvas(size=384, seed=seed)
    rng = np.random.default_rng(seed)
    ctcs = [(80, 90), (90, 290), (200, 190), (300, 80), (290, 300)]
    for (r, c), ck in zip(ctcs, rng.uniform(25, 35, len(ctcs)), strict=True):
        cv.cell(r, c, diam_um=rng.uniform(9, 14), ck=ck, dapi=1500)
    placed: list[tuple[float, float]] = []
    while len(placed) < 50:
        r, c = rng.uniform(12, 372, 2)
        near_ctc = min(np.hypot(r - a, c - b) for a, b in ctcs)
        near_wbc = min((np.hypot(r - a, c - b) for a, b in placed), default=99)
        if near_ctc > 19 and near_wbc > 13:  # may touch, never overlap
            cv.leukocyte(r, c, cd45=rng.uniform(200, 600))
            placed.append((r, c))
    objs = _detect(cv.field(vignetting=0.3))
    called = _ctcs(objs)
    for r, c in ctcs:
        mine = [o for o in called if np.hypot(o["row"] - r, o["col"] - c) < 14]
        assert len(mine) == 1, (r, c, [_at(objs, r, c)])
    assert len(called) == len(ctcs)


def test_ck_fragment_over_a_leukocyte_is_not_a_ctc() -> None:
    # a cytokeratin vesicle lying on a leukocyte: nucleus inside CK, but the
    # leukocyte's CD45 membrane surrounds that nucleus
    cv = Canvas()
    cv.leukocyte(128, 128, cd45=400)
    cv.cell(128, 130, diam_um=11, ck=1500, dapi=0)
    obj = _at(_detect(cv.field()), 128, 128)
    assert obj["label"] == "DOUBLE_POSITIVE", obj


@pytest.mark.parametrize(
    ("cd45", "frag_um", "blur"),
    [(150, 7.5, 1.0), (250, 6.5, 1.0), (250, 6.5, 2.0), (250, 7.5, 2.0)],
)
def test_a_small_ck_fragment_on_a_leukocyte_is_not_a_ctc(
    cd45: float, frag_um: float, blur: float
) -> None:
    # a fragment smaller than the leukocyte it lies on: the leukocyte's membrane
    # rings its nucleus outside the fragment, where the CD45 inside the CK area
    # (`cd45_nucleus_snr`) and the membrane band across the fragment's edge do
    # not look; the ring around the nucleus, on every side, does
    cv = Canvas(seed=3)
    cv.leukocyte(128, 128, cd45=cd45)
    cv.cell(128, 129, diam_um=frag_um, ck=1200, dapi=0)
    obj = _at(_detect(cv.field(blur=blur)), 128, 128)
    assert obj["diameter_um"] > DetectionSettings().min_ctc_diameter_um
    assert obj["cd45_encircled"] >= DetectionSettings().min_cd45_encircled
    assert obj["label"] == "DOUBLE_POSITIVE", obj


@pytest.mark.parametrize(("bleed", "blur"), [(0.03, 1.5), (0.03, 2.5), (0.04, 2.5)])
def test_a_bright_ctcs_own_bleed_through_around_its_nucleus_is_no_leukocyte(
    bleed: float, blur: float
) -> None:
    # the field's bleed-through into CD45 given wrongly as none: the cell's
    # cytokeratin lights CD45 all around its nucleus at a few percent of itself
    cv = Canvas(seed=5)
    cv.cell(128, 128, diam_um=12, ck=3000, nucleus_um=7, texture=False)
    cv.planes[A] += bleed * cv.planes[P]
    field = cv.field(blur=blur)
    st = DetectionSettings(spillover={"PE->APC": 0.0, "DAPI->APC": 0.0})
    obj = _at(_detect(field, settings=st), 128, 128)
    assert obj["cd45_encircled"] < st.min_cd45_encircled
    assert obj["cd45_membrane_cover"] < st.min_cd45_membrane_cover
    assert obj["label"] == "CTC", obj
    # what the ratio to the cytokeratin there guards against
    loose = st.model_copy(update={"min_cd45_encircled_ratio": 0.0})
    obj = _at(_detect(field, settings=loose), 128, 128)
    assert obj["cd45_encircled"] >= st.min_cd45_encircled
    assert obj["cd45_membrane_cover"] >= st.min_cd45_membrane_cover
    assert obj["label"] == "DOUBLE_POSITIVE", obj


# ---------------------------------------------------------------- look-alikes


def test_a_cell_without_cytokeratin_is_no_ctc() -> None:
    # a part of a CK region split among its nuclei (seen at a defocused rim's
    # corner: mean CK below zero) meets every other rule of the definition
    cv = Canvas()
    cv.cell(128, 128)
    field = cv.field()
    (row,) = _ctcs(_detect(field))
    ctx = detect_mod._Field(
        field, NAMES, resolve_roles(NAMES), DetectionSettings(), PX, 4095.0
    )
    ctx.blur = 1.0
    st = DetectionSettings()
    keep = ("label", "reason", "marker_positive", "score")
    base = {k: v for k, v in row.items() if k not in keep}
    base.update(_sat2=False, _all_bright=0.0, _glow=0.0, _cut=False)
    assert ctx._classify(dict(base), has_nucleus=True) == (
        "CTC",
        "meets the CTC definition",
    )
    for ck in (-0.5, 0.0, st.ck_smooth_snr - 0.01):
        label, reason = ctx._classify({**base, "ck_snr": ck}, has_nucleus=True)
        assert (label, reason) == ("OTHER", "no cytokeratin over the cell")
        flagged = {**row, "ck_snr": ck, "label": label, "reason": reason}
        assert review_flag({**flagged, "solidity": st.min_solidity * 0.95}, st) == ""
    # the dimmest cells the detector finds stay CTCs
    dim = {**base, "ck_snr": st.ck_smooth_snr}
    assert ctx._classify(dim, has_nucleus=True)[0] == "CTC"


def test_debris_bright_in_every_channel() -> None:
    cv = Canvas()
    cv.blob(128, 128, 14, (2500, 1500, 2000, 1500))
    objs = _detect(cv.field())
    assert _at(objs, 128, 128)["label"] == "DEBRIS"
    assert not _ctcs(objs)


def test_a_glowing_blob_is_debris_and_its_record_holds_no_working_keys() -> None:
    # a blob as bright in FITC and APC as in cytokeratin, over DNA: the glow
    # rule calls it debris, before the field's edge is asked about; no
    # working key (``_cut``, ``_glow``, ...) reaches the record
    cv = Canvas()
    cv.blob(128, 128, 10, (1500, 80, 80, 80))
    cv.cell(60, 60)
    objs = _detect(cv.field())
    assert _at(objs, 128, 128)["reason"].startswith("faint glow"), objs
    assert _at(objs, 60, 60)["label"] == "CTC"
    for o in objs:
        assert not [k for k in o if k.startswith("_")], o


def test_debris_saturated_in_two_channels() -> None:
    cv = Canvas()
    cv.blob(128, 128, 10, (9000, 0, 9000, 0))  # saturates DAPI and PE
    objs = _detect(cv.field())
    obj = _at(objs, 128, 128)
    assert obj["label"] == "DEBRIS" and "saturated" in obj["reason"]


def test_ctc_beside_debris_is_still_found() -> None:
    cv = Canvas()
    cv.blob(128, 120, 12, (3000, 2000, 2500, 2000))
    cv.cell(128, 140)  # touching the debris
    objs = _detect(cv.field())
    assert _at(objs, 128, 140)["label"] == "CTC"
    assert any(o["label"] == "DEBRIS" for o in objs)


@pytest.mark.parametrize(
    ("levels", "diam_um", "nucleus_um", "ck", "dapi", "gap_um", "blur", "seed"),
    [
        ((9000, 6000, 9000, 6000), 12, 7, 800, 800, -1.5, 1.0, 798303),
        ((3000, 2000, 2500, 2000), 12, 5, 800, 800, -3.0, 1.0, 149509),
        ((9000, 6000, 9000, 6000), 15, 7, 2000, 400, -1.5, 2.5, 570231),
    ],
)
def test_a_cell_overlapping_debris_keeps_its_own_body(
    levels: tuple,
    diam_um: float,
    nucleus_um: float,
    ck: float,
    dapi: float,
    gap_um: float,
    blur: float,
    seed: int,
) -> None:
    # a cell pressed into 20 um debris (bright in every channel, or saturated):
    # once the debris is peeled off, the rest of the region is split with the
    # debris as one more seed, so the debris' blurred edge stays the debris'
    # and the cell is measured on its own body
    cv = Canvas(seed=seed)
    dc = 140 - (20 / 2 + diam_um / 2 + gap_um) / PX
    cv.blob(128, dc, 20, levels)
    cv.cell(128, 140, diam_um=diam_um, ck=ck, dapi=dapi, nucleus_um=nucleus_um)
    objs = _detect(cv.field(blur=blur))
    assert any(o["label"] == "DEBRIS" for o in objs)
    assert _at(objs, 128, 140)["label"] == "CTC", _at(objs, 128, 140)
    assert len(_ctcs(objs)) == 1, _ctcs(objs)


@pytest.mark.parametrize(
    ("diam_um", "glow", "width_px", "seed"),
    [(30, 0.04, 20, 2), (30, 0.04, 20, 4), (30, 0.03, 20, 2), (24, 0.04, 14, 0)],
)
def test_the_glow_around_debris_holds_no_ctc(
    diam_um: float, glow: float, width_px: float, seed: int
) -> None:
    # a bright particle's image has wide wings: in every channel, DNA too, a
    # slow fall that passes the nucleus and cytokeratin thresholds around it.
    # What is peeled off with the debris and has the colour of its glow (each
    # stain's channel to cytokeratin as just beyond the debris) is the glow.
    # (A glow so wide that the region is not debris as a whole is not caught:
    # 24 um, 0.03, 20 px gives CTCs in 5 of seeds 0-5.)
    cv = Canvas(seed=seed)
    levels = (3000, 2500, 3000, 2500)
    cv.blob(128, 128, diam_um, levels)
    wing = (1 + (np.hypot(cv.yy - 128, cv.xx - 128) / width_px) ** 2) ** -1.5
    for ch, level in enumerate(levels):
        cv.planes[ch] += glow * level * wing
    objs = _detect(cv.field())
    assert any(o["label"] == "DEBRIS" for o in objs)
    assert not _ctcs(objs), _ctcs(objs)


@pytest.mark.parametrize(("blur", "seed"), [(0.35, 0), (0.35, 1), (0.6, 0), (0.6, 1)])
def test_a_cell_pressed_into_sharp_debris_is_not_its_glow(
    blur: float, seed: int
) -> None:
    # sharp saturated debris has no glow: the band beyond it holds the edge of
    # the cell pressed into it (which the debris' seed may take), so its colour
    # is measured away from the cell, where nothing glows, and the cell stays
    # a cell
    cv = Canvas(seed=seed)
    cv.blob(128, 140 - (20 / 2 + 10 / 2 - 0.5) / PX, 20, (9000, 6000, 9000, 6000))
    cv.cell(128, 140, diam_um=10, ck=700, dapi=800, nucleus_um=6, fitc=40, cd45=40)
    obj = _at(_detect(cv.field(blur=blur)), 128, 140)
    assert obj["label"] == "CTC", obj


def test_cartridge_rim_and_dark_outside_give_no_ctc() -> None:
    cv = Canvas(size=320)
    # a bright wall band in every channel at column 100, dark outside on its left
    band = np.clip(1 - np.abs(cv.xx - 100) / 30, 0, 1)
    for ch, level in enumerate((1200, 2500, 3000, 2000)):
        cv.planes[ch] += level * band
    cv.leukocyte(160, 200)
    field = cv.field()
    field[:, :, :70] = (
        100 + 3 * np.random.default_rng(1).standard_normal((4, 320, 70))
    ).astype(np.uint16)
    objs = _detect(field)
    assert not _ctcs(objs)
    assert any(o["label"] == "DEBRIS" for o in objs)


def test_a_cluster_of_touching_ctcs_counts_each_cell() -> None:
    cv = Canvas()
    for r, c in [(118, 118), (118, 135), (134, 126)]:
        cv.cell(r, c, diam_um=11, nucleus_um=6)
    ctcs = _ctcs(_detect(cv.field()))
    assert len(ctcs) == 3
    assert all(o["cluster_size"] == 3 for o in ctcs)


def test_dense_leukocytes_and_vignetting() -> None:
    # 45 leukocytes on 384 x 384 px is ~ 400 on a full 1384 x 1036 field
    cv = Canvas(size=384, seed=3)
    rng = np.random.default_rng(4)
    drawn = 0
    for r, c in rng.uniform(20, 364, (46, 2)):
        if np.hypot(r - 192, c - 192) > 20:
            cv.leukocyte(r, c, cd45=rng.uniform(200, 600))
            drawn += 1
    cv.cell(192, 192)
    objs = _detect(cv.field(vignetting=0.4))
    ctcs = _ctcs(objs)
    assert len(ctcs) == 1 and _at(ctcs, 192, 192)
    # a few touching leukocytes merge; none is lost to the background estimate
    assert sum(o["label"] == "WBC" for o in objs) >= 0.85 * drawn


# ---------------------------------------------------------------- settings, input


def test_every_threshold_comes_from_the_settings() -> None:
    cv = Canvas()
    cv.cell(128, 128, diam_um=7, nucleus_um=4)
    field = cv.field()
    assert _at(_detect(field), 128, 128)["label"] == "CTC"
    strict = DetectionSettings(min_ctc_diameter_um=9.0)
    obj = _at(_detect(field, settings=strict), 128, 128)
    assert obj["label"] == "CK_FRAGMENT" and "9 um" in obj["reason"]


@pytest.mark.parametrize(
    "dtype", [np.uint16, np.int32, np.uint32, np.float32, np.float64]
)
def test_any_dtype(dtype: type) -> None:
    cv = Canvas()
    cv.cell(128, 128)
    cv.leukocyte(60, 200)
    labels = sorted(o["label"] for o in _detect(cv.field(dtype=dtype)))
    assert labels == ["CTC", "WBC"]


def test_uint8_field() -> None:
    cv = Canvas()
    cv.cell(128, 128, ck=120, dapi=150, fitc=0)
    field = cv.field(background=10, offset=10, top=255, dtype=np.uint8)
    obj = _at(detect_field(field, NAMES, pixel_size_um=PX).objects, 128, 128)
    assert obj["label"] == "CTC"


def test_other_channel_names_and_order() -> None:
    cv = Canvas()
    cv.cell(128, 128)
    field = cv.field()[[2, 0, 3, 1]]  # PE, DAPI, APC, FITC
    names = ["CK", "Hoechst", "CD45", "HER2"]
    roles = {
        "Hoechst": "nucleus",
        "CK": "epithelial",
        "CD45": "leukocyte",
        "HER2": "marker",
    }
    objs = detect_field(
        field, names, pixel_size_um=PX, roles=roles, saturation=4095
    ).objects
    assert _at(objs, 128, 128)["label"] == "CTC"


def test_missing_channel_is_named() -> None:
    with pytest.raises(ValueError, match=r"APC \(leukocyte\)"):
        resolve_roles(["DAPI", "FITC", "PE"], DEFAULT_ROLES)
    with pytest.raises(ValueError, match="shape"):
        detect_field(np.zeros((3, 64, 64), np.uint16), NAMES, pixel_size_um=PX)


def test_a_field_smaller_than_a_field_file_may_be_is_refused() -> None:
    small = np.full((4, 40, 200), 100, np.uint16)
    with pytest.raises(ValueError, match="at least 64 x 64 px, got 40 x 200"):
        detect_field(small, NAMES, pixel_size_um=PX)


def test_a_dim_ctc_touching_a_bright_one_in_a_cluster() -> None:
    # the dim cell's smoothed cytokeratin joins the bright cell's; beyond the
    # bright cell's blurred halo it is the dim cell's own
    cv = Canvas(seed=5)
    cv.cell(128, 117, diam_um=12, nucleus_um=6.5)
    cv.cell(128, 136, diam_um=12, nucleus_um=6.5, ck=30)  # ~4 x the noise
    objs = _detect(cv.field())
    assert _at(objs, 128, 117)["label"] == "CTC"
    dim = _at(objs, 128, 136)
    assert dim["label"] == "CTC", dim


def test_a_dim_ctc_beside_leukocytes_is_no_debris_halo() -> None:
    # a leukocyte's CD45 ring and the cell's own marker light part of a dim
    # cell in every channel; a debris halo glows evenly across it
    cv = Canvas(seed=6)
    cv.cell(128, 128, diam_um=12, ck=60, fitc=900)
    cv.leukocyte(128, 144, cd45=900)
    cv.leukocyte(144, 128, cd45=900)
    obj = _at(_detect(cv.field()), 128, 128)
    assert obj["label"] == "CTC", obj


def test_a_dim_double_positive_is_not_a_ctc() -> None:
    # CD45 below the bright-cell limit, but comparable to a dim cytokeratin:
    # far more than the few percent its dye bleeds through
    cv = Canvas(seed=7)
    cv.cell(128, 128, diam_um=10, ck=60, cd45=160)
    obj = _at(_detect(cv.field()), 128, 128)
    assert obj["label"] == "DOUBLE_POSITIVE", obj


@pytest.mark.parametrize(("blur", "seed"), [(1.0, 1), (1.5, 2), (2.0, 3)])
def test_a_weak_cd45_membrane_all_around_a_cell_makes_it_double_positive(
    blur: float, seed: int
) -> None:
    # CD45 on the membrane at 3-5 times the noise: below the band's median limit
    # and a small fraction of a bright cell's cytokeratin, but all around it
    cv = Canvas(seed=seed)
    cv.cell(128, 128, diam_um=12, ck=300)
    ring = 100 * cv._ring(128, 128, 12)
    st = DetectionSettings(spillover={"PE->APC": 0.0, "DAPI->APC": 0.0})
    cv.planes[A] += ring
    obj = _at(_detect(cv.field(blur=blur), settings=st), 128, 128)
    assert obj["cd45_snr"] < st.max_cd45_snr
    assert obj["cd45_ck_ratio"] < st.min_cd45_ratio
    assert obj["cd45_membrane_cover"] >= st.min_cd45_membrane_cover
    assert obj["label"] == "DOUBLE_POSITIVE", obj
    assert obj["reason"] == "CD45 on the membrane all around the cell"
    # the same membrane on one side only: a leukocyte's pressed against the cell
    cv.planes[A] -= ring * (cv.xx < 128)
    obj = _at(_detect(cv.field(blur=blur), settings=st), 128, 128)
    assert obj["cd45_membrane_cover"] <= 0.5
    assert obj["label"] == "CTC", obj


@pytest.mark.parametrize(
    ("angles", "blur", "seed"), [((0, 90, 180), 2.0, 3), ((0, 90, 180, 270), 1.0, 1)]
)
def test_leukocytes_pressed_against_a_ctc_on_several_sides_are_not_its_membrane(
    angles: tuple[int, ...], blur: float, seed: int
) -> None:
    # each lights the band on its side: together six of the eight sectors. The
    # band is not read beside another cell's nucleus
    cv = Canvas(seed=seed)
    cv.cell(128, 128, diam_um=12, ck=300)
    d = (6 + 4.7 - 0.6) / PX  # touching: the radii less 0.6 um
    for a in np.deg2rad(angles):
        cv.leukocyte(128 + d * np.sin(a), 128 + d * np.cos(a), cd45=400)
    st = DetectionSettings(spillover={"PE->APC": 0.0, "DAPI->APC": 0.0})
    obj = _at(_detect(cv.field(blur=blur), settings=st), 128, 128)
    assert obj["cd45_membrane_cover"] < st.min_cd45_membrane_cover
    assert obj["label"] == "CTC", obj


@pytest.mark.parametrize("seed", [2, 3])
def test_unmeasured_bleed_through_all_around_a_bright_cell_is_no_cd45_membrane(
    seed: int,
) -> None:
    # no single-stain objects and no configured value: the cell's own low
    # estimate of its bleed-through into CD45 leaves most of it, all around the
    # cell, at 5-7 times the noise; CD45 must then be comparable to the CK
    cv = Canvas(seed=seed)
    cv.cell(128, 128, diam_um=12, ck=1600, nucleus_um=9.5)
    cv.planes[A] += 0.054 * cv.planes[P]
    field = cv.field(blur=2.5)
    st = DetectionSettings()
    obj = _at(_detect(field, settings=st), 128, 128)
    assert obj["cd45_excess_snr"] >= st.min_cd45_membrane_snr
    assert obj["cd45_membrane_cover"] < st.min_cd45_membrane_cover
    assert obj["label"] == "CTC", obj
    # what comparing with the cytokeratin guards against
    loose = st.model_copy(update={"min_cd45_ratio": st.min_cd45_encircled_ratio})
    obj = _at(_detect(field, settings=loose), 128, 128)
    assert obj["cd45_membrane_cover"] >= st.min_cd45_membrane_cover


@pytest.mark.parametrize("blur", [1.0, 2.4])
def test_a_nucleus_beside_cytokeratin_stays_one_nucleus(blur: float) -> None:
    # one nucleus, one DNA peak: however blurred, it is not split to put a
    # piece of it inside the cytokeratin
    cv = Canvas(seed=5)
    cv.cell(128, 128, diam_um=12, nucleus_um=9, nucleus_at=(0, 7.5))
    objs = _detect(cv.field(blur=blur))
    assert not _ctcs(objs), [(o["label"], o["reason"]) for o in objs]


def test_the_nucleus_inside_a_bright_cell_does_not_grow_with_the_blur() -> None:
    # a bright 10 um cell (no DNA of its own) and a 6 um nucleus whose centre
    # lies 0.4 of its radius inside the cell's edge, or on it, or beyond it:
    # the detection mask of a bright cell reaches past its edge by more than
    # 2 px once blurred (at 2.5 px: on-edge 0.71 inside, 0.3 beyond 0.55, both
    # CTCs with a fixed 2 px halo); the share inside must not depend on the blur
    inside: dict[tuple[float, float], float] = {}
    for blur in BLURS:
        for beyond in (-0.4, 0.0, 0.2, 0.3):
            cv = Canvas(size=256, seed=3)
            edge = 10 / 2 / PX + beyond * 6 / 2 / PX
            cv.cell(100, 100, diam_um=10, ck=2000, dapi=0, texture=False)
            cv.planes[D] += 1500 * cv._disc(100, 100 + edge, 6)
            for k in range(8):  # their nuclei tell the field's blur
                cv.leukocyte(200, 20 + 30 * k)
            obj = _at(_detect(cv.field(blur=blur)), 100, 100)
            inside[blur, beyond] = obj["nucleus_inside"]
            assert (obj["label"] == "CTC") == (beyond < 0), (blur, beyond, obj)
    for beyond in (-0.4, 0.0, 0.2, 0.3):
        shares = [inside[b, beyond] for b in BLURS]
        assert max(shares) - min(shares) <= 0.1, (beyond, shares)


def test_a_float_field_with_a_cytokeratin_peak_far_beyond_any_threshold() -> None:
    # the halo's normal quantile of 1 - T / P, with T / P below float precision
    cv = Canvas(size=256, seed=3)
    cv.cell(100, 100, diam_um=10, ck=2000, dapi=1500, texture=False)
    for k in range(8):
        cv.leukocyte(200, 20 + 30 * k)
    field = cv.field(blur=2.0, dtype=np.float32, top=1e12)
    field[P] += np.float32(1e30) * (field[P] > 1000)
    with np.errstate(over="ignore"):  # squares of 1e30 in float32 features
        obj = _at(_detect(field, saturation=None), 100, 100)
    assert obj["label"] == "CTC" and obj["nucleus_inside"] == 1.0, obj


@pytest.mark.parametrize("blur", [1.8, 2.4])
def test_touching_ctcs_whose_nuclei_blur_merged_count_twice(blur: float) -> None:
    cv = Canvas(seed=2)
    # pressed together, their nuclei 2.5 um apart: one blob once blurred
    cv.cell(128, 120, diam_um=10, nucleus_um=6, nucleus_at=(0, 1.2))
    cv.cell(128, 136, diam_um=10, nucleus_um=6, nucleus_at=(0, -1.2))
    objs = _detect(cv.field(blur=blur))
    assert len(_ctcs(objs)) == 2, [(o["label"], o["reason"]) for o in objs]


# ------------------------------------------------------- flat tops, large blobs


def test_dna_peaks_are_skimages_peaks_where_nothing_is_flat() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        h, w = rng.integers(8, 60, 2)
        img = ndimage.gaussian_filter(
            rng.random((h, w)).astype(np.float32), rng.uniform(0.5, 3)
        )
        mask = ndimage.gaussian_filter(rng.random((h, w)), 3) > 0.5
        if not mask.any():
            continue
        d = int(rng.integers(2, 7))
        want = peak_local_max(
            img, min_distance=d, labels=mask.astype(np.int32), exclude_border=False
        )
        np.testing.assert_array_equal(_dna_peaks(img, mask, d), want)


def test_labels_are_scipys_labels() -> None:
    # the detector's ids, areas and boxes follow the labels' numbering: the
    # faster labelling must find and number every component as scipy does, on
    # masks of every density, a strided view and edge cases
    rng = np.random.default_rng(11)
    masks = [np.zeros((0, 5), bool), np.zeros((4, 4), bool), np.ones((3, 7), bool)]
    for _ in range(300):
        h, w = rng.integers(1, 80, 2)
        smooth = ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(0, 2))
        masks.append(smooth > rng.uniform(0.3, 0.7))
    masks.append(rng.random((300, 400)) > 0.5)  # speckle: thousands of pieces
    masks.append(masks[-1][::2, 1::3])  # not contiguous
    # a few objects in bands of rows apart (labelled band by band), gaps of
    # 0-40 empty rows, objects side by side in a band and one row high
    for _ in range(60):
        sparse = np.zeros((int(rng.integers(40, 400)), int(rng.integers(5, 300))), bool)
        for _ in range(int(rng.integers(1, 9))):
            r, c = rng.integers(0, sparse.shape[0]), rng.integers(0, sparse.shape[1])
            hh, ww = rng.integers(1, 12, 2)
            sparse[r : r + hh, c : c + ww] = (
                rng.random((hh, ww))[: sparse.shape[0] - r, : sparse.shape[1] - c] > 0.3
            )
        masks.append(sparse)
    masks += [m[::2, ::-1] for m in masks[-5:]] + [masks[-1].T]  # views, in bands
    masks += [np.asfortranarray(m) for m in masks[-6:]]  # column-major
    masks.append(np.asfortranarray([[0, 0, 1], [1, 0, 1], [0, 0, 0]], bool))
    masks.append(np.pad(np.ones((1, 5), bool), ((200, 0), (0, 0))))  # last row
    masks.append(np.pad(np.ones((1, 5), bool), ((0, 200), (0, 0))))  # first row
    for mask in masks:
        want, n_want = ndimage.label(mask)
        got, n = _label(mask)
        assert n == n_want
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)


def test_grown_and_shrunk_masks_are_scipys() -> None:
    # the cross dilation and erosion (iterated, the border as background), the
    # opening made of them and the filled holes: the masks scipy gives, on
    # every density, thin and empty arrays, strided views and integer masks
    rng = np.random.default_rng(12)
    masks = [
        np.zeros((0, 5), bool),
        np.zeros((4, 4), bool),
        np.ones((3, 7), bool),
        np.ones((1, 9), bool),
        rng.random((9, 1)) > 0.4,
        np.ones((6, 6), np.int32),
    ]
    for _ in range(200):
        h, w = rng.integers(1, 60, 2)
        smooth = ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(0, 2))
        masks.append(smooth > rng.uniform(0.3, 0.7))
    masks.append(rng.random((300, 400)) > 0.5)
    masks.append(masks[-1][::2, 1::3])  # not contiguous
    for mask in masks:
        for n in (1, 2, 3, 4):
            grown = _grow(mask, n)
            assert grown.dtype == bool
            np.testing.assert_array_equal(
                grown, ndimage.binary_dilation(mask, iterations=n)
            )
            np.testing.assert_array_equal(
                _shrink(mask, n), ndimage.binary_erosion(mask, iterations=n)
            )
        np.testing.assert_array_equal(
            _grow(_shrink(mask)), ndimage.binary_opening(mask)
        )
        if mask.dtype == bool:
            np.testing.assert_array_equal(
                _fill_holes(mask), ndimage.binary_fill_holes(mask)
            )


def test_the_3x3_sums_are_scipys_mean_times_nine() -> None:
    # edges reflected as scipy's, on every shape down to one row or column,
    # to float32 rounding (sums of values up to a few thousand)
    rng = np.random.default_rng(5)
    shapes = [(1, 1), (1, 7), (7, 1), (2, 2), (2, 9), (3, 3), (518, 692)]
    shapes += [tuple(rng.integers(1, 40, 2)) for _ in range(50)]
    for shape in shapes:
        a = (rng.normal(0, 30, shape) + 3000 * (rng.random(shape) < 0.1)).astype(
            np.float32
        )
        got = detect_mod._box3_sum(a)
        assert got.dtype == np.float32 and got.shape == a.shape
        want = 9 * ndimage.uniform_filter(a.astype(np.float64), 3)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * 9 * 4000)


def test_the_cd45_near_each_nucleus_pixel_is_the_full_frames() -> None:
    # `_nuclei_table` takes the binned CD45 signal's 3 x 3 maximum only at the
    # nuclei's bins: the values at every bin (edges, corners, odd frame sizes,
    # with bleed-through subtracted) must be those of the full-frame filter
    rng = np.random.default_rng(5)
    for h, w in ((64, 64), (77, 91), (130, 65)):
        canvas = Canvas(size=max(h, w), seed=int(rng.integers(1000)))
        canvas.cell(h / 2, w / 2, diam_um=14, cd45=300)
        canvas.leukocyte(5, w - 6)
        raw = canvas.field()[:, :h, :w]
        ctx = detect_mod._Field(
            raw, NAMES, resolve_roles(NAMES), DetectionSettings(), PX, 4095.0
        )
        ctx.spill = {(P, A): 0.05, (D, A): 0.02}  # both sources subtracted
        for c in (A, P):  # a channel with its own map, a mask channel
            h2, w2 = h // 2, w // 2
            full = detect_mod._max3(ctx._binned_signal(c, h2, w2)).ravel()
            bins = np.r_[
                0, w2 - 1, h2 * w2 - 1, (h2 - 1) * w2, rng.integers(0, h2 * w2, 300)
            ]
            np.testing.assert_array_equal(ctx._near_max(c, bins, h2, w2), full[bins])
            np.testing.assert_array_equal(
                ctx._binned_at(c, bins, w2), ctx._binned_signal(c, h2, w2).ravel()[bins]
            )


def test_a_flat_top_is_one_peak() -> None:
    # a saturated blob: every pixel of its 40-px top is a local maximum
    yy, xx = np.mgrid[0:80, 0:80]
    img = np.clip(30 - np.hypot(yy - 40, xx - 40), 0, 10).astype(np.float32)
    mask = img > 0
    peaks = _dna_peaks(img, mask, 4)
    assert len(peaks) == 1
    assert img[tuple(peaks[0])] == img.max()


def _split_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size (px) of each blob the detector tries to split at its DNA peaks
    from now on, in call order."""
    sizes: list[int] = []
    real = detect_mod._split_dna

    def counting(mask, *a, **kw):
        sizes.append(int(mask.sum()))
        return real(mask, *a, **kw)

    monkeypatch.setattr(detect_mod, "_split_dna", counting)
    return sizes


def test_a_field_sized_bright_blob_is_not_split_into_nuclei(monkeypatch) -> None:
    # debris or a defocused smear bright in DAPI and CK across much of the
    # field: it is no set of merged nuclei, and a CTC beside it is still found
    cv = Canvas(size=320, seed=3)
    cv.blob(150, 150, 120, (3000, 0, 0, 0))
    cv.cell(150, 240, dapi=0)  # cytokeratin over the blob's edge
    cv.cell(290, 290)
    sizes = _split_sizes(monkeypatch)
    objs = _detect(cv.field())
    biggest = DetectionSettings().max_cluster_area_um2 / PX**2
    assert all(s <= biggest for s in sizes), sizes
    assert len(_ctcs(objs)) == 1
    _at(_ctcs(objs), 290, 290)


@pytest.mark.parametrize("blur", [1.0, 2.0])
def test_a_leukocyte_pressed_against_a_ctc_does_not_make_it_cd45_positive(
    blur: float,
) -> None:
    # the CD45 around the nucleus is looked for inside the cytokeratin only: the
    # ring around a nucleus near the cell's edge reaches the neighbour's membrane
    cv = Canvas(seed=11)
    cv.cell(128, 128, diam_um=10, ck=200, nucleus_um=6.5, nucleus_at=(0, 2.5))
    cv.leukocyte(128, 128 + 8.0 / PX, cd45=2000)
    objs = _detect(cv.field(blur=blur))
    assert _at(objs, 128, 128)["label"] == "CTC"
    assert len(_ctcs(objs)) == 1


@pytest.mark.parametrize(
    ("dist_um", "cd45", "blur"), [(5.0, 1000, 1.0), (5.0, 1000, 2.0), (5.5, 2000, 2.0)]
)
def test_a_leukocyte_lying_over_one_side_of_a_ctc_leaves_it_cd45_negative(
    dist_um: float, cd45: float, blur: float
) -> None:
    # a crowded field: the leukocyte overlaps the cell, its membrane crosses the
    # cytokeratin beside the nucleus and the ring there is bright (its median
    # 24-32 times the noise), but on one side only; a leukocyte's own membrane
    # encircles its nucleus (test_ck_fragment_over_a_leukocyte_is_not_a_ctc)
    cv = Canvas(seed=11)
    cv.cell(128, 128, diam_um=12, ck=150, nucleus_um=7)
    cv.leukocyte(128, 128 + dist_um / PX, cd45=cd45)
    obj = _at(_detect(cv.field(blur=blur)), 128, 128)
    assert obj["cd45_nucleus_snr"] >= DetectionSettings().max_cd45_nucleus_snr
    assert obj["label"] == "CTC", obj


def test_quantiles_are_numpys() -> None:
    """The detector's median, quantiles and sector medians, taken without
    numpy's per-call overhead, are numpy's to the last bit: ties, NaN, -inf,
    one to 200 values, float32 and float64."""
    rng = np.random.default_rng(7)
    for trial in range(1500):
        n = int(rng.integers(1, 200))
        dtype = (np.float32, np.float64)[trial % 2]
        a = (rng.normal(size=n) * 10.0 ** rng.uniform(-3, 4)).astype(dtype)
        if trial % 3 == 0:
            a = np.round(a)  # ties
        if trial % 7 == 0:
            a[rng.integers(0, n)] = np.nan
        if trial % 11 == 0:
            a[rng.integers(0, n)] = -np.inf
        with np.errstate(invalid="ignore"):
            for got, want in (
                (detect_mod._median(a), np.median(a)),
                (detect_mod._quantile(a, 0.1), np.quantile(a, 0.1)),
                (detect_mod._quantile(a, 0.2), np.quantile(a, 0.2)),
                (detect_mod._quantile(a, 90 / 100), np.percentile(a, 90)),
                (detect_mod._quantile(a, 1.0), np.quantile(a, 1.0)),
                (detect_mod._quantile(a, 0.0), np.quantile(a, 0.0)),
            ):
                assert got.dtype == want.dtype
                assert np.array_equal(got, want, equal_nan=True), (trial, got, want)
        group = rng.integers(0, 8, size=n)
        size = np.bincount(group, minlength=8)
        sectors = detect_mod._medians_by(a, group, size)
        for k in np.flatnonzero(size).tolist():
            want = float(np.median(a[group == k]))
            assert np.array_equal(sectors[k], want, equal_nan=True), (trial, k)


def test_ring_cover_counts_the_sectors_lit_around_the_nucleus() -> None:
    yy, xx = np.mgrid[-12:13, -12:13]
    d = np.hypot(yy, xx)
    nucleus = d <= 6
    ring = (d > 6) & (d <= 8)
    around = np.full(d.shape, 30.0)
    assert detect_mod._ring_cover(ring, nucleus, around, 15.0) == 1.0
    one_side = np.where(xx > 2, 30.0, 0.0)  # a neighbour's membrane to the right
    assert detect_mod._ring_cover(ring, nucleus, one_side, 15.0) <= 0.5
    assert detect_mod._ring_cover(ring, nucleus, around, 31.0) == 0.0
    half_ring = ring & (xx >= 0)  # the CK area covers half the ring: judged there
    assert detect_mod._ring_cover(half_ring, nucleus, around, 15.0) == 1.0
    assert np.isnan(detect_mod._ring_cover(ring & (d > 99), nucleus, around, 15.0))
    # with the cytokeratin there: lit only where CD45 is `ratio` of it or more
    ck = np.where(xx > 2, 1000.0, 500.0)  # bright cytokeratin on the right
    cover = detect_mod._ring_cover(ring, nucleus, around, 15.0, ck=ck, ratio=0.05)
    lit = detect_mod._ring_cover(ring, nucleus, around, 15.0, ck=ck, ratio=0.02)
    assert lit == 1.0  # 30 >= 0.02 x 1000 on the right too
    assert cover == 0.625  # the 3 sectors wholly right of x = 2 are not lit
    # `every`: over all 8 sectors, so a ring cut short cannot light them all
    assert detect_mod._ring_cover(half_ring, nucleus, around, 15.0, every=True) <= 0.625


def test_a_nucleus_blob_near_two_ck_regions_is_split_once(monkeypatch) -> None:
    # each CK region looks at the nuclei near it; one blob's split serves both
    cv = Canvas(size=256, seed=4)
    cv.blob(128, 128, 30, (3000, 0, 0, 0))
    cv.cell(128, 128 - 13 / PX, dapi=0)
    cv.cell(128, 128 + 13 / PX, dapi=0)
    sizes = _split_sizes(monkeypatch)
    _detect(cv.field())
    assert len(sizes) == 1, sizes


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("blur", [1.0, 2.0])
def test_a_ctc_across_the_edge_of_abutting_fields_counts_once(
    axis: int, blur: float
) -> None:
    # each field sees part of the cell; the one holding its nucleus' centre
    # counts it (the field it leaves by the bottom or right edge, as before,
    # saw only a sliver of it from about 3.5 um on and neither counted it).
    # Within about a pixel of the centre lying on the edge both views are
    # halves and the two masks' rounding decides: not asserted there.
    missed = []
    for off_um in [*np.arange(-6.0, -1.5, 1.0), *np.arange(1.5, 6.01, 0.5)]:
        cv = Canvas(size=512, seed=1)
        at = 256 + off_um / PX
        cv.cell(*((at, 200) if axis == 0 else (200, at)), diam_um=12)
        f = cv.field(blur=blur)
        a, b = (f[:, :256], f[:, 256:]) if axis == 0 else (f[..., :256], f[..., 256:])
        n = len(_ctcs(_detect(a))) + len(_ctcs(_detect(b)))
        if n != 1:
            missed.append((float(off_um), n))
    assert not missed


def test_the_edge_rule_reads_only_a_nucleus_on_the_frames_edge() -> None:
    frame = (100, 100)
    disk = np.hypot(*np.mgrid[-5:6, -5:6]) <= 5
    top = (slice(0, 11), slice(40, 51))
    assert not _centre_beyond_edge(disk, top, frame)  # centre 5 px inside
    assert _centre_beyond_edge(disk[8:], (slice(0, 3), slice(40, 51)), frame)
    assert not _centre_beyond_edge(disk, (slice(40, 51), slice(40, 51)), frame)
    assert not _centre_beyond_edge(np.zeros((3, 3), bool), (slice(0, 3),) * 2, frame)

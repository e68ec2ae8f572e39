"""The focus surface of a cartridge, pure: anchor geometry, fits, the map.

No device here: `anchor_positions` places the anchor points inside the chamber,
`SurfaceFit` is z(x, y) as a polynomial in normalised stage coordinates,
`fit_anchors` fits a plane or a quadratic and re-measures (through a callback),
then drops, anchors that disagree; `FocusMap` is what ``focus_map.json`` holds.
The device-driving side is `controller.focus.mapper`; per-field QC is
`controller.focus.qc`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from controller.config import FocusSettings
from controller.errors import ConfigError, FocusError
from controller.layouts import CartridgeLayout

__all__ = [
    "USABLE",
    "Anchor",
    "FocusMap",
    "FocusSearch",
    "SurfaceFit",
    "anchor_positions",
    "chamber_half_size",
    "fit_anchors",
    "predict_z",
    "visit_order",
]

#: anchor states whose z enters the fit
USABLE = ("ok", "remeasured", "confirmed")
#: quadratic terms need this many anchors beyond their count (to see residuals)
_SPARE_ANCHORS = 2


# ---------------------------------------------------------------- geometry


def chamber_half_size(
    layout: CartridgeLayout, fov_w: float, fov_h: float
) -> tuple[float, float]:
    """Half width and height (um) of the cartridge chamber inside its wall."""
    return (
        layout.cols * fov_w / 2 - layout.wall_inset_um,
        layout.rows * fov_h / 2 - layout.wall_inset_um,
    )


def anchor_positions(
    layout: CartridgeLayout, fov_w: float, fov_h: float, settings: FocusSettings
) -> list[tuple[float, float]]:
    """Stage (x, y) of the anchor points, in serpentine order.

    Raises
    ------
    ConfigError
        The margin leaves no room inside the chamber, or an explicit anchor lies
        outside the chamber less the margin.
    """
    half_w, half_h = chamber_half_size(layout, fov_w, fov_h)
    hx, hy = half_w - settings.margin_um, half_h - settings.margin_um
    cx, cy = layout.center_x_um, layout.center_y_um
    if hx < 0 or hy < 0:
        raise ConfigError(
            f"focus.margin_um {settings.margin_um:g} leaves no room for anchors in "
            f"the {2 * half_w:.0f} x {2 * half_h:.0f} um chamber of layout "
            f"{layout.name!r}"
        )
    if settings.anchor_points is not None:
        for x, y in settings.anchor_points:
            if abs(x - cx) > hx or abs(y - cy) > hy:
                raise ConfigError(
                    f"focus anchor ({x:g}, {y:g}) lies outside the cartridge "
                    f"chamber less its {settings.margin_um:g} um margin: x "
                    f"{cx - hx:.0f}..{cx + hx:.0f}, y {cy - hy:.0f}..{cy + hy:.0f} um"
                )
        return [(float(x), float(y)) for x, y in settings.anchor_points]
    nx, ny = settings.anchors

    def axis(c: float, h: float, n: int) -> list[float]:
        return [c] if n == 1 else [float(v) for v in np.linspace(c - h, c + h, n)]

    xs, ys = axis(cx, hx, nx), axis(cy, hy, ny)
    out = []
    for j, y in enumerate(reversed(ys)):  # from the top row, like the fields
        for x in xs if j % 2 == 0 else reversed(xs):
            out.append((x, y))
    return out


def travel_um(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Stage travel between two points, for an XY stage that moves both axes at
    once (its time goes with the longer axis)."""
    return max(abs(a[0] - b[0]), abs(a[1] - b[1]))


def visit_order(
    points: Sequence[tuple[float, float]], start: tuple[float, float]
) -> list[int]:
    """Indices of `points` in an order of short stage travel from `start`.

    Nearest neighbour first, then 2-opt: any stretch of the path whose reversal
    shortens it is reversed, until none does. On the default 5 x 2 anchor grid
    of ``cellsearch-5x35``, from the cartridge centre, the path zigzags between
    the two rows (a diagonal move costs no more than its longer axis): 51 mm of
    travel against 76 mm along the rows.
    """
    n = len(points)
    if n <= 1:
        return list(range(n))
    left = list(range(n))
    path: list[int] = []
    here = start
    while left:
        nxt = min(left, key=lambda i: (travel_um(here, points[i]), i))
        left.remove(nxt)
        path.append(nxt)
        here = points[nxt]

    def at(k: int) -> tuple[float, float]:  # position k of the walk; 0 is start
        return start if k == 0 else points[path[k - 1]]

    improved = True
    while improved:
        improved = False
        for i in range(1, n):
            for j in range(i + 1, n + 1):
                # reverse path positions i..j (walk positions i..j)
                before = travel_um(at(i - 1), at(i))
                after = travel_um(at(i - 1), at(j))
                if j < n:
                    before += travel_um(at(j), at(j + 1))
                    after += travel_um(at(i), at(j + 1))
                if after < before - 1e-6:
                    path[i - 1 : j] = path[i - 1 : j][::-1]
                    improved = True
    return path


# ---------------------------------------------------------------- surface fit


@dataclass(frozen=True)
class SurfaceFit:
    """z(x, y) as a polynomial in normalised stage coordinates.

    ``u = (x - cx) / sx``, ``v = (y - cy) / sy``; `terms` names the monomials
    (``1, u, v, uu, uv, vv``) whose coefficients are `coef`.
    """

    model: str
    terms: tuple[str, ...]
    coef: tuple[float, ...]
    center: tuple[float, float]
    scale: tuple[float, float]

    def __call__(self, x: float, y: float) -> float:
        row = _monomials(self.terms, *self._uv(x, y))
        return float(np.dot(row, self.coef))

    def _uv(self, x: float, y: float) -> tuple[float, float]:
        return (x - self.center[0]) / self.scale[0], (y - self.center[1]) / self.scale[
            1
        ]

    @classmethod
    def fit(
        cls,
        points: Sequence[tuple[float, float, float]],
        model: str,
        center: tuple[float, float],
        scale: tuple[float, float],
    ) -> SurfaceFit:
        """Least-squares fit of `model` to (x, y, z) points.

        `model` is ``auto``, ``plane`` or ``quadratic``; the terms actually used
        are those the points' geometry can carry (no u^2 without three distinct
        x, for instance), and fewer than three points give a constant.
        """
        terms = _terms_for(points, model)
        u = [(x - center[0]) / scale[0] for x, _, _ in points]
        v = [(y - center[1]) / scale[1] for _, y, _ in points]
        a = np.array([_monomials(terms, ui, vi) for ui, vi in zip(u, v, strict=True)])
        z = np.array([p[2] for p in points], dtype=float)
        coef, *_ = np.linalg.lstsq(a, z, rcond=None)
        curved = any(t in terms for t in ("uu", "uv", "vv"))
        name = "quadratic" if curved else "constant" if terms == ("1",) else "plane"
        return cls(name, terms, tuple(float(c) for c in coef), center, scale)


def predict_z(
    points: Sequence[tuple[float, float, float]],
    x: float,
    y: float,
    center: tuple[float, float],
    scale: tuple[float, float],
) -> float:
    """The z that the (x, y, z) points found so far predict at (x, y), to centre
    a search: their ``auto`` fit (curved only once spare points carry it); for
    two points, along the line through them (a fit of two is a constant)."""
    if len(points) == 2:
        (x0, y0, z0), (x1, y1, z1) = points
        dx, dy = x1 - x0, y1 - y0
        if dx * dx + dy * dy > 0:
            t = ((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy)
            return z0 + t * (z1 - z0)
    return SurfaceFit.fit(points, "auto", center, scale)(x, y)


def _monomials(terms: Sequence[str], u: float, v: float) -> list[float]:
    val = {"1": 1.0, "u": u, "v": v, "uu": u * u, "uv": u * v, "vv": v * v}
    return [val[t] for t in terms]


def _distinct(values: Sequence[float]) -> int:
    return len({round(v) for v in values})


def _terms_for(
    points: Sequence[tuple[float, float, float]], model: str
) -> tuple[str, ...]:
    n = len(points)
    nx = _distinct([p[0] for p in points])
    ny = _distinct([p[1] for p in points])
    if n < 3 or (nx < 2 and ny < 2):
        return ("1",)
    plane: tuple[str, ...] = (
        ("1",) + (("u",) if nx >= 2 else ()) + (("v",) if ny >= 2 else ())
    )
    if model == "plane":
        return plane
    quad = plane + tuple(
        t
        for t, ok in (("uu", nx >= 3), ("uv", nx >= 2 and ny >= 2), ("vv", ny >= 3))
        if ok
    )
    if model == "auto" and n < len(quad) + _SPARE_ANCHORS:
        return plane
    return quad


# ---------------------------------------------------------------- records


@dataclass
class FocusSearch:
    """One z search: the found z (None if none) and what it saw."""

    z: float | None
    reason: str = ""
    samples: list[tuple[float, float]] = field(default_factory=list)
    seconds: float = 0.0
    #: a full frame the search took, and its z (`Focuser.search`, ``full_at``)
    frame: tuple[float, np.ndarray] | None = field(default=None, repr=False)


@dataclass
class Anchor:
    """One anchor point and what was measured there."""

    index: int
    x_um: float
    y_um: float
    z_um: float | None = None
    source: str = ""  # hardware | software
    status: str = "pending"  # ok | remeasured | confirmed | dropped | failed
    reason: str = ""
    sharpness: float | None = None
    residual_um: float | None = None
    snaps: int = 0
    seconds: float = 0.0

    @property
    def usable(self) -> bool:
        return self.z_um is not None and self.status in USABLE


@dataclass
class FocusMap:
    """The measured focus surface of one cartridge (``focus_map.json``)."""

    fit: SurfaceFit
    anchors: list[Anchor]
    reference_sharpness: float | None
    rms_um: float
    max_residual_um: float
    warnings: list[str]
    seconds: float
    settings: dict[str, Any]
    enabled: bool = True

    def z_of(self, x: float, y: float) -> float:
        return self.fit(x, y)

    @classmethod
    def flat(cls, settings: FocusSettings) -> FocusMap:
        """Focus disabled: every field at `z_start_um`."""
        fit = SurfaceFit("constant", ("1",), (settings.z_start_um,), (0, 0), (1, 1))
        return cls(fit, [], None, 0.0, 0.0, [], 0.0, settings.model_dump(), False)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["anchors"] = [asdict(a) for a in self.anchors]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FocusMap:
        f = d["fit"]
        fit = SurfaceFit(
            f["model"],
            tuple(f["terms"]),
            tuple(f["coef"]),
            (f["center"][0], f["center"][1]),
            (f["scale"][0], f["scale"][1]),
        )
        return cls(
            fit=fit,
            anchors=[Anchor(**a) for a in d["anchors"]],
            reference_sharpness=d["reference_sharpness"],
            rms_um=d["rms_um"],
            max_residual_um=d["max_residual_um"],
            warnings=list(d["warnings"]),
            seconds=d["seconds"],
            settings=d["settings"],
            enabled=d.get("enabled", True),
        )


def fit_anchors(
    anchors: list[Anchor],
    settings: FocusSettings,
    center: tuple[float, float],
    scale: tuple[float, float],
    remeasure: Callable[[Anchor, float], None],
) -> SurfaceFit:
    """Fit the usable anchors; re-measure, then drop, those that disagree.

    An anchor's disagreement is its leave-one-out residual (its z less the fit of
    the others), so one bad anchor cannot hide by pulling the fit. The worst
    anchor beyond `outlier_um` is re-measured once (`remeasure(anchor,
    predicted_z)` updates it in place). The same z again means the surface
    really is there (``confirmed``: kept; the fit's residual reports what the
    model misses); a z that now agrees with the others replaces the first
    (``remeasured``); anything else is dropped. Leaves each anchor's residual
    against the final fit.
    """

    def pts(sel: Sequence[Anchor]) -> list[tuple[float, float, float]]:
        return [(a.x_um, a.y_um, float(a.z_um)) for a in sel if a.z_um is not None]

    while True:
        ok = [a for a in anchors if a.usable]
        if not ok:
            raise FocusError("no anchor found focus")
        fit = SurfaceFit.fit(pts(ok), settings.model, center, scale)
        if len(ok) <= len(fit.terms):  # no redundancy: nothing to judge by
            break
        worst, worst_res, worst_pred = None, 0.0, 0.0
        for a in ok:
            if a.status != "ok":  # measured twice already
                continue
            # confirmed anchors are known departures from the model: they do
            # not predict the others
            rest = [b for b in ok if b is not a and b.status != "confirmed"]
            if len(rest) < len(fit.terms):
                continue
            others = SurfaceFit.fit(pts(rest), fit.model, center, scale)
            pred = others(a.x_um, a.y_um)
            res = float(a.z_um) - pred  # type: ignore[arg-type]
            if abs(res) > abs(worst_res):
                worst, worst_res, worst_pred = a, res, pred
        if worst is None or abs(worst_res) <= settings.outlier_um:
            break
        before = worst.z_um
        remeasure(worst, worst_pred)
        again = worst.z_um
        if again is None:
            worst.status = "dropped"
            worst.reason = f"off by {worst_res:+.2f} um; re-measure failed"
        elif abs(again - float(before)) <= 2 * settings.fine_step_um:  # type: ignore[arg-type]
            # the same z twice: a real feature of the surface, not a bad
            # measurement; the fit's residual will say the model misses it
            worst.status = "confirmed"
            worst.reason = f"off by {worst_res:+.2f} um; re-measure agreed"
        elif abs(again - worst_pred) <= settings.outlier_um:
            worst.status = "remeasured"
            worst.reason = f"off by {worst_res:+.2f} um at {before} um; re-measured"
        else:
            worst.status = "dropped"
            worst.reason = (
                f"off by {worst_res:+.2f} um; re-measure gave {again:.2f} um, dropped"
            )
    for a in anchors:
        a.residual_um = (
            None if a.z_um is None else round(float(a.z_um) - fit(a.x_um, a.y_um), 3)
        )
    return fit

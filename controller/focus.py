"""Focus: the focus map of a cartridge, per-field focus QC and local re-focus.

The map is measured before the fields are imaged:

1. `anchor_positions` places anchor points inside the chamber, `margin_um` from
   its wall (a grid, or explicit points).
2. `FocusMapper` finds best focus at each anchor: the instrument's hardware
   autofocus when the config names one (retried, then software focus), else a
   software z search: coarse steps over the range, fine steps around the best
   coarse plane, and a sub-step peak (`analysis.focus.refine_peak`) of the
   nucleus channel's gradient energy.
3. `fit_surface` fits a plane, or a quadratic where the anchors can carry one;
   an anchor whose leave-one-out residual exceeds `outlier_um` is measured
   again (software search) and dropped if it still disagrees. A fit whose rms
   residual exceeds `max_residual_um` is reported in the map's warnings.

Every field is then imaged at the map's z. `FocusQC` judges the first frame of
each field (the focus channel) by `analysis.focus.field_sharpness` against the
anchors' sharpness; a field below `qc_min_relative` of it is searched locally and
re-acquired at the found z (see `controller.engine`).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from analysis.focus import FieldSharpness, field_sharpness, gradient_energy, refine_peak
from controller.config import FocusSettings, InstrumentConfig
from controller.errors import ConfigError, ScannerError
from controller.instrument import HardwareCalls, needs_manual_shutter, snap
from controller.layouts import CartridgeLayout

__all__ = [
    "Anchor",
    "FieldFocus",
    "FocusCanceled",
    "FocusError",
    "FocusMap",
    "FocusMapper",
    "FocusQC",
    "FocusSearch",
    "Focuser",
    "SurfaceFit",
    "anchor_positions",
    "fit_anchors",
]

#: anchor states whose z enters the fit
USABLE = ("ok", "remeasured", "confirmed")
#: quadratic terms need this many anchors beyond their count (to see residuals)
_SPARE_ANCHORS = 2


class FocusError(ScannerError):
    """The focus map could not be measured."""


class FocusCanceled(FocusError):
    """The scan was stopped while the focus map was measured."""


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


@dataclass
class FieldFocus:
    """Focus QC of one field: the first acquisition and, if re-focused, the second."""

    z_planned_um: float
    z_um: float
    sharpness: float | None
    first_sharpness: float | None
    second_z_um: float | None = None
    second_sharpness: float | None = None
    refocused: bool = False
    reason: str = ""
    search_snaps: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in asdict(self).items()
        }


# ---------------------------------------------------------------- device access


class Focuser:
    """Focus operations on an opened core, measured on the focus channel.

    Holds the core weakly, like pymmcore-plus's engine: the core must be
    destroyable as soon as the instrument is closed (see `Instrument.close`).
    """

    def __init__(self, core: Any, instrument: InstrumentConfig) -> None:
        self._core_ref = weakref.ref(core)
        self.settings = instrument.focus
        self.group = instrument.channel_group
        self.channel = next(
            c for c in instrument.channels if c.name == self.settings.channel
        )
        lim = instrument.stage_limits
        self.z_limits = (lim.z_min, lim.z_max) if lim is not None else (-1e6, 1e6)
        self.manual_shutter = needs_manual_shutter(core)
        self.snap_retries = instrument.snap_retries
        self.move_retries = instrument.move_retries
        self.snaps = 0
        #: the hardware call in progress, for the scan's watchdog
        self.calls = HardwareCalls()

    @property
    def core(self) -> Any:
        core = self._core_ref()
        if core is None:
            raise FocusError("the instrument is closed")
        return core

    def select_channel(self) -> None:
        core = self.core
        core.setConfig(self.group, self.channel.preset)
        core.waitForConfig(self.group, self.channel.preset)
        core.setExposure(self.channel.exposure_ms)

    def move_xy(self, x: float, y: float) -> None:
        with self.calls.mark(f"focus: XY move to ({x:.0f}, {y:.0f})"):
            self.core.setXYPosition(x, y)
            self.core.waitForDevice(self.core.getXYStageDevice())

    def move_z(self, z: float) -> None:
        """Move the focus drive (a failed move is retried, then raised)."""
        core = self.core
        for attempt in range(self.move_retries + 1):
            try:
                with self.calls.mark(f"focus: z move to {z:.2f}"):
                    core.setZPosition(z)
                    core.waitForDevice(core.getFocusDevice())
                return
            except Exception:
                if attempt == self.move_retries:
                    raise

    def snap_at(self, z: float) -> np.ndarray:
        """A focus-channel frame at `z` (a failed snap is retried, then raised)."""
        self.move_z(z)
        for attempt in range(self.snap_retries + 1):
            self.snaps += 1
            try:
                with self.calls.mark(f"focus: snap at z {z:.2f}"):
                    return np.asarray(snap(self.core, self.manual_shutter))
            except Exception:
                if attempt == self.snap_retries:
                    raise
        raise AssertionError("unreachable")

    def search(
        self, center: float, half_range: float, *, extend: int = 1
    ) -> FocusSearch:
        """Coarse-to-fine search of z in center +- half_range at the current xy.

        When the sharpest coarse plane lies at an end of the window, the window
        moves one range further that way (up to `extend` times, never past the
        focus drive's limits) before giving up.
        """
        s = self.settings
        t0 = time.perf_counter()
        samples: dict[float, float] = {}
        zmin, zmax = self.z_limits

        def measure(zs: Iterable[float]) -> None:
            for z in zs:
                z = round(float(z), 3)
                if z not in samples and zmin - 1e-9 <= z <= zmax + 1e-9:
                    samples[z] = gradient_energy(self.snap_at(z))

        n = max(math.floor(2 * half_range / s.coarse_step_um + 1e-9), 1)
        offsets = (np.arange(n + 1) - n / 2) * s.coarse_step_um
        mid = center
        for _ in range(extend + 1):
            measure(mid + offsets)
            coarse = refine_peak(list(samples), list(samples.values()))
            if coarse.z is not None or "end of the search" not in coarse.reason:
                break
            low_end = max(samples, key=samples.__getitem__) == min(samples)
            mid += -2 * half_range if low_end else 2 * half_range
        if coarse.z is None:
            return FocusSearch(
                None, coarse.reason, sorted(samples.items()), time.perf_counter() - t0
            )
        best = max(samples, key=samples.__getitem__)
        k = round(s.coarse_step_um / s.fine_step_um)
        measure(best + np.arange(-k, k + 1) * s.fine_step_um)
        fine = refine_peak(list(samples), list(samples.values()))
        return FocusSearch(
            fine.z, fine.reason, sorted(samples.items()), time.perf_counter() - t0
        )

    def hardware_focus(self) -> float:
        """The autofocus device's full focus; returns the z it settled at."""
        core = self.core
        with self.calls.mark("focus: hardware autofocus"):
            core.fullFocus()
            core.waitForDevice(core.getFocusDevice())
            return float(core.getZPosition())


# ---------------------------------------------------------------- the map


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


class FocusMapper:
    """Measures a `FocusMap` on an opened instrument."""

    def __init__(
        self,
        core: Any,
        instrument: InstrumentConfig,
        layout: CartridgeLayout,
        fov: tuple[float, float],
        *,
        on_anchor: Callable[[Anchor], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = instrument.focus
        self.layout = layout
        self.fov = fov
        self.core = core
        self.instrument = instrument
        self.on_anchor = on_anchor
        self.should_stop = should_stop
        self.fallbacks = 0
        self._focuser: Focuser | None = None

    @property
    def focuser(self) -> Focuser:
        if self._focuser is None:
            self._focuser = Focuser(self.core, self.instrument)
        return self._focuser

    @property
    def busy(self) -> tuple[float, str] | None:
        """The hardware call in progress, for a watchdog."""
        return None if self._focuser is None else self._focuser.calls.busy

    def build(self) -> FocusMap:
        s = self.settings
        if not s.enabled:
            return FocusMap.flat(s)
        t0 = time.perf_counter()
        positions = anchor_positions(self.layout, *self.fov, s)
        anchors = [Anchor(i, x, y) for i, (x, y) in enumerate(positions)]
        center = (self.layout.center_x_um, self.layout.center_y_um)
        scale = tuple(max(h, 1.0) for h in chamber_half_size(self.layout, *self.fov))
        self.focuser.select_channel()
        for a in anchors:
            if self.should_stop is not None and self.should_stop():
                raise FocusCanceled("stopped while measuring the focus map")
            found = [b for b in anchors if b.usable]
            if found:
                guess = SurfaceFit.fit(
                    [(b.x_um, b.y_um, float(b.z_um)) for b in found],  # type: ignore[arg-type]
                    "plane",
                    center,
                    scale,  # type: ignore[arg-type]
                )(a.x_um, a.y_um)
                self._measure(a, guess, s.anchor_range_um, fallback=s.z_start_um)
            else:
                self._measure(a, s.z_start_um, s.search_range_um)
            if self.on_anchor is not None:
                self.on_anchor(a)
        failed = [a for a in anchors if not a.usable]
        if not any(a.usable for a in anchors):
            reasons = "; ".join(f"anchor {a.index}: {a.reason}" for a in failed)
            raise FocusError(f"focus map failed, no anchor found focus ({reasons})")

        def remeasure(a: Anchor, predicted: float) -> None:
            # a window holding both the first z and the predicted one
            first = predicted if a.z_um is None else a.z_um
            half = abs(first - predicted) / 2 + s.anchor_range_um
            self._measure(a, (first + predicted) / 2, half, hardware=False)

        fit = fit_anchors(anchors, s, center, scale, remeasure)  # type: ignore[arg-type]
        used = [a for a in anchors if a.usable]
        res = np.array([a.residual_um or 0.0 for a in used])
        rms = float(np.sqrt(np.mean(res * res))) if len(used) else 0.0
        warnings = []
        if rms > s.max_residual_um:
            warnings.append(
                f"focus map rms residual {rms:.2f} um exceeds {s.max_residual_um:g} um"
            )
        if failed or any(a.status == "dropped" for a in anchors):
            bad = [a for a in anchors if not a.usable]
            warnings.append(
                f"{len(bad)} of {len(anchors)} anchors unused: "
                + "; ".join(f"{a.index}: {a.reason}" for a in bad)
            )
        if self.fallbacks:
            warnings.append(
                f"hardware autofocus failed at {self.fallbacks} anchor(s); "
                "software focus used there"
            )
        sharp = [a.sharpness for a in used if a.sharpness is not None]
        if s.qc and not sharp:
            warnings.append(
                "no anchor held anything sharp to compare fields with: "
                "per-field focus QC is off"
            )
        return FocusMap(
            fit=fit,
            anchors=anchors,
            reference_sharpness=float(np.median(sharp)) if sharp else None,
            rms_um=round(rms, 4),
            max_residual_um=round(float(np.max(np.abs(res))) if len(res) else 0.0, 4),
            warnings=warnings,
            seconds=round(time.perf_counter() - t0, 3),
            settings=s.model_dump(),
        )

    def _measure(
        self,
        a: Anchor,
        center: float,
        half_range: float,
        *,
        fallback: float | None = None,
        hardware: bool = True,
    ) -> None:
        """Find focus at anchor `a` (in place): hardware, else software search."""
        s, fz = self.settings, self.focuser
        t0, snaps0 = time.perf_counter(), fz.snaps
        a.z_um, a.sharpness, a.reason = None, None, ""
        try:
            fz.move_xy(a.x_um, a.y_um)
            z = self._hardware(center, half_range) if hardware else None
            if z is not None:
                a.source = "hardware"
            else:
                if hardware and s.autofocus_device:
                    self.fallbacks += 1
                a.source = "software"
                search = fz.search(center, half_range)
                if search.z is None and fallback is not None:
                    search = fz.search(fallback, s.search_range_um)
                z = search.z
                a.reason = search.reason
            if z is not None:
                a.z_um = round(z, 3)
                a.sharpness = field_sharpness(fz.snap_at(z)).sharpness
                a.status = "ok" if a.status == "pending" else a.status
            else:
                a.status = "failed"
        except Exception as e:  # a device error fails this anchor, not the map
            a.status, a.reason = "failed", f"{type(e).__name__}: {e}"
        a.snaps += fz.snaps - snaps0
        a.seconds = round(a.seconds + time.perf_counter() - t0, 3)

    def _hardware(self, center: float, half_range: float) -> float | None:
        """Hardware full focus with retries; None when unavailable or failing."""
        s = self.settings
        if not s.autofocus_device:
            return None
        for _ in range(s.autofocus_retries + 1):
            try:
                self.focuser.move_z(center)
                z = self.focuser.hardware_focus()
            except Exception:  # device errors: retry, then software focus
                continue
            lo, hi = self.focuser.z_limits
            if abs(z - center) <= half_range and lo <= z <= hi:
                return z
        return None


# ---------------------------------------------------------------- per-field QC


class FocusQC:
    """Judges each field's first (focus-channel) frame; re-focuses poor ones.

    Parameters
    ----------
    focuser : Focuser
        Device access; the engine has already set the focus channel.
    reference : float
        The anchors' in-focus sharpness.
    """

    def __init__(self, focuser: Focuser, reference: float) -> None:
        self.focuser = focuser
        self.settings = focuser.settings
        self.reference = reference
        self.preset = focuser.channel.preset
        self.seconds = 0.0
        self.refocused = 0

    def threshold(self) -> float:
        return self.settings.qc_min_relative * self.reference

    def check(self, image: np.ndarray, z: float) -> tuple[np.ndarray, FieldFocus]:
        """Judge `image` (taken at `z`); re-focus and re-acquire if it is poor.

        Returns the frame to keep and what was done; the focus drive is left at
        the kept frame's z.
        """
        t0 = time.perf_counter()
        first = field_sharpness(image)
        info = FieldFocus(z, z, first.sharpness, first.sharpness)
        if first.sharpness is None or first.sharpness >= self.threshold():
            info.reason = "no content" if first.sharpness is None else ""
            self.seconds += time.perf_counter() - t0
            info.seconds = round(time.perf_counter() - t0, 4)
            return image, info
        fz = self.focuser
        snaps0 = fz.snaps
        keep, kept = image, first
        try:
            search = fz.search(z, self.settings.refocus_range_um)
            if search.z is None:
                info.reason = f"re-focus found no focus: {search.reason}"
                fz.move_z(z)
            elif abs(search.z - z) < self.settings.fine_step_um:
                info.reason = "re-focus confirmed the planned z"
                fz.move_z(z)
            else:
                second = fz.snap_at(search.z)
                s2 = field_sharpness(second)
                info.refocused = True
                info.second_z_um = round(search.z, 3)
                info.second_sharpness = s2.sharpness
                if _better(s2, first):
                    keep, kept, info.z_um = second, s2, round(search.z, 3)
                    info.reason = "re-focused"
                else:
                    info.reason = "re-focused frame no sharper; first kept"
                    fz.move_z(z)
        except Exception as e:  # keep the first frame; the field is not lost
            info.reason = f"re-focus failed: {type(e).__name__}: {e}"
            keep, kept, info.z_um = image, first, z
        info.sharpness = kept.sharpness
        info.search_snaps = fz.snaps - snaps0
        info.seconds = round(time.perf_counter() - t0, 4)
        self.seconds += time.perf_counter() - t0
        self.refocused += int(info.refocused)
        return keep, info


def _better(a: FieldSharpness, b: FieldSharpness) -> bool:
    return (a.sharpness or 0.0) >= (b.sharpness or 0.0)

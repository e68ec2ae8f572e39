"""Measuring the focus map on the instrument.

`Focuser` does the focus channel's z searches through the run's `Hardware`
(every call marked, retried and reported there): coarse steps over the window,
fine steps around the best coarse plane, a sub-step peak
(`analysis.focus.refine_peak`) of the nucleus channel's gradient energy.
`FocusMapper` measures each anchor (hardware autofocus when the config names
one, retried, else software search), publishes a `FocusAnchorDone` record per
anchor, and fits the surface (`controller.focus.surface.fit_anchors`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import numpy as np

from analysis.focus import field_sharpness, gradient_energy, refine_peak
from controller.config import InstrumentConfig
from controller.errors import FocusCanceled, FocusError
from controller.events import RecordSink
from controller.focus.surface import (
    Anchor,
    FocusMap,
    FocusSearch,
    SurfaceFit,
    anchor_positions,
    chamber_half_size,
    fit_anchors,
)
from controller.hardware.facade import Hardware
from controller.layouts import CartridgeLayout
from controller.records import FocusAnchorDone

__all__ = ["FocusMapper", "Focuser"]


# ---------------------------------------------------------------- device access


class Focuser:
    """Focus operations on the focus channel, through the run's `Hardware`
    (marked for the watchdog, retried under its policy, preset checked)."""

    def __init__(self, hw: Hardware, instrument: InstrumentConfig) -> None:
        self.hw = hw
        self.settings = instrument.focus
        self.channel = next(
            c for c in instrument.channels if c.name == self.settings.channel
        )
        lim = instrument.stage_limits
        self.z_limits = (lim.z_min, lim.z_max) if lim is not None else (-1e6, 1e6)
        self.snaps = 0

    def select_channel(self) -> None:
        self.hw.set_channel(self.channel.preset, where="focus")
        self.hw.set_exposure(self.channel.exposure_ms, where="focus")

    def move_xy(self, x: float, y: float) -> None:
        self.hw.move_xy(x, y, where="focus")

    def move_z(self, z: float) -> None:
        """Move the focus drive (a failed move is retried, then raised)."""
        self.hw.move_z(z, where="focus")

    def snap_at(self, z: float) -> np.ndarray:
        """A focus-channel frame at `z` (a failed snap is retried, then raised)."""
        self.move_z(z)
        self.snaps += 1
        return self.hw.snap(where=f"focus z {z:.2f}")

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
        return self.hw.full_focus(where="focus")


class FocusMapper:
    """Measures a `FocusMap` on an opened instrument."""

    def __init__(
        self,
        hw: Hardware,
        instrument: InstrumentConfig,
        layout: CartridgeLayout,
        fov: tuple[float, float],
        *,
        sink: RecordSink | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = instrument.focus
        self.layout = layout
        self.fov = fov
        self.hw = hw
        self.instrument = instrument
        self.sink = sink
        self.should_stop = should_stop
        self.fallbacks = 0
        self._focuser: Focuser | None = None

    @property
    def focuser(self) -> Focuser:
        if self._focuser is None:
            self._focuser = Focuser(self.hw, self.instrument)
        return self._focuser

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
            if self.sink is not None:
                self.sink.emit(
                    FocusAnchorDone(
                        index=a.index,
                        done=a.index + 1,
                        total=len(anchors),
                        x_um=a.x_um,
                        y_um=a.y_um,
                        z_um=a.z_um,
                        status=a.status,
                    )
                )
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

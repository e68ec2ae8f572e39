"""Measuring the focus map on the instrument.

`Focuser` does the focus channel's z searches through the run's `Hardware`
(every call marked, retried and reported there): planes over a window from a
centred camera ROI (the full frame restored when the search ends, however it
ends), more planes one at a time on a side where the focus curve has not fallen
yet, and focus from the curve's two flanks (`analysis.focus.flank_peak`) of the
nucleus channel's gradient energy. `FocusMapper` visits the anchors in an order
of short stage travel, measures each (hardware autofocus when the config names
one, retried, else a software search: wide at the first anchor, three planes
around the z the anchors found so far predict at the others), publishes a
`FocusAnchorDone` record per anchor, and fits the surface
(`controller.focus.surface.fit_anchors`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from analysis.focus import field_sharpness, flank_peak, gradient_energy
from controller.config import InstrumentConfig
from controller.errors import FocusCanceled, FocusError
from controller.events import RecordSink
from controller.focus.surface import (
    Anchor,
    FocusMap,
    FocusSearch,
    anchor_positions,
    chamber_half_size,
    fit_anchors,
    predict_z,
    visit_order,
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
        cam = instrument.camera
        self.frame = (cam.width, cam.height)
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

    def roi(self) -> tuple[int, int, int, int] | None:
        """The centred square camera ROI of z searches (x, y, width, height),
        None for full frames."""
        side = self.settings.roi_px
        w, h = self.frame
        if not side or side >= max(w, h):
            return None
        rw, rh = min(side, w), min(side, h)
        return ((w - rw) // 2, (h - rh) // 2, rw, rh)

    @contextlib.contextmanager
    def search_frames(self) -> Iterator[None]:
        """Within this block snaps come from the search ROI; the full frame is
        restored on the way out, also when a snap fails or the run stops."""
        roi = self.roi()
        if roi is None:
            yield
            return
        try:
            self.hw.set_roi(*roi, where="focus")
            yield
        finally:
            self.full_frame()

    def full_frame(self) -> None:
        """Restore (and check) the camera's full frame."""
        self.hw.clear_roi(self.frame, where="focus")

    def search(
        self,
        center: float,
        half_range: float,
        *,
        step: float | None = None,
        reach: float | None = None,
        full_at: float | None = None,
    ) -> FocusSearch:
        """Focus near `center` at the current xy.

        Planes every `step` (default `coarse_step_um`) over center +- half_range,
        from the end nearer the focus drive; then, while the focus curve has not
        fallen far enough on both sides of its peak (`analysis.focus.flank_peak`),
        one more plane beyond the sampled span on the side that lacks it, up to
        center +- `reach` (default 3 x half_range: the window moved once) and
        within the focus drive's limits. Focus is the mid-point of the curve's
        two flanks. The plane at `full_at` (one of the window's) is taken as a
        full frame, measured on the ROI's pixels and kept in the result.
        """
        s = self.settings
        step = s.coarse_step_um if step is None else step
        reach = 3 * half_range if reach is None else reach
        t0 = time.perf_counter()
        samples: dict[float, float] = {}
        zmin, zmax = self.z_limits
        lo, hi = max(zmin, center - reach), min(zmax, center + reach)
        roi = self.roi()

        def inside(z: float) -> bool:
            return lo - 1e-9 <= z <= hi + 1e-9

        def energy(image: np.ndarray) -> float:
            if roi is not None and image.shape[:2] != (roi[3], roi[2]):
                x, y, w, h = roi  # a full frame: the ROI's pixels
                image = image[y : y + h, x : x + w]
            return gradient_energy(image)

        def measure(zs: Iterable[float]) -> None:
            for z in zs:
                z = round(float(z), 3)
                if z not in samples and inside(z):
                    samples[z] = energy(self.snap_at(z))

        n = max(math.floor(2 * half_range / step + 1e-9), 2)
        planes = [float(z) for z in center + (np.arange(n + 1) - n / 2) * step]
        here = self.hw.read_z()
        if abs(planes[-1] - here) < abs(planes[0] - here):
            planes.reverse()
        frame = None
        if full_at is not None and inside(round(full_at, 3)):
            z = round(full_at, 3)
            image = self.snap_at(z)
            frame, samples[z] = (z, image), energy(image)
        with self.search_frames():
            measure(planes)
            while True:
                peak = flank_peak(list(samples), list(samples.values()))
                if peak.z is not None or peak.side == 0:
                    break
                nxt = min(samples) - step if peak.side < 0 else max(samples) + step
                if not inside(nxt):
                    break
                measure([nxt])
        return FocusSearch(
            peak.z,
            peak.reason,
            sorted(samples.items()),
            time.perf_counter() - t0,
            frame,
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
        #: anchor index -> its sharpness, measured on a helper thread while the
        #: stage goes on to the next anchor (needed only once the map is fitted)
        self._sharpness: dict[int, Future[float | None]] = {}
        self._judge: ThreadPoolExecutor | None = None

    @property
    def focuser(self) -> Focuser:
        if self._focuser is None:
            self._focuser = Focuser(self.hw, self.instrument)
        return self._focuser

    def build(self) -> FocusMap:
        """Measure the map. The camera is at its full frame afterwards, whatever
        happened; when restoring it fails, so does the map."""
        if not self.settings.enabled:
            return FocusMap.flat(self.settings)
        if self.focuser.roi() is None:
            return self._build()
        try:
            fmap = self._build()
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one
                self.focuser.full_frame()
            raise
        self.focuser.full_frame()
        return fmap

    def _build(self) -> FocusMap:
        self._sharpness.clear()
        self._judge = ThreadPoolExecutor(1, thread_name_prefix="ctcscan-anchor-qc")
        try:
            return self._build_map()
        finally:
            self._judge.shutdown(wait=True, cancel_futures=True)
            self._judge = None

    def _build_map(self) -> FocusMap:
        s = self.settings
        t0 = time.perf_counter()
        positions = anchor_positions(self.layout, *self.fov, s)
        anchors = [Anchor(i, x, y) for i, (x, y) in enumerate(positions)]
        center = (self.layout.center_x_um, self.layout.center_y_um)
        scale = tuple(max(h, 1.0) for h in chamber_half_size(self.layout, *self.fov))
        self.focuser.select_channel()
        for done, a in enumerate(self._in_order(anchors), start=1):
            if self.should_stop is not None and self.should_stop():
                raise FocusCanceled("stopped while measuring the focus map")
            found = [b for b in anchors if b.usable]
            if found:
                guess = predict_z(
                    [(b.x_um, b.y_um, float(b.z_um)) for b in found],  # type: ignore[arg-type]
                    a.x_um,
                    a.y_um,
                    center,
                    scale,  # type: ignore[arg-type]
                )
                self._measure(
                    a, guess, s.anchor_range_um, fallback=s.z_start_um, predicted=True
                )
            else:
                self._measure(a, s.z_start_um, s.search_range_um)
            if self.sink is not None:
                self.sink.emit(
                    FocusAnchorDone(
                        index=a.index,
                        done=done,
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
        for a in anchors:
            if (judged := self._sharpness.get(a.index)) is not None:
                a.sharpness = judged.result()
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

    def _in_order(self, anchors: list[Anchor]) -> list[Anchor]:
        """The anchors in the order to visit them (`FocusSettings.anchor_order`)."""
        if self.settings.anchor_order == "as_given" or len(anchors) < 3:
            return anchors
        here = self.hw.read_xy()
        order = visit_order([(a.x_um, a.y_um) for a in anchors], here)
        return [anchors[i] for i in order]

    def _measure(
        self,
        a: Anchor,
        center: float,
        half_range: float,
        *,
        fallback: float | None = None,
        hardware: bool = True,
        predicted: bool = False,
    ) -> None:
        """Find focus at anchor `a` (in place): hardware, else software search.

        A `predicted` center is searched with three planes `predicted_step_um`
        apart, more on a side as the curve needs, up to twice `half_range`
        away; any other over center +- half_range. When that finds nothing, a
        `fallback` center is searched over +- `search_range_um`.
        """
        s, fz = self.settings, self.focuser
        t0, snaps0 = time.perf_counter(), fz.snaps
        a.z_um, a.sharpness, a.reason = None, None, ""
        self._sharpness.pop(a.index, None)
        near: tuple[float, np.ndarray] | None = None  # a full frame near focus
        try:
            fz.move_xy(a.x_um, a.y_um)
            z = self._hardware(center, half_range) if hardware else None
            if z is not None:
                a.source = "hardware"
            else:
                if hardware and s.autofocus_device:
                    self.fallbacks += 1
                a.source = "software"
                if predicted:  # its middle plane is a full frame (sharpness)
                    step = s.predicted_step_um
                    search = fz.search(
                        center, step, step=step, reach=2 * half_range, full_at=center
                    )
                else:
                    search = fz.search(center, half_range)
                if search.z is None and fallback is not None:
                    search = fz.search(fallback, s.search_range_um)
                z, near = search.z, search.frame
                a.reason = search.reason
            if z is not None:
                a.z_um = round(z, 3)
                # within the depth of field a frame this close is as sharp
                if near is None or abs(near[0] - z) > s.fine_step_um:
                    near = (z, fz.snap_at(z))
                self._judge_later(a, near[1])
                a.status = "ok" if a.status == "pending" else a.status
            else:
                a.status = "failed"
        except Exception as e:  # a device error fails this anchor, not the map
            a.status, a.reason = "failed", f"{type(e).__name__}: {e}"
        a.snaps += fz.snaps - snaps0
        a.seconds = round(a.seconds + time.perf_counter() - t0, 3)

    def _judge_later(self, a: Anchor, image: np.ndarray) -> None:
        """The anchor's sharpness (the per-field QC's reference), measured on
        the helper thread; at once when there is none."""
        if self._judge is None:
            a.sharpness = field_sharpness(image).sharpness
            return
        self._sharpness[a.index] = self._judge.submit(
            lambda: field_sharpness(image).sharpness
        )

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

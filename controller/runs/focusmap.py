"""The focus-map step of a scan: reuse the recorded map, or measure one.

A recorded map (``focus_map.json``) is reused when it was measured with the
same focus settings (`SEARCH_ONLY` settings aside: they say how finely or
quickly z was searched for, not which map), or whenever fields were stored
with it (they must keep the z they were imaged at). A new map is measured on
a supervised thread under the run's watchdog, checked against the focus
limits, then written durably before any field is imaged.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from controller.acquisition.plan import ScanPlan
from controller.config import InstrumentConfig
from controller.errors import (
    ConfigError,
    FocusCanceled,
    FocusError,
    HardwareHangError,
    StorageError,
)
from controller.focus.mapper import FocusMapper
from controller.focus.surface import FocusMap
from controller.hardware.facade import Hardware
from controller.records import FocusFailed, FocusMapRecorded, Stopped, Written
from controller.runs.watchdog import Watchdog
from controller.runstore.folder import RunFolder
from controller.runstore.ledger import RunLog
from controller.supervise import Supervisor

__all__ = ["FocusMapStep"]

logger = logging.getLogger("ctcscan.focus")

#: focus settings of the search alone: a map recorded with other values of
#: these (or before they existed) is still the map these settings would measure
SEARCH_ONLY = frozenset(
    {"coarse_step_um", "fine_step_um", "predicted_step_um", "roi_px", "anchor_order"}
)


def same_map_settings(recorded: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether a map recorded with `recorded` settings is the one `settings`
    would measure (both as ``FocusSettings.model_dump(mode="json")``)."""

    def key(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in SEARCH_ONLY}

    return key(recorded) == key(settings)


class FocusMapStep:
    """Obtains a run's focus map; see the module docstring."""

    def __init__(
        self,
        folder: RunFolder,
        instrument: InstrumentConfig,
        log: RunLog,
        hw: Hardware,
        *,
        cancel: threading.Event,
    ) -> None:
        self.folder = folder
        self.instrument = instrument
        self.log = log
        self.hw = hw
        self.cancel = cancel

    def run(
        self,
        plan: ScanPlan,
        *,
        resuming: bool,
        supervisor: Supervisor,
        watchdog: Watchdog,
    ) -> tuple[FocusMap | None, ScanPlan, bool]:
        """(map, plan with each field's z, reused); map None when canceled.

        Raises
        ------
        FocusError, ConfigError
            No map could be measured, or it lies outside the focus limits
            (a `FocusFailed` record says why).
        HardwareHangError
            A hardware call hung while measuring (a `Stopped` record).
        """
        folder, settings = self.folder, self.instrument.focus
        if not settings.enabled:
            fmap = FocusMap.flat(settings)
            return fmap, plan.with_focus(fmap.z_of, self.instrument), False
        recorded = self._recorded(plan, resuming)
        if recorded is not None:
            return recorded
        mapper = FocusMapper(
            self.hw,
            self.instrument,
            plan.layout,
            (plan.fov_width_um, plan.fov_height_um),
            sink=self.log,
            # a hang stops the map too, should the hung call ever return
            should_stop=lambda: self.cancel.is_set() or watchdog.hung.is_set(),
        )
        try:
            fmap = self._measure(mapper, supervisor, watchdog)
            planned = plan.with_focus(fmap.z_of, self.instrument)
        except FocusCanceled:
            self.log.emit(Stopped(canceled=True, during="focus map"))
            return None, plan, False
        except HardwareHangError as e:
            self.log.emit(Stopped(canceled=False, error=str(e), during="focus map"))
            raise
        except (FocusError, ConfigError) as e:
            self.log.emit(FocusFailed(reason=str(e)))
            raise
        fmap.settings = settings.model_dump(mode="json")
        folder.write_json(folder.focus_map_json, fmap.as_dict())
        self.log.emit(Written(files=folder.digests(folder.focus_map_json.name)))
        used = sum(a.usable for a in fmap.anchors)
        self.log.emit(
            FocusMapRecorded(
                reused=False,
                model=fmap.fit.model,
                anchors=len(fmap.anchors),
                used=used,
                rms_um=fmap.rms_um,
                seconds=fmap.seconds,
                warnings=fmap.warnings,
            )
        )
        for w in fmap.warnings:
            logger.warning("%s", w)
        return fmap, planned, False

    def _recorded(
        self, plan: ScanPlan, resuming: bool
    ) -> tuple[FocusMap, ScanPlan, bool] | None:
        folder, settings = self.folder, self.instrument.focus
        recorded = folder.read_json(folder.focus_map_json)
        if recorded is None:
            return None
        folder.check_as_written(folder.focus_map_json.name)  # not edited since
        try:
            fmap = FocusMap.from_dict(recorded)
            planned = plan.with_focus(fmap.z_of, self.instrument)
        except (KeyError, TypeError, ValueError) as e:
            raise StorageError(
                f"{folder.focus_map_json}: not a usable focus map ({e}); "
                "remove it to measure the focus map again"
            ) from None
        same = same_map_settings(fmap.settings, settings.model_dump(mode="json"))
        if not (same or resuming):
            logger.warning("focus settings changed since the map was measured")
            return None
        if not same:
            logger.warning(
                "focus settings changed since this run began; the run keeps its "
                "recorded focus map"
            )
        self.log.emit(FocusMapRecorded(reused=True, model=fmap.fit.model))
        return fmap, planned, True

    def _measure(
        self, mapper: FocusMapper, supervisor: Supervisor, watchdog: Watchdog
    ) -> FocusMap:
        """Measure on a thread; the caller's thread waits under the watchdog."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["map"] = mapper.build()
            except BaseException as e:  # handed to the waiting thread
                box["error"] = e

        thread = threading.Thread(target=target, name="ctcscan-focus", daemon=True)
        thread.start()
        while thread.is_alive():
            try:
                supervisor.join(thread, abandon=watchdog.hung.is_set)
            except KeyboardInterrupt:  # stop between anchors, like cancel()
                self.cancel.set()
                continue
            if watchdog.error is not None:
                raise watchdog.error
        if "error" in box:
            raise box["error"]
        return box["map"]

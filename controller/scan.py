"""One cartridge scan, from request to run folder, resumable.

`Scan.run` plans the fields, skips those already stored and verified in the run
folder, checks the disk, opens the instrument, and runs the MDA sequence of the
remaining fields on its own thread:

    frameReady -> FieldAssembler -> StoreWorker (bounded) -> FieldStore + ledger
                                                   '-> DetectorFeed.offer (never blocks)

`Scan.cancel` (or Ctrl-C in the CLI) stops after the current frame; every stored
field stays stored, and running the same request again resumes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from analysis.pipeline import FieldJob
from analysis.report import write_outputs
from controller import __version__
from controller.assembler import AssembledField, FieldAssembler
from controller.audit import AuditLog, config_hash
from controller.config import AssayConfig, InstrumentConfig
from controller.detector import OnlineDetector, load_records
from controller.engine import ScanEngine
from controller.errors import (
    ConfigError,
    HardwareHangError,
    ScannerError,
    StorageError,
)
from controller.focus import (
    FieldFocus,
    FocusCanceled,
    Focuser,
    FocusError,
    FocusMap,
    FocusMapper,
    FocusQC,
    anchor_positions,
)
from controller.instrument import open_instrument
from controller.layouts import CartridgeLayout
from controller.plan import FieldSpec, ScanPlan
from controller.store import (
    FieldStore,
    LedgerState,
    RunFolder,
    StoredField,
    StoreWorker,
)

__all__ = ["Scan", "ScanRequest", "ScanResult"]

logger = logging.getLogger("ctcscan.scan")

#: Extra room asked of the disk beyond the raw pixels (metadata, ledger, results).
_DISK_MARGIN_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class ScanRequest:
    """What to scan and where to put it."""

    instrument: InstrumentConfig
    layout: CartridgeLayout
    out: Path
    assay: AssayConfig = field(default_factory=AssayConfig)
    instrument_file: str = ""
    cartridge_id: str | None = None
    seed: int | None = None
    n_fields: int | None = None
    operator: str | None = None

    @property
    def cartridge(self) -> str:
        return self.cartridge_id or Path(self.out).resolve().name


@dataclass
class ScanResult:
    """Outcome of one `Scan.run`."""

    run_dir: Path
    cartridge_id: str
    planned: int
    resumed: int = 0
    stored: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    detected: int = 0
    detect_failed: int = 0
    max_detect_backlog: int = 0
    report: dict[str, Any] = field(default_factory=dict)
    frames: int = 0
    duration_s: float = 0.0
    canceled: bool = False
    focus_map: FocusMap | None = None
    focus_map_reused: bool = False
    focus_qc_s: float = 0.0
    refocused: list[str] = field(default_factory=list)

    @property
    def focus_s(self) -> float:
        """Time spent on focus: the map (if measured now) and the per-field QC."""
        fmap = (
            0.0
            if self.focus_map is None or self.focus_map_reused
            else (self.focus_map.seconds)
        )
        return fmap + self.focus_qc_s

    @property
    def complete(self) -> bool:
        return not self.canceled and self.resumed + self.stored == self.planned

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.duration_s if self.duration_s else 0.0


def _versions() -> dict[str, str]:
    out = {"ctcscan": __version__}
    for pkg in ("pymmcore-plus", "pymmcore", "useq-schema", "numpy", "tifffile"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class Scan:
    """A resumable scan of one cartridge.

    Parameters
    ----------
    request : ScanRequest
        What to scan.
    detector_workers : int, optional
        Worker processes of the on-line detector; 0 detects on a thread of this
        process. Default: 1 when the machine has a second core, else 0.
    run_job : callable, optional
        The per-field analysis (default `analysis.pipeline.analyze_field_file`).
    on_start : callable, optional
        ``on_start(total_fields, already_stored)`` once the plan is known.
    on_field : callable, optional
        ``on_field(name, status)`` with status ``stored``, ``failed``,
        ``detected`` or ``detect_failed``; called from worker threads.
    on_focus : callable, optional
        ``on_focus(done, total)`` while the focus map's anchors are measured.
    """

    def __init__(
        self,
        request: ScanRequest,
        *,
        detector_workers: int | None = None,
        run_job: Callable[[FieldJob], Mapping[str, Any]] | None = None,
        on_start: Callable[[int, int], None] | None = None,
        on_field: Callable[[str, str], None] | None = None,
        on_focus: Callable[[int, int], None] | None = None,
    ) -> None:
        self.request = request
        if detector_workers is None:
            detector_workers = 1 if (os.cpu_count() or 1) >= 2 else 0
        self.detector_workers = detector_workers
        self.run_job = run_job
        self.on_start = on_start
        self.on_field = on_field
        self.on_focus = on_focus
        self.folder = RunFolder(request.out)
        self._cancel = threading.Event()
        self._cancel_reason = ""
        #: a hardware call hung: the instrument must not be touched again
        self.hung = False
        self.audit = AuditLog(self.folder.root / "audit.log", request.operator)
        self._core: Any = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ control

    def cancel(self, reason: str = "stop requested") -> None:
        """Stop after the current frame; what is stored stays stored."""
        if not self._cancel.is_set():
            self._cancel_reason = reason
        self._cancel.set()
        if self._core is not None:
            self._core.mda.cancel()

    # ------------------------------------------------------------------ run

    def run(self) -> ScanResult:
        """Scan (or resume) the cartridge; see the class docstring."""
        self.folder.prepare()
        self._audit_start()
        try:
            result = self._run()
        except KeyboardInterrupt:
            self.audit.write("STOP", "interrupted by the operator (Ctrl-C); resumable")
            raise
        except BaseException as e:
            self.audit.write("ERROR", f"{type(e).__name__}: {e}")
            raise
        if result.complete:
            self.audit.write(
                "FINISH",
                f"{result.stored} fields stored now, {result.resumed} before; "
                f"{len(result.failed)} failed; CTC count "
                f"{result.report.get('ctc_count', '?')}",
            )
        else:
            why = self._cancel_reason or "incomplete"
            self.audit.write(
                "STOP",
                f"{why}; {result.stored} fields stored now, {result.resumed} before, "
                f"{len(result.failed)} failed; resumable",
            )
        return result

    def _audit_start(self) -> None:
        req = self.request
        inst_file = Path(req.instrument_file) if req.instrument_file else None
        digest = config_hash(
            req.instrument.model_dump(mode="json"),
            inst_file,
            Path(req.instrument.micromanager_config),
            req.assay.model_dump(mode="json"),
            req.layout.model_dump(mode="json"),
        )
        resuming = self.folder.scan_json.exists()
        self.audit.write(
            "RESUME" if resuming else "START",
            f"scan of cartridge {req.cartridge} into {self.folder.root}: "
            f"ctcscan {__version__}, instrument {req.instrument.name} "
            f"({req.instrument_file or 'in memory'}), layout {req.layout.name}, "
            f"fields {req.n_fields or 'all'}, seed {self._seed()}, "
            f"config sha256 {digest}",
        )

    def _run(self) -> ScanResult:
        req, folder = self.request, self.folder
        plan = ScanPlan.build(req.layout, req.instrument, n_fields=req.n_fields)
        self._check_same_scan(plan)
        state = LedgerState.from_records(folder.ledger.read())
        done = self._verified(state)
        remaining = [f for f in plan.fields if f.name not in done]
        cam = req.instrument.camera
        needed = len(remaining) * len(plan.channels) * cam.width * cam.height * 2
        folder.check_free_space(int(needed * 1.02) + _DISK_MARGIN_BYTES)

        instrument = open_instrument(
            req.instrument, req.layout, seed=req.seed, source=req.instrument_file
        )
        try:
            return self._run_on(instrument, plan, state, done, remaining)
        finally:
            if not self.hung:  # unloading a hung device would hang too
                instrument.close()

    def _run_on(
        self,
        instrument: Any,
        plan: ScanPlan,
        state: LedgerState,
        done: set[str],
        remaining: list[FieldSpec],
    ) -> ScanResult:
        req, folder = self.request, self.folder
        core = instrument.core
        cam = req.instrument.camera
        if (core.getImageWidth(), core.getImageHeight()) != (cam.width, cam.height):
            raise ConfigError(
                f"{req.instrument_file or req.instrument.name}: camera delivers "
                f"{core.getImageWidth()} x {core.getImageHeight()} px, config says "
                f"{cam.width} x {cam.height}"
            )
        try:
            fmap, plan, reused = self._focus_map(instrument, plan, bool(done))
        except FocusCanceled:
            result = ScanResult(folder.root, req.cartridge, len(plan.fields))
            result.resumed, result.canceled = len(done), True
            return result
        by_name = plan.by_name()
        remaining = [by_name[f.name] for f in remaining]
        self._write_scan_json(plan, instrument)
        if instrument.simulated:
            truth = instrument.ground_truth(
                [(f.name, f.x_um, f.y_um) for f in plan.fields]
            )
            folder.write_json(folder.ground_truth_json, truth)
        if done:
            folder.ledger.append(
                "resumed", skipped=len(done), remaining=[f.name for f in remaining]
            )
        else:
            folder.ledger.append(
                "planned",
                fields=[f.name for f in plan.fields],
                channels=list(plan.channel_names),
            )

        result = ScanResult(
            folder.root,
            req.cartridge,
            len(plan.fields),
            resumed=len(done),
            focus_map=fmap,
            focus_map_reused=reused,
        )
        if self.on_start is not None:
            self.on_start(len(plan.fields), len(done))

        detector = self._detector(result)
        detector.add_backlog(
            f.name
            for f in plan.fields
            if f.name in done
            and not (
                f.name in state.detected and folder.detection_path(f.name).exists()
            )
        )
        lock = threading.Lock()

        def stored(fld: AssembledField, info: StoredField) -> None:
            with lock:
                result.stored += 1
            detector.offer(info.name)
            if self.on_field is not None:
                self.on_field(info.name, "stored")

        def failed(spec: FieldSpec, reason: str, attempts: int) -> None:
            folder.ledger.append(
                "failed", field=spec.name, reason=reason, attempts=attempts
            )
            self.audit.write(
                "FIELD-FAILED", f"{spec.name} after {attempts} attempts: {reason}"
            )
            with lock:
                result.failed[spec.name] = reason
            if self.on_field is not None:
                self.on_field(spec.name, "failed")

        writer = StoreWorker(
            FieldStore(folder, req.instrument.pixel_size_um), on_stored=stored
        )

        def deliver(fld: AssembledField) -> None:
            try:
                writer.put(fld)
            except StorageError as e:  # disk trouble: stop cleanly, stay resumable
                self._fail_run(e)

        def focused(event: Any, info: FieldFocus) -> None:
            name = remaining[event.index.get("p", 0)].name
            if info.refocused:  # both acquisitions of the focus channel
                result.refocused.append(name)
                d = info.as_dict()
                folder.ledger.append(
                    "refocused",
                    field=name,
                    first={
                        "z_um": d["z_planned_um"],
                        "sharpness": d["first_sharpness"],
                    },
                    second={
                        "z_um": d["second_z_um"],
                        "sharpness": d["second_sharpness"],
                    },
                    kept="first" if d["z_um"] == d["z_planned_um"] else "second",
                    reason=d["reason"],
                    search_snaps=d["search_snaps"],
                    seconds=d["seconds"],
                )

        assembler = FieldAssembler(remaining, plan.channel_names, deliver, failed)
        qc = None
        if fmap.enabled and req.instrument.focus.qc and fmap.reference_sharpness:
            qc = FocusQC(Focuser(core, req.instrument), fmap.reference_sharpness)
        engine = ScanEngine(
            core,
            snap_retries=req.instrument.snap_retries,
            move_retries=req.instrument.move_retries,
            on_failure=assembler.failure,
            focus_qc=qc,
            on_focus=focused,
            on_event=self.audit.write,
            saturation=float(2**req.instrument.camera.bit_depth - 1),
        )
        core.mda.set_engine(engine)
        t0 = time.perf_counter()
        try:
            if remaining and not self._cancel.is_set():
                self._acquire(core, plan, remaining, assembler, writer, engine)
        finally:
            writer.close()
            stats = detector.close()
        if writer.error is not None and self._error is None:
            self._error = writer.error
        result.duration_s = time.perf_counter() - t0
        result.focus_qc_s = qc.seconds if qc is not None else 0.0
        result.frames = result.stored * len(plan.channels)
        result.detected, result.detect_failed = stats["detected"], stats["failed"]
        result.max_detect_backlog = stats["max_backlog"]
        result.canceled = self._cancel.is_set() or self._error is not None
        if self._error is None:
            result.report = self._write_outputs(plan, result)
        folder.ledger.append(
            "finished" if result.complete else "stopped",
            stored=result.stored,
            resumed=result.resumed,
            failed=sorted(result.failed),
            canceled=result.canceled,
            error=str(self._error) if self._error else None,
            duration_s=round(result.duration_s, 3),
            focus_s=round(result.focus_s, 3),
            refocused=result.refocused,
        )
        if self._error is not None:
            if isinstance(self._error, ScannerError):
                raise self._error
            raise ScannerError(f"scan stopped: {self._error}") from self._error
        return result

    def _detector(self, result: ScanResult) -> OnlineDetector:
        req, folder = self.request, self.folder
        saturation = float(2**req.instrument.camera.bit_depth - 1)

        def make_job(name: str) -> FieldJob:
            return FieldJob(
                path=str(folder.field_path(name)),
                name=name,
                out_dir=str(folder.root),
                settings=req.assay.detection,
                roles=dict(req.assay.channels),
                pixel_size_um=req.instrument.pixel_size_um,
                saturation=saturation,
            )

        def on_result(name: str, record: Mapping[str, Any]) -> None:
            if self.on_field is not None:
                self.on_field(name, "detected")

        def on_failed(name: str, reason: str) -> None:
            self.audit.write("DETECT-FAILED", f"{name}: {reason}")
            if self.on_field is not None:
                self.on_field(name, "detect_failed")

        kwargs: dict[str, Any] = {}
        if self.run_job is not None:
            kwargs["run_job"] = self.run_job
        return OnlineDetector(
            folder,
            make_job,
            workers=self.detector_workers,
            on_result=on_result,
            on_failed=on_failed,
            **kwargs,
        )

    def _write_outputs(self, plan: ScanPlan, result: ScanResult) -> dict[str, Any]:
        """events.csv, report.json, report.html from the fields' detections."""
        req, folder = self.request, self.folder
        names = [f.name for f in plan.fields]
        state = LedgerState.from_records(folder.ledger.read())
        failed = {
            n: str(r.get("reason", ""))
            for n, r in state.failed.items()
            if n in names and n not in state.stored
        }
        return write_outputs(
            folder.root,
            load_records(folder, names),
            {
                "cartridge_id": req.cartridge,
                "indication": req.assay.indication,
                "cutoff": req.assay.cutoff,
                "blood_volume_ml": req.assay.blood_volume_ml,
                "fields_planned": names,
                "cartridge_fields": plan.layout.n_fields,
                "fields_failed": failed,
                "source": str(folder.root),
                "extra_qc": {
                    "acquisition_seconds": round(result.duration_s, 2),
                    "focus_seconds": round(result.focus_s, 2),
                },
                "focus": self._focus_report(plan, state, result),
            },
        )

    def _focus_report(
        self, plan: ScanPlan, state: LedgerState, result: ScanResult
    ) -> dict[str, Any] | None:
        """The focus section of the report: map, anchors, per-field focus."""
        fmap = result.focus_map
        if fmap is None:
            return None
        fields = []
        for f in plan.fields:
            rec = state.stored.get(f.name) or {}
            foc = rec.get("focus") or {}
            fields.append(
                {
                    "name": f.name,
                    "x_um": f.x_um,
                    "y_um": f.y_um,
                    "z_planned_um": f.z_um,
                    "z_um": foc.get("z_um", (rec.get("stage") or {}).get("z_um")),
                    "sharpness": foc.get("sharpness"),
                    "refocused": bool(foc.get("refocused")),
                }
            )
        map_s = 0.0 if result.focus_map_reused else fmap.seconds
        ref = fmap.reference_sharpness
        return {
            "enabled": fmap.enabled,
            "model": fmap.fit.model,
            "reused": result.focus_map_reused,
            "rms_um": fmap.rms_um,
            "max_residual_um": fmap.max_residual_um,
            "warnings": fmap.warnings,
            "reference_sharpness": ref,
            "threshold": (
                None
                if ref is None
                else ref * self.request.instrument.focus.qc_min_relative
            ),
            "map_seconds": round(map_s, 3),
            "qc_seconds": round(result.focus_qc_s, 3),
            "seconds": round(result.focus_s, 3),
            "fov_um": [plan.fov_width_um, plan.fov_height_um],
            "anchors": [
                {
                    **{
                        k: getattr(a, k)
                        for k in ("index", "x_um", "y_um", "z_um", "status", "source")
                    },
                    "used": a.usable,
                }
                for a in fmap.anchors
            ],
            "fields": fields,
        }

    def _acquire(
        self,
        core: Any,
        plan: ScanPlan,
        remaining: list[FieldSpec],
        assembler: FieldAssembler,
        writer: StoreWorker,
        engine: ScanEngine,
    ) -> None:
        """Run the MDA on our own thread; watch for cancel, storage errors and
        hardware calls that do not return (the watchdog)."""
        sequence = plan.to_sequence(remaining)
        core.mda.events.frameReady.connect(assembler.frame_ready)
        self._core = core

        def target() -> None:
            try:
                core.mda.run(sequence)
            except BaseException as e:  # a lost thread exception is a lost scan
                self._error = e

        thread = threading.Thread(target=target, name="ctcscan-mda", daemon=True)
        thread.start()
        longest_exposure = max(c.exposure_ms for c in plan.channels) / 1000
        try:
            while thread.is_alive():
                thread.join(timeout=0.1)
                if writer.error is not None:
                    self._fail_run(writer.error)
                if hang := self._hang(engine.calls.busy, longest_exposure):
                    self._fail_run(hang)
                    break  # the call cannot be interrupted; do not wait on it
        except KeyboardInterrupt:
            self.cancel("interrupted by the operator (Ctrl-C)")
            thread.join()
        finally:
            core.mda.events.frameReady.disconnect(assembler.frame_ready)
            self._core = None

    def _hang(
        self, busy: tuple[float, str] | None, allowance_s: float
    ) -> HardwareHangError | None:
        """The watchdog: the error for a hardware call running too long, if any."""
        if busy is None:
            return None
        started, what = busy
        waited = time.monotonic() - started
        limit = self.request.instrument.watchdog_s
        if waited <= limit + allowance_s:
            return None
        self.hung = True
        return HardwareHangError(
            f"{what} has not returned after {waited:.0f} s (watchdog {limit:g} s): "
            "check the instrument, then run the same command again to resume"
        )

    def _watched_focus_map(self, mapper: FocusMapper) -> FocusMap:
        """Measure the focus map on a thread, under the watchdog."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["map"] = mapper.build()
            except BaseException as e:  # handed to the caller's thread
                box["error"] = e

        thread = threading.Thread(target=target, name="ctcscan-focus", daemon=True)
        thread.start()
        exposure = max(c.exposure_ms for c in self.request.instrument.channels) / 1000
        interrupted = False
        while thread.is_alive():
            try:
                thread.join(timeout=0.1)
            except KeyboardInterrupt:  # stop between anchors, like cancel()
                interrupted = True
                self.cancel("interrupted by the operator (Ctrl-C)")
            if hang := self._hang(mapper.busy, exposure):
                raise hang  # the call cannot be interrupted; do not wait on it
        if "error" in box:
            if interrupted and isinstance(box["error"], FocusCanceled):
                raise KeyboardInterrupt
            raise box["error"]
        return box["map"]

    def _fail_run(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if self._core is not None:
            self._core.mda.cancel()

    # ------------------------------------------------------------------ focus

    def _focus_map(
        self, instrument: Any, plan: ScanPlan, resuming: bool
    ) -> tuple[FocusMap, ScanPlan, bool]:
        """The run's focus map and the plan with each field's z from it.

        A recorded map (``focus_map.json``) is reused when it was measured with
        the same focus settings, or whenever fields were stored with it (they
        must keep the z they were imaged at). A new map is checked against the
        focus limits, then written durably before any field is imaged.
        """
        req, folder = self.request, self.folder
        settings = req.instrument.focus
        if not settings.enabled:
            fmap = FocusMap.flat(settings)
            return fmap, plan.with_focus(fmap.z_of, req.instrument), False
        recorded = folder.read_json(folder.focus_map_json)
        if recorded is not None:
            try:
                fmap = FocusMap.from_dict(recorded)
                planned = plan.with_focus(fmap.z_of, req.instrument)
            except (KeyError, TypeError, ValueError) as e:
                raise StorageError(
                    f"{folder.focus_map_json}: not a usable focus map ({e}); "
                    "remove it to measure the focus map again"
                ) from None
            same = fmap.settings == settings.model_dump(mode="json")
            if same or resuming:
                if not same:
                    logger.warning(
                        "focus settings changed since this run began; the run "
                        "keeps its recorded focus map"
                    )
                folder.ledger.append("focus_map", reused=True, model=fmap.fit.model)
                return fmap, planned, True
            logger.warning("focus settings changed since the map was measured")
        fov = (plan.fov_width_um, plan.fov_height_um)
        total = len(anchor_positions(plan.layout, *fov, settings))
        done = 0

        def anchor_done(_: Any) -> None:
            nonlocal done
            done += 1
            if self.on_focus is not None:
                self.on_focus(done, total)

        mapper = FocusMapper(
            instrument.core,
            req.instrument,
            plan.layout,
            fov,
            on_anchor=anchor_done,
            should_stop=self._cancel.is_set,
        )
        try:
            fmap = self._watched_focus_map(mapper)
            planned = plan.with_focus(fmap.z_of, req.instrument)
        except FocusCanceled:
            folder.ledger.append("stopped", canceled=True, during="focus map")
            raise
        except KeyboardInterrupt:
            folder.ledger.append("stopped", canceled=True, during="focus map")
            raise
        except HardwareHangError as e:
            folder.ledger.append("stopped", canceled=False, error=str(e))
            raise
        except (FocusError, ConfigError) as e:
            folder.ledger.append("focus_failed", reason=str(e))
            raise
        fmap.settings = settings.model_dump(mode="json")
        folder.write_json(folder.focus_map_json, fmap.as_dict())
        folder.ledger.append(
            "focus_map",
            reused=False,
            model=fmap.fit.model,
            anchors=len(fmap.anchors),
            used=sum(a.usable for a in fmap.anchors),
            rms_um=fmap.rms_um,
            seconds=fmap.seconds,
            warnings=fmap.warnings,
        )
        self.audit.write(
            "FOCUS",
            f"focus map measured: {fmap.fit.model} from "
            f"{sum(a.usable for a in fmap.anchors)}/{len(fmap.anchors)} anchors, "
            f"rms {fmap.rms_um:.2f} um, {fmap.seconds:.1f} s",
        )
        for w in fmap.warnings:
            logger.warning("%s", w)
            self.audit.write("WARNING", w)
        return fmap, planned, False

    # ------------------------------------------------------------------ helpers

    def _verified(self, state: LedgerState) -> set[str]:
        """Fields the ledger calls stored whose files still hash correctly."""
        ok = set()
        for name, rec in state.stored.items():
            if self.folder.verify(name, rec.get("sha256", "")):
                ok.add(name)
            else:
                self.folder.ledger.append(
                    "corrupt", field=name, reason="file missing or checksum mismatch"
                )
        return ok

    def _check_same_scan(self, plan: ScanPlan) -> None:
        prev = self.folder.read_scan_json()
        if prev is None:
            return
        req = self.request
        mine = {
            "cartridge_id": req.cartridge,
            "layout": plan.layout.name,
            "seed": self._seed(),
            "channels": list(plan.channel_names),
        }
        theirs = {k: prev.get("request", {}).get(k) for k in mine}
        if theirs != mine:
            diff = ", ".join(
                f"{k}: {theirs[k]!r} there, {mine[k]!r} now"
                for k in mine
                if theirs[k] != mine[k]
            )
            raise StorageError(
                f"{self.folder.root} holds a different scan ({diff}); "
                "choose another --out to start a new one"
            )

    def _seed(self) -> int | None:
        sim = self.request.instrument.simulation
        if sim is None:
            return None
        return sim.seed if self.request.seed is None else self.request.seed

    def _write_scan_json(self, plan: ScanPlan, instrument: Any) -> None:
        req = self.request
        core = instrument.core
        data = {
            "request": {
                "cartridge_id": req.cartridge,
                "layout": plan.layout.name,
                "seed": self._seed(),
                "fields": req.n_fields,
                "instrument_file": req.instrument_file,
                "channels": list(plan.channel_names),
            },
            "software": _versions(),
            "layout": plan.layout.model_dump(mode="json"),
            "instrument": req.instrument.model_dump(mode="json"),
            "assay": req.assay.model_dump(mode="json"),
            "devices": {
                "camera": core.getCameraDevice(),
                "xy_stage": core.getXYStageDevice(),
                "focus": core.getFocusDevice(),
                "shutter": core.getShutterDevice(),
                "simulated": instrument.simulated,
            },
            "pixel_size_um": req.instrument.pixel_size_um,
            "fov_um": [plan.fov_width_um, plan.fov_height_um],
            "fields": [f.as_dict() for f in plan.fields],
        }
        self.folder.write_json(self.folder.scan_json, data)

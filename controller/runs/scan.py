"""One cartridge scan, from request to run folder, resumable.

`Scan.run` takes the run folder's lock, plans the fields, skips those already
stored and verified, checks the disk, opens the instrument (or uses the one it
was given), measures or reuses the focus map, and runs the MDA sequence of the
remaining fields on a supervised thread:

    frameReady -> FieldAssembler -> StoreWorker (bounded) -> FieldStore -> Stored
    Stored record -> RunLog (ledger line, then the run's events)
                       '-> OnlineDetector.on_record (never blocks) -> Detected

Everything the run does is a typed record (`controller.records`) written to the
ledger and published on `Scan.events`; the CLI's progress bars, the audit log
and the result's tally subscribe to it. One `Supervisor` watches the threads
(acquisition, storage, detection, the watchdog): the first to die stops the
run with its error. `Scan.cancel` (Ctrl-C, SIGTERM, SIGHUP in the CLI) stops
after the current frame; every stored field stays stored, and running the same
request again resumes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import useq

from analysis.pipeline import FieldJob
from analysis.report import OUTPUT_FILES, Report
from analysis.stitch import default_affine
from controller import __version__
from controller.acquisition.assembler import FieldAssembler
from controller.acquisition.engine import ScanEngine
from controller.acquisition.plan import FieldSpec, ScanPlan
from controller.config import AssayConfig, InstrumentConfig
from controller.errors import (
    ConfigError,
    FocusError,
    HardwareHangError,
    ScannerError,
    StorageError,
)
from controller.events import EventStream
from controller.focus.mapper import Focuser
from controller.focus.qc import FocusQC
from controller.focus.surface import FocusMap
from controller.hardware.facade import Hardware, RetryPolicy
from controller.hardware.instrument import Instrument, open_instrument
from controller.heap import release_free_memory
from controller.layouts import CartridgeLayout
from controller.records import (
    Corrupt,
    Failed,
    Finished,
    Planned,
    Record,
    Refocused,
    Resumed,
    Started,
    Stopped,
    Stored,
    Written,
)
from controller.runs.detector import OnlineDetector
from controller.runs.focusmap import FocusMapStep
from controller.runs.outputs import DetectionCache, write_scan_outputs
from controller.runs.watchdog import Watchdog
from controller.runstore.audit import AuditLog, AuditTrail, config_hash
from controller.runstore.fieldstore import AssembledField, FieldStore, StoreWorker
from controller.runstore.folder import RunFolder, check_ours
from controller.runstore.ledger import LedgerState, RunLog
from controller.runstore.lock import FolderLock
from controller.runstore.omexml import OmeXml
from controller.supervise import Supervisor

__all__ = ["Scan", "ScanRequest", "ScanResult"]

logger = logging.getLogger("ctcscan.scan")

#: Extra room asked of the disk beyond the raw pixels (metadata, ledger, results).
_DISK_MARGIN_BYTES = 64 * 1024**2

#: How long a thread may hold the GIL while another waits for it, during a scan
#: (CPython's default is 5 ms). The device thread's every numpy call gives the
#: GIL up and takes it back; behind a thread running Python (storage, the
#: detector's results) each take could wait the whole interval: a 20 ms
#: exposure's frame took 14 ms to simulate instead of 5 (9 ms at 0.5 ms).
_SWITCH_INTERVAL_S = 0.0005


class _NoEventLines(logging.Filter):
    """Drops pymmcore-plus's line per MDA event (its runner logs every event's
    full repr to its DEBUG log file: 0.4-1 ms an event on the acquisition
    thread); the ledger records each field, and every other line passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            record.msg == "%s"
            and isinstance(args, tuple)
            and len(args) == 1
            and isinstance(args[0], useq.MDAEvent)
        )


class _Ahead:
    """A piece of the run's end done on its own thread, started once by
    whichever comes first (`start` is safe from any thread); `join` waits
    and returns its result; what it raised is kept in `error`."""

    def __init__(self, work: Callable[[], StorageError | None]) -> None:
        self._work = work
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._result: StorageError | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="ctcscan-ahead")
            self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._work()
        except BaseException as e:  # raised on the run's thread
            self.error = e

    def join(self) -> StorageError | None:
        self.start()
        assert self._thread is not None
        self._thread.join()
        return self._result


def _once_at_position(
    signal: Any, position: int, action: Callable[[], None]
) -> Callable[[], None]:
    """Connect to `signal` (``frameReady``) a slot that calls `action` at the
    first frame of position `position` and disconnects itself first, so the
    frames after it pass through no check of it. Returns the disconnect, for
    the end of the run: done once, whoever comes first, and never while
    holding a lock of ours (the slot runs inside the emission).

    psygnal emits to a copy of its slots under a reentrant lock: a slot may
    disconnect itself while it is called, and the slots after it still get
    that frame."""
    lock = threading.Lock()
    connected = [True]

    def disconnect() -> None:
        with lock:
            first, connected[0] = connected[0], False
        if first:
            signal.disconnect(slot)

    def slot(_img: Any, event: Any, _meta: Any) -> None:
        if event.index.get("p", 0) == position:
            disconnect()
            action()

    signal.connect(slot)
    return disconnect


@contextlib.contextmanager
def _device_thread_first() -> Iterator[None]:
    """The GIL's switch interval at `_SWITCH_INTERVAL_S` (never longer than it
    was) for the block; the process's own setting afterwards."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, _SWITCH_INTERVAL_S))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


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

    @property
    def simulated_seed(self) -> int | None:
        """The seed of the simulated cartridge (None on real hardware)."""
        sim = self.instrument.simulation
        if sim is None:
            return None
        return sim.seed if self.seed is None else self.seed


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
    report: Report | None = None
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

    def tally(self, r: Record) -> None:
        """Event subscriber: count what the run stores, fails and re-focuses."""
        if isinstance(r, Stored):
            self.stored += 1
            self.failed.pop(r.field, None)
        elif isinstance(r, Failed):
            self.failed[r.field] = r.reason
        elif isinstance(r, Refocused):
            self.refocused.append(r.field)


def _first_difference(then: Any, now: Any, path: str = "") -> str | None:
    """Where the settings `now` differ from those recorded, `then`: ``"key.sub:
    A there, B now"``, or None. Keys of a mapping that only one side has are
    left out (a setting a later version added, or dropped); nothing recorded
    (not a mapping where one is expected) is no difference."""
    if isinstance(then, dict) and isinstance(now, dict):
        for k in sorted(set(then) & set(now), key=str):
            sub = f"{path}.{k}" if path else str(k)
            if (d := _first_difference(then[k], now[k], sub)) is not None:
                return d
        return None
    if then is None or (isinstance(now, dict) and not isinstance(then, dict)):
        return None
    if then != now:
        return f"{path or 'value'}: {then!r} there, {now!r} now"
    return None


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
    instrument : Instrument, optional
        An instrument the caller opened (and closes): a queue's, or one on a
        core a GUI or notebook already has open. Default: the request's
        instrument is opened for this scan and closed after it.
    detector_workers : int, optional
        Worker processes of the on-line detector; 0 detects on a thread of this
        process. Default: 1 when the machine has a second core, else 0.
    run_job : callable, optional
        The per-field analysis (default `analysis.pipeline.analyze_field_file`).
    events : EventStream, optional
        Where the run publishes its records (default: a new stream,
        `Scan.events`); subscribe before `run`.
    """

    def __init__(
        self,
        request: ScanRequest,
        *,
        instrument: Instrument | None = None,
        detector_workers: int | None = None,
        run_job: Callable[[FieldJob], Mapping[str, Any]] | None = None,
        events: EventStream | None = None,
    ) -> None:
        self.request = request
        self.instrument = instrument
        if detector_workers is None:
            detector_workers = 1 if (os.cpu_count() or 1) >= 2 else 0
        self.detector_workers = detector_workers
        self.run_job = run_job
        self.events = events or EventStream()
        self.folder = RunFolder(request.out)
        self.lock = FolderLock(self.folder.root, "run folder")
        self.log = RunLog(self.folder.ledger, self.events)
        self.audit = AuditLog(self.folder.root / "audit.log", request.operator)
        self._cancel = threading.Event()
        self._cancel_reason = ""
        self._core: Any = None
        #: a hardware call hung: the instrument must not be touched again
        self.hung = False

    # ------------------------------------------------------------------ control

    def cancel(self, reason: str = "stop requested") -> None:
        """Stop after the current frame (or between focus anchors); what is
        stored stays stored. Safe from a signal handler or another thread."""
        if not self._cancel.is_set():
            self._cancel_reason = reason
        self._cancel.set()
        if self._core is not None:
            self._core.mda.cancel()

    # ------------------------------------------------------------------ run

    def run(self) -> ScanResult:
        """Scan (or resume) the cartridge; see the module docstring.

        Raises
        ------
        FolderLockedError
            Another process owns the run folder.
        ScannerError
            Bad input, or the run stopped with an error (a `Stopped` record
            holds it; the run is resumable).
        """
        check_ours(self.folder.root, "ledger.jsonl", "queue.jsonl", "a run folder")
        with self.lock, _device_thread_first():
            self.folder.prepare()
            audit = self.events.subscribe(AuditTrail(self.audit))
            try:
                return self._audited_run()
            finally:
                audit()
                release_free_memory()  # the next cartridge of a queue starts flat

    def _audited_run(self) -> ScanResult:
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
                f"{result.report.ctc_count if result.report else '?'}",
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
            f"fields {req.n_fields or 'all'}, seed {req.simulated_seed}, "
            f"config sha256 {digest}",
            required=True,
        )

    def _run(self) -> ScanResult:
        req, folder = self.request, self.folder
        plan = ScanPlan.build(req.layout, req.instrument, n_fields=req.n_fields)
        state = LedgerState.from_records(folder.ledger.read())
        self._check_same_scan(plan, state)
        planned = {f.name for f in plan.fields}
        done = self._verified(state) & planned
        remaining = [f for f in plan.fields if f.name not in done]
        cam = req.instrument.camera
        needed = len(remaining) * len(plan.channels) * cam.width * cam.height * 2
        folder.check_free_space(int(needed * 1.02) + _DISK_MARGIN_BYTES)

        instrument = self.instrument
        if instrument is None:
            instrument = open_instrument(
                req.instrument, req.layout, seed=req.seed, source=req.instrument_file
            )
        try:
            if instrument.sample is not None and req.simulated_seed is not None:
                instrument.sample.load_cartridge(req.simulated_seed, req.layout)
            return self._run_on(instrument, plan, state, done, remaining)
        finally:
            # an instrument the caller gave stays open; a hung device is left
            # alone (unloading it would hang too)
            if self.instrument is None and not self.hung:
                instrument.close()

    def _run_on(
        self,
        instrument: Instrument,
        plan: ScanPlan,
        state: LedgerState,
        done: set[str],
        remaining: list[FieldSpec],
    ) -> ScanResult:
        req = self.request
        self.log.emit(
            Started(
                cartridge_id=req.cartridge,
                planned=len(plan.fields),
                resumed=len(done),
                operator=self.audit.operator,
                pid=os.getpid(),
                host=socket.gethostname(),
            )
        )
        supervisor = Supervisor()
        supervisor.add_stop_hook(lambda e: self._stop_acquisition())
        hw = Hardware(
            instrument.core,
            RetryPolicy(req.instrument.move_retries, req.instrument.snap_retries),
            sink=self.log,
            channel_group=req.instrument.channel_group,
        )
        longest = max(c.exposure_ms for c in req.instrument.channels) / 1000
        watchdog = Watchdog(
            hw, supervisor, limit_s=req.instrument.watchdog_s, allowance_s=longest
        )
        result = ScanResult(self.folder.root, req.cartridge, len(plan.fields))
        result.resumed = len(done)
        self._ended = False
        try:
            return self._scan_fields(
                instrument,
                hw,
                supervisor,
                watchdog,
                plan,
                state,
                done,
                remaining,
                result,
            )
        except BaseException as e:
            if not self._ended:  # whatever ended the run early, the ledger says so
                interrupted = isinstance(e, KeyboardInterrupt)
                self._end(
                    Stopped(
                        stored=result.stored,
                        resumed=result.resumed,
                        failed=sorted(result.failed),
                        canceled=interrupted,
                        error=None if interrupted else str(watchdog.error or e),
                    )
                )
            if watchdog.error is not None:  # a hang outranks whatever came first
                self.hung = True
                if e is not watchdog.error:
                    raise watchdog.error from e
            raise
        finally:
            watchdog.close()

    def _scan_fields(
        self,
        instrument: Instrument,
        hw: Hardware,
        supervisor: Supervisor,
        watchdog: Watchdog,
        plan: ScanPlan,
        state: LedgerState,
        done: set[str],
        remaining: list[FieldSpec],
        result: ScanResult,
    ) -> ScanResult:
        # the detector's worker starts now: its interpreter and imports (1-3 s
        # on a busy machine) overlap the focus map instead of delaying the
        # first field's detection
        detector = self._detector(supervisor)
        try:
            return self._focus_and_scan(
                instrument,
                hw,
                supervisor,
                watchdog,
                plan,
                state,
                done,
                remaining,
                result,
                detector,
            )
        finally:
            if not detector.closed:  # ended before the scan: nothing to drain
                detector.close(drain=False)

    def _focus_and_scan(
        self,
        instrument: Instrument,
        hw: Hardware,
        supervisor: Supervisor,
        watchdog: Watchdog,
        plan: ScanPlan,
        state: LedgerState,
        done: set[str],
        remaining: list[FieldSpec],
        result: ScanResult,
        detector: OnlineDetector,
    ) -> ScanResult:
        req, folder = self.request, self.folder
        step = FocusMapStep(folder, req.instrument, self.log, hw, cancel=self._cancel)
        try:
            fmap, plan, reused = step.run(
                plan, resuming=bool(done), supervisor=supervisor, watchdog=watchdog
            )
        except (FocusError, ConfigError, HardwareHangError):
            self._ended = True  # the step's FocusFailed / Stopped says why
            raise
        if fmap is None:  # canceled between anchors (the step recorded it)
            self._ended = True
            result.canceled = True
            return result
        result.focus_map, result.focus_map_reused = fmap, reused
        by_name = plan.by_name()
        remaining = [by_name[f.name] for f in remaining]
        self._write_scan_json(plan, instrument)
        self.log.emit(Written(files=folder.digests("scan.json")))
        if done:
            self.log.emit(
                Resumed(skipped=len(done), remaining=[f.name for f in remaining])
            )
        else:
            self.log.emit(
                Planned(
                    fields=[f.name for f in plan.fields],
                    channels=list(plan.channel_names),
                )
            )
        backlog = [
            f.name
            for f in plan.fields
            if f.name in done
            and not (
                f.name in state.detected and folder.detection_path(f.name).exists()
            )
        ]
        qc = None
        if fmap.enabled and req.instrument.focus.qc and fmap.reference_sharpness:
            qc = FocusQC(Focuser(hw, req.instrument), fmap.reference_sharpness)
        unsubscribe = [self.events.subscribe(result.tally)]
        cache = DetectionCache(folder)
        unsubscribe.append(self.events.subscribe(cache.on_record))
        ahead = _Ahead(lambda: self._write_ground_truth(instrument, plan))
        writer: StoreWorker | None = None
        stats: dict[str, int] = {}
        t0 = time.perf_counter()
        try:
            unsubscribe.append(self.events.subscribe(detector.on_record))
            detector.add_backlog(backlog)
            fields_store = FieldStore(
                folder, self._ome_xml(), self.log, storage=req.instrument.storage
            )
            writer = StoreWorker(fields_store, supervisor)
            store = writer

            def deliver(fld: AssembledField) -> None:
                # storage died: the supervisor stops the run
                with contextlib.suppress(StorageError):
                    store.put(fld)

            assembler = FieldAssembler(remaining, plan.channel_names, deliver)
            unsubscribe.append(self.events.subscribe(assembler.on_record))
            engine = ScanEngine(
                instrument.core,
                hw,
                self.log,
                focus_qc=qc,
                saturation=float(2**req.instrument.camera.bit_depth - 1),
            )
            instrument.core.mda.set_engine(engine)
            if remaining and not self._cancel.is_set() and supervisor.error is None:
                # the simulator's truth (0.1-0.3 s) while the last field is
                # taken, stored and detected: not on the way to the report
                self._acquire(
                    instrument.core,
                    plan,
                    remaining,
                    assembler,
                    supervisor,
                    watchdog,
                    near_end=ahead.start,
                )
        finally:
            if writer is not None:
                writer.close()
            ahead.start()  # if the last field never came
            try:
                # a failed run leaves detection to resume
                stats = detector.close(drain=not supervisor.failed.is_set())
            finally:
                truth_error = ahead.join()
            for fn in unsubscribe:
                fn()
        if ahead.error is not None:
            raise ahead.error
        result.duration_s = time.perf_counter() - t0
        result.focus_qc_s = qc.seconds if qc is not None else 0.0
        result.frames = result.stored * len(plan.channels)
        result.detected, result.detect_failed = stats["detected"], stats["failed"]
        result.max_detect_backlog = stats["max_backlog"]
        error = watchdog.error or supervisor.error or truth_error
        result.canceled = self._cancel.is_set() or error is not None
        if error is None:
            try:
                result.report = write_scan_outputs(
                    folder,
                    cartridge_id=req.cartridge,
                    assay=req.assay,
                    instrument=req.instrument,
                    plan=plan,
                    fmap=fmap,
                    fmap_reused=reused,
                    acquisition_s=result.duration_s,
                    focus_qc_s=result.focus_qc_s,
                    cache=cache,
                )
                self.log.emit(Written(files=folder.digests(*OUTPUT_FILES)))
            except OSError as e:
                raise StorageError(
                    f"cannot write the report in {folder.root}: {e.strerror or e}"
                ) from None
        end = Finished if result.complete else Stopped
        self._end(
            end(
                stored=result.stored,
                resumed=result.resumed,
                failed=sorted(result.failed),
                canceled=result.canceled,
                error=str(error) if error else None,
                duration_s=round(result.duration_s, 3),
                focus_s=round(result.focus_s, 3),
                refocused=result.refocused,
            )
        )
        if error is not None:
            if isinstance(error, ScannerError):
                raise error
            raise ScannerError(f"scan stopped: {error}") from error
        return result

    def _write_ground_truth(
        self, instrument: Instrument, plan: ScanPlan
    ) -> StorageError | None:
        """ground_truth.json of a simulated instrument, and its `Written`
        record; the error if it cannot be written."""
        if instrument.sample is None:
            return None
        folder = self.folder
        try:
            truth = instrument.sample.ground_truth(
                [(f.name, f.x_um, f.y_um) for f in plan.fields]
            )
            folder.write_json(folder.ground_truth_json, truth, compact=True)
            self.log.emit(Written(files=folder.digests(folder.ground_truth_json.name)))
        except StorageError as e:
            logger.error("%s", e)
            return e
        return None

    def _end(self, record: Finished | Stopped) -> None:
        """The run's last record; if even the ledger cannot take it (a
        read-only disk), the error that stopped the run still stands."""
        self._ended = True
        try:
            self.log.emit(record)
        except StorageError as e:
            logger.error("%s", e)

    def _detector(self, supervisor: Supervisor) -> OnlineDetector:
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
                pixel_affine=req.instrument.affine,
            )

        kwargs: dict[str, Any] = {}
        if self.run_job is not None:
            kwargs["run_job"] = self.run_job
        return OnlineDetector(
            folder,
            make_job,
            self.log,
            supervisor,
            workers=self.detector_workers,
            **kwargs,
        )

    def _acquire(
        self,
        core: Any,
        plan: ScanPlan,
        remaining: list[FieldSpec],
        assembler: FieldAssembler,
        supervisor: Supervisor,
        watchdog: Watchdog,
        near_end: Callable[[], None] | None = None,
    ) -> None:
        """Run the MDA on a supervised thread until it ends, is canceled, a
        thread of the run dies, or a hardware call hangs (then stop waiting:
        the call cannot be interrupted). `near_end` is called once, at the
        last field's first frame (after the assembler has it), and costs the
        frames after that nothing (`_once_at_position`)."""
        sequence = plan.to_sequence(remaining)
        frame_ready = core.mda.events.frameReady
        frame_ready.connect(assembler.frame_ready)
        drop_near_end = None
        if near_end is not None:
            drop_near_end = _once_at_position(frame_ready, len(remaining) - 1, near_end)
        self._core = core
        mm_log, quiet = logging.getLogger("pymmcore-plus"), _NoEventLines()
        mm_log.addFilter(quiet)
        thread = supervisor.spawn("ctcscan-mda", lambda: core.mda.run(sequence))
        try:
            self._wait(core, thread, supervisor, watchdog)
        finally:
            mm_log.removeFilter(quiet)
            if thread.is_alive() and not watchdog.hung.is_set():
                # leaving early (an error in this thread): never leave the
                # acquisition running under whatever closes the instrument
                core.mda.cancel()
                thread.join()
            frame_ready.disconnect(assembler.frame_ready)
            if drop_near_end is not None:
                drop_near_end()  # a no-op once it has fired
            self._core = None

    def _wait(
        self,
        core: Any,
        thread: threading.Thread,
        supervisor: Supervisor,
        watchdog: Watchdog,
    ) -> None:
        """Join the MDA thread. A stop (cancel, a dead thread) is passed to
        the runner again on every turn: pymmcore-plus drops a cancel that
        comes before its run has started. Ctrl-C without the CLI's handlers
        cancels too."""
        while thread.is_alive():
            try:
                thread.join(timeout=0.1)
            except KeyboardInterrupt:
                self.cancel("interrupted by the operator (Ctrl-C)")
            if watchdog.hung.is_set():
                return  # the call cannot be interrupted; do not wait on it
            if self._cancel.is_set() or supervisor.failed.is_set():
                core.mda.cancel()

    def _stop_acquisition(self) -> None:
        if self._core is not None:
            self._core.mda.cancel()

    # ------------------------------------------------------------------ helpers

    def _verified(self, state: LedgerState) -> set[str]:
        """Fields the ledger calls stored whose files still hash correctly."""
        ok = set()
        for name, rec in state.stored.items():
            if self.folder.verify(name, rec.sha256):
                ok.add(name)
            else:
                self.log.emit(
                    Corrupt(field=name, reason="file missing or checksum mismatch")
                )
        return ok

    def _ome_xml(self) -> OmeXml:
        """What every field file's OME metadata records of this run."""
        return OmeXml.for_instrument(self.request.instrument, self.request.cartridge)

    def _check_same_scan(self, plan: ScanPlan, state: LedgerState) -> None:
        prev = self.folder.read_scan_json()
        req = self.request
        # the files a resume reads back are those it wrote (or none recorded)
        for path in (self.folder.scan_json, self.folder.focus_map_json):
            if path.exists():
                self.folder.check_as_written(path.name)
        if prev is None:
            if state.stored:  # written before the first field: removed since
                raise StorageError(
                    f"{self.folder.scan_json} is missing, though "
                    f"{len(state.stored)} field(s) are stored: nothing tells "
                    "what scan they belong to; restore it, or choose another --out"
                )
            return
        beyond = sorted(set(state.stored) - {f.name for f in plan.fields})
        if beyond:
            # the report would leave them out: a count of fewer fields
            raise StorageError(
                f"{self.folder.root} holds {len(state.stored)} stored fields, "
                f"{beyond[0]} among them beyond the {len(plan.fields)} of "
                f"--fields {req.n_fields}; resume with as many fields or more"
            )
        mine = {
            "cartridge_id": req.cartridge,
            "layout": plan.layout.name,
            "seed": req.simulated_seed,
            "channels": list(plan.channel_names),
        }
        request = prev.get("request") if isinstance(prev, dict) else None
        request = request if isinstance(request, dict) else {}
        theirs = {k: request.get(k) for k in mine}
        if theirs != mine:
            diff = ", ".join(
                f"{k}: {theirs[k]!r} there, {mine[k]!r} now"
                for k in mine
                if theirs[k] != mine[k]
            )
            hint = ""
            if req.cartridge_id is None and all(
                theirs[k] == mine[k] for k in mine if k != "cartridge_id"
            ):  # a renamed folder: only its cartridge differs, named inside
                hint = "; to resume it, add --cartridge-id " + shlex.quote(
                    str(theirs["cartridge_id"])
                )
            raise StorageError(
                f"{self.folder.root} holds a different scan ({diff}); "
                f"choose another --out to start a new one{hint}"
            )
        # ...imaged where this layout, with this camera, and judged by this
        # assay (a key that one of them lacks, as a version adds settings, is
        # not compared)
        then_inst = prev.get("instrument")
        then_cam = then_inst.get("camera") if isinstance(then_inst, dict) else None
        for what, was, now in (
            ("layout", prev.get("layout"), plan.layout.model_dump(mode="json")),
            (
                "camera",
                then_cam,
                req.instrument.camera.model_dump(
                    mode="json", include={"width", "height"}
                ),
            ),
            ("assay", prev.get("assay"), req.assay.model_dump(mode="json")),
        ):
            if (where := _first_difference(was, now)) is not None:
                raise StorageError(
                    f"{self.folder.root} was scanned with another {what} "
                    f"({where}); resume it as it was started, or choose "
                    "another --out"
                )
        # the fields stored so far lie where this overlap and camera put them
        inst = prev.get("instrument")
        inst = inst if isinstance(inst, dict) else {}
        cfg = req.instrument
        then_px = inst.get("pixel_size_um")
        then_px = then_px if isinstance(then_px, (int, float)) else cfg.pixel_size_um
        then = {
            "field_overlap_um": inst.get("field_overlap_um") or 0.0,
            "pixel_affine": inst.get("pixel_affine")
            or list(default_affine(float(then_px))),
        }
        now = {
            "field_overlap_um": cfg.field_overlap_um,
            "pixel_affine": list(cfg.affine),
        }
        if then != now:
            diff = ", ".join(
                f"{k}: {then[k]} there, {now[k]} now" for k in now if then[k] != now[k]
            )
            raise StorageError(
                f"{self.folder.root} was scanned with another field geometry "
                f"({diff}); resume it with its instrument file, or choose "
                "another --out"
            )

    def _write_scan_json(self, plan: ScanPlan, instrument: Instrument) -> None:
        req = self.request
        core = instrument.core
        data = {
            "request": {
                "cartridge_id": req.cartridge,
                "layout": plan.layout.name,
                "seed": req.simulated_seed,
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

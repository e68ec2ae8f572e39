"""Unattended queue: every cartridge the loader (or a holder) holds, in turn.

`CartridgeQueue.run` opens the loader, reads its inventory and, slot by slot,
loads a cartridge, reads its barcode, scans it into ``QUEUE/<barcode>/`` (an
ordinary, resumable run folder) and unloads it. A failed cartridge (a jam, a
scan error) is recorded with its reason and the queue goes on. Everything is
journalled in ``QUEUE/queue.jsonl`` (fsync'd lines, like a run's ledger) and in
``QUEUE/audit.log``; ``QUEUE/summary.json`` holds the table printed at the end.

Resume: running the same queue again skips cartridges the journal calls done
whose run folder is still as their scan left it (`_not_as_left`: the folder,
its ledger, scan.json and report, every stored field's file at its size;
otherwise the cartridge is scanned again and its run folder resumes),
continues a cartridge left on the stage (its run folder resumes; one not
asked for now, by `--slots`, goes back to its slot first), and scans the
rest. ``QUEUE/STOP`` (`request_stop`) stops the queue after the current
cartridge; Ctrl-C stops the current scan after its current frame.

Without a loader, a multi-cartridge holder (`HolderConfig`: cartridge ids and
where each sits on the stage) is scanned the same way, cartridge by cartridge.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

from pydantic import Field, model_validator

from controller.config import AssayConfig, ConfigModel, InstrumentConfig
from controller.errors import ConfigError, HardwareHangError, ScannerError
from controller.events import EventStream
from controller.hardware.instrument import Instrument, open_instrument
from controller.hardware.loader import (
    CartridgeLoader,
    LoaderError,
    LoaderFault,
    open_loader,
)
from controller.heap import release_free_memory
from controller.layouts import CartridgeLayout
from controller.records import (
    CartridgeDone,
    DeviceEvent,
    Loaded,
    LoaderSeen,
    QueueFinished,
    QueueStarted,
    QueueStopped,
    Record,
    Unloaded,
    Written,
)
from controller.runs.scan import Scan, ScanRequest, ScanResult
from controller.runstore.audit import AuditLog, AuditTrail
from controller.runstore.folder import (
    RunFolder,
    check_ours,
    folder_name,
    write_durably,
)
from controller.runstore.ledger import Ledger, LedgerState, RunLog
from controller.runstore.lock import FolderLock

__all__ = [
    "CartridgeOutcome",
    "CartridgeQueue",
    "HolderCartridge",
    "HolderConfig",
    "QueueRequest",
    "request_stop",
]

logger = logging.getLogger("ctcscan.queue")

STOP_FILE = "STOP"


def request_stop(queue_dir: str | Path) -> Path:
    """Ask a running queue to stop after its current cartridge."""
    path = Path(queue_dir) / STOP_FILE
    write_durably(path, b"stop after the current cartridge\n")
    return path


class HolderCartridge(ConfigModel):
    """One cartridge of a multi-cartridge holder: its identifier and where the
    centre of its layout sits on the stage."""

    id: str = Field(min_length=1, max_length=64)
    center_x_um: float
    center_y_um: float


class HolderConfig(ConfigModel):
    """A multi-cartridge holder (``--cartridges FILE``): the cartridges on it."""

    cartridges: tuple[HolderCartridge, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        ids = [c.id for c in self.cartridges]
        if len(set(ids)) != len(ids):
            raise ValueError(f"cartridge ids repeat: {ids}")
        return self


@dataclass(frozen=True)
class QueueRequest:
    instrument: InstrumentConfig
    layout: CartridgeLayout
    out: Path
    assay: AssayConfig = field(default_factory=AssayConfig)
    instrument_file: str = ""
    operator: str | None = None
    n_fields: int | None = None
    slots: tuple[int, ...] | None = None  # default: every occupied slot
    #: a multi-cartridge holder instead of the loader
    holder: HolderConfig | None = None


@dataclass
class CartridgeOutcome:
    """One row of the queue's summary."""

    slot: int
    barcode: str
    status: str  # complete | incomplete | failed | stopped
    ctc_count: int | None = None
    cutoff: int | None = None
    at_or_above_cutoff: bool | None = None
    duration_s: float = 0.0
    reason: str = ""
    run_dir: str = ""


class QueueCanceled(Exception):
    """The queue was stopped during a cartridge's scan (Ctrl-C, a signal)."""


class CartridgeQueue:
    """Scans every cartridge of the loader; see the module docstring.

    The queue's journal records and every cartridge scan's records are
    published on `events` (subscribe before `run`); `scan_kwargs` go to every
    `Scan` (detector workers). The instrument is opened once for the whole
    queue (or `instrument`, opened by the caller, is used).
    """

    def __init__(
        self,
        request: QueueRequest,
        *,
        scan_kwargs: dict[str, Any] | None = None,
        instrument: Instrument | None = None,
        events: EventStream | None = None,
    ) -> None:
        self.request = request
        self.root = Path(request.out)
        self.scan_kwargs = dict(scan_kwargs or {})
        self.instrument = instrument
        self.events = events or EventStream()
        self.lock = FolderLock(self.root, "queue folder")
        self.journal = Ledger(self.root / "queue.jsonl")
        self.log = RunLog(self.journal, self.events)
        self.audit = AuditLog(self.root / "audit.log", request.operator)
        self.current: Scan | None = None
        self.outcomes: list[CartridgeOutcome] = []
        self._cancel = threading.Event()
        self._cancel_reason = ""

    def cancel(self, reason: str = "stop requested") -> None:
        """Stop the current cartridge's scan after its current frame, then the
        queue (the cartridge stays on the stage; the queue resumes it)."""
        if not self._cancel.is_set():
            self._cancel_reason = reason
        self._cancel.set()
        if (scan := self.current) is not None:
            scan.cancel(reason)

    @property
    def canceled(self) -> bool:
        return self._cancel.is_set()

    def _stopped_by(self, e: BaseException) -> None:
        """Summary, journal and audit of a queue that an error stops."""
        with contextlib.suppress(OSError, ScannerError):
            self._write_summary()
        with contextlib.suppress(ScannerError):
            self.log.emit(QueueStopped(reason=str(e)))
        self.audit.write("QUEUE-STOP", f"{type(e).__name__}: {e}")

    def _raise_if_canceled(self) -> None:
        if self._cancel.is_set():  # between cartridges: load nothing more
            raise QueueCanceled(self._cancel_reason)

    # ------------------------------------------------------------------ control

    @property
    def stop_file(self) -> Path:
        return self.root / STOP_FILE

    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    # ------------------------------------------------------------------ run

    def run(self) -> list[CartridgeOutcome]:
        """Scan the queue's cartridges (resuming the folder); see the module
        docstring.

        Raises
        ------
        FolderLockedError
            Another process runs a queue on this folder.
        """
        check_ours(self.root, "queue.jsonl", "ledger.jsonl", "a queue folder")
        with self.lock:
            trail = AuditTrail(self.audit)
            unsubscribe = self.events.subscribe(
                lambda r: trail(r) if _loader_event(r) else None
            )
            try:
                return self._run()
            finally:
                unsubscribe()

    def _run(self) -> list[CartridgeOutcome]:
        req = self.request
        self.stop_file.unlink(missing_ok=True)  # a new command is a new decision
        done = self._done_before()
        self.log.emit(
            QueueStarted(
                operator=self.audit.operator,
                pid=os.getpid(),
                host=socket.gethostname(),
            )
        )
        self.audit.write(
            "QUEUE-START",
            f"queue into {self.root}: instrument {req.instrument.name}, layout "
            f"{req.layout.name}, {len(done)} cartridge(s) done before",
            required=True,
        )
        instrument = self.instrument
        hung = False
        try:
            if instrument is None:
                instrument = open_instrument(
                    req.instrument, req.layout, source=req.instrument_file
                )
            if req.holder is not None:
                self._run_holder(instrument, req.holder, done)
            else:
                with open_loader(
                    req.instrument,
                    self.root,
                    source=req.instrument_file,
                    sink=self.log,
                ) as loader:
                    self._run_with(instrument, loader, done)
        except (KeyboardInterrupt, QueueCanceled):
            why = self._cancel_reason or "interrupted (Ctrl-C)"
            self._write_summary()
            self.log.emit(QueueStopped(reason=why))
            self.audit.write("QUEUE-STOP", f"{why}; resumable")
            raise
        except LoaderError as e:
            self._write_summary()
            self.log.emit(QueueStopped(reason=str(e)))
            self.audit.write("QUEUE-STOP", f"loader unusable: {e}")
            raise
        except HardwareHangError as e:
            hung = True
            self._stopped_by(e)
            raise
        except ScannerError as e:  # the instrument cannot be opened, a disk, ...
            self._stopped_by(e)
            raise
        finally:
            if instrument is not None and self.instrument is None and not hung:
                instrument.close()
        stopped = self.stop_requested()
        end = QueueStopped if stopped else QueueFinished
        self._write_summary()
        self.log.emit(
            end(
                reason="stop requested" if stopped else "",
                cartridges=len(self.outcomes),
            )
        )
        self.audit.write(
            "QUEUE-STOP" if stopped else "QUEUE-FINISH",
            ("stopped after the current cartridge, as requested; " if stopped else "")
            + ", ".join(f"{o.barcode}: {o.status}" for o in self.outcomes),
        )
        return self.outcomes

    def _run_holder(
        self, instrument: Instrument, holder: HolderConfig, done: dict[str, dict]
    ) -> None:
        """Every cartridge of a holder in turn: no loader, one layout each."""
        for i, cart in enumerate(holder.cartridges, start=1):
            if cart.id in done:
                self.outcomes.append(CartridgeOutcome(**done[cart.id]))
                continue
            if self.stop_requested():
                break
            self._raise_if_canceled()
            layout = self.request.layout.model_copy(
                update={
                    "center_x_um": cart.center_x_um,
                    "center_y_um": cart.center_y_um,
                }
            )
            self._one(instrument, None, i, cart.id, on_stage=True, layout=layout)
            if self.stop_requested():
                break

    def _run_with(
        self, instrument: Instrument, loader: CartridgeLoader, done: dict[str, dict]
    ) -> None:
        req = self.request
        info = loader.identify()
        status = loader.status()
        if status.state == "FAULT":
            loader.reset()
        inventory = loader.inventory()
        self.log.emit(LoaderSeen(identity=info, inventory=inventory))
        if status.slot is not None:  # left on the stage by an interrupted queue
            barcode = loader.barcode()
            inventory[status.slot] = barcode
        if req.slots:
            _check_slots(req.slots, inventory)
        slots = [s for s in (req.slots or sorted(inventory)) if inventory.get(s)]
        left = status.slot
        if left is not None and (left not in slots or inventory[left] in done):
            # not to be scanned now: back to its slot before any other loads
            # (its run folder stays resumable, by a queue that asks for it)
            loader.unload()
            self.log.emit(Unloaded(slot=left, barcode=str(inventory[left])))
            self.audit.write(
                "UNLOAD",
                f"slot {left}: cartridge {inventory[left]}, left on the stage by "
                "an interrupted queue and not scanned now, back in its slot",
            )
            left = None
        for slot in slots:
            barcode = str(inventory[slot])
            if barcode in done:
                self.outcomes.append(CartridgeOutcome(**done[barcode]))
                continue
            if self.stop_requested():
                break
            self._raise_if_canceled()
            self._one(instrument, loader, slot, barcode, on_stage=left == slot)
            if self.stop_requested():
                break

    def _one(
        self,
        instrument: Instrument,
        loader: CartridgeLoader | None,
        slot: int,
        barcode: str,
        *,
        on_stage: bool,
        layout: CartridgeLayout | None = None,
    ) -> None:
        """Load (with a loader), scan, unload one cartridge; record its outcome."""
        t0 = time.perf_counter()
        outcome = CartridgeOutcome(slot, barcode, "failed")
        try:
            if loader is not None and not on_stage:
                got = loader.load(slot)
                if got != barcode:
                    raise LoaderError(
                        f"slot {slot} was listed as {barcode} but the loaded "
                        f"cartridge reads {got}"
                    )
            self.log.emit(Loaded(slot=slot, barcode=barcode))
            self.audit.write("LOAD", f"slot {slot}: cartridge {barcode}")
            result = self._scan(
                instrument, slot, barcode, layout or self.request.layout
            )
            outcome = self._outcome(slot, barcode, result)
            if result.canceled:  # stopped inside the scan: leave it on the stage
                raise QueueCanceled(self._cancel_reason)
            if loader is not None:
                loader.unload()
                self.log.emit(Unloaded(slot=slot, barcode=barcode))
            _release_memory()
        except (KeyboardInterrupt, QueueCanceled):  # the queue resumes it
            outcome.status = "stopped"
            raise
        except HardwareHangError as e:  # leave the instrument and loader alone
            outcome.reason = str(e)
            raise
        except LoaderFault as e:
            outcome.reason = str(e)
            self._recover(loader)
        except ScannerError as e:  # the scan failed: unload, go on
            outcome.reason = str(e)
            if loader is not None:
                self._recover(loader)
        finally:
            outcome.duration_s = round(time.perf_counter() - t0, 2)
            if outcome.status != "stopped":
                self.outcomes.append(outcome)
                self.log.emit(CartridgeDone(**asdict(outcome)))
                self.audit.write(
                    "CARTRIDGE",
                    f"{barcode} (slot {slot}): {outcome.status}"
                    + (f", {outcome.reason}" if outcome.reason else "")
                    + (
                        f", {outcome.ctc_count} CTC"
                        if outcome.ctc_count is not None
                        else ""
                    ),
                )

    def _scan(
        self, instrument: Instrument, slot: int, barcode: str, layout: CartridgeLayout
    ) -> ScanResult:
        req = self.request
        sim = req.instrument.simulation
        request = ScanRequest(
            instrument=req.instrument,
            layout=layout,
            out=self.root / _folder_name(barcode),
            assay=req.assay,
            instrument_file=req.instrument_file,
            cartridge_id=barcode,
            # each simulated cartridge is a different draw
            seed=None if sim is None else sim.seed + slot,
            n_fields=req.n_fields,
            operator=req.operator,
        )
        _on_stage(instrument, request)
        scan = Scan(
            request, instrument=instrument, events=self.events, **self.scan_kwargs
        )
        self.current = scan
        if self._cancel.is_set():  # a stop that came between cartridges
            scan.cancel(self._cancel_reason)
        try:
            return scan.run()
        finally:
            self.current = None

    def _outcome(self, slot: int, barcode: str, r: ScanResult) -> CartridgeOutcome:
        if r.canceled:
            status = "stopped"
        elif r.complete and not r.failed:
            status = "complete"
        else:
            status = "incomplete"
        reason = (
            f"{len(r.failed)} field(s) failed: " + ", ".join(sorted(r.failed))
            if r.failed
            else ""
        )
        return CartridgeOutcome(
            slot=slot,
            barcode=barcode,
            status=status,
            ctc_count=r.report.ctc_count if r.report else None,
            cutoff=r.report.cutoff if r.report else None,
            at_or_above_cutoff=r.report.at_or_above_cutoff if r.report else None,
            reason=reason,
            run_dir=str(r.run_dir),
        )

    def _recover(self, loader: CartridgeLoader | None) -> None:
        """After a failed cartridge: clear a fault and empty the stage."""
        if loader is None:
            return
        st = loader.status()
        if st.state == "FAULT":
            self.audit.write("LOADER-RESET", f"fault code {st.code:02d}")
            loader.reset()
            st = loader.status()
        if st.slot is not None:
            loader.unload()

    # ------------------------------------------------------------------ journal

    def _done_before(self) -> dict[str, dict]:
        """Cartridges a previous run of this queue finished (by barcode)."""
        out: dict[str, dict] = {}
        for rec in self.journal.read():
            if isinstance(rec, CartridgeDone) and rec.status in (
                "complete",
                "incomplete",
            ):
                out[rec.barcode] = rec.model_dump(
                    include=set(CartridgeOutcome.__dataclass_fields__)
                )
        for barcode, row in list(out.items()):
            # (a child of the queue's folder, wherever that is now)
            run_dir = self.root / Path(row["run_dir"]).name
            if (why := _not_as_left(run_dir)) is not None:
                # scanned again: its own resume verifies what is still there
                logger.warning("cartridge %s: %s; scanned again", barcode, why)
                self.audit.write("RESCAN", f"cartridge {barcode}: {why}")
                del out[barcode]
        return out

    def _write_summary(self) -> None:
        data = json.dumps([asdict(o) for o in self.outcomes], indent=1).encode()
        write_durably(self.root / "summary.json", data)
        self.log.emit(Written(files={"summary.json": hashlib.sha256(data).hexdigest()}))


def _not_as_left(run_dir: Path) -> str | None:
    """Why a cartridge's run folder is no longer as its scan left it (from
    what the folder lists alone, no file read whole): gone, its report or
    ledger gone, or a stored field missing or of another size; None if not."""
    folder = RunFolder(run_dir)
    if not run_dir.is_dir():
        return f"its run folder {run_dir} is gone"
    for name in ("ledger.jsonl", "scan.json", "report.json"):
        if not (run_dir / name).is_file():
            return f"{run_dir / name} is gone"
    try:
        stored = LedgerState.from_records(folder.ledger.read()).stored
    except ScannerError as e:
        return str(e)
    for name, rec in sorted(stored.items()):
        try:
            size = (run_dir / rec.file).stat().st_size
        except OSError:
            return f"field {name}'s file is gone"
        if size != rec.bytes:
            return f"field {name}'s file is not the one stored"
    return None


def _check_slots(chosen: tuple[int, ...], inventory: dict[int, str | None]) -> None:
    """Every slot asked for exists and holds a cartridge (checked before any
    cartridge moves)."""
    if missing := [s for s in chosen if s not in inventory]:
        raise ConfigError(
            f"--slots: the loader has slots 1-{max(inventory, default=0)}, "
            f"not {', '.join(map(str, missing))}"
        )
    if empty := [s for s in chosen if not inventory[s]]:
        raise ConfigError(f"--slots: slot(s) {', '.join(map(str, empty))} are empty")


def _loader_event(r: Record) -> bool:
    return isinstance(r, DeviceEvent) and r.device == "loader"


def _release_memory() -> None:
    """Between cartridges: collect garbage and hand freed heap back to the OS.

    A cartridge's frames are allocated and freed by several threads; glibc keeps
    the freed memory in its arenas (measured: the queue's RSS rose from 106 to
    about 600 MB over the first four cartridges, then stayed there).
    ``malloc_trim`` returns it, so memory stays flat across a night's queue.
    """
    gc.collect()
    release_free_memory()


def _on_stage(instrument: Instrument, request: ScanRequest) -> None:
    """Before a cartridge's scan: the simulated instrument holds that
    cartridge, then the heap is handed back (`_release_memory`).

    The simulator keeps the previous cartridge's drawing (its last field's
    stain planes and wall masks, 33 MB, and its last frame) until the next
    cartridge replaces it. Replaced inside the scan, after the heap was last
    trimmed, that memory stayed in the heap as resident free blocks, and each
    cartridge after the first peaked higher than the first (bench_soak, 3 full
    cartridges: 300, 332, 344 MB). The scan's own `load_cartridge` of the same
    draw is then nothing to do. A real instrument (no `sample`) only trims.
    """
    seed = request.simulated_seed
    if instrument.sample is not None and seed is not None:
        instrument.sample.load_cartridge(seed, request.layout)
    _release_memory()


#: names in a queue folder that are the queue's own (compared in lower case)
_QUEUE_ENTRIES = frozenset(
    {"queue.jsonl", "audit.log", "summary.json", STOP_FILE.lower(), ".loader-port",
     ".lock", ".owner.json"}
)  # fmt: skip


def _folder_name(barcode: str) -> str:
    """The run folder of a cartridge in the queue folder (`folder_name`)."""
    return folder_name(barcode, reserved=_QUEUE_ENTRIES)

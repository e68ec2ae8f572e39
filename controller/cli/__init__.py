"""The ``ctcscan`` command line.

Every error a user can cause is a `ScannerError` and is printed as one line on
stderr (exit code 2); a scan that stored every field exits 0, one with failed
fields 1; a hardware call that hung 3; a run stopped by Ctrl-C 130, by SIGTERM
143, by SIGHUP 129 (run the same command again to resume). Progress bars
subscribe to the run's event stream.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from analysis.fieldio import FieldReadError
from controller import __version__
from controller.config import AssayConfig, InstrumentConfig
from controller.errors import HardwareHangError, ScannerError, StorageError
from controller.events import EventStream
from controller.hardware.instrument import DEFAULT_INSTRUMENT
from controller.layouts import DEFAULT_LAYOUT, LAYOUTS, CartridgeLayout, get_layout
from controller.records import (
    AnalysisStarted,
    Detected,
    DetectFailed,
    Failed,
    FocusAnchorDone,
    Loaded,
    Record,
    Started,
    Stored,
)
from controller.runs.analyze import (
    AnalyzeRequest,
    CartridgeResult,
    failures,
    parse_channel_map,
    run_analyze,
)
from controller.runs.compare import CartridgeChange
from controller.runs.compare import compare as compare_analyses
from controller.runs.queue import (
    CartridgeQueue,
    HolderConfig,
    QueueCanceled,
    QueueRequest,
    request_stop,
)
from controller.runs.scan import Scan, ScanRequest, ScanResult
from controller.runs.verify import verify_folder
from controller.runstore.lock import in_use

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="ctcscan: scan CTC cartridges on a Micro-Manager microscope.",
)
err = Console(stderr=True)
out = Console()

#: exit code when a hardware call hung (the process leaves without touching it)
EXIT_HUNG = 3
#: exit codes of a run stopped by a signal (128 + the signal's number)
STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
_SIGNAL_NAMES = {
    signal.SIGINT: "Ctrl-C",
    signal.SIGTERM: "SIGTERM",
    signal.SIGHUP: "SIGHUP",
}


def _say(text: str) -> None:
    """A note on stderr that may fail (a hung-up terminal) without harm."""
    with contextlib.suppress(Exception):
        err.print(text)


class StopSignals:
    """Ctrl-C, SIGTERM and SIGHUP stop the job like its `cancel`: after the
    current frame, with a `stopped` record and an audit line. A second signal
    only says the stop is under way (the record must still be written)."""

    def __init__(self, cancel: Callable[[str], None]) -> None:
        self.cancel = cancel
        self.received: signal.Signals | None = None

    @property
    def exit_code(self) -> int | None:
        return None if self.received is None else STOP_SIGNALS[self.received]

    def _handle(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if self.received is not None:
            _say("still stopping after the current frame; please wait")
            return
        self.received = sig
        name = _SIGNAL_NAMES[sig]
        self.cancel(f"interrupted by the operator ({name})")
        _say(f"{name}: stopping after the current frame ...")

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _hung(e: HardwareHangError) -> None:
    """A hardware call hangs in a thread nobody can stop: leave at once.

    Everything stored is already durable and recorded; exiting normally would
    wait on, or tear down, a device that is still inside a call.
    """
    err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_HUNG)


def _inputs(
    instrument_file: Path, assay: Path | None, layout: str
) -> tuple[InstrumentConfig, AssayConfig, CartridgeLayout]:
    """The instrument, assay and layout a scan or a queue starts from."""
    cfg = InstrumentConfig.from_file(instrument_file)
    assay_cfg = AssayConfig.from_file(assay) if assay else AssayConfig()
    return cfg, assay_cfg, get_layout(layout)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def scan(
    out_dir: Annotated[
        Path,
        typer.Option("--out", help="run folder (created; an existing one is resumed)"),
    ],
    instrument: Annotated[
        Path | None,
        typer.Option(help="instrument YAML; default: the simulated scanner"),
    ] = None,
    layout: Annotated[
        str, typer.Option(help="cartridge layout name, or a layout YAML file")
    ] = DEFAULT_LAYOUT,
    cartridge_id: Annotated[
        str | None,
        typer.Option(help="cartridge identifier; default: the run folder's name"),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="simulated cartridge seed (simulated instrument only)"),
    ] = None,
    fields: Annotated[
        int | None, typer.Option(help="scan only the first N fields of the plan")
    ] = None,
    assay: Annotated[Path | None, typer.Option(help="assay YAML")] = None,
    operator: Annotated[
        str | None,
        typer.Option(help="who runs the scan, for the audit log; default: login"),
    ] = None,
) -> None:
    """Scan one cartridge into a run folder, resuming it if it exists."""
    instrument_file = instrument or DEFAULT_INSTRUMENT
    try:
        cfg, assay_cfg, lay = _inputs(instrument_file, assay, layout)
        if cartridge_id is not None and not (
            0 < len(cartridge_id) <= 64 and cartridge_id.isprintable()
        ):  # as a holder's ids: it names the cartridge on one line everywhere
            _fail("--cartridge-id takes 1 to 64 printable characters")
        if seed is not None and seed < 0:
            _fail(f"--seed must be 0 or more, got {seed}")
        if seed is not None and not cfg.is_simulated:
            _fail(
                f"--seed applies to a simulated instrument; {instrument_file} "
                "is real hardware"
            )
        request = ScanRequest(
            instrument=cfg,
            layout=lay,
            out=out_dir,
            assay=assay_cfg,
            instrument_file=str(instrument_file),
            cartridge_id=cartridge_id,
            seed=seed,
            n_fields=fields,
            operator=operator,
        )
        job = Scan(request)
        stops = StopSignals(job.cancel)
        progress = _progress()
        job.events.subscribe(ScanProgress(progress))
        with stops.installed(), progress:
            result = job.run()
    except HardwareHangError as e:
        _hung(e)
    except ScannerError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail(f"interrupted; run the same command again to resume {out_dir}", 130)
    _summary(result)
    if result.canceled:
        code = stops.exit_code or 130
        err.print(f"stopped; run the same command again to resume {out_dir}")
        raise typer.Exit(code)
    if result.failed or not result.complete:
        raise typer.Exit(1)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


class ScanProgress:
    """Progress bars of scans (focusing, scanning, detecting), fed by their
    events; a new scan on the same `progress` replaces the previous bars."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}
        self.analysis = [0, 0]  # fields of every cartridge analysed; done before

    def _drop(self, *keys: str) -> None:
        for key in keys or tuple(self.tasks):
            if key in self.tasks:
                self.progress.remove_task(self.tasks.pop(key))

    def __call__(self, r: Record) -> None:
        p, tasks = self.progress, self.tasks
        if isinstance(r, Started):
            self._drop()
            tasks["scan"] = p.add_task(
                "scanning", total=r.planned, completed=r.resumed, unit="fields"
            )
            tasks["detect"] = p.add_task("detecting", total=r.planned, unit="fields")
        elif isinstance(r, FocusAnchorDone):
            if "focus" not in tasks:
                tasks["focus"] = p.add_task("focusing", total=r.total, unit="anchors")
            p.update(tasks["focus"], completed=r.done)
        elif isinstance(r, (Stored, Failed)) and "scan" in tasks:
            p.advance(tasks["scan"])
        elif isinstance(r, (Detected, DetectFailed)) and "detect" in tasks:
            p.advance(tasks["detect"])
        elif isinstance(r, AnalysisStarted):  # one bar over every cartridge
            if "analyse" not in tasks:
                self._drop()
                self.analysis = [0, 0]
                tasks["analyse"] = tasks["detect"] = p.add_task(
                    "analysing", total=0, unit="fields"
                )
            self.analysis[0] += r.fields
            self.analysis[1] += r.done
            p.update(
                tasks["analyse"], total=self.analysis[0], completed=self.analysis[1]
            )


def _summary(r: ScanResult) -> None:
    t = Table(title=f"cartridge {r.cartridge_id}", show_header=False)
    t.add_row("run folder", str(r.run_dir))
    t.add_row("fields planned", str(r.planned))
    t.add_row("stored now", str(r.stored))
    if r.resumed:
        t.add_row("already stored (verified)", str(r.resumed))
    t.add_row("failed", ", ".join(f"{k} ({v})" for k, v in r.failed.items()) or "0")
    t.add_row(
        "detected on-line",
        f"{r.detected} fields"
        + (f", {r.detect_failed} failed" if r.detect_failed else ""),
    )
    if r.report is not None:
        t.add_row("CTC count", str(r.report.ctc_count))
        t.add_row("result", r.report.statement)
    t.add_row(
        "acquisition time", f"{r.duration_s:.1f} s ({r.frames_per_s:.1f} frames/s)"
    )
    if (fm := r.focus_map) is not None and fm.enabled:
        used = sum(a.usable for a in fm.anchors)
        how = (
            "recorded map reused"
            if r.focus_map_reused
            else f"{fm.fit.model} map from {used}/{len(fm.anchors)} anchors, "
            f"rms {fm.rms_um:.2f} um"
        )
        t.add_row(
            "focus",
            f"{r.focus_s:.1f} s: {how}; {len(r.refocused)} field(s) re-focused",
        )
        for w in fm.warnings:
            t.add_row("focus warning", w)
    state = (
        "complete"
        if r.complete
        else (
            "interrupted: run the same command to resume"
            if r.canceled
            else "incomplete"
        )
    )
    t.add_row("status", state)
    out.print(t)


@app.command()
def queue(
    out_dir: Annotated[
        Path, typer.Option("--out", help="queue folder: one run folder per cartridge")
    ],
    instrument: Annotated[
        Path | None,
        typer.Option(help="instrument YAML with a loader section (default: simulated)"),
    ] = None,
    layout: Annotated[
        str, typer.Option(help="cartridge layout name, or a layout YAML file")
    ] = DEFAULT_LAYOUT,
    slots: Annotated[
        str | None, typer.Option(help="only these loader slots, e.g. 1,3,4")
    ] = None,
    cartridges: Annotated[
        Path | None,
        typer.Option(
            help="a multi-cartridge holder YAML (cartridge ids and stage centres) "
            "to scan instead of the loader"
        ),
    ] = None,
    fields: Annotated[
        int | None, typer.Option(help="scan only the first N fields of each cartridge")
    ] = None,
    assay: Annotated[Path | None, typer.Option(help="assay YAML")] = None,
    operator: Annotated[
        str | None,
        typer.Option(help="who runs the queue, for the audit log; default: login"),
    ] = None,
) -> None:
    """Scan every cartridge in the loader (or a holder), unattended; resumes a
    queue folder.

    `ctcscan stop QUEUE` stops it after the current cartridge.
    """
    instrument_file = instrument or DEFAULT_INSTRUMENT
    try:
        cfg, assay_cfg, lay = _inputs(instrument_file, assay, layout)
        holder = HolderConfig.from_file(cartridges) if cartridges else None
        if holder is not None and slots:
            _fail("--slots chooses loader slots; with --cartridges list the holder's")
        chosen = _parse_slots(slots) if slots is not None else None
        if fields is not None and fields < 1:  # before any cartridge is loaded
            _fail(f"--fields must be at least 1, got {fields}")
        request = QueueRequest(
            instrument=cfg,
            layout=lay,
            out=out_dir,
            assay=assay_cfg,
            instrument_file=str(instrument_file),
            operator=operator,
            n_fields=fields,
            slots=chosen,
            holder=holder,
        )
        progress = _progress()

        def announce(r: Record) -> None:
            if isinstance(r, Loaded):
                progress.console.print(
                    f"[bold]cartridge {r.barcode}[/] (slot {r.slot})"
                )

        job = CartridgeQueue(request)
        job.events.subscribe(announce)
        job.events.subscribe(ScanProgress(progress))
        stops = StopSignals(job.cancel)
        with stops.installed(), progress:
            outcomes = job.run()
    except HardwareHangError as e:
        _hung(e)
    except ScannerError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail(f"interrupted; run the same command again to resume {out_dir}", 130)
    except QueueCanceled:
        _fail(
            f"stopped; run the same command again to resume {out_dir}",
            stops.exit_code or 130,
        )
    t = Table(title=f"queue {out_dir}")
    for col in ("slot", "cartridge", "CTC", "cut-off", "status", "duration", "note"):
        t.add_column(col)
    for o in outcomes:
        t.add_row(
            str(o.slot),
            o.barcode,
            "" if o.ctc_count is None else str(o.ctc_count),
            ""
            if o.cutoff is None
            else (
                f"{o.cutoff} ({'reached' if o.at_or_above_cutoff else 'not reached'})"
            ),
            o.status,
            f"{o.duration_s:.0f} s",
            o.reason,
        )
    out.print(t)
    if job.stop_requested():
        out.print("stopped after the current cartridge; run the same command to go on")
        raise typer.Exit(130)
    if any(o.status != "complete" for o in outcomes):
        raise typer.Exit(1)


def _parse_slots(text: str) -> tuple[int, ...]:
    """``"1,3,4"`` -> ``(1, 3, 4)``: slot numbers from 1, each once."""
    if not text.strip():  # not every slot: that is no --slots at all
        _fail("--slots takes slot numbers like 1,3,4, got none")
    try:
        chosen = tuple(int(v) for v in text.split(","))
    except ValueError:
        _fail(f"--slots takes slot numbers like 1,3,4, got {text!r}")
    if bad := [v for v in chosen if v < 1]:
        _fail(f"--slots: slots are numbered from 1, got {bad[0]}")
    if len(set(chosen)) != len(chosen):
        twice = next(v for v in chosen if chosen.count(v) > 1)
        _fail(f"--slots: slot {twice} is given twice")
    return chosen


@app.command()
def stop(
    queue_dir: Annotated[Path, typer.Argument(metavar="QUEUE", help="queue folder")],
) -> None:
    """Ask a running queue to stop after its current cartridge."""
    if not (queue_dir / "queue.jsonl").exists():
        _fail(f"{queue_dir} is not a queue folder (no queue.jsonl)")
    if in_use(queue_dir) is False:  # (None: this system cannot tell)
        _fail(f"no queue is running in {queue_dir}: nothing to stop")
    path = request_stop(queue_dir)
    out.print(f"the queue stops after its current cartridge ({path})")


@app.command()
def analyze(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="INPUT...",
            help="ctcscan run folders or folders of OME-TIFF fields (with "
            "--recursive: roots to search)",
        ),
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="output folder (several inputs: one subfolder each); default: "
            "RUN/analyses/<id>/ beside a run folder's own results",
        ),
    ] = None,
    channels: Annotated[
        str | None,
        typer.Option(help="assay=file channel names, e.g. DAPI=Hoechst,PE=CK"),
    ] = None,
    pixel_size: Annotated[
        float | None,
        typer.Option(help="pixel size in um, for files whose metadata has none"),
    ] = None,
    assay: Annotated[Path | None, typer.Option(help="assay YAML")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="worker processes (default: one per core; 0: in this process)"
        ),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="a Dask scheduler (tcp://HOST:PORT), or 'local' for a local "
            "Dask cluster of --workers processes; default: a local process pool"
        ),
    ] = None,
    recursive: Annotated[
        bool,
        typer.Option(
            "--recursive",
            help="analyse every run folder and OME-TIFF folder under the inputs",
        ),
    ] = False,
) -> None:
    """Detect CTCs in stored fields and write events, gallery and report; the
    same command resumes."""
    try:
        assay_cfg = AssayConfig.from_file(assay) if assay else AssayConfig()
        if workers is not None and workers < 0:
            _fail(f"--workers must be 0 (in this process) or more, got {workers}")
        if scheduler is not None and workers == 0:
            _fail("--workers 0 analyses in this process; a --scheduler needs 1 or more")
        if pixel_size is not None and not (0 < pixel_size < 1000):
            _fail(f"--pixel-size must be a size in um (0 to 1000), got {pixel_size}")
        if scheduler not in (None, "local") and "://" not in scheduler:
            _fail(f"--scheduler takes tcp://HOST:PORT or 'local', got {scheduler!r}")
        request = AnalyzeRequest(
            inputs=tuple(inputs),
            out=out_dir,
            assay=assay_cfg,
            rename=parse_channel_map(channels, assay_cfg),
            pixel_size_um=pixel_size,
            workers=workers,
            recursive=recursive,
            scheduler=scheduler,
        )
        if scheduler is not None:
            _quiet_dask()
        progress = _progress()
        events = EventStream()
        events.subscribe(ScanProgress(progress))
        with progress:
            results = run_analyze(request, events=events)
    except (ScannerError, FieldReadError) as e:
        _fail(str(e))
    except OSError as e:  # the output's disk: full, gone, read-only
        what = f"cannot write {e.filename}: {e.strerror}" if e.filename else str(e)
        _fail(f"{what}; what was analysed is kept: run the same command again")
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to resume", 130)
    if len(results) == 1 and not recursive:
        _analysis_table(results[0])
    else:
        _archive_table(results)
    if problems := failures(results):
        more = len(problems) - 1
        _fail(
            problems[0]
            + (f" (and {more} more, listed in the reports and above)" if more else "")
        )


def _quiet_dask() -> None:
    """A lost or unreachable Dask scheduler is reported in one line, not by
    its client's log (importing distributed sets up its loggers: after it)."""
    import distributed  # noqa: F401

    def quiet(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL or not record.name.startswith(
            ("distributed", "tornado")
        )

    for handler in logging.getLogger().handlers:  # its modules set own levels
        handler.addFilter(quiet)
    for name in ("distributed", "tornado"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _analysis_table(r: CartridgeResult) -> None:
    t = Table(title=f"cartridge {r.name}", show_header=False)
    t.add_row("fields analysed", f"{r.analyzed} of {r.fields}")
    t.add_row("CTC count", str(r.ctc_count))
    if r.previous is not None:
        t.add_row("previous count", f"{r.previous} ({_change(r)})")
    t.add_row("result", r.statement)
    t.add_row("report", str(Path(r.out) / "report.html"))
    out.print(t)


def _change(r: CartridgeResult) -> str:
    if r.previous is None or r.ctc_count is None:
        return ""
    d = r.ctc_count - r.previous
    return "no change" if d == 0 else f"{d:+d}"


def _archive_table(results: list[CartridgeResult]) -> None:
    t = Table(title=f"{len(results)} cartridge(s)")
    for col in ("cartridge", "fields", "CTC", "cut-off", "previous", "change", "note"):
        t.add_column(col)
    for r in results:
        note = r.error or (f"{len(r.failed)} field(s) failed" if r.failed else r.out)
        t.add_row(
            r.name,
            f"{r.analyzed}/{r.fields}",
            "" if r.ctc_count is None else str(r.ctc_count),
            ""
            if r.ctc_count is None
            else f"{r.cutoff} ({'reached' if r.at_or_above_cutoff else 'not reached'})",
            "" if r.previous is None else str(r.previous),
            _change(r),
            note,
        )
    out.print(t)


@app.command()
def compare(
    a: Annotated[
        Path,
        typer.Argument(
            metavar="A", help="an analysis or run folder, or a folder of them"
        ),
    ],
    b: Annotated[
        Path, typer.Argument(metavar="B", help="the same, analysed otherwise")
    ],
    csv_out: Annotated[
        Path | None,
        typer.Option(
            "--csv",
            help="write every changed object to this new CSV file (an existing "
            "file is never overwritten)",
        ),
    ] = None,
    show: Annotated[
        int, typer.Option(min=0, help="changed objects to print per cartridge")
    ] = 20,
) -> None:
    """Compare two analyses of the same cartridges: CTC counts and the objects
    whose label changed."""
    try:
        changes = compare_analyses(a, b)
        if csv_out is not None:
            _write_changes(csv_out, changes)
    except ScannerError as e:
        _fail(str(e))
    t = Table(title=f"{a} -> {b}")
    for col in ("cartridge", "CTC A", "CTC B", "change", "objects changed"):
        t.add_column(col)
    for c in changes:
        t.add_row(
            c.cartridge,
            "-" if c.ctc_a is None else str(c.ctc_a),
            "-" if c.ctc_b is None else str(c.ctc_b),
            "" if c.change is None else f"{c.change:+d}" if c.change else "0",
            str(len(c.objects))
            if c.ctc_a is not None and c.ctc_b is not None
            else "only in " + ("A" if c.ctc_b is None else "B"),
        )
    out.print(t)
    for c in changes:
        if not c.objects:
            continue
        o = Table(title=f"{c.cartridge}: objects whose label changed")
        for col in ("field", "row", "col", "A", "B"):
            o.add_column(col)
        for ch in c.objects[:show]:
            o.add_row(
                ch.field,
                f"{ch.row:.0f}",
                f"{ch.col:.0f}",
                ch.label_a or "-",
                ch.label_b or "-",
            )
        if len(c.objects) > show:
            o.caption = f"... and {len(c.objects) - show} more" + (
                f" (all in {csv_out})" if csv_out else " (--csv FILE lists all)"
            )
        out.print(o)


def _write_changes(path: Path, changes: list[CartridgeChange]) -> None:
    rows = [o for c in changes for o in c.objects]
    try:
        # "x": a file that is there already (a run's events.csv, a review, an
        # earlier comparison) is the user's or another run's, never replaced
        f = open(path, "x", newline="", encoding="utf-8")  # noqa: SIM115
    except FileExistsError:
        raise StorageError(
            f"{path} exists already: not overwritten (give --csv a new file name)"
        ) from None
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["cartridge", "field", "row", "col", "label_a", "label_b"])
            for o in rows:
                w.writerow([o.cartridge, o.field, o.row, o.col, o.label_a, o.label_b])
    except OSError as e:
        path.unlink(missing_ok=True)  # this command's own, half written
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from None


@app.command()
def verify(
    folder: Annotated[
        Path,
        typer.Argument(metavar="FOLDER", help="a run, analysis or queue folder"),
    ],
) -> None:
    """Check that a folder holds what the program wrote: the sealed audit log
    and ledger, every stored field, detection and output against its
    recorded sha256. Prints each problem (exit 1), or ok (exit 0)."""
    try:
        found = verify_folder(folder)
    except ScannerError as e:
        _fail(str(e))
    for note in found.notes:
        out.print(f"note: {note}", highlight=False, soft_wrap=True)
    for problem in found.problems:
        out.print(f"[bold red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    if found.problems:
        out.print(f"{len(found.problems)} problem(s) in {folder}", highlight=False)
        raise typer.Exit(1)
    out.print(f"ok: {folder} ({found.summary()})", highlight=False, soft_wrap=True)


@app.command()
def serve(
    root: Annotated[
        Path, typer.Option("--root", help="folder holding run and queue folders")
    ] = Path("runs"),
    host: Annotated[
        str, typer.Option(help="address to listen on (others need --token-file)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8750,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            help="the token every request must carry (one word), or one "
            "'NAME TOKEN' line per reviewer",
        ),
    ] = None,
) -> None:
    """The bench station: live runs and queues under ROOT, and the review."""
    from controller.station.app import LOOPBACK, Tokens
    from controller.station.server import make_server

    if not root.is_dir():
        _fail(f"--root {root} is no folder")
    tokens = Tokens()
    if token_file is not None:
        try:
            tokens = Tokens.from_text(token_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            _fail(f"--token-file {token_file}: {getattr(e, 'strerror', None) or e}")
    if host not in LOOPBACK and not tokens:
        _fail(f"--host {host} is reachable from other machines: give --token-file")
    try:  # a one-line error now rather than the server's log line later
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        _fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    server = make_server(root, host=host, port=port, tokens=tokens)
    shown = f"[{host}]" if ":" in host else host
    hint = "/?token=<your token>" if tokens else "/"
    out.print(
        f"ctcscan station on http://{shown}:{port}{hint} over {root.resolve()}"
        " (Ctrl-C stops it)"
    )
    server.run()


@app.command("layouts")
def list_layouts() -> None:
    """List the known cartridge layouts."""
    t = Table("name", "rows x cols", "fields", "description")
    for lay in LAYOUTS.values():
        t.add_row(
            lay.name, f"{lay.rows} x {lay.cols}", str(lay.n_fields), lay.description
        )
    out.print(t)


@app.command("version")
def show_version() -> None:
    """Print the ctcscan version."""
    out.print(__version__)


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pymmcore-plus").setLevel(logging.ERROR)
    app()


if __name__ == "__main__":
    main()

"""Off-line analysis: ``ctcscan analyze`` on a run folder or a folder of OME-TIFFs.

The same per-field analysis as the on-line detector (`OnlineDetector` runs it, in
parallel worker processes), then the same outputs: ``events.csv``,
``candidates/``, ``report.json``, ``report.html`` in the output folder, with the
per-field records in ``detections/`` and a ``ledger.jsonl`` of the analysis.
Every input file's metadata is checked before any work starts, so a bad file is
reported at once, by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.fieldio import FieldReadError, field_name_of, inspect_field_file
from analysis.pipeline import FieldJob
from analysis.report import OUTPUT_FILES, Report, ReportContext, write_outputs
from controller.config import AssayConfig
from controller.errors import ConfigError, StorageError
from controller.events import EventStream
from controller.records import (
    AnalysisFinished,
    AnalysisStarted,
    DetectFailed,
    Written,
)
from controller.runs.detector import OnlineDetector
from controller.runs.outputs import load_records
from controller.runstore.folder import RunFolder
from controller.runstore.ledger import LedgerState, RunLog
from controller.runstore.lock import FolderLock
from controller.supervise import Supervisor

__all__ = ["AnalyzeRequest", "parse_channel_map", "run_analyze"]

_TIFF_SUFFIXES = (".tif", ".tiff")


def parse_channel_map(text: str | None, assay: AssayConfig) -> dict[str, str] | None:
    """``"DAPI=Hoechst,PE=CK"`` -> ``{"DAPI": "Hoechst", "PE": "CK"}``."""
    if not text:
        return None
    out: dict[str, str] = {}
    for part in text.split(","):
        name, sep, in_file = (p.strip() for p in part.partition("="))
        if not sep or not name or not in_file:
            raise ConfigError(
                f"--channels: expected ASSAY=FILE pairs such as "
                f"DAPI=Hoechst, got {part.strip()!r}"
            )
        if name not in assay.channels:
            raise ConfigError(
                f"--channels: {name!r} is not a channel of the assay "
                f"({', '.join(assay.channels)})"
            )
        out[name] = in_file
    return out


@dataclass(frozen=True)
class AnalyzeRequest:
    """What to analyse."""

    input: Path
    out: Path
    assay: AssayConfig = field(default_factory=AssayConfig)
    rename: dict[str, str] | None = None
    pixel_size_um: float | None = None
    workers: int | None = None


def _inputs(req: AnalyzeRequest) -> tuple[list[tuple[str, Path]], dict[str, Any]]:
    """Field files of the input, and what is known of the run."""
    src = req.input
    if not src.is_dir():
        raise StorageError(f"{src}: no such folder")
    ctx: dict[str, Any] = {"cartridge_id": src.resolve().name, "source": str(src)}
    run = RunFolder(src)
    if run.scan_json.exists() and run.fields_dir.is_dir():
        scan = run.read_scan_json() or {}
        ctx["cartridge_id"] = scan.get("request", {}).get(
            "cartridge_id", ctx["cartridge_id"]
        )
        planned = [f["name"] for f in scan.get("fields", [])]
        state = LedgerState.from_records(run.ledger.read())
        ctx["fields_planned"] = planned
        lay = scan.get("layout", {})
        if lay.get("rows") and lay.get("cols"):
            ctx["cartridge_fields"] = int(lay["rows"]) * int(lay["cols"])
        ctx["fields_failed"] = {
            n: r.reason
            for n, r in state.failed.items()
            if n in planned and n not in state.stored
        }
        bits = scan.get("instrument", {}).get("camera", {}).get("bit_depth")
        if bits:
            ctx["saturation"] = float(2 ** int(bits) - 1)
        folder = run.fields_dir
    else:
        folder = src
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.name.lower().endswith(_TIFF_SUFFIXES)
    )
    if not files:
        raise StorageError(f"{folder}: no OME-TIFF field files (*.tif, *.tiff)")
    names = [field_name_of(p) for p in files]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise StorageError(f"{folder}: two files give the field name {dup!r}")
    return list(zip(names, files, strict=True)), ctx


def _check_out(req: AnalyzeRequest, out: RunFolder) -> None:
    """The output folder is new, empty, or holds an analysis of this input
    (which is then redone): never the input itself, a scan's run folder, the
    analysis of another input, or a folder of someone else's files."""
    root = out.root
    if root.resolve() == req.input.resolve():
        raise StorageError(
            f"--out {root} is the input folder: its scan's report would be "
            "overwritten; choose another --out"
        )
    if out.scan_json.exists():
        raise StorageError(f"--out {root} is a scan's run folder; choose another --out")
    started = [r for r in out.ledger.read() if isinstance(r, AnalysisStarted)]
    if started:
        before = Path(started[-1].input).resolve()
        if before != req.input.resolve():
            raise StorageError(
                f"--out {root} holds the analysis of {before}; choose another "
                "--out (or the same input, to redo that analysis)"
            )
        return
    # no analysis recorded: only the lock and what a start cut short may be here
    theirs = sorted(
        p.name
        for p in root.iterdir()
        if not (
            p.name in (".lock", ".owner.json", out.ledger.path.name)
            or (
                p.is_dir()
                and p.name in ("detections", "candidates")
                and not any(p.iterdir())
            )
        )
    )
    if theirs:
        raise StorageError(
            f"--out {root} holds other files ({', '.join(theirs[:3])}"
            f"{', ...' if len(theirs) > 3 else ''}); choose a new or empty folder"
        )


def run_analyze(req: AnalyzeRequest, *, events: EventStream | None = None) -> Report:
    """Analyse every field of `req.input`; return the report (report.json).

    The analysis's records (`AnalysisStarted`, `Detected`, `DetectFailed`,
    `AnalysisFinished`) go to the output folder's ledger and to `events`.
    """
    with FolderLock(req.out, "output folder"):
        return _analyze(req, events or EventStream())


def _analyze(req: AnalyzeRequest, events: EventStream) -> Report:
    fields, ctx = _inputs(req)
    required = [n for n, r in req.assay.channels.items() if r != "marker"]
    for _, path in fields:  # fail fast, by file name, before any work
        ff = inspect_field_file(path, rename=req.rename, required=required)
        if not (ff.pixel_size_um or req.pixel_size_um):
            raise FieldReadError(
                f"{path}: no pixel size in the metadata; give one with --pixel-size"
            )
    out = RunFolder(req.out)
    _check_out(req, out)
    out.prepare(fields=False)
    paths = dict(fields)

    def make_job(name: str) -> FieldJob:
        return FieldJob(
            path=str(paths[name]),
            name=name,
            out_dir=str(out.root),
            settings=req.assay.detection,
            roles=dict(req.assay.channels),
            rename=req.rename,
            pixel_size_um=req.pixel_size_um,
            saturation=ctx.get("saturation"),
        )

    workers = req.workers if req.workers is not None else (os.cpu_count() or 1)
    log = RunLog(out.ledger, events)
    log.emit(AnalysisStarted(input=str(req.input.resolve()), fields=len(fields)))
    supervisor = Supervisor()
    detector = OnlineDetector(out, make_job, log, supervisor, workers=workers)
    detector.add_backlog(paths)
    detector.close()
    supervisor.raise_error()
    records = out.ledger.read()
    state = LedgerState.from_records(records)
    since = max(i for i, r in enumerate(records) if isinstance(r, AnalysisStarted))
    failed_now = {
        r.field: r.reason
        for r in records[since:]
        if isinstance(r, DetectFailed) and r.field not in state.detected
    }
    context = ReportContext(
        cartridge_id=ctx["cartridge_id"],
        indication=req.assay.indication,
        cutoff=req.assay.cutoff,
        blood_volume_ml=req.assay.blood_volume_ml,
        fields_planned=ctx.get("fields_planned") or list(paths),
        fields_failed={**ctx.get("fields_failed", {}), **failed_now},
        cartridge_fields=ctx.get("cartridge_fields"),
        source=ctx["source"],
    )
    report = write_outputs(out.root, load_records(out, list(paths), state), context)
    log.emit(Written(files=out.digests(*OUTPUT_FILES)))
    log.emit(AnalysisFinished(ctc_count=report.ctc_count, failed=sorted(failed_now)))
    if failed_now:
        name, reason = next(iter(failed_now.items()))
        where = str(paths[name])
        raise FieldReadError(
            (reason if reason.startswith(where) else f"{where}: {reason}")
            + (
                f" (and {len(failed_now) - 1} more failed fields, "
                f"listed in {out.root / 'report.json'})"
                if len(failed_now) > 1
                else ""
            )
        )
    return report

"""Analysis of stored fields: ``ctcscan analyze`` on run folders, folders of
OME-TIFFs, or every one of them under a root, locally or on a Dask cluster.

The same per-field analysis as the on-line detector, then the same outputs:
``events.csv``, ``candidates/``, ``report.json``, ``report.html`` in each
cartridge's output folder, with the per-field records in ``detections/`` and a
``ledger.jsonl`` of the analysis. Where the results go:

- ``--out DIR`` with one input: DIR is the analysis folder;
- ``--out DIR`` with several inputs (or ``--recursive``): ``DIR/<cartridge>/``;
- no ``--out``: beside a run folder's on-line analysis, ``RUN/analyses/<id>/``.

Each analysis has an id (`analysis.pipeline.analysis_identity`: the detector's
version and the settings' sha256); an output folder holds one id and is never
overwritten by another, and the input's own results are never touched. Each
field's result is durable as it arrives (`DetectionWriter`), so the same
command resumes: a field whose result is recorded for the same file (size and
modification time), and whose result file is still the one recorded (its
sha256), is not analysed again.

Execution (`runners`): without a scheduler, a local process pool per cartridge
(`OnlineDetector`); with ``--scheduler tcp://HOST:PORT`` an existing Dask
cluster, with ``--scheduler local`` a `distributed.LocalCluster`: one task per
field over all cartridges, workers reading the files themselves.

Every input file's metadata is checked before any work starts, so a bad file is
reported at once, by name (with several inputs, its cartridge is listed as
failed and the others go on).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import resource
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.fieldio import FieldReadError, field_name_of, inspect_field_file
from analysis.pipeline import (
    FieldJob,
    analysis_identity,
    detector_version,
    file_stamp,
)
from analysis.report import (
    OUTPUT_FILES,
    ReportContext,
    read_report,
    write_outputs,
)
from analysis.stitch import check_affine
from controller.config import AssayConfig
from controller.errors import ConfigError, ScannerError, StorageError
from controller.events import EventStream
from controller.records import (
    AnalysisFinished,
    AnalysisStarted,
    Detected,
    DetectFailed,
    Written,
)
from controller.runs.outputs import load_records
from controller.runs.runners import dask_client, run_dask, run_local
from controller.runstore.folder import RunFolder, folder_name, no_folder
from controller.runstore.ledger import LedgerState, RunLog
from controller.runstore.lock import LOCK_FILE, OWNER_FILE, FolderLock
from controller.runstore.results import (
    CANDIDATES_DIR,
    DETECTIONS_DIR,
    decode_result,
)

__all__ = [
    "ANALYSES_DIR",
    "AnalyzeRequest",
    "Cartridge",
    "CartridgeResult",
    "failures",
    "find_inputs",
    "parse_channel_map",
    "run_analyze",
]

_TIFF_SUFFIXES = (".tif", ".tiff")

#: where, in a run folder, re-analyses go when no --out is given
ANALYSES_DIR = "analyses"


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
        if name in out:
            raise ConfigError(f"--channels: {name!r} is mapped twice")
        out[name] = in_file
    if len(set(out.values())) != len(out):
        dup = next(v for v in out.values() if list(out.values()).count(v) > 1)
        raise ConfigError(f"--channels: the file's {dup!r} is mapped twice")
    return out


@dataclass(frozen=True)
class AnalyzeRequest:
    """What to analyse, where, and on what."""

    inputs: tuple[Path, ...]
    out: Path | None = None
    assay: AssayConfig = field(default_factory=AssayConfig)
    rename: dict[str, str] | None = None
    pixel_size_um: float | None = None
    workers: int | None = None
    recursive: bool = False
    #: None: local process pool; "local": a LocalCluster; else a scheduler address
    scheduler: str | None = None

    @property
    def n_workers(self) -> int:
        return self.workers if self.workers is not None else (os.cpu_count() or 1)


@dataclass
class Cartridge:
    """One input folder's analysis while it runs."""

    input: Path
    out: RunFolder
    fields: dict[str, Path] = field(default_factory=dict)
    ctx: dict[str, Any] = field(default_factory=dict)
    #: fields whose result is already recorded for their current file
    done: set[str] = field(default_factory=set)
    log: RunLog | None = None
    #: why the cartridge cannot be analysed (its metadata, its folder)
    error: str | None = None

    @property
    def name(self) -> str:
        return str(self.ctx.get("cartridge_id") or self.input.resolve().name)

    @property
    def pending(self) -> list[str]:
        return [n for n in self.fields if n not in self.done] if not self.error else []


@dataclass(frozen=True)
class CartridgeResult:
    """One row of the summary."""

    name: str
    input: str
    out: str
    fields: int = 0
    analyzed: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    ctc_count: int | None = None
    cutoff: int | None = None
    at_or_above_cutoff: bool | None = None
    statement: str = ""
    #: the count the input's own report holds (a scan's on-line count)
    previous: int | None = None
    error: str | None = None


# ---------------------------------------------------------------- inputs


#: the longest field name (UTF-8 bytes) whose outputs' names fit in 255
_MAX_FIELD_NAME_BYTES = 200


def _is_run(path: Path) -> bool:
    return (path / "scan.json").is_file() and (path / "fields").is_dir()


def _has_fields(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return any(
            p.name.lower().endswith(_TIFF_SUFFIXES)
            and not p.name.startswith(".")
            and p.is_file()
            for p in path.iterdir()
        )
    return False


def find_inputs(paths: Sequence[Path], recursive: bool = False) -> list[Path]:
    """The input folders: `paths` themselves, or with `recursive` every run
    folder and every folder of OME-TIFFs under them (a run folder's own
    ``fields/`` and ``analyses/`` are part of it, not inputs).

    Raises
    ------
    StorageError
        A path is no folder; nothing to analyse under a root.
    """
    found: dict[Path, Path] = {}  # resolved -> as given: each folder once
    for root in paths:
        if not root.is_dir():
            raise no_folder(root)
        if not recursive:
            found.setdefault(root.resolve(), root)
            continue
        before = len(found)
        for dirpath, dirnames, _ in os.walk(root):
            here = Path(dirpath)
            if _is_run(here):
                found.setdefault(here.resolve(), here)
                dirnames.clear()  # its fields/ and analyses/ are its own
            elif _has_fields(here) and not (here / "ledger.jsonl").exists():
                found.setdefault(here.resolve(), here)
            # hidden folders (a file system's snapshots, a sync tool's state)
            # hold no cartridges of the archive
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if len(found) == before:
            raise StorageError(
                f"{root}: no run folder or folder of OME-TIFF fields under it"
            )
    return list(found.values())


def _run_context(run: RunFolder, ctx: dict[str, Any]) -> None:
    """What a run folder's scan.json and ledger tell of its run, into `ctx`."""
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
    inst = scan.get("instrument")
    inst = inst if isinstance(inst, dict) else {}
    camera = inst.get("camera")
    bits = camera.get("bit_depth") if isinstance(camera, dict) else None
    if bits is not None:  # for files that do not state theirs
        if type(bits) is not int or not 1 <= bits <= 32:
            raise StorageError(
                f"{run.scan_json}: instrument.camera.bit_depth {bits!r} is "
                "no bit depth (1-32)"
            )
        ctx["saturation"] = float(2**bits - 1)
    # a scan's fields lie where its stage put them: overlaps are joined
    ctx["stitch"] = True
    affine = inst.get("pixel_affine")
    if affine is not None:
        try:
            ctx["pixel_affine"] = check_affine(
                affine, float(inst.get("pixel_size_um") or 0.0)
            )
        except (TypeError, ValueError) as e:
            raise StorageError(
                f"{run.scan_json}: instrument.{e}; the objects cannot be "
                "placed on the stage"
            ) from None


def _inputs(src: Path) -> tuple[list[tuple[str, Path]], dict[str, Any]]:
    """Field files of the input folder, and what is known of its run."""
    if not src.is_dir():
        raise no_folder(src)
    ctx: dict[str, Any] = {"cartridge_id": src.resolve().name, "source": str(src)}
    run = RunFolder(src)
    if _is_run(src):
        try:
            _run_context(run, ctx)
        except StorageError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
            # a scan.json of another shape than ctcscan writes
            raise StorageError(
                f"{run.scan_json}: damaged ({type(e).__name__}: {e}); restore it "
                "from a backup, or analyse its fields/ folder as a plain folder"
            ) from None
        folder = run.fields_dir
    else:
        folder = src
    files = sorted(
        p
        for p in folder.iterdir()
        # hidden files (".x.ome.tif", a Mac's "._x.ome.tif") are no fields
        if p.is_file()
        and p.name.lower().endswith(_TIFF_SUFFIXES)
        and not p.name.startswith(".")
    )
    if not files:
        raise StorageError(f"{folder}: no OME-TIFF field files (*.tif, *.tiff)")
    names = [field_name_of(p) for p in files]
    for name, path in zip(names, files, strict=True):
        # its outputs' names add to it (a candidate's picture, while written:
        # "<field>_000.png.<16 hex>.tmp"); a file system takes 255 bytes
        if len(name.encode()) > _MAX_FIELD_NAME_BYTES:
            raise StorageError(
                f"{path}: a field name of {len(name.encode())} bytes is too long "
                f"for its outputs' names (at most {_MAX_FIELD_NAME_BYTES}); "
                "rename the file"
            )
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise StorageError(f"{folder}: two files give the field name {dup!r}")
    return list(zip(names, files, strict=True)), ctx


def _out_folders(req: AnalyzeRequest, inputs: list[Path], aid: str) -> list[Path]:
    """Each input's output folder (see the module docstring)."""
    if req.out is None:
        outs = []
        for src in inputs:
            if not _is_run(src):
                raise ConfigError(
                    f"{src} is no ctcscan run folder: give --out for its analysis"
                )
            outs.append(src / ANALYSES_DIR / aid)
        return outs
    if len(inputs) == 1 and not req.recursive:
        return [req.out]
    names: dict[str, Path] = {}
    outs = []
    for src in inputs:
        name = folder_name(_cartridge_id(src))
        if name in names and names[name] != src.resolve():  # a namesake
            name = folder_name(f"{name}/{src.resolve()}")
        names[name] = src.resolve()
        outs.append(req.out / name)
    return outs


def _cartridge_id(src: Path) -> str:
    with contextlib.suppress(StorageError, OSError, ValueError, AttributeError):
        scan = RunFolder(src).read_scan_json() or {}
        cid = scan.get("request", {}).get("cartridge_id")
        if isinstance(cid, str) and cid:
            return cid
    return src.resolve().name


def _check_out(src: Path, out: RunFolder, aid: str) -> None:
    """The output folder is new, empty, or holds this analysis (same input,
    same id: it resumes): never the input itself, a scan's run folder, the
    analysis of another input or with other settings, or someone's files."""
    root = out.root
    if root.resolve() == src.resolve():
        raise StorageError(
            f"--out {root} is the input folder: its scan's report would be "
            "overwritten; choose another --out"
        )
    if out.scan_json.exists():
        raise StorageError(f"--out {root} is a scan's run folder; choose another --out")
    ledger = out.ledger.path
    if ledger.is_symlink() or (os.path.lexists(ledger) and not ledger.is_file()):
        # a link (the records would go where it points) or a pipe, a folder
        raise StorageError(
            f"--out {root} holds a {ledger.name} that is no file of its own; "
            "choose a new or empty folder"
        )
    started = [r for r in out.ledger.read() if isinstance(r, AnalysisStarted)]
    if started:
        before = Path(started[-1].input).resolve()
        if before != src.resolve():
            raise StorageError(
                f"--out {root} holds the analysis of {before}; choose another "
                "--out (or the same input, to resume that analysis)"
            )
        if started[-1].analysis_id != aid:
            raise StorageError(
                f"--out {root} holds analysis {started[-1].analysis_id or '(old)'} "
                f"of this input, with another detector or settings (now {aid}); "
                "choose another --out, or compare the two with ctcscan compare"
            )
        return
    # no analysis recorded: only the lock and what a start cut short may be
    # here (an analysis' ledger begins with its start: one without is not one)
    with contextlib.suppress(OSError):
        if out.ledger.path.read_bytes().strip():
            raise StorageError(
                f"--out {root} holds a {out.ledger.path.name} that is no "
                "analysis' ledger; choose a new or empty folder"
            )
    theirs = sorted(
        p.name
        for p in root.iterdir()
        if not (
            p.name in (".lock", ".owner.json", out.ledger.path.name)
            or (
                p.is_dir()
                and p.name in (DETECTIONS_DIR, CANDIDATES_DIR)
                and not any(p.iterdir())
            )
        )
    )
    if theirs:
        raise StorageError(
            f"--out {root} holds other files ({', '.join(theirs[:3])}"
            f"{', ...' if len(theirs) > 3 else ''}); choose a new or empty folder"
        )


# ---------------------------------------------------------------- the analysis


def run_analyze(
    req: AnalyzeRequest, *, events: EventStream | None = None
) -> list[CartridgeResult]:
    """Analyse every field of every input; one result per input folder.

    The records of each cartridge's analysis (`AnalysisStarted`, `Detected`,
    `DetectFailed`, `Written`, `AnalysisFinished`) go to its output folder's
    ledger and to `events`.

    Raises
    ------
    ScannerError
        Bad inputs or output folders (with one input: also a bad field file,
        by name); `ClusterError` when the scheduler cannot be reached or is
        lost (the same command then resumes).
    """
    events = events or EventStream()
    inputs = find_inputs(req.inputs, req.recursive)
    aid, settings_sha = analysis_identity(
        req.assay.detection,
        dict(req.assay.channels),
        req.rename,
        req.pixel_size_um,
        req.assay.stitch,
    )
    outs = _out_folders(req, inputs, aid)
    _raise_open_files_limit(len(outs))
    with contextlib.ExitStack() as locks:
        client = None  # the cluster first: nothing is written if it is away
        if req.scheduler is not None:
            client = locks.enter_context(dask_client(req.scheduler, req.n_workers))
        carts = []
        for src, out in zip(inputs, outs, strict=True):
            cart = Cartridge(input=src, out=RunFolder(out))
            lock = FolderLock(out, "output folder")
            made = _lock_files_to_make(out)
            try:
                locks.enter_context(lock)
                _prepare(req, cart, aid)
            except (ScannerError, FieldReadError) as e:
                # a refused folder keeps nothing of this command's: removed
                # while the lock is held (not taken: the folder is another
                # process's, whatever it holds), then the lock let go
                if lock.held:
                    _remove_made(out, made)
                lock.release()
                if len(inputs) == 1:
                    raise
                cart.error = str(e)
            carts.append(cart)
        for cart in carts:
            if cart.error is None:
                cart.log = RunLog(cart.out.ledger, events)
                cart.log.emit(
                    AnalysisStarted(
                        input=str(cart.input.resolve()),
                        fields=len(cart.fields),
                        done=len(cart.done),
                        analysis_id=aid,
                        detector_version=detector_version(),
                        settings_sha256=settings_sha,
                    )
                )
        work = [c for c in carts if c.pending]
        # each cartridge's outputs as soon as its last field is in, while the
        # workers go on with the others
        results: dict[int, CartridgeResult] = {}

        def finished(cart: Cartridge) -> None:
            results[id(cart)] = _finish(req, cart)

        if client is None:
            # no more worker processes than fields to analyse
            fields = sum(len(c.pending) for c in work)
            n = min(req.n_workers, max(fields, 1))
            run_local(work, lambda c: _job_maker(req, c), n, finished)
        else:
            assert req.scheduler is not None
            run_dask(
                client, work, lambda c: _job_maker(req, c), req.scheduler, finished
            )
        return [results.get(id(c)) or _finish(req, c) for c in carts]


def _lock_files_to_make(out: Path) -> list[Path]:
    """What taking `out`'s lock will create there (the folder itself, when
    it is not there yet, comes last)."""
    made = [
        out / name
        for name in (LOCK_FILE, OWNER_FILE)
        if not os.path.lexists(out / name)  # a link, even dangling, is someone's
    ]
    return made if os.path.lexists(out) else [*made, out]


def _remove_made(out: Path, made: list[Path]) -> None:
    """Remove what `_lock_files_to_make` listed; the folder only if empty."""
    for path in made:
        with contextlib.suppress(OSError):
            path.rmdir() if path == out else path.unlink()


def _raise_open_files_limit(n_folders: int) -> None:
    """Each output folder's lock holds a file open: allow them all."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n_folders + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _prepare(req: AnalyzeRequest, cart: Cartridge, aid: str) -> None:
    """Fields, context, checks and the fields already done of one input."""
    fields, cart.ctx = _inputs(cart.input)
    cart.fields = dict(fields)  # its summary row counts them, also if refused
    _check_out(cart.input, cart.out, aid)
    required = [n for n, r in req.assay.channels.items() if r != "marker"]
    for _, path in fields:  # fail fast, by file name, before any work
        ff = inspect_field_file(path, rename=req.rename, required=required)
        if not (ff.pixel_size_um or req.pixel_size_um):
            raise FieldReadError(
                f"{path}: no pixel size in the metadata; give one with --pixel-size"
            )
    cart.out.prepare(fields=False)
    records = cart.out.ledger.read()
    state = LedgerState.from_records(records)
    latest = {r.field: r for r in records if isinstance(r, Detected)}
    cart.done = {
        name
        for name, path in cart.fields.items()
        if name in state.detected
        and latest[name].source is not None
        and latest[name].source == file_stamp(path)
        and _still_current(
            cart.out.detection_path(name),
            latest[name].sha256,
            cart.ctx.get("pixel_affine"),
        )
    }


def _still_current(
    detection: Path, sha256: str | None, affine: tuple[float, ...] | None
) -> bool:
    """The stored result is the one the ledger recorded (its sha256, when
    recorded: a file replaced or damaged since is redone) and placed its
    objects with `affine` (scan.json's, which a re-analysis into the same
    folder may see corrected)."""
    try:
        data = detection.read_bytes()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            return False
        got = decode_result(data).get("pixel_affine")
    except (OSError, ValueError, AttributeError):
        return False
    return (None if got is None else tuple(got)) == affine


def _job_maker(req: AnalyzeRequest, cart: Cartridge) -> Any:
    def make_job(name: str) -> FieldJob:
        return FieldJob(
            path=str(cart.fields[name]),
            name=name,
            out_dir=str(cart.out.root),
            settings=req.assay.detection,
            roles=dict(req.assay.channels),
            rename=req.rename,
            pixel_size_um=req.pixel_size_um,
            saturation=cart.ctx.get("saturation"),
            pixel_affine=cart.ctx.get("pixel_affine"),
        )

    return make_job


def _finish(req: AnalyzeRequest, cart: Cartridge) -> CartridgeResult:
    """The cartridge's outputs from its detection files; its summary row."""
    base = CartridgeResult(
        name=cart.name,
        input=str(cart.input),
        out=str(cart.out.root),
        fields=len(cart.fields),
        cutoff=req.assay.cutoff,
        previous=_previous_count(cart.input),
    )
    if cart.error is not None or cart.log is None:
        return dataclasses.replace(base, error=cart.error)
    records = cart.out.ledger.read()
    state = LedgerState.from_records(records)
    since = max(i for i, r in enumerate(records) if isinstance(r, AnalysisStarted))
    failed_now = {
        r.field: r.reason
        for r in records[since:]
        if isinstance(r, DetectFailed) and r.field not in state.detected
    }
    ctx = cart.ctx
    context = ReportContext(
        cartridge_id=cart.name,
        indication=req.assay.indication,
        cutoff=req.assay.cutoff,
        blood_volume_ml=req.assay.blood_volume_ml,
        fields_planned=ctx.get("fields_planned") or list(cart.fields),
        fields_failed={**ctx.get("fields_failed", {}), **failed_now},
        cartridge_fields=ctx.get("cartridge_fields"),
        source=ctx["source"],
        stitch=req.assay.stitch if ctx.get("stitch") else None,
    )
    names = list(cart.fields)
    report = write_outputs(cart.out.root, load_records(cart.out, names, state), context)
    cart.log.emit(Written(files=cart.out.digests(*OUTPUT_FILES)))
    cart.log.emit(
        AnalysisFinished(ctc_count=report.ctc_count, failed=sorted(failed_now))
    )
    # planned by the scan, not failed by it, and no file: lost, not analysed
    missing = {
        n: f"{cart.input}: field {n} was planned by its scan but has no file in "
        "fields/ (a scan still running or cut short, or a file removed)"
        for n in ctx.get("fields_planned") or []
        if n not in cart.fields and n not in ctx.get("fields_failed", {})
    }
    return dataclasses.replace(
        base,
        analyzed=report.fields.analyzed,
        failed={
            **missing,
            **{
                n: r if r.startswith(str(cart.fields[n])) else f"{cart.fields[n]}: {r}"
                for n, r in failed_now.items()
            },
        },
        ctc_count=report.ctc_count,
        at_or_above_cutoff=report.at_or_above_cutoff,
        statement=report.statement,
    )


def _previous_count(src: Path) -> int | None:
    """The CTC count of the input's own report (a run folder's), if any."""
    path = src / "report.json"
    if not (_is_run(src) and path.is_file()):
        return None
    try:
        return read_report(path).ctc_count
    except (OSError, ValueError):
        return None


def failures(results: Iterable[CartridgeResult]) -> list[str]:
    """Every failed field and cartridge, one line each, file names first."""
    out = []
    for r in results:
        if r.error:
            out.append(f"{r.input}: {r.error}" if r.input not in r.error else r.error)
        out += list(r.failed.values())
    return out

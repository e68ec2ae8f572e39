"""Benchmark: one simulated cartridge scan, ctcscan vs plain pymmcore-plus MDA.

Scans the same simulated cartridge (default: all 175 fields of layout
``cellsearch-5x35``, 4 channels, 1384 x 1036 uint16 frames) in several modes and
prints them side by side:

``ctcscan``
    ctcscan's own ``Scan(ScanRequest(...)).run()`` into a fresh run folder, with
    the default on-line detection (``analysis.pipeline.analyze_field_file`` in
    ``detector_workers`` worker processes, default: one when there is a second
    core). ``Scan.run()`` returns once every stored field is detected and the
    report (events.csv, report.json/html) is written. The bench opens the
    instrument itself (``open_instrument``, to watch its frames) and passes it
    to ``Scan(..., instrument=...)``; opening and closing it are timed with the
    run, as when ``Scan.run()`` opened it.
``ctcscan-nodetect``
    The same with a no-op ``run_job`` (`_no_detection`, module level so that it
    pickles into the worker process): storage, the ledger, the worker round trip
    and the report, but no detection.
``mda``
    pymmcore-plus's default ``MDAEngine`` running ``ScanPlan.to_sequence()`` on the
    core from ``open_instrument``, with no output. The shutter is opened by hand
    first (``setAutoShutter(False); setShutterOpen(True)``): Python cameras under
    ``UniMMCore`` skip auto-shutter, so the default engine would otherwise image
    a closed shutter.
``mda-ometiff``
    The same with pymmcore-plus's built-in OME-TIFF output (ome-writers),
    ``core.mda.run(sequence, output=".../mda.ome.tif")``, on the core exactly as
    ``open_instrument`` returns it. A failure is reported with its error.

Every mode runs in its own fresh interpreter (this file with ``--mode``), so peak
RSS (``ru_maxrss``) is per mode. The simulated instrument's ``time_scale`` is 0 in
``hardware_configs/simulated.yaml``: exposures and stage travel are never waited
for, so the numbers are pure software overhead (rendering, copying, encoding,
writing, fsync, detection).

For ``ctcscan`` the child also reads the run folder's ``ledger.jsonl`` and reports
the detection lag: how long after the last ``stored`` event the last ``detected``
event came (and the same from the run's event stream, ``Scan.events``), plus the
detector worker's peak RSS (``RUSAGE_CHILDREN``).

Usage::

    python bench/bench_scan.py                 # all modes, 175 fields
    python bench/bench_scan.py --fields 20 --modes ctcscan,mda
    python bench/bench_scan.py --mode mda      # one mode, JSON result

The driver prints a table and writes it, with the environment, as JSON to
``bench/out/bench_scan-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from analysis.pipeline import FieldJob

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "bench" / "out"
DEFAULT_LAYOUT = "cellsearch-5x35"

MODES: dict[str, str] = {
    "ctcscan": "ctcscan Scan.run(), run folder, on-line detection (default workers)",
    "ctcscan-nodetect": "ctcscan Scan.run(), run folder, no-op run_job in the worker",
    "mda": "pymmcore-plus MDAEngine, no output (shutter opened by hand)",
    "mda-ometiff": "pymmcore-plus MDAEngine, output=*.ome.tif (ome-writers)",
}

#: The budget the full cartridge is held to.
BUDGET_WALL_S = 60.0
BUDGET_RSS_MB = 1024.0
BUDGET_CORES = 2
#: /work/shared/ARCHITECTURE.md "Budgets": ctcscan (whole pipeline) frame rate
#: >= 0.85 x the bare MDA's in the same run; scan + detector worker <= 500 MB
BUDGET_RATIO = 0.85
BUDGET_PAIR_RSS_MB = 500.0
#: issue 12: on-line detection adds at most this to a zero-exposure scan's wall
#: time (ctcscan against ctcscan-nodetect, same run)
BUDGET_DETECTION_COST = 0.05


# --------------------------------------------------------------------- results


@dataclass
class ModeResult:
    """What one mode measured; written by the child process as JSON."""

    mode: str
    ok: bool = False
    error: str | None = None
    fields: int = 0
    frames: int = 0
    wall_s: float = 0.0  # the whole mode in-process: open instrument .. files closed
    acquire_s: float | None = None  # the MDA run (ctcscan: incl. store+detect drain)
    ttff_s: float | None = None  # mode start -> first frameReady
    first_field_s: float | None = None  # mode start -> first durable field (ctcscan)
    last_stored_s: float | None = None  # mode start -> last durable field (ctcscan)
    detection_lag_s: float | None = None  # last 'stored' -> last 'detected' (ledger)
    worker_peak_rss_mb: float | None = None  # largest child's VmHWM (detector)
    children_maxrss_mb: float | None = None  # RUSAGE_CHILDREN ru_maxrss (see notes)
    cpu_s: float = 0.0  # user + system CPU of the child process and its workers
    baseline_rss_mb: float = 0.0  # peak RSS after imports, before the mode
    peak_rss_mb: float = 0.0
    first_frame_mean: float | None = None  # a dark frame would mean a closed shutter
    output_files: int = 0
    output_bytes: int = 0
    process_s: float | None = None  # whole child process, incl. interpreter start
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.wall_s if self.wall_s else 0.0


def _peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size of this process so far (ru_maxrss is KB on Linux).

    With ``RUSAGE_CHILDREN``: of the largest child that has ended and been waited
    for (here: the detector worker processes, after ``Scan.run`` shut them down).
    """
    rss = resource.getrusage(who).ru_maxrss
    return rss / 1024**2 if sys.platform == "darwin" else rss / 1024


class ChildPeaks:
    """The peak RSS of each child process (the detector worker, the
    multiprocessing resource tracker), sampled from /proc.

    ``RUSAGE_CHILDREN``'s ru_maxrss is no measure of a spawned worker: Linux
    carries the high-water mark of the image a child replaces at exec into its
    ru_maxrss, so a worker spawned by a 250 MB scanning process reports at
    least 250 MB even if it never uses more than 15 MB. Each child's own
    ``VmHWM`` (/proc/PID/status) is read every `every_s` instead; the kernel
    keeps it as a high-water mark, so a sample misses only what the child used
    in its last `every_s` before it exited.
    """

    def __init__(self, every_s: float = 0.1) -> None:
        self.every_s = every_s
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ChildPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def largest_mb(self) -> float | None:
        return max(self.peaks.values()) if self.peaks else None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def sample(self) -> None:
        for pid in _children(os.getpid()):
            hwm = _vm_hwm_mb(pid)
            if hwm is not None:
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), hwm)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _no_detection(job: FieldJob) -> dict[str, Any]:
    """A `Scan` ``run_job`` that detects nothing (module level: it must pickle)."""
    return {"field": job.name, "counts": {}, "objects": []}


def _ledger_times(run_dir: Path) -> dict[str, Any]:
    """Timing of the run from the run folder's ledger.jsonl ('t': ISO timestamps)."""
    path = run_dir / "ledger.jsonl"
    if not path.exists():
        return {}
    times: dict[str, list[datetime]] = {}
    seconds: list[float] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            t = datetime.fromisoformat(rec["t"])
        except (ValueError, KeyError, TypeError):
            continue
        ev = rec.get("event", "")
        times.setdefault(ev, []).append(t)
        if ev == "detected" and isinstance(rec.get("seconds"), int | float):
            seconds.append(float(rec["seconds"]))
    out: dict[str, Any] = {k: len(v) for k, v in times.items()}
    stored, detected = times.get("stored", []), times.get("detected", [])
    if stored and detected:
        out["lag_s"] = (max(detected) - max(stored)).total_seconds()
        out["first_stored_to_last_detected_s"] = (
            max(detected) - min(stored)
        ).total_seconds()
        out["first_stored_to_last_stored_s"] = (
            max(stored) - min(stored)
        ).total_seconds()
    if seconds:
        out["detect_seconds_mean"] = sum(seconds) / len(seconds)
        out["detect_seconds_max"] = max(seconds)
        out["detect_seconds_total"] = sum(seconds)
    return out


def _cpu_s() -> float:
    """User + system CPU of this process and of its ended, waited-for children
    (the detector worker processes, which `Scan.run` shuts down before it returns).
    """
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


def _tree_size(path: Path) -> tuple[int, int]:
    """(number of files, total bytes) under `path` (or of `path` itself)."""
    if path.is_file():
        return 1, path.stat().st_size
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


class FrameProbe:
    """Counts frames and notes when the first one arrived (a frameReady slot)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.frames = 0
        self.first_s: float | None = None
        self.first_mean: float | None = None
        self._lock = threading.Lock()

    def frame_ready(self, img: Any, event: Any, meta: Any) -> None:
        with self._lock:
            self.frames += 1
            if self.first_s is None:
                self.first_s = time.perf_counter() - self.t0
                self.first_mean = float(img.mean())


# --------------------------------------------------------------------- modes


def _load(instrument: str, layout: str) -> tuple[Any, Any]:
    from controller.config import InstrumentConfig
    from controller.layouts import get_layout

    cfg = InstrumentConfig.from_file(instrument)
    if cfg.simulation is not None and cfg.simulation.time_scale != 0:
        print(
            f"warning: {instrument} has simulation.time_scale="
            f"{cfg.simulation.time_scale}; the bench will include real waiting",
            file=sys.stderr,
        )
    return cfg, get_layout(layout)


def run_ctcscan(
    res: ModeResult, args: argparse.Namespace, work: Path, *, detect: bool
) -> None:
    """ctcscan's own Scan into a fresh run folder."""
    from controller.hardware.instrument import open_instrument
    from controller.records import Detected, DetectFailed, Failed, Record, Stored
    from controller.runs.scan import Scan, ScanRequest

    cfg, layout = _load(args.instrument, args.layout)
    run_dir = work / "run"
    request = ScanRequest(
        instrument=cfg,
        layout=layout,
        out=run_dir,
        instrument_file=str(args.instrument),
        n_fields=args.fields,
    )
    run_job = None if detect else _no_detection

    seen: dict[str, list[float]] = {}
    seen_lock = threading.Lock()
    statuses: dict[type[Record], str] = {
        Stored: "stored",
        Failed: "failed",
        Detected: "detected",
        DetectFailed: "detect_failed",
    }

    t0 = time.perf_counter()
    probe = FrameProbe(t0)

    def on_record(record: Record) -> None:
        status = statuses.get(type(record))
        if status is not None:
            with seen_lock:
                seen.setdefault(status, []).append(time.perf_counter() - t0)

    # Open the instrument here (as Scan.run would: same seed and source) to watch
    # its frames, and hand it to Scan. Opening and closing stay inside the timed
    # part, so wall s covers what Scan.run() covered when it opened the instrument
    # itself and stays comparable with earlier runs.
    instrument = open_instrument(cfg, layout, source=str(args.instrument))
    scan: Scan | None = None
    try:
        instrument.core.mda.events.frameReady.connect(probe.frame_ready)
        scan = Scan(request, instrument=instrument, run_job=run_job)
        scan.events.subscribe(on_record)
        res.notes.append(
            f"detection: {'analyze_field_file' if detect else 'no-op run_job'}, "
            f"detector_workers={scan.detector_workers} (default)"
        )
        with ChildPeaks() as children:
            result = scan.run()
    finally:
        if scan is None or not scan.hung:  # a hung device is left alone, as Scan does
            instrument.close()
    res.wall_s = time.perf_counter() - t0

    res.fields = result.stored
    res.frames = result.frames
    res.acquire_s = result.duration_s
    res.ttff_s = probe.first_s
    res.first_frame_mean = probe.first_mean
    stored_t, detected_t = seen.get("stored", []), seen.get("detected", [])
    res.first_field_s = min(stored_t) if stored_t else None
    res.last_stored_s = max(stored_t) if stored_t else None
    res.worker_peak_rss_mb = children.largest_mb
    res.children_maxrss_mb = _peak_rss_mb(resource.RUSAGE_CHILDREN) or None
    res.output_files, res.output_bytes = _tree_size(run_dir)
    ledger = _ledger_times(run_dir)
    res.detection_lag_s = ledger.get("lag_s")
    outputs = {
        n: (run_dir / n).exists() for n in ("events.csv", "report.json", "report.html")
    }
    res.extra.update(
        planned=result.planned,
        failed=dict(result.failed),
        detected=result.detected,
        detect_failed=result.detect_failed,
        max_detect_backlog=result.max_detect_backlog,
        detector_workers=scan.detector_workers,
        frames_seen=probe.frames,
        complete=result.complete,
        ctc_count=result.report.ctc_count if result.report else None,
        report_counts=result.report.counts if result.report else None,
        report_fields=result.report.fields.analyzed if result.report else None,
        outputs=outputs,
        ledger=ledger,
        # callback_*: keys kept from the on_field days; now from Scan.events
        callback_lag_s=(max(detected_t) - max(stored_t))
        if stored_t and detected_t
        else None,
        callback_last_detected_s=max(detected_t) if detected_t else None,
    )
    if res.detection_lag_s is not None:
        res.notes.append(
            f"detection finished {res.detection_lag_s:.2f} s after the last field "
            f"was stored (ledger; the event stream says "
            f"{res.extra['callback_lag_s']:.2f} s); {result.detected} detected, "
            f"{result.detect_failed} failed, max backlog {result.max_detect_backlog}"
            + (
                f", detect_field+QC+PNGs {ledger['detect_seconds_mean'] * 1e3:.0f} ms"
                f"/field mean, {ledger['detect_seconds_max'] * 1e3:.0f} ms max "
                "(in the worker)"
                if detect and "detect_seconds_mean" in ledger
                else ""
            )
        )
    if res.last_stored_s is not None:
        res.notes.append(f"last field durably stored after {res.last_stored_s:.2f} s")
    if res.worker_peak_rss_mb:
        res.notes.append(
            f"detector worker peak RSS {res.worker_peak_rss_mb:.0f} MB (its VmHWM, "
            f"sampled every 0.1 s; + this process {_peak_rss_mb():.0f} MB); "
            f"RUSAGE_CHILDREN says {_fmt(res.children_maxrss_mb, '.0f')} MB, which "
            "can include the scanning process's RSS when the worker was spawned"
        )
    missing = [n for n, ok in outputs.items() if not ok]
    if result.report:
        res.notes.append(
            f"report: {result.report.ctc_count} CTC, "
            f"{result.report.fields.analyzed} fields analysed"
            + (f"; MISSING {missing}" if missing else "; events.csv/report.* written")
        )
    else:
        res.notes.append("no report written")
    res.ok = result.complete and result.detected == result.stored and not missing
    if not result.complete:
        res.error = (
            f"incomplete: stored {result.stored}/{result.planned}, "
            f"failed {sorted(result.failed)}"
        )
    elif result.detected != result.stored:
        res.error = (
            f"detected {result.detected} of {result.stored} stored fields "
            f"({result.detect_failed} failed)"
        )
    elif missing:
        res.error = f"report outputs missing: {missing}"


def run_mda(
    res: ModeResult,
    args: argparse.Namespace,
    work: Path,
    *,
    output: bool,
) -> None:
    """pymmcore-plus's default MDAEngine on the plan's sequence."""
    from controller.acquisition.plan import ScanPlan
    from controller.hardware.instrument import open_instrument

    cfg, layout = _load(args.instrument, args.layout)
    t0 = time.perf_counter()
    instrument = open_instrument(cfg, layout, source=str(args.instrument))
    try:
        core = instrument.core
        res.extra["engine"] = type(core.mda.engine).__name__
        res.extra["core"] = type(core).__name__
        res.extra["core_pixel_size_um"] = core.getPixelSizeUm()
        # Python cameras under UniMMCore skip auto-shutter: open it once, by hand.
        core.setAutoShutter(False)
        core.setShutterOpen(True)
        res.notes.append(
            "shutter opened by hand (UniMMCore Python camera skips auto-shutter)"
        )
        plan = ScanPlan.build(layout, cfg, n_fields=args.fields)
        sequence = plan.to_sequence()
        res.fields = len(plan.fields)
        probe = FrameProbe(t0)
        core.mda.events.frameReady.connect(probe.frame_ready)
        target = work / "mda.ome.tif"
        t_run = time.perf_counter()
        try:
            if output:
                core.mda.run(sequence, output=str(target))
            else:
                core.mda.run(sequence)
        finally:
            res.acquire_s = time.perf_counter() - t_run
            res.frames = probe.frames
            res.ttff_s = probe.first_s
            res.first_frame_mean = probe.first_mean
            if output:
                _describe_output(res, work, target)
    finally:
        instrument.close()
    res.wall_s = time.perf_counter() - t0
    expected = res.fields * len(cfg.channels)
    res.ok = res.frames == expected
    if not res.ok:
        res.error = f"got {res.frames} frames, expected {expected}"


def _describe_output(res: ModeResult, work: Path, target: Path) -> None:
    """What the built-in writer actually produced under `work`."""
    produced = sorted(p for p in work.iterdir())
    res.output_files, res.output_bytes = _tree_size(work)
    if not produced:
        res.notes.append("writer produced nothing")
        return
    for p in produced:
        rel = p.relative_to(work)
        if p.is_dir():
            n, nbytes = _tree_size(p)
            res.notes.append(
                f"wrote directory {rel}/ with {n} file(s), "
                f"{nbytes / 1e9:.2f} GB (asked for {target.name})"
            )
        else:
            res.notes.append(f"wrote file {rel}, {p.stat().st_size / 1e9:.2f} GB")


def child(args: argparse.Namespace) -> int:
    """Run one mode in this process; write a `ModeResult` as JSON."""
    res = ModeResult(mode=args.mode)
    own_work = not args.work_dir and not args.out_dir
    if args.work_dir or args.out_dir:
        work = Path(args.work_dir or Path(args.out_dir) / args.mode)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix=f"ctcscan-bench-{args.mode}-"))
    # import everything a mode needs before the baseline, so it is comparable
    import pymmcore_plus  # noqa: F401

    import controller.runs.scan  # noqa: F401
    import simulators  # noqa: F401

    res.baseline_rss_mb = _peak_rss_mb()
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    try:
        if args.mode == "ctcscan":
            run_ctcscan(res, args, work, detect=True)
        elif args.mode == "ctcscan-nodetect":
            run_ctcscan(res, args, work, detect=False)
        elif args.mode == "mda":
            run_mda(res, args, work, output=False)
        elif args.mode == "mda-ometiff":
            run_mda(res, args, work, output=True)
        else:
            raise ValueError(f"unknown mode {args.mode!r}")
    except Exception as e:  # report, do not hide: the driver prints it
        res.ok = False
        res.error = f"{type(e).__name__}: {_first_line(e)}"
        if not res.wall_s:
            res.wall_s = time.perf_counter() - t0
    res.cpu_s = _cpu_s() - cpu0
    res.peak_rss_mb = _peak_rss_mb()
    if own_work and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(asdict(res), indent=1)
    if args.result_json:
        Path(args.result_json).write_text(text)
    else:
        print(text)
    return 0 if res.ok else 1


def _first_line(e: BaseException) -> str:
    lines = [
        ln
        for ln in str(e).strip().splitlines()
        if ln.strip() and not ln.strip().startswith("For further information")
    ]
    if not lines:
        return ""
    # pydantic ValidationErrors put the useful part after the first line
    return " / ".join(ln.strip() for ln in lines[:5])


# --------------------------------------------------------------------- driver


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in (
        "ctcscan",
        "pymmcore-plus",
        "pymmcore",
        "useq-schema",
        "ome-writers",
        "tifffile",
        "numpy",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_mode(mode: str, args: argparse.Namespace, base: Path) -> ModeResult:
    """Run one mode in a fresh interpreter and read back its result."""
    work = base / mode
    work.mkdir(parents=True, exist_ok=True)
    result_file = base / f"{mode}.result.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--mode",
        mode,
        "--layout",
        args.layout,
        "--instrument",
        str(args.instrument),
        "--work-dir",
        str(work),
        "--result-json",
        str(result_file),
    ]
    if args.fields is not None:
        cmd += ["--fields", str(args.fields)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        res = ModeResult(mode=mode, error=f"timed out after {args.timeout} s")
        res.process_s = time.perf_counter() - t0
        return res
    process_s = time.perf_counter() - t0
    if result_file.exists():
        data = json.loads(result_file.read_text())
        res = ModeResult(**data)
    else:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        res = ModeResult(
            mode=mode, error=f"child exited {proc.returncode}: " + " | ".join(tail)
        )
    res.process_s = process_s
    res.extra["returncode"] = proc.returncode
    if proc.returncode < 0 or proc.returncode > 1:
        res.notes.append(
            f"subprocess exited with code {proc.returncode} (after writing its result)"
            if result_file.exists()
            else f"subprocess exited with code {proc.returncode}"
        )
    stderr = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
    if stderr:
        res.extra["stderr_tail"] = stderr[-10:]
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(results: Sequence[ModeResult]) -> str:
    head = [
        "mode",
        "fields",
        "frames",
        "wall s",
        "acq s",
        "frames/s",
        "TTFF s",
        "CPU s",
        "base RSS MB",
        "peak RSS MB",
        "proc s",
        "out GB",
        "status",
    ]
    rows = [head]
    for r in results:
        rows.append(
            [
                r.mode,
                str(r.fields),
                str(r.frames),
                _fmt(r.wall_s, ".2f"),
                _fmt(r.acquire_s, ".2f"),
                _fmt(r.frames_per_s, ".1f"),
                _fmt(r.ttff_s, ".2f"),
                _fmt(r.cpu_s, ".1f"),
                _fmt(r.baseline_rss_mb, ".0f"),
                _fmt(r.peak_rss_mb, ".0f"),
                _fmt(r.process_s, ".1f"),
                _fmt(r.output_bytes / 1e9, ".2f"),
                "ok" if r.ok else "FAILED",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for i, row in enumerate(rows):
        cells = [
            c.ljust(w) if j == 0 else c.rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _detection_cost_line(results: Sequence[ModeResult], full: bool) -> str | None:
    """What on-line detection adds to the scan: ctcscan's wall time against
    ctcscan-nodetect's in the same run (None unless both ran and succeeded)."""
    by = {r.mode: r for r in results if r.ok}
    on, off = by.get("ctcscan"), by.get("ctcscan-nodetect")
    if on is None or off is None or not off.wall_s:
        return None
    extra = on.wall_s / off.wall_s - 1
    ok = extra <= BUDGET_DETECTION_COST
    scope = "" if full else "  (partial cartridge: not a budget verdict)"
    return (
        f"  on-line detection: +{extra * 100:.0f} % wall ({on.wall_s:.1f} s against "
        f"{off.wall_s:.1f} s without detection) {'<=' if ok else '>'} "
        f"{BUDGET_DETECTION_COST * 100:.0f} % [{'PASS' if ok else 'FAIL'}]{scope}"
    )


def _budget_line(r: ModeResult, full: bool, mda: ModeResult | None = None) -> str:
    if not r.ok:
        return f"  {r.mode}: no verdict (mode failed)"
    ratio = ""
    if mda is not None and mda.ok and mda.frames_per_s and r.mode != mda.mode:
        x = r.frames_per_s / mda.frames_per_s
        ok_r = x >= BUDGET_RATIO
        ratio = (
            f", frame rate {x:.2f}x the bare MDA's "
            f"{'>=' if ok_r else '<'} {BUDGET_RATIO}x [{'PASS' if ok_r else 'FAIL'}]"
        )
    wall = r.process_s if r.process_s is not None else r.wall_s
    ok_t, ok_m = wall <= BUDGET_WALL_S, r.peak_rss_mb <= BUDGET_RSS_MB
    scope = "" if full else "  (partial cartridge: not a budget verdict)"
    both = ""
    if r.worker_peak_rss_mb:
        total = r.peak_rss_mb + r.worker_peak_rss_mb
        ok_b = total <= BUDGET_PAIR_RSS_MB
        both = (
            f"; with the detector worker {total:.0f} MB "
            f"{'<=' if ok_b else '>'} {BUDGET_PAIR_RSS_MB:.0f} MB "
            f"[{'PASS' if ok_b else 'FAIL'}]"
        )
    return (
        f"  {r.mode}: end-to-end {wall:.1f} s {'<=' if ok_t else '>'} "
        f"{BUDGET_WALL_S:.0f} s [{'PASS' if ok_t else 'FAIL'}], peak RSS "
        f"{r.peak_rss_mb:.0f} MB {'<=' if ok_m else '>'} {BUDGET_RSS_MB:.0f} MB "
        f"[{'PASS' if ok_m else 'FAIL'}]{both}{ratio}{scope}"
    )


def driver(args: argparse.Namespace) -> int:
    from controller.layouts import get_layout

    modes = list(dict.fromkeys(m.strip() for m in args.modes.split(",") if m.strip()))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}", file=sys.stderr)
        return 2
    layout = get_layout(args.layout)
    n_fields = (
        layout.n_fields if args.fields is None else min(args.fields, layout.n_fields)
    )
    full = n_fields == layout.n_fields
    if args.out_dir:
        base = Path(args.out_dir)
        base.mkdir(parents=True, exist_ok=True)
    else:
        base = Path(tempfile.mkdtemp(prefix="ctcscan-bench-"))
    cores = _cores()
    print(
        f"ctcscan scan bench: layout {layout.name}, {n_fields}/{layout.n_fields} "
        f"fields, instrument {args.instrument}"
    )
    print(
        f"  {cores} core(s) available, python {platform.python_version()}, "
        f"run folders under {base}{' (kept)' if args.keep else ' (removed)'}"
    )
    print(
        f"  budget: full {layout.n_fields}-field cartridge end to end <= "
        f"{BUDGET_WALL_S:.0f} s wall on {BUDGET_CORES} cores, peak RSS <= "
        f"{BUDGET_RSS_MB:.0f} MB"
    )
    if cores != BUDGET_CORES:
        print(
            f"  note: this machine offers {cores} cores, the budget assumes "
            f"{BUDGET_CORES}"
        )
    print(
        "  note: mda modes open the shutter by hand (core.setAutoShutter(False); "
        "core.setShutterOpen(True)): Python cameras under UniMMCore skip "
        "auto-shutter",
        flush=True,
    )

    results: list[ModeResult] = []
    for mode in modes:
        print(f"-- {mode}: {MODES[mode]} ...", end=" ", flush=True)
        r = run_mode(mode, args, base)
        print(
            f"{'ok' if r.ok else 'FAILED'} ({_fmt(r.process_s, '.1f')} s)", flush=True
        )
        results.append(r)
    if not args.keep and not args.out_dir:
        shutil.rmtree(base, ignore_errors=True)

    print()
    print(format_table(results))
    print()
    print(
        "wall s: the mode in-process (ctcscan: open_instrument + Scan.run() + "
        "close; mda: open_instrument + plan + mda.run + close); acq s: ctcscan "
        "ScanResult.duration_s (MDA + store and detection drain) / mda.run(); "
        "frames/s = frames / wall s; TTFF: "
        "mode start -> first frameReady; proc s: whole subprocess incl. interpreter "
        "start and imports; base RSS: peak RSS after imports, before the mode; "
        "peak RSS: the mode's own process (detector workers: see below)."
    )
    lagged = [r for r in results if r.mode.startswith("ctcscan")]
    if lagged:
        print("on-line detection (from the run folder's ledger.jsonl):")
        for r in lagged:
            led = r.extra.get("ledger") or {}
            print(
                f"  {r.mode}: last field stored at {_fmt(r.last_stored_s, '.2f')} s, "
                f"detection lag (last 'detected' - last 'stored') "
                f"{_fmt(r.detection_lag_s, '.2f')} s, detected "
                f"{r.extra.get('detected', '-')}/{r.fields}, max backlog "
                f"{r.extra.get('max_detect_backlog', '-')}, worker peak RSS "
                f"{_fmt(r.worker_peak_rss_mb, '.0f')} MB"
                + (
                    f", per-field job {led['detect_seconds_mean'] * 1e3:.0f} ms mean"
                    if "detect_seconds_mean" in led
                    else ""
                )
            )
    print(f"budget (end to end = proc s, {n_fields} fields):")
    mda = next((r for r in results if r.mode == "mda"), None)
    for r in results:
        print(_budget_line(r, full, mda))
    if (line := _detection_cost_line(results, full)) is not None:
        print(line)
    print("notes:")
    for r in results:
        for note in r.notes:
            print(f"  {r.mode}: {note}")
        if r.first_frame_mean is not None:
            print(f"  {r.mode}: first frame mean {r.first_frame_mean:.1f} ADU")
        if r.first_field_s is not None:
            print(
                f"  {r.mode}: first field durably stored after {r.first_field_s:.2f} s"
            )
        if r.error:
            print(f"  {r.mode}: ERROR {r.error}")

    out_dir = Path(args.json_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_file = out_dir / f"bench_scan-{stamp}.json"
    report = {
        "bench": "bench_scan",
        "started": stamp,
        "command": [sys.executable, *sys.argv],
        "layout": layout.name,
        "fields": n_fields,
        "instrument": str(args.instrument),
        "cores": cores,
        "platform": platform.platform(),
        "versions": _versions(),
        "budget": {
            "wall_s": BUDGET_WALL_S,
            "rss_mb": BUDGET_RSS_MB,
            "cores": BUDGET_CORES,
        },
        "results": [{**asdict(r), "frames_per_s": r.frames_per_s} for r in results],
    }
    out_file.write_text(json.dumps(report, indent=1))
    print(f"\nJSON: {out_file}")
    return 0 if all(r.ok for r in results) else 1


# --------------------------------------------------------------------- cli


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from controller.hardware.instrument import DEFAULT_INSTRUMENT

    p = argparse.ArgumentParser(
        description="Scan a simulated cartridge with ctcscan and with plain "
        "pymmcore-plus MDA; report wall time, frames/s and peak RSS per mode."
    )
    p.add_argument(
        "--mode",
        choices=list(MODES),
        help="run ONE mode in this process and print its JSON result "
        "(used by the driver)",
    )
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated modes for the driver (default: all: {','.join(MODES)})",
    )
    p.add_argument(
        "--fields",
        type=int,
        default=None,
        help="scan only the first N fields (default: the whole layout)",
    )
    p.add_argument("--layout", default=DEFAULT_LAYOUT, help="layout name or YAML")
    p.add_argument(
        "--instrument",
        default=str(DEFAULT_INSTRUMENT),
        help="instrument YAML (default: the simulated scanner)",
    )
    p.add_argument(
        "--out-dir",
        default=None,
        help="where run folders / MDA output go (default: a temp dir)",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the run folders and MDA output"
    )
    p.add_argument(
        "--json-dir",
        default=str(DEFAULT_OUT),
        help="where the driver writes its JSON report (default: bench/out)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds before a mode's subprocess is killed",
    )
    p.add_argument("--work-dir", help=argparse.SUPPRESS)
    p.add_argument("--result-json", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return child(args) if args.mode else driver(args)


if __name__ == "__main__":
    raise SystemExit(main())

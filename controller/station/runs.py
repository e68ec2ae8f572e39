"""What the station knows of the run folders under its root: read from files only.

`Catalog` finds run folders (a ``ledger.jsonl``: scans and analyses) and queue
folders (a ``queue.jsonl``) under the root and resolves a request's folder name
to a folder strictly inside the root (``..``, absolute names and symlinks that
lead out are refused as "no such run"). `RunView` follows one folder's ledger
as it grows: each `refresh` reads only the bytes appended since the last one
and folds the new records into the run's live status (progress, ETA, current
field, failures, re-focused fields, candidates so far). Whether a run is going
on now is read from the kernel's lock table (`controller.runstore.lock.in_use`):
the station never touches a folder's lock while it watches.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from controller.records import (
    AnalysisFinished,
    AnalysisStarted,
    CartridgeDone,
    Corrupt,
    Detected,
    DetectFailed,
    Failed,
    Finished,
    FocusAnchorDone,
    FocusMapRecorded,
    Loaded,
    Planned,
    QueueFinished,
    QueueStarted,
    QueueStopped,
    Record,
    RecordError,
    Refocused,
    Resumed,
    Started,
    Stopped,
    Stored,
    parse_line,
)
from controller.runs.queue import STOP_FILE
from controller.runstore.lock import in_use

__all__ = ["Catalog", "NoSuchRun", "RunView"]

#: folders never searched for runs (a run's own parts, hidden folders)
_SKIP = {"fields", "detections", "candidates", "__pycache__", "node_modules"}
#: how deep below the root run folders are looked for
MAX_DEPTH = 4


class NoSuchRun(LookupError):
    """The name is no run or queue folder inside the root."""


def _seconds(t: str) -> float | None:
    try:
        return datetime.fromisoformat(t).timestamp()
    except ValueError:
        return None


@dataclass
class LedgerTail:
    """Reads the lines appended to a file since the last read."""

    path: Path
    offset: int = 0
    ino: int | None = None

    def read(self) -> tuple[list[Record], bool]:
        """New records, and whether the file was replaced (read from the
        start again: the caller starts over)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return [], False
        if not stat.S_ISREG(st.st_mode):  # a symlink, a FIFO: not read
            return [], False
        reset = False
        if st.st_ino != self.ino or st.st_size < self.offset:
            reset = self.ino is not None
            self.ino, self.offset = st.st_ino, 0
        if st.st_size == self.offset:
            return [], reset
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(st.st_size - self.offset)
        end = chunk.rfind(b"\n") + 1  # a line still being written waits
        self.offset += end
        out = []
        for line in chunk[:end].split(b"\n"):
            if line.strip():
                try:
                    out.append(parse_line(line))
                except RecordError:
                    continue
        return out, reset


@dataclass
class _Live:
    """A run's status folded from its records."""

    kind: str = "run"
    cartridge_id: str = ""
    planned: list[str] = field(default_factory=list)
    planned_n: int = 0
    stored: dict[str, Stored] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    detected: dict[str, int] = field(default_factory=dict)
    detect_failed: dict[str, str] = field(default_factory=dict)
    refocused: list[str] = field(default_factory=list)
    anchors: list[dict[str, Any]] = field(default_factory=list)
    anchors_total: int = 0
    focus_done: bool = False
    end: str | None = None  # finished | stopped
    error: str | None = None
    last_stored: str | None = None
    times: deque[float] = field(default_factory=lambda: deque(maxlen=12))
    started_at: str = ""
    # queues
    loaded: list[str] = field(default_factory=list)
    done: dict[str, dict[str, Any]] = field(default_factory=dict)

    def fold(self, r: Record) -> None:
        if isinstance(r, Started | AnalysisStarted | QueueStarted):
            self.end, self.error = None, None
            self.started_at = r.t
            self.times.clear()
            if isinstance(r, Started):
                self.cartridge_id, self.planned_n = r.cartridge_id, r.planned
            elif isinstance(r, AnalysisStarted):
                self.kind, self.planned_n = "analysis", r.fields
        elif isinstance(r, Planned):
            self.planned = list(r.fields)
            self.planned_n = len(self.planned)
        elif isinstance(r, Resumed):
            pass
        elif isinstance(r, FocusAnchorDone):
            self.anchors_total = r.total
            self.anchors.append(
                {"index": r.index, "x_um": r.x_um, "y_um": r.y_um, "z_um": r.z_um}
            )
        elif isinstance(r, FocusMapRecorded):
            self.focus_done = True
        elif isinstance(r, Stored):
            self.stored[r.field] = r
            self.failed.pop(r.field, None)
            self.detected.pop(r.field, None)
            self.last_stored = r.field
            if (s := _seconds(r.t)) is not None:
                self.times.append(s)
        elif isinstance(r, Failed):
            self.failed[r.field] = r.reason
        elif isinstance(r, Corrupt):
            self.stored.pop(r.field, None)
        elif isinstance(r, Detected):
            self.detected[r.field] = int((r.counts or {}).get("CTC", 0))
            self.detect_failed.pop(r.field, None)
            if self.kind == "analysis":
                self.stored.setdefault(r.field, None)  # type: ignore[arg-type]
        elif isinstance(r, DetectFailed):
            self.detected.pop(r.field, None)
            self.detect_failed[r.field] = r.reason
        elif isinstance(r, Refocused):
            if r.field not in self.refocused:
                self.refocused.append(r.field)
        elif isinstance(r, Finished | AnalysisFinished | QueueFinished):
            self.end = "finished"
        elif isinstance(r, Stopped):
            self.end, self.error = "stopped", r.error
        elif isinstance(r, QueueStopped):
            self.end, self.error = "stopped", r.reason
        elif isinstance(r, Loaded):
            self.loaded.append(r.barcode)
        elif isinstance(r, CartridgeDone):
            self.done[r.barcode] = {
                "slot": r.slot,
                "status": r.status,
                "ctc_count": r.ctc_count,
                "cutoff": r.cutoff,
            }

    def eta_s(self, remaining: int) -> float | None:
        if len(self.times) < 2 or remaining <= 0:
            return None if remaining > 0 else 0.0
        per = (self.times[-1] - self.times[0]) / (len(self.times) - 1)
        return round(per * remaining, 1)


class RunView:
    """One run, analysis or queue folder, followed as its journal grows."""

    def __init__(self, folder: Path, name: str, kind: str) -> None:
        self.folder = folder
        self.name = name
        self.kind = kind  # run | queue
        journal = "queue.jsonl" if kind == "queue" else "ledger.jsonl"
        self._tail = LedgerTail(folder / journal)
        self._live = _Live(kind=kind)
        self._lock = threading.Lock()
        self.version = 0  # grows with every new record
        #: the latest records with their sequence numbers, for live pages
        self._recent: deque[tuple[int, Record]] = deque(maxlen=1000)
        self._seq = 0
        self._report_cache: tuple[int, int, dict[str, Any] | None] = (-1, -1, None)

    def refresh(self) -> list[Record]:
        """Fold the records appended since the last call; return them."""
        with self._lock:
            new, reset = self._tail.read()
            if reset:
                self._live = _Live(kind=self.kind)
            for r in new:
                self._live.fold(r)
                self._seq += 1
                self._recent.append((self._seq, r))
            self.version += len(new) + int(reset)
            return new

    def cursor(self) -> int:
        """The sequence number of the latest record read (see `records_since`)."""
        self.refresh()
        return self._seq

    def records_since(self, seq: int) -> list[tuple[int, Record]]:
        """The records read after sequence number `seq`."""
        self.refresh()
        with self._lock:
            return [(n, r) for n, r in self._recent if n > seq]

    def detected_fields(self) -> list[str]:
        self.refresh()
        return list(self._live.detected)

    def running(self) -> bool:
        self.refresh()
        return bool(in_use(self.folder)) and self._live.end is None

    def status(self) -> dict[str, Any]:
        """The run's live status (what ``GET /api/runs/{run}`` returns)."""
        self.refresh()
        lv = self._live
        running = self.running()
        if running:
            state = "scanning" if self.kind != "queue" else "running"
            if lv.kind == "analysis":
                state = "analysing"
        elif lv.end is not None:
            state = lv.end
        elif lv.started_at:
            state = "interrupted"
        else:
            state = "new"
        if self.kind == "queue":
            return self._queue_status(state)
        planned = lv.planned or [f"field_{i:03d}" for i in range(lv.planned_n)]
        n = len(planned) or lv.planned_n
        stored = (
            [f for f in lv.stored if f in planned] if lv.planned else list(lv.stored)
        )
        remaining = max(n - len(stored) - len(lv.failed), 0)
        current = None
        if running:
            current = next(
                (f for f in planned if f not in lv.stored and f not in lv.failed), None
            )
        report = self._report()
        return {
            "run": self.name,
            "kind": lv.kind,
            "cartridge_id": lv.cartridge_id or self.folder.name,
            "state": state,
            "error": lv.error,
            "started_at": lv.started_at,
            "fields": {
                "planned": n,
                "stored": len(stored),
                "failed": len(lv.failed),
                "detected": len(lv.detected),
                "detect_failed": len(lv.detect_failed),
            },
            "failed": lv.failed,
            "detect_failed": lv.detect_failed,
            "refocused": lv.refocused,
            "focus": {
                "anchors_done": len(lv.anchors),
                "anchors_total": lv.anchors_total,
                "done": lv.focus_done,
            },
            "current_field": current,
            "last_field": lv.last_stored,
            "eta_s": lv.eta_s(remaining) if running else None,
            "machine_count": (
                report.get("ctc_count")
                if report and lv.end == "finished"
                else sum(lv.detected.values())
            ),
            "cutoff": report.get("cutoff") if report else None,
            "report": bool(report),
            "version": self.version,
        }

    def _queue_status(self, state: str) -> dict[str, Any]:
        lv = self._live
        current = lv.loaded[-1] if lv.loaded and lv.loaded[-1] not in lv.done else None
        return {
            "run": self.name,
            "kind": "queue",
            "cartridge_id": self.folder.name,
            "state": state,
            "error": lv.error,
            "started_at": lv.started_at,
            "cartridges": {"loaded": len(lv.loaded), "done": len(lv.done)},
            "done": lv.done,
            "current_cartridge": current if state == "running" else None,
            "stop_requested": (self.folder / STOP_FILE).exists(),
            "version": self.version,
        }

    def _report(self) -> dict[str, Any] | None:
        """report.json, read again only when it changes."""
        path = self.folder / "report.json"
        try:
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                return None
            if self._report_cache[:2] == (st.st_size, st.st_mtime_ns):
                return self._report_cache[2]
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        data = data if isinstance(data, dict) else None
        self._report_cache = (st.st_size, st.st_mtime_ns, data)
        return data

    def stored(self) -> dict[str, Stored]:
        self.refresh()
        return {k: v for k, v in self._live.stored.items() if v is not None}

    def anchors(self) -> list[dict[str, Any]]:
        self.refresh()
        return list(self._live.anchors)


class Catalog:
    """The run and queue folders under `root`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self._views: dict[Path, RunView] = {}
        self._lock = threading.Lock()

    def find(self) -> list[tuple[str, str]]:
        """(name below the root, kind) of every run and queue folder, sorted;
        symlinks are not followed."""
        found: list[tuple[str, str]] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            here = Path(dirpath)
            depth = len(here.relative_to(self.root).parts)
            dirnames[:] = sorted(
                d
                for d in dirnames
                if not d.startswith(".") and d not in _SKIP and depth < MAX_DEPTH
            )
            if here == self.root:
                continue
            rel = here.relative_to(self.root).as_posix()
            if "queue.jsonl" in filenames:
                found.append((rel, "queue"))
            elif "ledger.jsonl" in filenames:
                found.append((rel, "run"))
        return sorted(found)

    def resolve(self, name: str) -> tuple[Path, str]:
        """The folder and kind of the run named `name` (its path below the
        root). Raises `NoSuchRun` for anything else."""
        if not name or "\x00" in name or name.startswith(("/", "\\")):
            raise NoSuchRun(name)
        parts = Path(name).parts
        if any(p in ("..", ".") or p.startswith(".") for p in parts):
            raise NoSuchRun(name)
        try:
            path = (self.root / name).resolve(strict=True)
        except (OSError, RuntimeError):
            raise NoSuchRun(name) from None
        if not path.is_relative_to(self.root) or path == self.root:
            raise NoSuchRun(name)
        if path != self.root / Path(*parts):  # a symlink on the way
            raise NoSuchRun(name)
        if (path / "queue.jsonl").is_file():
            return path, "queue"
        if (path / "ledger.jsonl").is_file():
            return path, "run"
        raise NoSuchRun(name)

    def view(self, name: str) -> RunView:
        path, kind = self.resolve(name)
        with self._lock:
            v = self._views.get(path)
            if v is None or v.kind != kind:
                v = self._views[path] = RunView(path, Path(name).as_posix(), kind)
            return v

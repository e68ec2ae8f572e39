"""The review of one run folder: candidates, decisions and the sign-off.

Reads ``events.csv`` and ``review.jsonl`` (`controller.runstore.review` holds
the file format and the rules); writes a decision or the sign-off under the run
folder's lock (`FolderLock`), so nothing else writes there meanwhile: a scan or
analysis owning the folder gets the request refused, and two readers posting at
the same moment are written one after the other. Every decision and the
sign-off also goes to the run's ``audit.log``. The sign-off adds the review to
``report.json`` and ``report.html``.
"""

from __future__ import annotations

import hashlib
import json
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.report import rewrite_report
from controller.records import Written
from controller.runs.outputs import load_records
from controller.runstore.audit import AuditLog
from controller.runstore.folder import RunFolder
from controller.runstore.ledger import LedgerState
from controller.runstore.lock import FolderLock, FolderLockedError
from controller.runstore.review import (
    FEATURES,
    REVIEW_FILE,
    DecisionLine,
    ReviewError,
    ReviewState,
    SignOffLine,
    append_line,
    candidates_of,
    fold,
    read_lines,
    signoff_digest,
)

__all__ = ["Events", "RunReview", "read_events", "regular_file"]

#: one writer at a time per process (the folder lock is per open file)
_WRITE = threading.Lock()


#: how long a write waits for another station's write to the same run
LOCK_WAIT_S = 3.0


def regular_file(path: Path, root: Path) -> None:
    """`path` is absent, or a regular file that is no symlink (so nothing is
    read or written outside the run folder, and no FIFO blocks a request)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise ReviewError(
            f"{path.relative_to(root)} is not a regular file of the run folder: "
            "the review does not read or write it"
        )


def _float(v: str) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f else None


@dataclass(frozen=True)
class Events:
    """What the review needs of one version of an events.csv."""

    sha256: str
    candidates: list[dict[str, Any]]
    machine: int
    #: every object id in the file
    ids: frozenset[str]
    #: the cytokeratin objects, for the scatter plots
    scatter: list[dict[str, Any]]


_EVENTS: OrderedDict[Path, tuple[int, int, Events]] = OrderedDict()
_EVENTS_LOCK = threading.Lock()


def read_events(path: Path) -> Events:
    """The review's view of an events.csv, parsed once per file version (a
    cartridge's events.csv has thousands of rows; pages ask often)."""
    try:
        st = path.stat()
        with _EVENTS_LOCK:
            hit = _EVENTS.get(path)
            if hit is not None and hit[:2] == (st.st_size, st.st_mtime_ns):
                _EVENTS.move_to_end(path)
                return hit[2]
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ReviewError(
            "this run has no events.csv yet: it can be reviewed once its "
            "scan has finished"
        ) from None
    rows, machine, everything = candidates_of(raw)
    ev = Events(
        sha256=hashlib.sha256(raw).hexdigest(),
        candidates=rows,
        machine=machine,
        ids=frozenset(str(r.get("object_id")) for r in everything),
        scatter=[
            {
                "object_id": r.get("object_id"),
                "label": r.get("label"),
                "ck_snr": _float(r.get("ck_snr", "")),
                "cd45_snr": _float(r.get("cd45_snr", "")),
                "dapi": _float(r.get("DAPI_mean", "")),
                "ck_area_um2": _float(r.get("area_um2", "")),
            }
            for r in everything
            if _float(r.get("ck_snr", "")) is not None
        ],
    )
    with _EVENTS_LOCK:
        _EVENTS[path] = (st.st_size, st.st_mtime_ns, ev)
        while len(_EVENTS) > 64:
            _EVENTS.popitem(last=False)
    return ev


class RunReview:
    """The review of the run folder `root` (its current events.csv)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.events_path = root / "events.csv"
        self.path = root / REVIEW_FILE

    def _events(self) -> Events:
        return read_events(self.events_path)

    def state(self) -> tuple[ReviewState, Events]:
        for path in self._files():
            regular_file(path, self.root)
        ev = self._events()
        lines, _, problems = read_lines(self.path)
        st = fold(lines, [r["object_id"] for r in ev.candidates], ev.machine, ev.sha256)
        st.problems[:0] = problems
        if st.signoff is None and self._report_signed():
            st.problems.append(
                "report.json holds a signed review that review.jsonl does not: "
                "lines were removed"
            )
        return st, ev

    def _files(self) -> tuple[Path, ...]:
        return (
            self.events_path,
            self.path,
            self.root / "audit.log",
            self.root / "report.json",
            self.root / "report.html",
        )

    def _report_signed(self) -> bool:
        try:
            data = json.loads((self.root / "report.json").read_bytes())
        except (OSError, ValueError):
            return False
        review = data.get("review") if isinstance(data, dict) else None
        return isinstance(review, dict) and bool(review.get("signoff"))

    def candidates(self, reviewer: str | None) -> dict[str, Any]:
        """Candidates with features; `reviewer`'s own decisions (and everyone's
        once both readers are done)."""
        st, ev = self.state()
        me = st.who(reviewer) if reviewer else ""
        mine = st.decisions.get(me, {})
        if me and me == st.adjudicator:
            mine = st.adjudicated
        reveal = st.readers_done
        out = []
        for r in ev.candidates:
            oid = r["object_id"]
            item: dict[str, Any] = {
                "object_id": oid,
                "field": r["field"],
                "row": _float(r["row"]),
                "col": _float(r["col"]),
                "stage_x_um": _float(r.get("stage_x_um", "")),
                "stage_y_um": _float(r.get("stage_y_um", "")),
                "label": r["label"],
                "reason": r.get("reason", ""),
                "review": r.get("review", ""),
                "score": _float(r.get("score", "")),
                "features": {k: _float(r.get(k, "")) for k in FEATURES if k in r},
                "decision": mine.get(oid),
            }
            if reveal:
                item["readers"] = {
                    name: st.decisions[name].get(oid) for name in st.readers
                }
                item["adjudicated"] = st.adjudicated.get(oid)
                item["disagreement"] = oid in st.disagreements
            out.append(item)
        return {"candidates": out, "objects": ev.scatter, **self.summary(st)}

    def summary(self, st: ReviewState | None = None) -> dict[str, Any]:
        if st is None:
            st = self.state()[0]
        return {
            "state": st.state,
            "events_sha256": st.events_sha256,
            "candidates_total": len(st.candidates),
            "machine_count": st.machine_count,
            "reviewed_count": st.reviewed_count,
            "readers": st.readers,
            "adjudicator": st.adjudicator,
            "progress": st.progress(),
            "disagreements": st.disagreements,
            "pending": st.pending,
            "agreement": st.agreement,
            "kappa": st.kappa,
            "ready_to_sign": st.ready_to_sign,
            "stale_decisions": st.stale,
            "problems": st.problems,
            "signoff": None if st.signoff is None else st.signoff.model_dump(),
        }

    def _locked(self) -> FolderLock:
        """The run folder's lock; another station's write (milliseconds) is
        waited for, a scan or analysis owning the folder is not."""
        lock = FolderLock(self.root, "run folder")
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                lock.acquire()
                return lock
            except FolderLockedError:
                if time.monotonic() > deadline:
                    raise ReviewError(
                        "the run folder is in use by a scan or analysis: review "
                        "it when that has finished"
                    ) from None
                time.sleep(0.02)

    def decide(
        self, reviewer: str, object_id: str, decision: str, comment: str
    ) -> DecisionLine:
        with _WRITE:
            lock = self._locked()
            try:
                st, _ = self.state()
                role = st.check(reviewer, object_id, decision)
                reviewer = st.who(reviewer)
                line = DecisionLine(
                    reviewer=reviewer,
                    object_id=object_id,
                    decision=decision,  # type: ignore[arg-type]
                    comment=comment,
                    role=role,  # type: ignore[arg-type]
                    events_sha256=st.events_sha256,
                )
                append_line(self.path, line)
                AuditLog(self.root / "audit.log", reviewer).write(
                    "REVIEW",
                    f"{role} {object_id}: {decision}"
                    + (f" ({comment})" if comment else ""),
                )
                return line
            finally:
                lock.release()

    def sign(self, reviewer: str) -> SignOffLine:
        with _WRITE:
            lock = self._locked()
            try:
                st, _ = self.state()
                if st.signoff is not None:
                    raise ReviewError(
                        f"already signed by {st.signoff.reviewer} at {st.signoff.t}"
                    )
                if st.problems:
                    raise ReviewError(f"the review cannot be signed: {st.problems[0]}")
                reviewer = st.who(reviewer)
                if not st.ready_to_sign:
                    left = (
                        f"{len(st.pending)} disagreement(s) wait for the adjudicator"
                        if st.readers_done
                        else "two readers must decide every candidate first"
                    )
                    raise ReviewError(f"the review cannot be signed yet: {left}")
                folder = RunFolder(self.root)
                ledger = LedgerState.from_records(folder.ledger.read())
                fields = {n: s.sha256 for n, s in ledger.stored.items()}
                _, raw, _ = read_lines(self.path)
                whole, f_sha, d_sha = signoff_digest(fields, st.events_sha256, raw)
                line = SignOffLine(
                    reviewer=reviewer,
                    sha256=whole,
                    fields_sha256=f_sha,
                    events_sha256=st.events_sha256,
                    decisions_sha256=d_sha,
                    machine_count=st.machine_count,
                    reviewed_count=st.reviewed_count or 0,
                    readers=st.readers,
                    adjudicator=st.adjudicator,
                    kappa=st.kappa,
                    agreement=st.agreement,
                    candidates=len(st.candidates),
                )
                append_line(self.path, line)
                AuditLog(self.root / "audit.log", reviewer).write(
                    "SIGN",
                    f"review signed: reviewed count {line.reviewed_count} "
                    f"(machine {line.machine_count}), sha256 {whole}",
                )
                st.signoff = line
                if (self.root / "report.json").exists():
                    records = load_records(folder, sorted(ledger.detected), ledger)
                    rewrite_report(self.root, records, st.summary())
                    written: tuple[str, ...] = ("report.json", "report.html")
                else:
                    written = ()
                written += (REVIEW_FILE,)
                folder.ledger.append(Written(files=folder.digests(*written)))
                return line
            finally:
                lock.release()

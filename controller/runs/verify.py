"""``ctcscan verify``: is a run, analysis or queue folder what the program wrote?

Checked, read-only:

- the seals of ``audit.log``, ``ledger.jsonl`` and ``queue.jsonl`` (every line
  vouches for itself and the lines before it, `controller.runstore.chain`);
- every stored field against the sha256 of its ``stored`` record;
- every current detection file against its ``detected`` record;
- every file a ``written`` record names (scan.json, focus_map.json,
  ground_truth.json, events.csv, report.json, report.html, summary.json)
  against the latest such record;
- in a queue folder, each cartridge's run folder as well; in a run folder, each
  re-analysis under ``analyses/``.

A problem is something changed, missing or cut short; a note is something the
check could not vouch for (lines written before lines were sealed, a run that
has not finished). Nothing is written into the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from controller.errors import StorageError
from controller.records import (
    AnalysisFinished,
    AnalysisStarted,
    CartridgeDone,
    Detected,
    Finished,
    QueueFinished,
    QueueStarted,
    Record,
    RecordError,
    Started,
    Stopped,
    Stored,
    Written,
    parse_line,
)
from controller.runstore.chain import check_lines, unseal
from controller.runstore.folder import RunFolder, no_folder
from controller.runstore.ledger import LedgerState
from controller.runstore.review import REVIEW_FILE, find_signoff

__all__ = ["VerifyReport", "verify_folder"]


@dataclass
class VerifyReport:
    """What `verify_folder` found."""

    root: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: what was checked, by kind (folders, log lines, fields, detections,
    #: pictures, files)
    checked: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        order = ("folders", "log lines", "fields", "detections", "pictures", "files")
        return ", ".join(
            f"{n} {k if n != 1 else k[:-1]}" for k in order if (n := self.checked[k])
        )


def verify_folder(root: str | Path) -> VerifyReport:
    """Check a run, analysis or queue folder; see the module docstring.

    Raises
    ------
    StorageError
        `root` is no such folder, or none of these kinds.
    """
    root = Path(root)
    if not root.is_dir():
        raise no_folder(root)
    rep = VerifyReport(root)
    if (root / "queue.jsonl").is_file():
        _queue(root, rep)
    elif (root / "ledger.jsonl").is_file():
        _run(root, rep, prefix="")
        for sub in sorted((root / "analyses").glob("*/ledger.jsonl")):
            _run(sub.parent, rep, prefix=f"analyses/{sub.parent.name}/")
    else:
        raise StorageError(
            f"{root}: not a run, analysis or queue folder (no ledger.jsonl or "
            "queue.jsonl)"
        )
    return rep


def _read(path: Path, rep: VerifyReport, name: str) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        rep.problems.append(f"{name}: cannot be read ({e.strerror or e})")
        return None


def _log(path: Path, rep: VerifyReport, name: str) -> list[Record]:
    """Check a sealed file's chain; return the records of its lines (none
    for the audit log, whose lines are no records)."""
    raw = _read(path, rep, name)
    if raw is None:
        return []
    chain = check_lines(raw)
    rep.checked["log lines"] += chain.lines
    rep.problems += [f"{name}: {p}" for p in chain.problems]
    if chain.torn:
        rep.notes.append(
            f"{name}: line(s) {', '.join(map(str, chain.torn))} were torn by a "
            "crash (cut short, no record; the next line starts afresh)"
        )
    if chain.unsealed_before:
        rep.notes.append(
            f"{name}: the first {chain.unsealed_before} line(s) were written "
            "before lines were sealed and cannot be vouched for"
        )
    records: list[Record] = []
    if path.name in ("audit.log", REVIEW_FILE):
        return records
    for n, line in enumerate(raw.split(b"\n")[:-1], start=1):
        try:
            records.append(parse_line(line))
        except RecordError as e:  # unsealed lines are problems already
            if unseal(line)[1] is not None:
                rep.notes.append(f"{name}: line {n} is sealed but not read here ({e})")
    return records


#: records that start or end a run or an analysis
_RUN_MARKS = (Started, Finished, Stopped, AnalysisStarted, AnalysisFinished)


def _run(root: Path, rep: VerifyReport, prefix: str) -> None:
    rep.checked["folders"] += 1
    folder = RunFolder(root)
    _log(root / "audit.log", rep, f"{prefix}audit.log")
    _review(root, rep, prefix)
    records = _log(folder.ledger.path, rep, f"{prefix}ledger.jsonl")
    if any(isinstance(r, Started) for r in records) and not os.path.lexists(
        root / "audit.log"
    ):  # a scan writes its audit log before its first ledger line
        rep.problems.append(f"{prefix}audit.log: missing (the scan wrote one)")
    state = LedgerState.from_records(records)
    for _, rec in sorted(state.stored.items()):
        _check_file(root, rec.file, rec.sha256, rep, prefix, "fields")
    fields_dir = folder.fields_dir
    if fields_dir.is_dir():
        recorded = {Path(r.file).name for r in state.stored.values()}
        for p in sorted(fields_dir.iterdir()):
            if p.name not in recorded and not p.name.endswith(".tmp"):
                rep.notes.append(
                    f"{prefix}fields/{p.name}: not recorded as stored (a write "
                    "cut short; a resume acquires the field again)"
                )
    last_detected: dict[str, Detected] = {}
    for r in records:
        if isinstance(r, Stored):
            last_detected.pop(r.field, None)
        elif isinstance(r, Detected):
            last_detected[r.field] = r
    for name in sorted(state.detected):
        det = last_detected.get(name)
        rel = str(folder.detection_path(name).relative_to(root))
        if det is None or det.sha256 is None:
            rep.notes.append(f"{prefix}{rel}: its checksum was not recorded")
            continue
        before = len(rep.problems)
        _check_file(root, rel, det.sha256, rep, prefix, "detections")
        if len(rep.problems) == before:  # as written: its pictures' sha256
            _check_pictures(root, rel, rep, prefix)
    written: dict[str, str] = {}
    for r in records:
        if isinstance(r, Written):
            written.update(r.files)
    for rel, digest in sorted(written.items()):
        _check_file(root, rel, digest, rep, prefix, "files")
    ends = [r for r in records if isinstance(r, _RUN_MARKS)]
    if not ends or not isinstance(ends[-1], (Finished, AnalysisFinished)):
        rep.notes.append(
            f"{prefix}ledger.jsonl: the run has not finished (stopped, killed, "
            "or still running)"
        )


def _review(root: Path, rep: VerifyReport, prefix: str) -> None:
    """The review's chain; a sign-off must match the events and decisions."""
    path = root / REVIEW_FILE
    _log(path, rep, f"{prefix}{REVIEW_FILE}")
    raw = _read(path, rep, f"{prefix}{REVIEW_FILE}") or b""
    signed, head = find_signoff(raw)
    if signed is None:
        return
    events = _read(root / "events.csv", rep, f"{prefix}events.csv")
    if (
        events is not None
        and hashlib.sha256(events).hexdigest() != signed.events_sha256
    ):
        rep.problems.append(f"{prefix}events.csv: not the events the review signed")
    if hashlib.sha256(head).hexdigest() != signed.decisions_sha256:
        rep.problems.append(
            f"{prefix}{REVIEW_FILE}: the decisions differ from those signed"
        )


def _check_pictures(root: Path, rel: str, rep: VerifyReport, prefix: str) -> None:
    """The CTC candidates' pictures a field's detection file names, against
    the sha256 it holds for each (files written before it held them: none)."""
    raw = _read(root / rel, rep, f"{prefix}{rel}")
    try:
        pictures = json.loads(raw or b"{}").get("candidates") or {}
    except (ValueError, AttributeError):
        return  # (the file matched its checksum: what was written)
    if isinstance(pictures, dict):
        for png, digest in sorted(pictures.items()):
            _check_file(root, png, str(digest), rep, prefix, "pictures")


def _check_file(
    root: Path, rel: str, digest: str, rep: VerifyReport, prefix: str, kind: str
) -> None:
    rep.checked[kind] += 1
    try:
        got = RunFolder(root).digests(rel).get(rel)
    except StorageError as e:
        rep.problems.append(f"{prefix}{e}")
        return
    if got is None:
        rep.problems.append(f"{prefix}{rel}: missing (the ledger records it)")
    elif got != digest:
        rep.problems.append(
            f"{prefix}{rel}: changed since it was written (sha256 differs from "
            "the ledger's)"
        )


def _queue(root: Path, rep: VerifyReport) -> None:
    _log(root / "audit.log", rep, "audit.log")
    records = _log(root / "queue.jsonl", rep, "queue.jsonl")
    written: dict[str, str] = {}
    runs: dict[str, None] = {}
    for r in records:
        if isinstance(r, Written):
            written.update(r.files)
        elif isinstance(r, CartridgeDone) and r.run_dir:
            runs[Path(r.run_dir).name] = None
    for rel, digest in sorted(written.items()):
        _check_file(root, rel, digest, rep, "", "files")
    for p in sorted(root.iterdir()):  # also a cartridge the journal has not closed
        if (p / "ledger.jsonl").is_file():
            runs[p.name] = None
    for name in runs:
        if (root / name / "ledger.jsonl").is_file():
            _run(root / name, rep, prefix=f"{name}/")
        else:
            rep.problems.append(f"{name}/: the journal names this run folder; missing")
    ends = [r for r in records if isinstance(r, (QueueStarted, QueueFinished))]
    if not ends or not isinstance(ends[-1], QueueFinished):
        rep.notes.append("queue.jsonl: the queue has not finished")

"""Typed records, the ledger file and the audit log, on their own."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from analysis.report import Report, read_report
from controller.errors import StorageError
from controller.events import EventStream
from controller.records import (
    RECORD_TYPES,
    Detected,
    Failed,
    Record,
    RecordError,
    Stored,
    dump_line,
    parse_line,
)
from controller.runstore.audit import AuditLog
from controller.runstore.folder import RunFolder
from controller.runstore.ledger import Ledger, LedgerState, RunLog


def stored(name: str) -> Stored:
    return Stored(field=name, file=f"fields/{name}.ome.tif", sha256="ab", bytes=3)


def test_every_record_kind_round_trips_through_its_line() -> None:
    assert len(RECORD_TYPES) >= 20
    rec = stored("field_001").replace(stage={"x_um": 1.5, "y_um": -2.0, "z_um": 3.25})
    line = dump_line(rec)
    assert line.endswith("\n") and line.count("\n") == 1
    back = parse_line(line)
    assert back == rec and isinstance(back, Stored)
    data = json.loads(line)
    assert data["event"] == "stored" and data["v"] == 1


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"\xff\xfe binary", "not a JSON line"),
        (b"[1, 2, 3]", "not a record but a JSON list"),
        (b'{"event": "teleported", "field": "x"}', "unknown record kind"),
        (b'{"event": "failed", "field": "x"}', "reason"),
        (b'{"event": "stored", "v": 99, "field": "x"}', "schema version 99"),
    ],
)
def test_a_line_that_is_no_record_is_refused_by_name(line: bytes, why: str) -> None:
    with pytest.raises(RecordError, match=why):
        parse_line(line)


def test_a_ledger_skips_foreign_lines_and_a_torn_tail_and_appends_on_a_fresh_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(
        dump_line(stored("field_000")).encode()
        + b"\xff\xfe garbage\n"
        + b"[1,2,3]\n"
        + dump_line(stored("field_001")).encode()
        + b'{"t": "2026", "event": "stored", "fie'  # crash mid-line
    )
    ledger = Ledger(path)
    assert [r.field for r in ledger.read()] == ["field_000", "field_001"]  # type: ignore[attr-defined]
    assert len(ledger.skipped) == 2
    ledger.append(stored("field_002"))
    again = Ledger(path).read()
    assert [r.field for r in again] == ["field_000", "field_001", "field_002"]  # type: ignore[attr-defined]


def test_a_ledger_written_before_versions_reads_as_version_1(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_text(
        '{"t":"2026-11-30T10:00:00+00:00","event":"stored","field":"field_000",'
        '"file":"fields/field_000.ome.tif","sha256":"00","bytes":1,"stage":{},'
        '"focus":null,"acquired_at":"x","future_key":1}\n'
        '{"t":"2026-11-30T10:00:01+00:00","event":"detected","field":"field_000",'
        '"counts":{"CTC":1},"seconds":0.1}\n'
    )
    state = LedgerState.from_records(Ledger(path).read())
    assert set(state.stored) == {"field_000"} and state.detected == {"field_000"}
    assert state.stored["field_000"].v == 1


def test_the_run_log_writes_before_it_publishes_and_isolates_subscribers(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.jsonl"
    events = EventStream()
    seen: list[tuple[str, int]] = []

    def broken(r: Record) -> None:
        raise RuntimeError("a subscriber bug")

    def lines_at_publish(r: Record) -> None:
        seen.append((r.kind, len(path.read_text().splitlines())))

    events.subscribe(broken)
    unsubscribe = events.subscribe(lines_at_publish)
    log = RunLog(Ledger(path), events)
    log.emit(Failed(field="field_003", reason="snap failed", attempts=3))
    unsubscribe()
    log.emit(Detected(field="field_004"))
    assert seen == [("failed", 1)]  # durable first; the broken one hurt nobody
    assert len(Ledger(path).read()) == 2


def test_an_operator_name_cannot_forge_audit_lines(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", "eve\n2026-12-01T00:00:00Z  admin  SIGN  ok")
    log.write("START", "scan")
    lines = log.read()
    assert len(lines) == 1
    assert lines[0].split()[1] == "eve_2026-12-01T00:00:00Z_admin_SIGN_ok"


def test_preparing_a_folder_removes_only_the_programs_own_temporaries(
    tmp_path: Path,
) -> None:
    run = RunFolder(tmp_path / "run")
    run.prepare()
    mine = [
        run.fields_dir / "field_003.ome.tif.tmp",
        run.detections_dir / "field_003.json.tmp",
        run.detections_dir / "field_004.json.0a1b2c3d.tmp",  # a worker's own
        run.root / "candidates" / "field_004_000.png.9f8e7d6c.tmp",
        run.root / "report.json.tmp",
    ]
    theirs = [
        run.root / "thesis.tmp",
        run.fields_dir / "notes.tmp",
        run.root / "candidates" / "notes.tmp",
    ]
    (run.root / "candidates").mkdir()
    for p in mine + theirs:
        p.write_text("x")
    run.prepare()
    assert not any(p.exists() for p in mine)
    assert all(p.read_text() == "x" for p in theirs)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_field_that_cannot_be_read_is_no_evidence_of_damage() -> None:
    """Verifying a stored field that is there but unreadable stops with an
    error; it is not called corrupt (which would have it acquired again)."""
    root = Path(tempfile.mkdtemp(prefix="ctcscan-verify-"))
    root.chmod(0o755)
    run = RunFolder(root / "run")
    run.prepare()
    path = run.field_path("field_000")
    path.write_bytes(b"pixels")
    path.chmod(0o000)
    os.setegid(65534)
    os.seteuid(65534)
    try:
        with pytest.raises(StorageError, match=r"cannot read .* to verify it"):
            run.verify("field_000", "00")
        assert run.verify("field_001", "00") is False  # missing: re-acquire
    finally:
        os.seteuid(0)
        os.setegid(0)
        shutil.rmtree(root)


def test_report_json_is_a_typed_record_with_a_version(small_scan: Any) -> None:
    report = read_report(small_scan.run_dir / "report.json")
    assert report.kind == "report" and report.v == 1
    assert report == small_scan.report.model_copy(
        update={"generated_at": report.generated_at}
    )
    assert report.ctc_count == report.counts["CTC"]
    with pytest.raises(ValidationError):  # a report missing its count is refused
        Report.model_validate({**report.model_dump(), "ctc_count": None})

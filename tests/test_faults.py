"""Fault injection: every fault ends with nothing lost.

"Nothing lost" (`assert_nothing_lost`): every planned field is either stored
exactly once with a file that verifies against its ledger checksum, or listed
as failed with its reason and attempts; and every stored field has exactly one
detection result.

Faults are injected at the device level of the simulated instrument (its
`WorldConfig`) or in the detector's job, never by replacing controller parts.
Field numbering of injected snaps: with focus off, snap 0 is the engine's dark
frame and field k's channels are snaps 4k+1 .. 4k+4.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analysis.pipeline import FieldJob, analyze_field_file
from controller.errors import StorageError
from controller.layouts import get_layout
from controller.records import Record, Stored
from controller.runs.scan import Scan, ScanRequest, ScanResult
from controller.runstore.audit import AuditLog
from tests.conftest import SIM_YAML, read_field, run_scan, sim_instrument

NO_FOCUS = {"enabled": False}


def ledger(run: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()
    ]


def audit(run: Path) -> str:
    return "\n".join(AuditLog(run / "audit.log").read())


def assert_nothing_lost(result: ScanResult) -> None:
    run = result.run_dir
    records = ledger(run)
    planned = next(r for r in records if r["event"] == "planned")["fields"]
    stored: dict[str, list[dict[str, Any]]] = {}
    failed: dict[str, dict[str, Any]] = {}
    detected: dict[str, int] = {}
    for r in records:
        if r["event"] == "stored":
            stored.setdefault(r["field"], []).append(r)
        elif r["event"] == "failed":
            failed[r["field"]] = r
        elif r["event"] == "detected":
            detected[r["field"]] = detected.get(r["field"], 0) + 1
    for name in planned:
        if name in stored:
            assert len(stored[name]) == 1, f"{name} stored {len(stored[name])} times"
            path = run / stored[name][0]["file"]
            assert (
                hashlib.sha256(path.read_bytes()).hexdigest()
                == (stored[name][0]["sha256"])
            ), name
            assert detected.get(name) == 1, f"{name}: {detected.get(name)} results"
            assert (run / "detections" / f"{name}.json").exists()
        else:
            assert name in failed, f"{name} neither stored nor failed"
            assert failed[name]["reason"] and failed[name]["attempts"] >= 1
    assert set(result.failed) == set(failed) - set(stored)


def same_pixels(a: ScanResult, b: ScanResult, names: list[str]) -> None:
    for name in names:
        pa, _, _ = read_field(a.run_dir / "fields" / f"{name}.ome.tif")
        pb, _, _ = read_field(b.run_dir / "fields" / f"{name}.ome.tif")
        assert np.array_equal(pa, pb), name


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> ScanResult:
    out = tmp_path_factory.mktemp("clean") / "run"
    return run_scan(out, n_fields=3, seed=5, instrument=sim_instrument(focus=NO_FOCUS))


NAMES = ["field_000", "field_001", "field_002"]


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ({"black_snaps": [2]}, "black frame"),
        ({"saturated_snaps": [6]}, "saturated frame"),
        ({"stale_snaps": [3]}, "stale frame"),
        ({"fail_snaps": [7]}, "readout failed"),
        ({"stuck_filter": [0]}, "channel FITC at field_000"),
        ({"fail_xy_moves": [1]}, "XY move at field_001"),
    ],
)
def test_a_bad_frame_or_device_call_is_retried_and_nothing_changes(
    tmp_path: Path, clean: ScanResult, fault: dict[str, Any], words: str
) -> None:
    result = run_scan(
        tmp_path / "run",
        n_fields=3,
        seed=5,
        instrument=sim_instrument(focus=NO_FOCUS, **fault),
    )
    assert result.complete and not result.failed
    assert_nothing_lost(result)
    same_pixels(clean, result, NAMES)  # the bad frame never reached a file
    log = audit(result.run_dir)
    assert "DEVICE-ERROR" in log and words in log and "RECOVERED" in log


def test_a_camera_that_keeps_failing_loses_one_field_with_its_reason(
    tmp_path: Path, clean: ScanResult
) -> None:
    # field_001's FITC frame: 3 tries, all black
    result = run_scan(
        tmp_path / "run",
        n_fields=3,
        seed=5,
        instrument=sim_instrument(focus=NO_FOCUS, black_snaps=[6, 7, 8]),
    )
    assert set(result.failed) == {"field_001"}
    assert "black frame" in result.failed["field_001"]
    assert_nothing_lost(result)
    same_pixels(clean, result, ["field_000", "field_002"])
    assert "FIELD-FAILED  field_001 after 3 attempts" in audit(result.run_dir)


def crash_once(job: FieldJob) -> dict[str, Any]:
    """A detection job whose worker process dies the first time it sees field_001."""
    marker = Path(job.out_dir) / "crashed-once"
    if job.name == "field_001" and not marker.exists():
        marker.write_text("x")
        os._exit(3)
    return analyze_field_file(job)


def test_a_detector_worker_that_dies_is_replaced(tmp_path: Path) -> None:
    result = run_scan(
        tmp_path / "run",
        n_fields=3,
        seed=5,
        instrument=sim_instrument(focus=NO_FOCUS),
        detector_workers=1,
        run_job=crash_once,
    )
    assert (tmp_path / "run" / "crashed-once").exists()
    assert result.complete and result.detected == 3 and result.detect_failed == 0
    assert_nothing_lost(result)
    events = json.loads((result.run_dir / "report.json").read_text())
    assert events["fields"]["analyzed"] == 3


def test_disk_full_in_the_middle_stops_cleanly_and_resumes(
    tmp_path: Path, clean: ScanResult
) -> None:
    """field_002's file cannot be written: its temporary name leads to /dev/full,
    which fails every write with ENOSPC, as a full disk does."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    run = tmp_path / "run"
    inst = sim_instrument(focus=NO_FOCUS)

    def on_record(r: Record) -> None:
        if isinstance(r, Stored) and r.field == "field_000":
            (run / "fields" / "field_002.ome.tif.tmp").symlink_to("/dev/full")

    req = ScanRequest(
        instrument=inst,
        layout=get_layout("test-3x4"),
        out=run,
        instrument_file=str(SIM_YAML),
        seed=5,
        n_fields=3,
    )
    with pytest.raises(StorageError, match="No space left on device"):
        job = Scan(req, detector_workers=0)
        job.events.subscribe(on_record)
        job.run()
    records = ledger(run)
    assert records[-1]["event"] == "stopped"
    assert "No space left" in records[-1]["error"]
    stored = {r["field"]: r for r in records if r["event"] == "stored"}
    assert "field_002" not in stored and "field_000" in stored
    for r in stored.values():  # what was stored is intact
        assert hashlib.sha256((run / r["file"]).read_bytes()).hexdigest() == r["sha256"]
    assert "ERROR" in audit(run) and "No space left" in audit(run)
    # the disk has room again: the same request resumes and completes
    result = Scan(req, detector_workers=0).run()
    assert result.complete and result.resumed == len(stored)
    assert_nothing_lost(result)
    same_pixels(clean, result, NAMES)

"""Scans through the real Micro-Manager core (UniMMCore) on the simulated scanner."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import useq
from pymmcore_plus.mda.events import MDASignaler

from controller.acquisition.plan import ScanPlan
from controller.config import AssayConfig, InstrumentConfig
from controller.errors import StorageError
from controller.layouts import get_layout
from controller.records import Record, Stored
from controller.runs.scan import Scan, ScanRequest, ScanResult, _once_at_position
from controller.runstore.folder import RunFolder
from controller.runstore.ledger import LedgerState, LedgerTampered
from tests.conftest import (
    DEMO_YAML,
    SIM_YAML,
    read_back_only,
    read_field,
    run_scan,
    sim_instrument,
)

CHANNELS = ["DAPI", "FITC", "PE", "APC"]
NO_FOCUS = {"enabled": False}


def _ledger(run: Path) -> list[dict]:
    return [
        json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()
    ]


def test_small_scan_stores_every_field_as_ome_tiff(small_scan: ScanResult) -> None:
    run = small_scan.run_dir
    assert small_scan.complete and small_scan.stored == 12 and not small_scan.failed
    scan = json.loads((run / "scan.json").read_text())
    plan = {f["name"]: f for f in scan["fields"]}
    assert len(plan) == 12 and all("z_um" in f for f in plan.values())
    stored = {r["field"]: r for r in _ledger(run) if r["event"] == "stored"}
    assert set(stored) == set(plan)
    files = sorted((run / "fields").iterdir())
    assert [f.name for f in files] == [f"{n}.ome.tif" for n in sorted(plan)]
    for path in files:
        name = path.name.removesuffix(".ome.tif")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == stored[name]["sha256"]
        with tifffile.TiffFile(path) as tif:
            assert tif.is_ome
            series = tif.series[0]
            assert series.axes == "CYX"
            assert series.shape == (4, 1036, 1384) and series.dtype == np.uint16
            ome = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        pixels = ome["Pixels"]
        assert [c["Name"] for c in pixels["Channel"]] == CHANNELS
        assert pixels["PhysicalSizeX"] == pytest.approx(0.64)
        assert pixels["PhysicalSizeY"] == pytest.approx(0.64)
        planes = pixels["Plane"]
        assert len(planes) == 4
        for p in planes:
            assert p["PositionX"] == pytest.approx(plan[name]["x_um"])
            assert p["PositionY"] == pytest.approx(plan[name]["y_um"])
            assert p["PositionZ"] == pytest.approx(plan[name]["z_um"])
        # the stage position read back at acquisition is in the ledger too
        assert stored[name]["stage"]["x_um"] == pytest.approx(plan[name]["x_um"])


def test_fields_carry_what_the_simulator_rendered(small_scan: ScanResult) -> None:
    run = small_scan.run_dir
    truth = json.loads((run / "ground_truth.json").read_text())
    assert {f["name"] for f in truth["fields"]} == {f"field_{i:03d}" for i in range(12)}
    assert all("z_true_um" in f for f in truth["fields"])
    # every CTC of the truth shows cytokeratin (PE) in the stored file
    n = 0
    for f in truth["fields"]:
        data, names, px = read_field(run / "fields" / f"{f['name']}.ome.tif")
        assert names == CHANNELS and px == pytest.approx(0.64)
        pe = data[2].astype(float)
        bg = np.median(pe)
        for o in f["objects"]:
            if o["kind"] != "CTC":
                continue
            r, c = round(o["row"]), round(o["col"])
            win = pe[max(r - 4, 0) : r + 5, max(c - 4, 0) : c + 5]
            assert win.size and win.max() - bg > 30
            n += 1
    assert n > 0


def test_every_field_is_detected_once_and_reported(small_scan: ScanResult) -> None:
    run = small_scan.run_dir
    records = _ledger(run)
    detected = [r["field"] for r in records if r["event"] == "detected"]
    assert sorted(detected) == [f"field_{i:03d}" for i in range(12)]
    assert small_scan.detected == 12 and not small_scan.detect_failed
    for name in detected:
        rec = json.loads((run / "detections" / f"{name}.json").read_text())
        assert rec["field"] == name and rec["channels"] == CHANNELS
    report = json.loads((run / "report.json").read_text())
    assert report["fields"]["analyzed"] == 12
    assert report["ctc_count"] == report["counts"]["CTC"] > 0
    assert report["at_or_above_cutoff"] == (report["ctc_count"] >= report["cutoff"])
    rows = (run / "events.csv").read_text().splitlines()
    head = "object_id,field,row,col,stage_x_um,stage_y_um,label,score,"
    assert rows[0].startswith(head)
    assert len(rows) - 1 == sum(report["counts"].values())
    pngs = sorted((run / "candidates").glob("*.png"))
    assert len(pngs) == report["ctc_count"]
    assert "CTC count" in (run / "report.html").read_text()


def test_detection_runs_in_a_worker_process(tmp_path: Path) -> None:
    import os

    def pid_of_worker(job):
        return {"counts": {}, "objects": [], "pid": os.getpid()}

    result = run_scan(tmp_path / "cart", n_fields=3, seed=2, detector_workers=1)
    assert result.detected == 3
    # the default analysis ran elsewhere: its record reached the run folder
    rec = json.loads((tmp_path / "cart" / "detections" / "field_000.json").read_text())
    assert rec["counts"] and rec["seconds"] > 0


def test_resume_skips_verified_fields_and_redoes_bad_ones(tmp_path: Path) -> None:
    run = tmp_path / "cart"
    first = run_scan(run, n_fields=5, seed=2)
    assert first.stored == 5
    before = {p.name: p.read_bytes() for p in (run / "fields").iterdir()}
    pixels = {p.name: read_field(p)[0] for p in (run / "fields").iterdir()}
    # damage one stored file and leave a torn temporary file behind
    (run / "fields" / "field_001.ome.tif").write_bytes(b"garbage")
    (run / "fields" / "field_007.ome.tif.tmp").write_bytes(b"half a file")
    second = run_scan(run, seed=2)
    assert second.resumed == 4  # 000, 002, 003, 004 verified and skipped
    assert second.stored == 12 - 4  # the damaged one is acquired again
    assert second.complete
    assert not list((run / "fields").glob("*.tmp"))
    for name, data in before.items():
        path = run / "fields" / name
        if name != "field_001.ome.tif":  # verified files are not rewritten
            assert path.read_bytes() == data
        assert np.array_equal(read_field(path)[0], pixels[name])  # same pixels
    records = _ledger(run)
    assert [r["field"] for r in records if r["event"] == "corrupt"] == ["field_001"]
    state = LedgerState.from_records(RunFolder(run).ledger.read())
    assert len(state.stored) == 12 and state.detected == set(state.stored)
    # a third run finds nothing to do
    third = run_scan(run, seed=2)
    assert (third.resumed, third.stored) == (12, 0)


def test_resume_refuses_a_different_scan(tmp_path: Path) -> None:
    run = tmp_path / "cart"
    run_scan(run, n_fields=1, seed=2)
    with pytest.raises(StorageError, match="different scan"):
        run_scan(run, n_fields=1, seed=3)


def test_resume_refuses_what_would_mix_two_scans(tmp_path: Path) -> None:
    run = tmp_path / "cart"
    run_scan(run, n_fields=3, seed=2)
    scan_json = run / "scan.json"
    ledger = (run / "ledger.jsonl").read_bytes()

    def refused(why: str, **kw: Any) -> None:
        with pytest.raises(StorageError, match=why):
            Scan(
                ScanRequest(
                    instrument=kw.pop("instrument", sim_instrument()),
                    layout=kw.pop("layout", get_layout("test-3x4")),
                    out=run,
                    instrument_file=str(SIM_YAML),
                    seed=2,
                    **kw,
                ),
                detector_workers=0,
            ).run()
        assert (run / "ledger.jsonl").read_bytes() == ledger  # nothing done

    # the same layout name on other ground, another camera, another assay
    moved = get_layout("test-3x4").model_copy(update={"center_x_um": 3000.0})
    refused(r"another layout \(center_x_um: ", layout=moved, n_fields=4)
    small = sim_instrument()
    small = small.model_copy(
        update={"camera": small.camera.model_copy(update={"width": 1024})}
    )
    refused(r"another camera \(width: 1384 there, 1024 now\)", instrument=small)
    other = AssayConfig.from_dict({"detection": {"min_ctc_diameter_um": 12.0}})
    refused(r"another assay \(detection.min_ctc_diameter_um: ", assay=other)
    # fewer fields than are stored: the report would count fewer
    refused("holds 3 stored fields, field_002 among them beyond the 2", n_fields=2)
    # the focus map or scan.json edited by hand (a focus map moved by 40 um
    # had changed the count 15 -> 6): not used
    for name in ("focus_map.json", "scan.json"):
        path = run / name
        was = path.read_bytes()
        path.write_bytes(was.replace(b"{", b"{ ", 1))
        refused(f"{name} is not the file this program wrote")
        path.write_bytes(was)
    # scan.json gone: nothing tells whose fields these are
    scan_json.unlink()
    refused("scan.json is missing, though 3 field", n_fields=6)


def test_resume_refuses_a_ledger_changed_by_hand(tmp_path: Path) -> None:
    run = tmp_path / "cart"
    run_scan(run, n_fields=2, seed=2)
    ledger = run / "ledger.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    n = next(i for i, x in enumerate(lines) if b'"event":"stored"' in x)
    # a stored field's sha256 edited: the seal no longer matches
    sha = json.loads(lines[n])["sha256"]
    edited = lines[n].replace(sha.encode(), b"0" * 64)
    # ...or a record copied in again without its seal
    unsealed = re.sub(rb',"chain":"[0-9a-f]{64}"\}', b"}", lines[n])
    for i, changed, why in [
        (n, [*lines[:n], edited, *lines[n + 1 :]], "seal does not match"),
        (n + 1, [*lines[: n + 1], unsealed, *lines[n + 1 :]], "without a seal"),
    ]:
        ledger.write_bytes(b"".join(changed))
        with pytest.raises(LedgerTampered, match=f"line {i + 1}: .*{why}"):
            run_scan(run, n_fields=3, seed=2)
        assert ledger.read_bytes() == b"".join(changed)  # left as it is
        assert not (run / "fields" / "field_002.ome.tif").exists()
    # a line torn by a crash is no tampering: the resume goes on
    ledger.write_bytes(b"".join(lines) + lines[n][:40])
    assert run_scan(run, n_fields=3, seed=2).stored == 1


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> ScanResult:
    """4 fields of seed 4 with focus off and no fault: the pixels the faulty
    scans below must reproduce (read only)."""
    return run_scan(
        tmp_path_factory.mktemp("clean") / "clean",
        n_fields=4,
        seed=4,
        instrument=sim_instrument(focus=NO_FOCUS),
    )


def test_a_failed_snap_is_retried(tmp_path: Path, clean: ScanResult) -> None:
    # focus off: the injected snap numbers then count field frames only
    flaky = run_scan(
        tmp_path / "flaky",
        n_fields=3,
        seed=4,
        instrument=sim_instrument(focus=NO_FOCUS, fail_snaps=[5]),
    )
    assert flaky.complete and not flaky.failed
    for i in range(3):
        name = f"field_{i:03d}.ome.tif"
        a, _, _ = read_field(clean.run_dir / "fields" / name)
        b, _, _ = read_field(flaky.run_dir / "fields" / name)
        assert np.array_equal(a, b)


def test_a_field_that_keeps_failing_is_recorded_and_shifts_nothing(
    tmp_path: Path, clean: ScanResult
) -> None:
    # snaps 5, 6, 7 fail: field_001's FITC frame fails three times (2 retries)
    bad = run_scan(
        tmp_path / "bad",
        n_fields=4,
        seed=4,
        instrument=sim_instrument(focus=NO_FOCUS, fail_snaps=[5, 6, 7]),
    )
    assert set(bad.failed) == {"field_001"} and "snap failed" in bad.failed["field_001"]
    assert not (bad.run_dir / "fields" / "field_001.ome.tif").exists()
    failed = [r for r in _ledger(bad.run_dir) if r["event"] == "failed"]
    assert failed[0]["field"] == "field_001" and failed[0]["attempts"] == 3
    # the fields after the failure hold exactly their own pixels
    for name in ("field_000", "field_002", "field_003"):
        a, _, _ = read_field(clean.run_dir / "fields" / f"{name}.ome.tif")
        b, _, _ = read_field(bad.run_dir / "fields" / f"{name}.ome.tif")
        assert np.array_equal(a, b), name
    # resuming acquires the failed field
    again = run_scan(
        bad.run_dir, n_fields=4, seed=4, instrument=sim_instrument(focus=NO_FOCUS)
    )
    assert again.stored == 1 and again.complete


def test_acquisition_never_waits_for_a_stuck_detector(tmp_path: Path) -> None:
    """The detector blocks until acquisition has stored every field; a scan that
    waited on it would never get there and the wait would time out."""
    all_stored = threading.Event()
    seen: list[str] = []
    n = 8

    def stuck(job):
        got = all_stored.wait(timeout=60)
        seen.append("ok" if got else "timeout")
        data, _, _ = read_field(Path(job.path))  # read back from the store
        return {
            "field": job.name,
            "counts": {"CTC": 0},
            "objects": [],
            "mean": float(data.mean()),
        }

    stored = []

    def on_record(r: Record) -> None:
        if isinstance(r, Stored):
            stored.append(r.field)
            if len(stored) == n:
                all_stored.set()

    req = ScanRequest(
        instrument=sim_instrument(),
        layout=get_layout("test-3x4"),
        out=tmp_path / "cart",
        n_fields=n,
        seed=1,
    )
    job = Scan(req, detector_workers=0, run_job=stuck)
    job.events.subscribe(on_record)
    result = job.run()
    assert all_stored.is_set()
    assert seen and set(seen) == {"ok"}
    assert result.detected == n  # nothing dropped
    assert result.max_detect_backlog > 1  # fields waited, by name, and caught up
    detected = [
        r["field"] for r in _ledger(tmp_path / "cart") if r["event"] == "detected"
    ]
    assert sorted(detected) == [f"field_{i:03d}" for i in range(n)]


def test_small_scan_on_cpp_demo_adapters(tmp_path: Path) -> None:
    cfg = InstrumentConfig.from_file(DEMO_YAML)
    req = ScanRequest(
        instrument=cfg,
        layout=get_layout("test-3x4"),
        out=tmp_path / "demo",
        n_fields=2,
        instrument_file=str(DEMO_YAML),
    )
    result = Scan(req, detector_workers=1, run_job=read_back_only).run()
    assert result.complete and result.stored == 2
    # each stored field was read back by the detector worker
    assert result.detected == 2 and not result.detect_failed
    plan = ScanPlan.build(get_layout("test-3x4"), cfg)
    for f in plan.fields[:2]:
        data, names, _px = read_field(
            tmp_path / "demo" / "fields" / f"{f.name}.ome.tif"
        )
        assert data.shape == (4, 1036, 1384) and names == CHANNELS
        assert data.max() > 0  # the demo camera's noise pattern, not a blank
    stored = [r for r in _ledger(tmp_path / "demo") if r["event"] == "stored"]
    # the demo stage's read-back position lands in the ledger
    assert stored[0]["stage"]["x_um"] == pytest.approx(plan.fields[0].x_um, abs=0.1)
    assert not (tmp_path / "demo" / "ground_truth.json").exists()


def test_the_last_fields_hook_fires_once_then_leaves_the_frames() -> None:
    """The scan's near-end slot (the simulator's truth written while the last
    field is taken) on pymmcore-plus's own frameReady signal: its action runs
    once, at the last position's first frame, and the slot disconnects itself
    there; the slot connected after it still gets that frame and every other."""
    frame_ready = MDASignaler().frameReady
    img = np.zeros((2, 2), np.uint16)

    def frame(p: int, c: int) -> None:
        frame_ready.emit(img, useq.MDAEvent(index={"p": p, "c": c}), {})

    fired: list[int] = []
    seen: list[tuple[int, int]] = []
    drop = _once_at_position(frame_ready, 2, lambda: fired.append(len(seen)))

    def after(_img: np.ndarray, event: useq.MDAEvent, _meta: dict) -> None:
        seen.append((event.index["p"], event.index["c"]))

    frame_ready.connect(after)
    assert len(frame_ready) == 2
    for p in range(3):
        for c in range(4):
            frame(p, c)
            # connected until the last position's first frame, gone after it
            assert len(frame_ready) == (2 if (p, c) < (2, 0) else 1)
    frame(2, 0)  # the last position again (a re-taken frame): nothing more
    assert fired == [8]  # before the slot after it had the 9th frame
    assert seen == [(p, c) for p in range(3) for c in range(4)] + [(2, 0)]
    drop()  # the run's end: already gone, nothing to do
    assert len(frame_ready) == 1
    # a run that ends before its last field: the end disconnects it
    early: list[int] = []
    drop = _once_at_position(frame_ready, 2, lambda: early.append(1))
    assert len(frame_ready) == 2
    drop()
    drop()
    assert len(frame_ready) == 1
    frame(2, 0)
    assert early == [] and fired == [8]


def test_run_folder_checks(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="not writable"):
        RunFolder(blocker / "run").prepare()


@pytest.mark.parametrize("yaml", ["simulated", "demo-adapters"])
def test_core_reports_the_configured_pixel_size(yaml: str) -> None:
    from controller.hardware.instrument import open_instrument
    from hardware_configs import CONFIG_DIR

    cfg = InstrumentConfig.from_file(CONFIG_DIR / f"{yaml}.yaml")
    inst = open_instrument(cfg, get_layout("test-3x4"))
    try:
        assert inst.core.getPixelSizeUm() == pytest.approx(0.64)
    finally:
        inst.close()


def test_pixel_size_disagreeing_with_the_cfg_is_refused() -> None:
    from controller.errors import ConfigError
    from controller.hardware.instrument import open_instrument
    from hardware_configs import CONFIG_DIR

    cfg = InstrumentConfig.from_file(CONFIG_DIR / "demo-adapters.yaml")
    cfg = cfg.model_copy(update={"pixel_size_um": 0.5})
    with pytest.raises(ConfigError, match="pixel size preset"):
        open_instrument(cfg, get_layout("test-3x4"))

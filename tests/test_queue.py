"""`ctcscan queue`: unattended cartridges from the (emulated, pty) loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from controller.config import InstrumentConfig
from controller.layouts import get_layout
from controller.records import Loaded, Record, Stored
from controller.runs.queue import (
    CartridgeQueue,
    QueueCanceled,
    QueueRequest,
    request_stop,
)
from tests.conftest import SIM_YAML, invoke, read_field, sim_instrument

QUICK_FOCUS = {"anchors": [2, 1]}  # the queue is under test, not the focus map


def instrument(**loader: Any) -> InstrumentConfig:
    inst = sim_instrument(focus=QUICK_FOCUS)
    data = inst.model_dump(mode="json")
    data["loader"] = {**data["loader"], **loader}
    return InstrumentConfig.from_dict(data)


def run_queue(out: Path, inst: InstrumentConfig, **kw: Any) -> CartridgeQueue:
    req = QueueRequest(
        instrument=inst,
        layout=get_layout("test-3x4"),
        out=out,
        instrument_file=str(SIM_YAML),
        n_fields=2,
        slots=kw.pop("slots", (1, 2, 3)),
        operator="tester",
    )
    q = CartridgeQueue(req, scan_kwargs={"detector_workers": 0})
    if (on_record := kw.pop("on_record", None)) is not None:
        q.events.subscribe(on_record)
    q.run()
    return q


def journal(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "queue.jsonl").read_text().splitlines()]


def test_a_queue_scans_every_cartridge_into_a_folder_named_by_barcode(
    tmp_path: Path,
) -> None:
    q = run_queue(tmp_path / "q", instrument())
    assert [(o.slot, o.barcode, o.status) for o in q.outcomes] == [
        (1, "SIM-0001", "complete"),
        (2, "SIM-0002", "complete"),
        (3, "SIM-0003", "complete"),
    ]
    for o in q.outcomes:
        run = tmp_path / "q" / o.barcode
        report = json.loads((run / "report.json").read_text())
        assert report["cartridge_id"] == o.barcode
        assert report["ctc_count"] == o.ctc_count and o.cutoff == report["cutoff"]
        assert "tester" in (run / "audit.log").read_text()
    # each cartridge is its own simulated draw
    a, _, _ = read_field(tmp_path / "q" / "SIM-0001" / "fields" / "field_000.ome.tif")
    b, _, _ = read_field(tmp_path / "q" / "SIM-0002" / "fields" / "field_000.ome.tif")
    assert not np.array_equal(a, b)
    events = [r["event"] for r in journal(tmp_path / "q")]
    assert events.count("loaded") == events.count("unloaded") == 3
    assert events[-1] == "queue_finished"
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert [s["barcode"] for s in summary] == ["SIM-0001", "SIM-0002", "SIM-0003"]


def test_a_jam_fails_one_cartridge_and_the_queue_goes_on(tmp_path: Path) -> None:
    # motions: LOAD 1 (0), UNLOAD (1), LOAD 2 (2) jams
    q = run_queue(tmp_path / "q", instrument(faults={"jam": [2]}))
    status = {o.barcode: o.status for o in q.outcomes}
    assert status == {
        "SIM-0001": "complete",
        "SIM-0002": "failed",
        "SIM-0003": "complete",
    }
    failed = next(o for o in q.outcomes if o.status == "failed")
    assert "JAM" in failed.reason
    audit = (tmp_path / "q" / "audit.log").read_text()
    assert "LOADER-RESET" in audit and "LOADER-FAULT" in audit
    assert not (tmp_path / "q" / "SIM-0002" / "fields").exists()
    # running the queue again scans what failed, and only that
    again = run_queue(tmp_path / "q", instrument())
    assert {o.barcode: o.status for o in again.outcomes} == dict.fromkeys(
        status, "complete"
    )
    loads = [r for r in journal(tmp_path / "q") if r["event"] == "loaded"]
    assert [r["barcode"] for r in loads] == ["SIM-0001", "SIM-0003", "SIM-0002"]


def test_garbled_replies_and_a_vanishing_port_are_survived(tmp_path: Path) -> None:
    faults = {"garble": [2, 9], "truncate": [14], "unplug": [20]}
    q = run_queue(tmp_path / "q", instrument(faults=faults, reconnect_s=5.0))
    assert [o.status for o in q.outcomes] == ["complete"] * 3
    audit = (tmp_path / "q" / "audit.log").read_text()
    assert "LOADER-RETRY" in audit and "LOADER-RECONNECT" in audit


def test_stop_after_the_current_cartridge_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "q"

    def stop_during_first(r: Record) -> None:
        if isinstance(r, Loaded) and r.slot == 1:
            request_stop(out)

    first = run_queue(out, instrument(), on_record=stop_during_first)
    assert [(o.barcode, o.status) for o in first.outcomes] == [("SIM-0001", "complete")]
    assert journal(out)[-1]["event"] == "queue_stopped"
    second = run_queue(out, instrument())
    assert [o.barcode for o in second.outcomes] == ["SIM-0001", "SIM-0002", "SIM-0003"]
    assert all(o.status == "complete" for o in second.outcomes)
    loads = [r["barcode"] for r in journal(out) if r["event"] == "loaded"]
    assert loads == ["SIM-0001", "SIM-0002", "SIM-0003"]  # nothing scanned twice
    # a cartridge's folder removed, another's field: not "complete" from the
    # journal alone, but scanned again (its own resume keeps what verifies)
    dirs = {o.barcode: Path(o.run_dir) for o in second.outcomes}
    shutil.rmtree(dirs["SIM-0002"])
    next((dirs["SIM-0003"] / "fields").iterdir()).unlink()
    third = run_queue(out, instrument())
    assert all(o.status == "complete" for o in third.outcomes)
    loads = [r["barcode"] for r in journal(out) if r["event"] == "loaded"]
    assert loads[3:] == ["SIM-0002", "SIM-0003"]
    assert (dirs["SIM-0002"] / "report.json").is_file()
    assert len(list((dirs["SIM-0003"] / "fields").iterdir())) == len(
        list((dirs["SIM-0001"] / "fields").iterdir())
    )


def test_a_cartridge_left_on_the_stage_and_not_asked_for_goes_back_first(
    tmp_path: Path,
) -> None:
    # resumed with other --slots, the next LOAD had met the cartridge an
    # interrupted queue left on the stage (STAGE-OCCUPIED, a failed cartridge)
    out = tmp_path / "q"
    first = CartridgeQueue(
        QueueRequest(
            instrument=instrument(),
            layout=get_layout("test-3x4"),
            out=out,
            instrument_file=str(SIM_YAML),
            n_fields=2,
            slots=(1, 2, 3),
        ),
        scan_kwargs={"detector_workers": 0},
    )
    first.events.subscribe(lambda r: first.cancel() if isinstance(r, Stored) else None)
    with pytest.raises(QueueCanceled):
        first.run()  # SIM-0001 stays on the stage, half scanned
    second = run_queue(out, instrument(), slots=(2, 3))
    assert [(o.barcode, o.status) for o in second.outcomes] == [
        ("SIM-0002", "complete"),
        ("SIM-0003", "complete"),
    ]
    moves = [(r["event"], r["slot"]) for r in journal(out) if "slot" in r]
    assert moves[:3] == [("loaded", 1), ("unloaded", 1), ("loaded", 2)]
    third = run_queue(out, instrument(), slots=(1,))  # its run folder resumes
    assert [(o.barcode, o.status) for o in third.outcomes] == [("SIM-0001", "complete")]


def test_queue_command_prints_the_summary_table(tmp_path: Path) -> None:
    res = invoke(
        "queue",
        "--out",
        str(tmp_path / "q"),
        "--layout",
        "test-3x4",
        "--fields",
        "1",
        "--slots",
        "2,4",
        "--operator",
        "night shift",
    )
    assert res.exit_code == 0, res.output
    for word in ("SIM-0002", "SIM-0004", "complete", "cut-off"):
        assert word in res.output
    assert "night_shift" in (tmp_path / "q" / "audit.log").read_text()
    bad = invoke("stop", str(tmp_path / "nothing"))
    assert bad.exit_code == 2 and "not a queue folder" in bad.output
    # a queue that has finished: nothing to stop (it had said it would stop)
    idle = invoke("stop", str(tmp_path / "q"))
    assert idle.exit_code == 2 and "no queue is running" in idle.output
    assert not (tmp_path / "q" / "STOP").exists()


def test_a_multi_cartridge_holder_is_scanned_without_a_loader(tmp_path: Path) -> None:
    holder = tmp_path / "holder.yaml"
    holder.write_text(
        "cartridges:\n"
        "  - {id: PT-0001, center_x_um: -6000, center_y_um: 0}\n"
        "  - {id: PT-0002, center_x_um: 6000, center_y_um: 1000}\n"
    )
    res = invoke(
        "queue", "--out", str(tmp_path / "q"), "--cartridges", str(holder),
        "--layout", "test-3x4", "--fields", "2",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    for cid, (cx, cy) in (("PT-0001", (-6000, 0)), ("PT-0002", (6000, 1000))):
        scan = json.loads((tmp_path / "q" / cid / "scan.json").read_text())
        assert scan["request"]["cartridge_id"] == cid
        assert (scan["layout"]["center_x_um"], scan["layout"]["center_y_um"]) == (
            cx,
            cy,
        )
        first = scan["fields"][0]
        assert abs(first["x_um"] - cx) < 3000 and abs(first["y_um"] - cy) < 2000
    events = [r["event"] for r in journal(tmp_path / "q")]
    assert "loader" not in events and events[-1] == "queue_finished"
    # a bad holder file is one clear line
    holder.write_text("cartridges: []\n")
    bad = invoke("queue", "--out", str(tmp_path / "q2"), "--cartridges", str(holder))
    assert bad.exit_code == 2 and "holder.yaml" in bad.output


def test_the_next_cartridge_is_on_the_stage_before_the_heap_is_trimmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the previous cartridge's drawing is freed before the trim, not in the scan
    from controller.runs import queue as queue_module
    from controller.runs.scan import ScanRequest

    calls: list[object] = []

    class Sample:
        def load_cartridge(self, seed: int, layout: object) -> None:
            calls.append(("load", seed))

    monkeypatch.setattr(queue_module, "release_free_memory", lambda: calls.append(0))
    request = ScanRequest(
        instrument=instrument(), layout=get_layout("test-3x4"), out=tmp_path, seed=7
    )
    queue_module._on_stage(SimpleNamespace(sample=Sample()), request)  # type: ignore[arg-type]
    assert calls == [("load", 7), 0]
    calls.clear()
    queue_module._on_stage(SimpleNamespace(sample=None), request)  # type: ignore[arg-type]
    assert calls == [0]  # a real instrument: the trim only

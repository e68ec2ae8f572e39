"""Each cell counted once on a real stage: positioning error, a turned camera,
overlapping fields joined in stage coordinates (`analysis.stitch`)."""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.detect import CUT_REASON
from analysis.napari_reader import read_run, world_from_stage
from analysis.report import OUTPUT_FILES, ReportContext, write_outputs
from analysis.settings import StitchSettings
from analysis.stitch import FieldGeometry, default_affine, object_place, stitch
from controller.acquisition.plan import ScanPlan, plan_fields
from controller.config import InstrumentConfig, load_yaml
from controller.errors import ConfigError, StorageError
from controller.hardware.instrument import open_instrument
from controller.layouts import CartridgeLayout, get_layout
from controller.records import Detected, Started
from controller.runs.scan import Scan, ScanRequest, ScanResult
from controller.runstore.folder import RunFolder
from controller.station.live import Station
from hardware_configs import CONFIG_DIR
from tests.conftest import invoke, one_line_error
from tests.test_focus import EMPTY

PX = 0.64
W, H = 1384, 1036
FOV_W, FOV_H = W * PX, H * PX


def turned_affine(deg: float) -> tuple[float, float, float, float, float, float]:
    """Micro-Manager's pixel-size affine of a camera turned by `deg`."""
    t = math.radians(deg)
    c, s = PX * math.cos(t), PX * math.sin(t)
    return (c, s, 0.0, s, -c, 0.0)


# ---------------------------------------------------------------- scans


def border_cells(
    layout: CartridgeLayout, overlap_um: float
) -> list[tuple[float, float]]:
    """Stage positions on the borders between the planned fields (where
    abutting fields would cut a cell in two), corners included."""
    pw, ph = FOV_W - overlap_um, FOV_H - overlap_um
    xs = [(k + 0.5 - (layout.cols - 1) / 2) * pw for k in range(layout.cols - 1)]
    ys = [(k + 0.5 - (layout.rows - 1) / 2) * ph for k in range(layout.rows - 1)]
    # inside the chamber, clear of the wall's rim
    x_in = layout.cols * FOV_W / 2 - layout.wall_inset_um - 90
    y_in = layout.rows * FOV_H / 2 - layout.wall_inset_um - 90
    cells = [(x, f * y_in) for x in xs for f in (-0.6, 0.2, 0.8)]
    cells += [(f * x_in, y) for y in ys for f in (-0.7, -0.15, 0.45)]
    cells += [(x + 3.0, y - 2.0) for x in xs for y in ys]  # where 4 fields meet
    return cells


def scan_cells(
    out: Path,
    layout: CartridgeLayout,
    cells: list[tuple[float, float]],
    *,
    stage_error_um: float = 0.0,
    rotation_deg: float = 0.0,
    overlap_um: float = 0.0,
    seed: int = 1,
) -> ScanResult:
    """A scan of `layout` holding only `cells` (CTCs) and sparse leukocytes."""
    data = load_yaml(CONFIG_DIR / "simulated.yaml")
    data["simulation"]["seed"] = seed
    data["simulation"]["world"] = {
        "stage_error_um": stage_error_um,
        "camera_rotation_deg": rotation_deg,
        "population": {
            "ctc": 0,
            "ctc_at": cells,
            "ctc_dim_fraction": 0.0,
            "wbc_per_field": 40,
            "double_positive": 0,
            "ck_fragment": 0,
            "small_ck_dapi": 0,
            "nucleus_beside_ck": 0,
            "debris": 0,
        },
        "surface": {"bow_um": 0.0, "tilt_x_um_per_mm": 0.0, "tilt_y_um_per_mm": 0.0},
    }
    data["focus"] = {"enabled": False}  # a flat cartridge at z 0: no map needed
    data["field_overlap_um"] = overlap_um
    if rotation_deg:
        data["pixel_affine"] = list(turned_affine(rotation_deg))
    cfg = InstrumentConfig.from_dict(data, base_dir=CONFIG_DIR)
    req = ScanRequest(instrument=cfg, layout=layout, out=out)
    return Scan(req, detector_workers=0).run()


def _detected_fields(run: Path) -> list[str]:
    """The field of every `detected` record in the run's ledger."""
    lines = (run / "ledger.jsonl").read_text().splitlines()
    return [r["field"] for r in map(json.loads, lines) if r["event"] == "detected"]


def events(run: Path) -> list[dict[str, str]]:
    with open(run / "events.csv") as f:
        return list(csv.DictReader(f))


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_bytes()) for p in sorted(run.glob("detections/*.json"))]


def near(rows: list[dict[str, str]], x: float, y: float, r: float) -> list[dict]:
    return [
        e
        for e in rows
        if math.hypot(float(e["stage_x_um"]) - x, float(e["stage_y_um"]) - y) <= r
    ]


def test_cells_on_field_borders_count_once_on_a_real_stage(tmp_path: Path) -> None:
    layout = CartridgeLayout(name="dedup-3x3", rows=3, cols=3)
    # every cell whole in some field: the overlap holds a cell (up to 15 um),
    # twice the stage's error, and the stagger of a row's field borders against
    # the next row's that 1 degree makes over a field pitch (11-15 um)
    overlap = 40.0
    cells = border_cells(layout, overlap)
    res = scan_cells(
        tmp_path / "run",
        layout,
        cells,
        stage_error_um=5.0,
        rotation_deg=1.0,
        overlap_um=overlap,
    )
    run = res.run_dir
    recs = records(run)
    assert len(recs) == 9
    # the stage landed off its targets, and the fields record where it went
    plan = {f.name: f for f in plan_fields(layout, FOV_W, FOV_H, overlap_um=overlap)}
    off = [
        (
            r["stage"]["x_um"] - plan[r["field"]].x_um,
            r["stage"]["y_um"] - plan[r["field"]].y_um,
        )
        for r in recs
    ]
    assert all(max(abs(dx), abs(dy)) <= 5.0 for dx, dy in off)
    assert sum(max(abs(dx), abs(dy)) > 1.0 for dx, dy in off) >= 6
    # each field on its own sees the border cells twice (or four times)
    seen = sum(o["label"] == "CTC" for r in recs for o in r["objects"])
    assert seen > len(cells) + 10
    # the cartridge: one object at each cell, and each of them a CTC once
    rows = events(run)
    for x, y in cells:
        here = near(rows, x, y, 4.0)
        assert len(here) == 1, (x, y, here)
    ctc = [e for e in rows if e["label"] == "CTC"]
    assert len(ctc) == res.report.ctc_count == len(cells)
    assert all(len(near(ctc, x, y, 4.0)) == 1 for x, y in cells)
    st = json.loads((run / "report.json").read_text())["stitching"]
    assert st["merged"] > 0 and st["left_to_neighbour"] > 0
    # the ids of events.csv do not depend on what was left out
    ids = [e["object_id"] for e in rows]
    assert len(set(ids)) == len(ids)
    # a re-analysis of the run folder joins the fields the same way (the
    # affine from scan.json)
    again = tmp_path / "again"
    r = invoke("analyze", str(run), "--out", str(again), "--workers", "0")
    assert r.exit_code == 0, r.output
    assert (again / "events.csv").read_bytes() == (run / "events.csv").read_bytes()
    # a damaged affine in scan.json is named, not used to miscount
    scan_json = run / "scan.json"
    good = scan_json.read_bytes()
    meta = json.loads(good)
    for bad in (
        [0, 0, 0, 0, 0, 0],
        "abc",
        [PX, 0, 0, 0, -PX],
        [2 * PX, 0, 0, 0, -PX / 2, 0],
    ):
        meta["instrument"]["pixel_affine"] = bad
        scan_json.write_text(json.dumps(meta))
        r = invoke("analyze", str(run), "--out", str(again), "--workers", "0")
        one_line_error(r, "scan.json", "pixel_affine")
    # another (valid) affine places the objects anew: every field is redone,
    # and the right one again gives the scan's own result
    meta["instrument"]["pixel_affine"] = list(turned_affine(2.0))
    scan_json.write_text(json.dumps(meta))
    r = invoke("analyze", str(run), "--out", str(again), "--workers", "0")
    assert r.exit_code == 0, r.output
    assert (again / "events.csv").read_bytes() != (run / "events.csv").read_bytes()
    scan_json.write_bytes(good)
    r = invoke("analyze", str(run), "--out", str(again), "--workers", "0")
    assert r.exit_code == 0, r.output
    assert (again / "events.csv").read_bytes() == (run / "events.csv").read_bytes()
    assert set(Counter(_detected_fields(again)).values()) == {3}
    # the run resumes only with the geometry its fields were taken with
    with pytest.raises(StorageError, match=r"another field geometry.*field_overlap_um"):
        scan_cells(run, layout, cells, stage_error_um=5.0, rotation_deg=1.0)
    # the station's live list (before events.csv) leaves out what the
    # stitching drops: the same CTCs, with the same ids, as the outputs
    root = tmp_path / "station"
    live = root / "live"
    shutil.copytree(run, live)
    for name in OUTPUT_FILES:
        (live / name).unlink()
    cands = Station(root).candidates("live", None)
    assert cands["state"] != "reviewing" and cands["machine_count"] == len(cells)
    got = sorted(c["object_id"] for c in cands["candidates"] if c["label"] == "CTC")
    assert got == sorted(e["object_id"] for e in ctc)
    # a damaged detection file gives no candidates, and the rest still show
    bad = sorted((live / "detections").glob("*.json"))[0]
    bad.write_text(json.dumps({"field": bad.stem, "objects": [{"label": "CTC"}, 7]}))
    cands = Station(root).candidates("live", None)
    assert 0 < cands["machine_count"] <= len(cells)
    assert all(c["field"] != bad.stem for c in cands["candidates"])
    # napari's mosaic places the fields where the stage went, turned with the
    # camera: each event's point falls on its object's pixel of its field
    kw = read_run(str(run))[0][1]
    placed = kw["metadata"]["fields"]
    assert "scale" not in kw and "translate" not in kw
    to_world = np.array(kw["affine"])
    for e in rows:
        world = world_from_stage(float(e["stage_x_um"]), float(e["stage_y_um"]))
        r, c = np.linalg.solve(to_world[:2, :2], world - to_world[:2, 2])
        row0, col0 = placed[e["field"]]
        # a field lands on the nearest whole pixel of the mosaic
        assert abs(r - row0 - float(e["row"])) <= 0.75
        assert abs(c - col0 - float(e["col"])) <= 0.75


def test_without_error_rotation_or_overlap_the_count_is_todays(tmp_path: Path) -> None:
    layout = CartridgeLayout(name="dedup-2x2", rows=2, cols=2)
    cells = border_cells(layout, 0.0)
    res = scan_cells(tmp_path / "run", layout, cells)
    run = res.run_dir
    recs = records(run)
    # the detector's own half-open tiling, without any stitching
    ctx = ReportContext(
        cartridge_id="x", indication="metastatic-breast", cutoff=5, blood_volume_ml=7.5
    )
    today = write_outputs(tmp_path / "today", recs, ctx)
    assert (run / "events.csv").read_bytes() == (
        tmp_path / "today" / "events.csv"
    ).read_bytes()
    assert res.report is not None
    assert res.report.ctc_count == today.ctc_count
    assert res.report.counts == today.counts
    assert res.report.stitching == {
        "tolerance_um": 4.0,
        "margin_um": 1.5,
        "left_to_neighbour": 0,
        "merged": 0,
    }
    # fields abut exactly where they were planned
    plan = {f.name: f for f in plan_fields(layout, FOV_W, FOV_H)}
    assert all(r["stage"]["x_um"] == plan[r["field"]].x_um for r in recs)


# ---------------------------------------------------------------- stitch()


def record(
    name: str,
    x: float,
    y: float,
    objects: list[tuple[float, float, str]],
    affine: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """A detection record of a field centred at (x, y) holding objects at
    stage positions (x, y, reason)."""
    aff = tuple(affine or default_affine(PX))
    a, b, tx, c, d, ty = aff
    det = a * d - b * c
    objs = []
    for ox, oy, reason in objects:
        px_, py_ = ox - x - tx, oy - y - ty
        dc, dr = (d * px_ - b * py_) / det, (a * py_ - c * px_) / det
        objs.append(
            {
                "row": round(dr + (H - 1) / 2, 1),
                "col": round(dc + (W - 1) / 2, 1),
                "label": "CTC",
                "reason": reason,
            }
        )
    return {
        "field": name,
        "stage": {"x_um": x, "y_um": y},
        "shape": [H, W],
        "pixel_size_um": PX,
        "pixel_affine": list(aff),
        "objects": objs,
    }


def test_a_cell_seen_whole_by_two_overlapping_fields_is_one() -> None:
    pitch = FOV_W - 20
    a = record("field_000", 0, 0, [(pitch / 2 - 1, 5, "x"), (-100, 0, "y")])
    b = record("field_001", pitch, 0, [(pitch / 2 - 0.5, 5.3, "x")])
    got = stitch([a, b], StitchSettings())
    assert got.left == {}
    # about 10 um inside both; the deeper one (field_000) stays
    assert got.merged == {"field_001-0000": "field_000-0000"}


def test_a_cut_object_is_left_to_the_field_holding_it_deeper() -> None:
    pitch = FOV_H - 20
    # a cell 2 um inside field_000's bottom edge (its visible part's centre),
    # 18 um inside field_001's top edge
    edge = -FOV_H / 2
    a = record("field_000", 0, 0, [(50, edge + 2, "meets the CTC definition")])
    b = record("field_001", 0, -pitch, [(50, edge + 4.5, "meets the CTC definition")])
    got = stitch([a, b], StitchSettings())
    assert got.left == {"field_000-0000": "field_001"}
    assert got.merged == {}
    # the detector's own edge rule: a nucleus cut by the top edge claims nothing
    c = record("field_001", 0, -pitch, [(50, -pitch + FOV_H / 2 - 1, CUT_REASON)])
    a2 = record("field_000", 0, 0, [(50, -pitch + FOV_H / 2 - 1 - 3, "x")])
    got = stitch([a2, c], StitchSettings())
    assert set(got.dropped) == {"field_001-0000"}


def test_a_cell_the_edge_rule_leaves_next_door_stays_there() -> None:
    # 8 um of overlap: a cell whose nucleus field_001's top edge cuts; each
    # view's centre moved into its own field, field_000's the shallower
    pitch = FOV_H - 8
    top = -pitch + FOV_H / 2  # field_001's top edge
    a = record("field_000", 0, 0, [(50, top - 5.5, "meets the CTC definition")])
    b = record("field_001", 0, -pitch, [(50, top - 6.0, CUT_REASON)])
    got = stitch([a, b], StitchSettings())
    assert got.dropped == {"field_001-0000"}
    # the slim objects kept for the stitching keep the edge rule's reason
    slim = [dict(r, objects=[object_place(o) for o in r["objects"]]) for r in (a, b)]
    assert [o.get("reason") for r in slim for o in r["objects"]] == [None, CUT_REASON]
    assert stitch(slim, StitchSettings()).dropped == got.dropped


def test_the_live_list_is_stitched_again_when_a_detection_file_comes_or_changes(
    tmp_path: Path,
) -> None:
    """The station keeps the live list stitched while the run folder's
    detection files stay as they were; a new file, or one written again,
    is stitched with the others."""
    folder = RunFolder(tmp_path / "station" / "live")
    folder.prepare()
    folder.ledger.append(Started(cartridge_id="c", planned=2))
    station = Station(tmp_path / "station")

    def write(rec: dict[str, Any]) -> None:
        objs = [{**o, "field": rec["field"]} for o in rec["objects"]]
        folder.detection_path(rec["field"]).write_text(
            json.dumps(rec | {"objects": objs})
        )

    def detected(rec: dict[str, Any]) -> None:
        write(rec)
        folder.ledger.append(Detected(field=rec["field"]))

    def ctc() -> list[str]:
        got = station.candidates("live", None)["candidates"]
        return sorted(c["object_id"] for c in got if c["label"] == "CTC")

    # one cell about 10 um inside both fields, deeper in field_000
    pitch = FOV_W - 20
    a = record("field_000", 0, 0, [(pitch / 2 - 1, 5, "x")])
    b = record("field_001", pitch, 0, [(pitch / 2 - 0.5, 5.3, "x")])
    detected(b)
    assert ctc() == ["field_001-0000"]
    view = station.catalog.view("live")
    kept = station._live_rows(view)
    assert station._live_rows(view) is kept  # nothing changed: not stitched again
    # a new file: the cell is field_000's, so field_001's view of it leaves
    detected(a)
    assert ctc() == ["field_000-0000"]
    # field_000's file written again (no new ledger line): its objects elsewhere
    a = record("field_000", 0, 0, [(-100, 0, "x"), (-200, 0, "x")])
    write(a)
    assert ctc() == ["field_000-0000", "field_000-0001", "field_001-0000"]


def test_abutting_fields_lose_nothing() -> None:
    edge = FOV_W / 2
    objs_a = [(edge - 0.33, 0, "x"), (edge - 3, 10, "x")]  # last column, pixel 1383
    objs_b = [(edge + 0.33, 0, CUT_REASON), (edge + 3, 10, "x")]
    a = record("field_000", 0, 0, objs_a)
    b = record("field_001", FOV_W, 0, objs_b)
    assert stitch([a, b], StitchSettings()).dropped == frozenset()


def test_records_without_a_stage_position_take_no_part() -> None:
    a = record("a", 0, 0, [(0, 0, "x")])
    b = record("b", 0, 0, [(0, 0, "x")])
    b["stage"] = {}
    assert FieldGeometry.of(b) is None
    assert stitch([a, b], StitchSettings()).dropped == frozenset()


def _views(
    cells: list[tuple[float, float, float]],
    fields: list[tuple[str, float, float]],
    affine: tuple[float, ...],
    rng: random.Random,
) -> list[dict[str, Any]]:
    """What each field's detector reports of `cells` (x, y, radius): a whole
    cell at its centre (within 0.2 um), a cut one at its visible part's centre
    (moved inward by half the part cut off), one whose centre lies beyond the
    edge as left next door."""
    out = []
    for name, fx, fy in fields:
        geom = FieldGeometry.of(record(name, fx, fy, [], affine))
        assert geom is not None
        objs = []
        for x, y, r in cells:
            p = np.array([[x, y]])
            depth = float(geom.depth(p)[0])
            if depth <= -r:
                continue
            if depth >= r:
                objs.append(
                    (x + rng.uniform(-0.2, 0.2), y + rng.uniform(-0.2, 0.2), "x")
                )
                continue
            # the nearest edge's inward normal, in the field's own frame
            a, b, _, c, d, _ = affine
            det = a * d - b * c
            dc = (d * (x - fx) - b * (y - fy)) / det
            dr = (a * (y - fy) - c * (x - fx)) / det
            to_edge = {
                "left": dc + W / 2,
                "right": W / 2 - dc,
                "top": dr + H / 2,
                "bottom": H / 2 - dr,
            }
            side = min(to_edge, key=lambda k: to_edge[k])
            step = (r - depth) / 2 / PX
            ndc, ndr = {
                "left": (step, 0),
                "right": (-step, 0),
                "top": (0, step),
                "bottom": (0, -step),
            }[side]
            sx, sy = a * ndc + b * ndr, c * ndc + d * ndr
            cut = depth < 0  # its centre beyond the edge: counted next door
            objs.append((x + sx, y + sy, CUT_REASON if cut else "x"))
        out.append(record(name, fx, fy, objs, affine))
    return out


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rotation=st.floats(-1.0, 1.0),
    error=st.floats(0.0, 5.0),
)
def test_every_cell_counts_once_whatever_the_order(
    seed: int, rotation: float, error: float
) -> None:
    rng = random.Random(seed)
    overlap = 40.0  # as on the scan above: every cell whole in some field
    layout = CartridgeLayout(name="h", rows=2, cols=3)
    plan = plan_fields(layout, FOV_W, FOV_H, overlap_um=overlap)
    fields = [
        (
            f.name,
            f.x_um + rng.uniform(-error, error),
            f.y_um + rng.uniform(-error, error),
        )
        for f in plan
    ]
    affine = turned_affine(rotation)
    # cells of 6-15 um near the borders, 16 um or more apart, clear of the
    # grid's outer edge
    cells: list[tuple[float, float, float]] = []
    pw, ph = FOV_W - overlap, FOV_H - overlap
    while len(cells) < 40:
        if rng.random() < 0.5:
            x = rng.choice([-pw / 2, pw / 2]) + rng.uniform(-30, 30)
            y = rng.uniform(-ph + 30, ph - 30)
        else:
            x = rng.uniform(-1.5 * pw + 30, 1.5 * pw - 30)
            y = rng.uniform(-30, 30)
        if all(math.hypot(x - u, y - v) >= 16 for u, v, _ in cells):
            cells.append((x, y, rng.uniform(3.0, 7.5)))
    recs = _views(cells, fields, affine, rng)
    got = stitch(recs, StitchSettings())
    kept = []
    for rec in recs:
        objs = sorted(rec["objects"], key=lambda o: (o["row"], o["col"]))
        geom = FieldGeometry.of(rec)
        assert geom is not None
        for k, o in enumerate(objs):
            if f"{rec['field']}-{k:04d}" not in got.dropped:
                kept.append(geom.to_stage(np.array(o["row"]), np.array(o["col"])))
    # each cell exactly once
    for x, y, _ in cells:
        n = sum(math.hypot(float(p[0]) - x, float(p[1]) - y) < 5 for p in kept)
        assert n == 1, (x, y)
    assert len(kept) == len(cells)
    # the same whatever order the records and their objects come in
    shuffled = [
        dict(r, objects=rng.sample(r["objects"], len(r["objects"]))) for r in recs
    ]
    rng.shuffle(shuffled)
    again = stitch(shuffled, StitchSettings())
    assert again.left == got.left and again.merged == got.merged
    # and the same from the slim objects kept for it (the scan's outputs, the
    # station's live list): their places and the edge rule's reason only
    slim = [dict(r, objects=[object_place(o) for o in r["objects"]]) for r in recs]
    assert all(set(o) <= {"row", "col", "reason"} for r in slim for o in r["objects"])
    kept_slim = stitch(slim, StitchSettings())
    assert kept_slim.left == got.left and kept_slim.merged == got.merged


# ---------------------------------------------------------------- plan, config


def test_overlapping_fields_step_by_the_field_of_view_less_the_overlap() -> None:
    layout = CartridgeLayout(name="p", rows=2, cols=3)
    abut = plan_fields(layout, FOV_W, FOV_H)
    over = plan_fields(layout, FOV_W, FOV_H, overlap_um=20.0)
    assert abut == plan_fields(layout, FOV_W, FOV_H, overlap_um=0.0)
    assert abut[1].x_um - abut[0].x_um == pytest.approx(FOV_W)
    assert over[1].x_um - over[0].x_um == pytest.approx(FOV_W - 20)
    assert over[0].y_um - over[-1].y_um == pytest.approx(FOV_H - 20)
    assert [f.name for f in over] == [f.name for f in abut]
    with pytest.raises(ConfigError, match="overlap"):
        plan_fields(layout, FOV_W, FOV_H, overlap_um=FOV_H / 2)


def test_an_overlap_that_would_leave_part_of_the_chamber_unimaged_is_refused() -> None:
    # 35 fields in a row, 250 um beyond the wall at each end: 14.7 um at most
    long = get_layout("cellsearch-5x35")
    assert len(ScanPlan.build(long, _instrument(field_overlap_um=14.5)).fields) == 175
    with pytest.raises(ConfigError, match=r"cellsearch-5x35.*at most 14\.7 um"):
        ScanPlan.build(long, _instrument(field_overlap_um=20))


def _instrument(**kw: Any) -> InstrumentConfig:
    data = load_yaml(CONFIG_DIR / "simulated.yaml")
    data.update(kw)
    return InstrumentConfig.from_dict(data, base_dir=CONFIG_DIR, source="sim.yaml")


def test_the_affine_must_fit_the_pixel_size_and_the_overlap_the_field() -> None:
    with pytest.raises(ConfigError, match=r"sim\.yaml.*pixel_affine scales 0\.7"):
        _instrument(pixel_affine=[0.7, 0, 0, 0, -0.7, 0])
    with pytest.raises(ConfigError, match="field_overlap_um"):
        _instrument(field_overlap_um=400)
    # a camera is turned, never mirrored, sheared or stretched, and the plan
    # along the stage axes tiles only a small turn
    for bad, why in [
        ([PX, 0, 0, 0, PX, 0], "not a turned camera"),
        ([PX, 0.3, 0, 0, -PX, 0], "not a turned camera"),
        ([2 * PX, 0, 0, 0, -PX / 2, 0], "not a turned camera"),
        (list(turned_affine(45)), "turns the camera 45.00 degrees"),
        ([PX, 0, 1e6, 0, -PX, 0], "translation"),
        ([PX, 0, float("nan"), 0, -PX, 0], "pixel_affine.2.*finite"),
        ("abc", "pixel_affine"),
    ]:
        with pytest.raises(ConfigError, match=why):
            _instrument(pixel_affine=bad)
    assert _instrument(pixel_affine=list(turned_affine(-1))).affine == pytest.approx(
        turned_affine(-1)
    )
    assert _instrument().affine == (PX, 0.0, 0.0, 0.0, -PX, 0.0)


def test_the_core_reports_the_configured_affine() -> None:
    cfg = _instrument(pixel_affine=list(turned_affine(0.5)))
    inst = open_instrument(cfg, CartridgeLayout(name="c", rows=1, cols=1))
    try:
        got = inst.core.getPixelSizeAffine()
        assert got == pytest.approx(turned_affine(0.5))
        assert inst.core.getPixelSizeUm() == PX
    finally:
        inst.close()


def _landings(error_um: float, targets: list[tuple[float, float]]) -> list[tuple]:
    data = load_yaml(CONFIG_DIR / "simulated.yaml")
    data["simulation"]["world"] = {"stage_error_um": error_um}
    cfg = InstrumentConfig.from_dict(data, base_dir=CONFIG_DIR)
    inst = open_instrument(cfg, CartridgeLayout(name="c", rows=1, cols=1))
    try:
        out = []
        for x, y in targets:
            inst.core.setXYPosition(x, y)
            inst.core.waitForDevice(inst.core.getXYStageDevice())
            out.append(tuple(inst.core.getXYPosition()))
        return out
    finally:
        inst.close()


def test_the_simulated_stage_lands_near_its_target_and_says_where() -> None:
    targets = [(100.0, -50.0), (-300.0, 200.0), (100.0, -50.0), (0.0, 0.0)]
    assert _landings(0.0, targets) == targets
    landed = _landings(5.0, targets)
    off = [(lx - x, ly - y) for (lx, ly), (x, y) in zip(landed, targets, strict=True)]
    assert all(0 < max(abs(dx), abs(dy)) <= 5.0 for dx, dy in off)
    assert landed[0] != landed[2]  # each move its own error
    assert _landings(5.0, targets) == landed  # seeded


def test_a_turned_camera_sees_a_cell_where_the_affine_says() -> None:
    from simulators import World, WorldConfig

    cell = (300.0, 200.0)  # stage um from the frame centre
    layout = CartridgeLayout(name="c", rows=3, cols=3)  # the centre field
    world = World(
        WorldConfig(camera_rotation_deg=1.0, population={**EMPTY, "ctc_at": [cell]}),
        layout,
    )
    frame = world.renderer.frame(0.0, 0.0, world.surface_z(0, 0), 2, 100.0)
    med = float(np.median(frame))
    rows, cols = np.nonzero(frame > med + 0.3 * (float(frame.max()) - med))
    seen = np.array([rows.mean(), cols.mean()])
    # the pixel the affine maps onto the cell's stage position
    a, b, _, c, d, _ = turned_affine(1.0)
    det = a * d - b * c
    dc = (d * cell[0] - b * cell[1]) / det
    dr = (a * cell[1] - c * cell[0]) / det
    turned = np.array([dr + (H - 1) / 2, dc + (W - 1) / 2])
    straight = np.array([-cell[1] / PX + (H - 1) / 2, cell[0] / PX + (W - 1) / 2])
    assert np.hypot(*(seen - turned)) < 1.5
    assert np.hypot(*(seen - straight)) > 5

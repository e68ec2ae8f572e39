"""Focus: peak finding, sharpness, surface fit, and the focus map in real scans."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from analysis.focus import _mean_sq_diff, field_sharpness, flank_peak, refine_peak
from controller.acquisition.plan import plan_fields
from controller.config import FocusSettings, InstrumentConfig, load_yaml
from controller.errors import ConfigError, FocusCanceled, FocusError
from controller.focus.mapper import Focuser, FocusMapper
from controller.focus.surface import (
    Anchor,
    anchor_positions,
    fit_anchors,
    predict_z,
    travel_um,
    visit_order,
)
from controller.hardware.facade import Hardware
from controller.hardware.instrument import Instrument, open_instrument
from controller.layouts import CartridgeLayout, get_layout
from controller.records import FocusAnchorDone, Record
from controller.runs.focusmap import same_map_settings
from controller.runs.scan import Scan, ScanRequest, ScanResult
from hardware_configs import CONFIG_DIR
from simulators import SimulatedSample, World, WorldConfig
from tests.conftest import DEMO_YAML, SIM_YAML, invoke, one_line_error, sim_instrument

#: 24 fields over 5.3 x 2.0 mm: wide enough for a bow, quick to scan
STRIP = CartridgeLayout(name="test-3x8", rows=3, cols=8)
FOV = (1384 * 0.64, 1036 * 0.64)
#: a cartridge with nothing in it
EMPTY = dict.fromkeys(
    (
        "ctc",
        "wbc_per_field",
        "double_positive",
        "ck_fragment",
        "small_ck_dapi",
        "nucleus_beside_ck",
        "free_nucleus_per_field",
        "debris",
    ),
    0,
)


def scan(out: Path, instrument: InstrumentConfig, **kw: Any) -> ScanResult:
    req = ScanRequest(
        instrument=instrument,
        layout=kw.pop("layout", STRIP),
        out=out,
        instrument_file=str(SIM_YAML),
        **kw,
    )
    return Scan(req, detector_workers=0, run_job=no_detection).run()


def no_detection(job: Any) -> dict[str, Any]:
    """Focus tests judge focus, not cells: a valid, empty detection record."""
    return {"field": job.name, "counts": {}, "objects": []}


BOWED = {"bow_um": 8.0, "tilt_x_um_per_mm": 0.5, "tilt_y_um_per_mm": 0.0}


@pytest.fixture(scope="module")
def bowed(tmp_path_factory: pytest.TempPathFactory) -> ScanResult:
    """A plane map of an 8 um bow: fields far from the plane need re-focus."""
    out = tmp_path_factory.mktemp("bowed") / "run"
    return scan(out, sim_instrument(surface=BOWED, focus={"model": "plane"}), seed=34)


def ledger(run: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()
    ]


def truth_z(run: Path) -> dict[str, float]:
    truth = json.loads((run / "ground_truth.json").read_text())
    return {f["name"]: f["z_true_um"] for f in truth["fields"]}


def stored_z(run: Path) -> dict[str, float]:
    """The z every stored field was imaged at, from its OME-TIFF planes."""
    out = {}
    for path in sorted((run / "fields").glob("*.ome.tif")):
        with tifffile.TiffFile(path) as tif:
            ome = tif.ome_metadata or ""
        z = float(ome.split('PositionZ="')[1].split('"')[0])
        out[path.name.split(".")[0]] = z
    return out


# ---------------------------------------------------------------- peak and sharpness


@pytest.mark.parametrize("peak", [-3.3, 0.0, 0.26, 1.9])
def test_refine_peak_finds_a_gaussian_peak_between_samples(peak: float) -> None:
    zs = np.arange(-6.0, 6.01, 0.5)
    values = 100 + 5000 * np.exp(-((zs - peak) ** 2) / (2 * 1.5**2))
    est = refine_peak(zs, values)
    assert est.z is not None and abs(est.z - peak) < 0.1


def test_refine_peak_refuses_flat_and_one_sided_curves() -> None:
    zs = np.arange(-4.0, 4.01, 1.0)
    flat = refine_peak(zs, np.full(zs.size, 500.0) + np.linspace(0, 5, zs.size) % 2)
    assert flat.z is None and "flat" in flat.reason
    rising = refine_peak(zs, 100 + 50 * (zs + 5))
    assert rising.z is None and "end of the search" in rising.reason


def _defocus_curve(zs: np.ndarray, focus: float) -> np.ndarray:
    """Gradient energy of a defocused field, as the simulated optics give it:
    a flat top within the depth of field, log-linear flanks."""
    blur = np.hypot(zs - focus, 1.0) - 1.0
    return 80 + 7500 * np.exp(-0.9 * blur)


@pytest.mark.parametrize("focus", [-1.0, -0.5, 0.0, 0.3, 0.9])
def test_flank_peak_places_focus_from_three_planes(focus: float) -> None:
    zs = np.array([-3.0, 0.0, 3.0])
    est = flank_peak(zs, _defocus_curve(zs, focus))
    assert est.z is not None and abs(est.z - focus) < 0.1


def test_flank_peak_names_the_side_that_needs_another_plane() -> None:
    zs = np.array([-3.0, 0.0, 3.0])
    above = flank_peak(zs, _defocus_curve(zs, 2.5))
    assert above.z is None and above.side == 1
    below = flank_peak(zs, _defocus_curve(zs, -4.0))
    assert below.z is None and below.side == -1
    flat = flank_peak(zs, np.full(3, 500.0))
    assert flat.z is None and flat.side == 0 and "flat" in flat.reason
    # with the plane it asked for, the peak is found
    more = np.array([-3.0, 0.0, 3.0, 6.0])
    est = flank_peak(more, _defocus_curve(more, 2.5))
    assert est.z is not None and abs(est.z - 2.5) < 0.1


def test_field_sharpness_does_not_depend_on_how_much_the_field_holds() -> None:
    layout = get_layout("cellsearch-5x35")
    dense = World(WorldConfig(seed=21), layout)
    sparse = World(
        WorldConfig(
            seed=22, population={"wbc_per_field": 15, "free_nucleus_per_field": 1}
        ),
        layout,
    )
    empty = World(WorldConfig(seed=23, population=EMPTY), layout)
    x, y = 2000.0, 0.0  # an inner field

    def sharp(w: World, dz: float) -> float | None:
        return field_sharpness(
            w.renderer.frame(x, y, w.surface_z(x, y) + dz, 0, 20.0)
        ).sharpness

    in_focus = [sharp(w, 0.0) for w in (dense, sparse)]
    assert all(s is not None for s in in_focus)
    assert max(in_focus) - min(in_focus) < 0.1  # type: ignore[operator]
    for w in (dense, sparse):
        assert sharp(w, 0.5) > 0.9 * sharp(w, 0.0)  # type: ignore[operator]
        assert sharp(w, 2.5) < 0.7 * sharp(w, 0.0)  # type: ignore[operator]
        assert sharp(w, 15.0) < 0.5 * sharp(w, 0.0)  # type: ignore[operator]
    assert sharp(empty, 0.0) is None


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((1036, 1384), np.uint16),
        ((130, 64), np.float64),
        ((5, 7), np.int32),
        ((2, 3), np.uint8),
    ],
)
def test_mean_squared_differences_by_row_blocks_are_the_full_frames(
    shape: tuple[int, int], dtype: type
) -> None:
    # blocks of rows (and a last, shorter one), every dtype, a strided view
    f = (np.random.default_rng(3).random(shape) * 4000).astype(dtype)
    for image in (f, f[:, ::-1]):
        a = image.astype(np.float32)
        for d in (1, 4):
            if min(shape) <= d:
                continue
            along = np.mean((a[:, d:] - a[:, :-d]) ** 2, dtype=np.float64)
            across = np.mean((a[d:] - a[:-d]) ** 2, dtype=np.float64)
            # a block's float32 dot product rounds as float32 sums do
            assert _mean_sq_diff(image, d) == pytest.approx(
                (along + across) / 2, rel=1e-5
            )


@pytest.mark.parametrize("shape", [(4, 100), (100, 4), (1, 100), (3, 3), (0, 0)])
def test_a_frame_too_small_to_judge_has_no_sharpness_and_raises_nothing(
    shape: tuple[int, int],
) -> None:
    frame = np.full(shape, 100, np.uint16)
    assert np.isnan(_mean_sq_diff(frame, 4))
    sharpness = field_sharpness(frame).sharpness
    assert sharpness is None or np.isnan(sharpness)


# ---------------------------------------------------------------- surface fit


def _anchors(points: list[tuple[float, float, float]]) -> list[Anchor]:
    return [Anchor(i, x, y, z, "software", "ok") for i, (x, y, z) in enumerate(points)]


def _plane_points(n_x: int = 4, n_y: int = 2) -> list[tuple[float, float, float]]:
    return [
        (x, y, 2.0 + 0.001 * x - 0.002 * y)
        for x in np.linspace(-3000, 3000, n_x)
        for y in np.linspace(-500, 500, n_y)
    ]


@pytest.mark.parametrize(
    ("second_try", "status"),
    [("agrees", "remeasured"), ("repeats", "confirmed"), ("elsewhere", "dropped")],
)
def test_an_anchor_that_disagrees_is_remeasured(second_try: str, status: str) -> None:
    points = _plane_points()
    anchors = _anchors(points)
    first = float(points[3][2]) + 6.0
    anchors[3].z_um = first
    calls = []

    def remeasure(a: Anchor, predicted: float) -> None:
        calls.append((a.index, predicted))
        a.z_um = {
            "agrees": predicted + 0.2,
            "repeats": first - 0.3,
            "elsewhere": first - 12.0,
        }[second_try]

    settings = FocusSettings(model="plane")
    fit = fit_anchors(anchors, settings, (0.0, 0.0), (3000.0, 500.0), remeasure)
    assert [c[0] for c in calls] == [3]  # only the bad anchor, once
    assert calls[0][1] == pytest.approx(points[3][2], abs=1e-6)
    assert anchors[3].status == status
    assert anchors[3].usable == (status != "dropped")
    assert all(a.status == "ok" for a in anchors if a.index != 3)
    if status == "confirmed":  # a real bump: kept, and the fit shows a residual
        assert abs(anchors[3].residual_um) > 2.0  # type: ignore[arg-type]
    else:
        for x, y, z in points[:3] + points[4:]:
            assert fit(x, y) == pytest.approx(z, abs=0.1)


def test_model_follows_the_anchors_geometry() -> None:
    bowed = [(x, y, 5 - 4e-7 * x * x) for x, y, _ in _plane_points(5, 2)]
    fit = fit_anchors(
        _anchors(bowed), FocusSettings(), (0.0, 0.0), (3000.0, 500.0), lambda a, p: None
    )
    # 5 x 2 anchors carry u^2 and uv but not v^2
    assert fit.model == "quadratic" and "vv" not in fit.terms and "uu" in fit.terms
    assert max(abs(fit(x, y) - z) for x, y, z in bowed) < 1e-6
    few = fit_anchors(
        _anchors(bowed[:4]),
        FocusSettings(),
        (0.0, 0.0),
        (3000.0, 500.0),
        lambda a, p: None,
    )
    assert few.model == "plane"


# ---------------------------------------------------------------- settings


def test_anchors_are_placed_inside_the_chamber_away_from_the_wall() -> None:
    pts = anchor_positions(STRIP, *FOV, FocusSettings(anchors=(4, 3), margin_um=300))
    half_w = STRIP.cols * FOV[0] / 2 - STRIP.wall_inset_um
    half_h = STRIP.rows * FOV[1] / 2 - STRIP.wall_inset_um
    assert len(pts) == 12
    assert all(
        abs(x) <= half_w - 300 + 1e-6 and abs(y) <= half_h - 300 + 1e-6 for x, y in pts
    )
    assert max(x for x, _ in pts) == pytest.approx(half_w - 300)


def test_two_anchors_predict_along_the_line_through_them() -> None:
    points = [(0.0, 0.0, 2.0), (1000.0, 0.0, 3.0)]
    scale = (10000.0, 1000.0)
    assert predict_z(points, 3000.0, 50.0, (0.0, 0.0), scale) == pytest.approx(5.0)
    # one anchor predicts its own z; more are fitted
    assert predict_z(points[:1], 3000.0, 0.0, (0.0, 0.0), scale) == 2.0
    plane = [*points, (0.0, 500.0, 1.0)]
    assert predict_z(plane, 1000.0, 500.0, (0.0, 0.0), scale) == pytest.approx(2.0)


def test_anchors_are_visited_in_an_order_of_short_travel() -> None:
    layout = get_layout("cellsearch-5x35")
    points = anchor_positions(layout, *FOV, FocusSettings())
    start = (layout.center_x_um, layout.center_y_um)

    def travel(order: list[int]) -> float:
        walk = [start] + [points[i] for i in order]
        return sum(travel_um(a, b) for a, b in pairwise(walk))

    order = visit_order(points, start)
    assert sorted(order) == list(range(len(points)))
    rows = list(range(len(points)))  # the grid's serpentine along the rows
    assert travel(order) < 0.7 * travel(rows)
    # it starts at the anchor nearest the stage
    nearest = min(range(len(points)), key=lambda i: travel_um(start, points[i]))
    assert travel_um(start, points[order[0]]) == travel_um(start, points[nearest])
    # from a corner, the corner's anchor comes first
    corner = (points[9][0] - 500, points[9][1] - 500)
    assert visit_order(points, corner)[0] == 9


@pytest.mark.parametrize(
    ("focus", "words"),
    [
        ({"search_range_um": 0}, "empty search range"),
        ({"refocus_range_um": 1.0}, "smaller than coarse_step_um"),
        ({"fine_step_um": 3.0}, "fine_step_um must be smaller"),
        ({"predicted_step_um": 7.0}, "larger than anchor_range_um"),
        ({"roi_px": -1}, "roi_px"),
        ({"channel": "Cy7"}, "not one of the channels"),
        ({"search_range_um": 500}, "leaves the stage's z limits"),
    ],
)
def test_bad_focus_settings_are_refused_by_name(
    tmp_path: Path, focus: dict[str, Any], words: str
) -> None:
    data = load_yaml(SIM_YAML)
    data["focus"] = focus
    yml = tmp_path / "instrument.yaml"
    yml.write_text(
        json.dumps({**data, "micromanager_config": str(CONFIG_DIR / "simulated.cfg")})
    )
    res = invoke("scan", "--out", str(tmp_path / "run"), "--instrument", str(yml))
    assert res.exit_code == 2
    msg = one_line_error(res)
    assert "focus" in msg and words in msg and str(yml) in msg
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("focus", "words"),
    [
        ({"anchor_points": [[0, 0], [90000, 0]]}, "outside the cartridge chamber"),
        ({"margin_um": 2000}, "leaves no room for anchors"),
    ],
)
def test_anchors_outside_the_cartridge_are_refused_before_anything_moves(
    tmp_path: Path, focus: dict[str, Any], words: str
) -> None:
    with pytest.raises(ConfigError, match=words):
        scan(tmp_path / "run", sim_instrument(focus=focus), n_fields=1)
    assert not list((tmp_path / "run" / "fields").glob("*"))


# ---------------------------------------------------------------- scans


SURFACES = [
    (31, {"z0_um": 0.0}),  # the default mild surface
    (
        32,
        {
            "z0_um": 7.0,
            "tilt_x_um_per_mm": 2.0,
            "tilt_y_um_per_mm": -1.5,
            "bow_um": 4.0,
        },
    ),
    (
        33,
        {
            "z0_um": -12.0,
            "tilt_x_um_per_mm": -1.0,
            "tilt_y_um_per_mm": 2.5,
            "bow_um": -3.0,
        },
    ),
]


@pytest.mark.parametrize(("seed", "surface"), SURFACES)
def test_every_field_is_imaged_within_1um_of_true_focus(
    tmp_path: Path, seed: int, surface: dict[str, float]
) -> None:
    result = scan(tmp_path / "run", sim_instrument(surface=surface), seed=seed)
    assert result.complete and result.focus_map is not None
    truth = truth_z(result.run_dir)
    planned = json.loads((result.run_dir / "scan.json").read_text())["fields"]
    assert len(planned) == STRIP.n_fields
    errors = {f["name"]: f["z_um"] - truth[f["name"]] for f in planned}
    assert max(abs(e) for e in errors.values()) < 1.0, errors
    imaged = stored_z(result.run_dir)
    assert max(abs(imaged[n] - truth[n]) for n in truth) < 1.0
    # a good map leaves nothing to re-focus; every field's sharpness is recorded
    assert result.refocused == []
    stored = [r for r in ledger(result.run_dir) if r["event"] == "stored"]
    assert all(r["focus"]["sharpness"] > 0.5 for r in stored)
    assert result.focus_map.rms_um < 0.5 and not result.focus_map.warnings


def test_a_bowed_cartridge_refocuses_the_fields_that_need_it_and_only_those(
    bowed: ScanResult,
) -> None:
    result = bowed
    run = result.run_dir
    truth = truth_z(run)
    planned = {
        f["name"]: f["z_um"]
        for f in json.loads((run / "scan.json").read_text())["fields"]
    }
    off = {n: abs(planned[n] - truth[n]) for n in planned}
    need = {n for n, d in off.items() if d > 1.4}
    fine = {n for n, d in off.items() if d < 1.0}
    assert len(need) >= 4 and len(fine) >= 4  # the test means something
    refocused = set(result.refocused)
    assert need <= refocused and not (refocused & fine), sorted(off.items())
    # re-focused fields end up in focus, the rest within what QC accepts; each
    # stored file is the sharp one
    imaged = stored_z(run)
    assert max(abs(imaged[n] - truth[n]) for n in refocused) < 1.0
    assert max(abs(imaged[n] - truth[n]) for n in truth) < 1.4
    records = ledger(run)
    again = {r["field"]: r for r in records if r["event"] == "refocused"}
    assert set(again) == refocused
    stored = {r["field"]: r for r in records if r["event"] == "stored"}
    for name in need:
        rec = again[name]
        assert rec["first"]["z_um"] == pytest.approx(planned[name])
        assert rec["kept"] == "second"
        assert rec["second"]["sharpness"] > rec["first"]["sharpness"]
        assert stored[name]["focus"]["z_um"] == pytest.approx(imaged[name], abs=0.01)
        assert stored[name]["focus"]["sharpness"] == pytest.approx(
            rec["second"]["sharpness"]
        )
    report = json.loads((run / "report.json").read_text())["focus"]
    assert {f["name"] for f in report["fields"] if f["refocused"]} == refocused
    assert report["seconds"] > 0 and report["qc_seconds"] > 0


def test_hardware_autofocus_measures_the_anchors(tmp_path: Path) -> None:
    surface = {"z0_um": 5.0, "tilt_x_um_per_mm": 1.5, "bow_um": 2.0}
    hw = scan(
        tmp_path / "hw",
        sim_instrument(surface=surface, focus={"autofocus_device": "Autofocus"}),
        seed=35,
        n_fields=4,
    )
    sw = scan(tmp_path / "sw", sim_instrument(surface=surface), seed=35, n_fields=4)
    fm = hw.focus_map
    assert fm is not None and sw.focus_map is not None
    assert {a.source for a in fm.anchors} == {"hardware"}
    assert {a.source for a in sw.focus_map.anchors} == {"software"}
    # one sharpness frame per anchor instead of a z search
    assert sum(a.snaps for a in fm.anchors) == len(fm.anchors)
    # software focus needs at least three planes per anchor
    assert sum(a.snaps for a in sw.focus_map.anchors) >= 3 * len(fm.anchors)
    truth = truth_z(hw.run_dir)
    assert max(abs(z - truth[n]) for n, z in stored_z(hw.run_dir).items()) < 1.0


def test_a_failing_autofocus_falls_back_to_software_focus(tmp_path: Path) -> None:
    # calls 0-2: the first anchor visited fails all three tries; call 3 (the
    # second) lands 12 um off, outside the search range, and is tried again
    inst = sim_instrument(
        surface={"z0_um": -4.0, "tilt_x_um_per_mm": 1.0},
        focus={"autofocus_device": "Autofocus"},
        fail_autofocus=[0, 1, 2],
        wrong_autofocus=[3],
    )
    result = scan(tmp_path / "run", inst, seed=36)
    fm = result.focus_map
    assert fm is not None and result.complete
    visits = [r for r in ledger(result.run_dir) if r["event"] == "focus_anchor"]
    first = next(r["index"] for r in visits if r["done"] == 1)
    sources = {a.index: a.source for a in fm.anchors}
    assert sources.pop(first) == "software" and set(sources.values()) == {"hardware"}
    assert all(a.usable for a in fm.anchors)
    assert any("hardware autofocus failed at 1 anchor" in w for w in fm.warnings)
    truth = truth_z(result.run_dir)
    assert max(abs(z - truth[n]) for n, z in stored_z(result.run_dir).items()) < 1.0
    rec = next(r for r in ledger(result.run_dir) if r["event"] == "focus_map")
    assert rec["warnings"] == fm.warnings


def test_cpp_demo_autofocus_device_measures_the_anchors(tmp_path: Path) -> None:
    inst = InstrumentConfig.from_file(DEMO_YAML)
    req = ScanRequest(
        instrument=inst,
        layout=get_layout("test-3x4"),
        out=tmp_path / "demo",
        instrument_file=str(DEMO_YAML),
        n_fields=2,
    )
    # the demo camera's pattern holds no cells: no detection (minutes a field)
    result = Scan(req, detector_workers=0, run_job=no_detection).run()
    fm = result.focus_map
    assert result.complete and fm is not None
    assert {a.source for a in fm.anchors} == {"hardware"}
    assert all(a.usable for a in fm.anchors)


def test_a_resumed_run_reuses_the_recorded_focus_map(tmp_path: Path) -> None:
    inst = sim_instrument(surface={"z0_um": 3.0, "tilt_x_um_per_mm": 2.0})
    first = scan(tmp_path / "run", inst, seed=37, n_fields=5)
    map_bytes = (first.run_dir / "focus_map.json").read_bytes()
    second = scan(tmp_path / "run", inst, seed=37)
    assert second.focus_map_reused and not first.focus_map_reused
    assert second.resumed == 5 and second.stored == STRIP.n_fields - 5
    assert (first.run_dir / "focus_map.json").read_bytes() == map_bytes
    maps = [r for r in ledger(first.run_dir) if r["event"] == "focus_map"]
    assert [m["reused"] for m in maps] == [False, True]
    truth = truth_z(first.run_dir)
    assert max(abs(z - truth[n]) for n, z in stored_z(first.run_dir).items()) < 1.0


def test_a_map_is_reused_across_search_settings_but_not_across_anchors() -> None:
    recorded = FocusSettings().model_dump(mode="json")
    faster = FocusSettings(coarse_step_um=4, roi_px=0, anchor_order="as_given")
    assert same_map_settings(recorded, faster.model_dump(mode="json"))
    # a map recorded before the search settings existed
    old = {k: v for k, v in recorded.items() if k not in ("roi_px", "anchor_order")}
    assert same_map_settings(old, recorded)
    other = FocusSettings(anchors=(7, 3)).model_dump(mode="json")
    assert not same_map_settings(recorded, other)
    assert not same_map_settings(recorded, {**recorded, "z_start_um": 5.0})


def test_a_cartridge_with_nothing_to_focus_on_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(FocusError, match=r"no anchor found focus.*flat focus curve"):
        scan(
            tmp_path / "run",
            sim_instrument(population=EMPTY, focus={"anchors": [2, 1]}),
            n_fields=2,
        )
    records = ledger(tmp_path / "run")
    assert records[-1]["event"] == "focus_failed"
    assert not any(r["event"] == "stored" for r in records)
    assert not (tmp_path / "run" / "focus_map.json").exists()


def test_a_refocus_that_fails_leaves_the_field_at_its_planned_z(
    tmp_path: Path, bowed: ScanResult
) -> None:
    clean = bowed
    surface, focus = BOWED, {"model": "plane"}
    planned = json.loads((clean.run_dir / "scan.json").read_text())["fields"]
    first = clean.refocused[0]
    k = [f["name"] for f in planned].index(first)
    map_snaps = sum(
        a["snaps"]
        for a in json.loads((clean.run_dir / "focus_map.json").read_text())["anchors"]
    )
    # the map's snaps, the engine's dark frame, 4 frames per earlier field, the
    # field's DAPI frame and its FITC frame (taken while the DAPI frame is
    # judged): the next snap is the re-focus search's first
    search = map_snaps + 1 + 4 * k + 2
    # every try of the search's first snap fails: the re-focus gives up
    inst = sim_instrument(
        surface=surface, focus=focus, fail_snaps=[search, search + 1, search + 2]
    )
    bad = scan(tmp_path / "bad", inst, seed=34, n_fields=k + 2)
    stored = {r["field"]: r for r in ledger(bad.run_dir) if r["event"] == "stored"}
    rec = stored[first]["focus"]
    assert rec["reason"].startswith("re-focus failed") and not rec["refocused"]
    z_plan = planned[k]["z_um"]
    assert rec["z_um"] == pytest.approx(z_plan)
    # every channel really was taken at the planned z: the simulator renders the
    # same pixels for the same position, z, channel and exposure
    world = World(
        WorldConfig(seed=34, surface=surface),
        STRIP,
        width=1384,
        height=1036,
        pixel_size_um=0.64,
    )
    data = tifffile.imread(bad.run_dir / "fields" / f"{first}.ome.tif")
    x, y = planned[k]["x_um"], planned[k]["y_um"]
    for c, exposure in enumerate((20.0, 150.0, 100.0, 150.0)):
        expected = world.renderer.frame(x, y, z_plan, c, exposure)
        assert np.array_equal(data[c], expected), c
    # the field after it is unharmed
    assert bad.complete and not bad.failed


def test_a_refocused_field_stores_every_channel_at_the_kept_z(
    bowed: ScanResult,
) -> None:
    """The focus frame is judged while the next channel is taken; a field
    re-focused to another z has that channel taken again there: the stored
    frames are those of a field imaged at the kept z from its first channel."""
    run = bowed.run_dir
    planned = {
        f["name"]: f for f in json.loads((run / "scan.json").read_text())["fields"]
    }
    again = {r["field"]: r for r in ledger(run) if r["event"] == "refocused"}
    moved = [n for n, r in again.items() if r["kept"] == "second"]
    assert moved
    world = World(
        WorldConfig(seed=34, surface=BOWED),
        STRIP,
        width=1384,
        height=1036,
        pixel_size_um=0.64,
    )
    for name in moved[:2]:
        z = again[name]["second"]["z_um"]
        x, y = planned[name]["x_um"], planned[name]["y_um"]
        data = tifffile.imread(run / "fields" / f"{name}.ome.tif")
        for c, exposure in enumerate((20.0, 150.0, 100.0, 150.0)):
            expected = world.renderer.frame(x, y, z, c, exposure)
            assert np.array_equal(data[c], expected), (name, c)


def test_stopping_during_the_focus_map_stops_between_anchors(tmp_path: Path) -> None:
    req = ScanRequest(
        instrument=sim_instrument(),
        layout=STRIP,
        out=tmp_path / "run",
        instrument_file=str(SIM_YAML),
    )
    seen: list[int] = []

    def on_record(r: Record) -> None:
        if isinstance(r, FocusAnchorDone):
            seen.append(r.done)
            if r.done == 2:
                job.cancel()

    job = Scan(req, detector_workers=0)
    job.events.subscribe(on_record)
    result = job.run()
    assert result.canceled and not result.complete and result.stored == 0
    assert seen == [1, 2]
    records = ledger(tmp_path / "run")
    assert records[-1]["event"] == "stopped" and records[-1]["during"] == "focus map"
    assert not (tmp_path / "run" / "focus_map.json").exists()
    again = scan(tmp_path / "run", sim_instrument())
    assert again.complete and not again.focus_map_reused


def test_a_focus_range_away_from_zero_works(tmp_path: Path) -> None:
    inst = sim_instrument(surface={"z0_um": 150.0, "tilt_x_um_per_mm": 1.0})
    data = inst.model_dump(mode="json")
    data["stage_limits"] = {**data["stage_limits"], "z_min": 100.0, "z_max": 199.0}
    data["focus"] = {**data["focus"], "z_start_um": 145.0, "anchors": [3, 1]}
    inst = InstrumentConfig.from_dict(data)
    result = scan(tmp_path / "run", inst, n_fields=3)
    truth = truth_z(result.run_dir)
    assert result.complete
    assert max(abs(z - truth[n]) for n, z in stored_z(result.run_dir).items()) < 1.0


# ---------------------------------------------------------------- focus frames


#: the bench's cartridge surface (bench/bench_focus.py)
TILTED = {
    "z0_um": 6.0,
    "tilt_x_um_per_mm": 0.8,
    "tilt_y_um_per_mm": -1.5,
    "bow_um": 3.0,
}
FULL = (1384, 1036)


class RecordingHardware(Hardware):
    """The run's `Hardware`, keeping the shape of every frame it snapped; it can
    be interrupted (as by Ctrl-C) before a given snap."""

    def __init__(self, core: Any, *, interrupt_at: int | None = None) -> None:
        super().__init__(core)
        self.shapes: list[tuple[int, ...]] = []
        self.interrupt_at = interrupt_at

    def snap(self, **kw: Any) -> np.ndarray:
        if self.interrupt_at is not None and len(self.shapes) == self.interrupt_at:
            raise KeyboardInterrupt
        img = super().snap(**kw)
        self.shapes.append(img.shape)
        return img


@contextmanager
def opened(inst: InstrumentConfig, layout: CartridgeLayout) -> Iterator[Instrument]:
    instrument = open_instrument(inst, layout, seed=51)
    try:
        yield instrument
    finally:
        instrument.close()


def camera_frame(instrument: Instrument) -> tuple[int, ...]:
    core = instrument.core
    return (*core.getROI(), core.getImageWidth(), core.getImageHeight())


def test_an_roi_search_frame_is_that_region_of_a_full_frame() -> None:
    inst = sim_instrument(surface=TILTED)
    layout = get_layout("cellsearch-5x35")
    with opened(inst, layout) as instrument:
        fz = Focuser(Hardware(instrument.core), inst)
        fz.select_channel()
        fz.move_xy(2000.0, 0.0)
        x, y, w, h = fz.roi()  # type: ignore[misc]
        assert (w, h) == (512, 512)
        with fz.search_frames():
            part = fz.snap_at(7.5)
        full = fz.snap_at(7.5)
    assert part.shape == (512, 512) and full.shape == (1036, 1384)
    assert np.array_equal(part, full[y : y + h, x : x + w])


def test_the_focus_map_takes_fewer_frames_mostly_from_an_roi_and_stays_accurate() -> (
    None
):
    inst = sim_instrument(surface=TILTED)
    layout = get_layout("cellsearch-5x35")
    fov = (FULL[0] * 0.64, FULL[1] * 0.64)
    with opened(inst, layout) as instrument:
        hw = RecordingHardware(instrument.core)
        fmap = FocusMapper(hw, inst, layout, fov).build()
        after = camera_frame(instrument)
        sample = instrument.sample
        assert isinstance(sample, SimulatedSample)
        world = sample.world
        errors = [
            abs(fmap.z_of(f.x_um, f.y_um) - world.surface_z(f.x_um, f.y_um))
            for f in plan_fields(layout, *fov)
        ]
    assert after == (0, 0, *FULL, *FULL)
    assert max(errors) <= 0.3
    n = len(fmap.anchors)
    assert n == 10 and all(a.usable for a in fmap.anchors)
    # coarse + fine steps took 166 frames (16.6 an anchor)
    assert sum(a.snaps for a in fmap.anchors) == len(hw.shapes) <= 6 * n
    roi = hw.shapes.count((512, 512))
    assert roi + hw.shapes.count((1036, 1384)) == len(hw.shapes)
    assert roi >= len(hw.shapes) / 2
    assert fmap.reference_sharpness is not None and fmap.reference_sharpness > 0.8


@pytest.mark.parametrize("how", ["stopped", "interrupted", "nothing to focus on"])
def test_the_camera_is_back_at_full_frame_when_the_map_ends_early(how: str) -> None:
    world: dict[str, Any] = {"surface": TILTED}
    if how == "nothing to focus on":
        world["population"] = EMPTY
    inst = sim_instrument(**world)
    layout = STRIP
    stop_after = [0]

    def should_stop() -> bool:  # after the first anchor
        stop_after[0] += 1
        return how == "stopped" and stop_after[0] > 1

    with opened(inst, layout) as instrument:
        # snap 5 falls inside the first anchor's search, from the ROI
        hw = RecordingHardware(
            instrument.core, interrupt_at=5 if how == "interrupted" else None
        )
        mapper = FocusMapper(hw, inst, layout, FOV, should_stop=should_stop)
        expected = {
            "stopped": FocusCanceled,
            "interrupted": KeyboardInterrupt,
            "nothing to focus on": FocusError,
        }[how]
        with pytest.raises(expected):
            mapper.build()
        assert (512, 512) in hw.shapes  # the ROI was in use
        assert camera_frame(instrument) == (0, 0, *FULL, *FULL)


def test_fields_imaged_after_the_focus_map_are_full_frames(bowed: ScanResult) -> None:
    fields = sorted((bowed.run_dir / "fields").glob("*.ome.tif"))
    assert fields
    for path in fields[:3]:
        assert tifffile.imread(path).shape == (4, FULL[1], FULL[0])

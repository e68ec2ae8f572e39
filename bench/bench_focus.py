"""Benchmark: the focus stage, time against anchors x z-steps, and its accuracy.

The grid's items are ``NXxNY:COARSE/PREDICTED``: anchors, and the plane
spacing (um) of the first anchor's search (``coarse_step_um``) and of the later
anchors' predicted searches (``predicted_step_um``).

For every seed and every focus setting in the grid, opens the simulated
instrument on a full ``cellsearch-5x35`` cartridge with a tilted and bowed
surface, measures the focus map (`controller.focus.mapper.FocusMapper`) and reports:

- ``anchors``, ``snaps`` (all anchors), ``snaps/anchor``;
- ``instrument s``: the instrument time of the map by the simulator's timing
  model (its ``World.clock_ms``: every exposure, DAPI 20 ms, every stage move at
  20 um/ms and focus move at 1 um/ms), the same at any ``--time-scale``;
- ``map s``: wall time of the map; with ``--time-scale 1`` the simulator sleeps
  for that instrument time, so the figure is the instrument's time plus the
  software's (rendering defocused frames, the focus measure, the fit); with 0 it
  is software only;
- ``anchor err``: largest |measured - true| focus at an anchor;
- ``map err max/rms``: the map's error at the centres of all 175 fields;
- per-field QC: the cost of `analysis.focus.field_sharpness` on one DAPI frame
  (median of 20), paid once per field during the scan.

Usage::

    python bench/bench_focus.py                      # grid, seeds 51-53
    python bench/bench_focus.py --time-scale 1 --grid 5x2:3/3
    python bench/bench_focus.py --grid 5x2:3/3 --focus roi_px=0,anchor_order=as_given
    python bench/bench_focus.py --grid 5x2:3/3 --surface bow_um=8,tilt_x_um_per_mm=1.5

Writes ``bench/out/bench_focus-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.focus import field_sharpness  # noqa: E402
from controller.acquisition.plan import ScanPlan  # noqa: E402
from controller.config import InstrumentConfig, load_yaml  # noqa: E402
from controller.focus.mapper import FocusMapper  # noqa: E402
from controller.hardware.facade import Hardware, RetryPolicy  # noqa: E402
from controller.hardware.instrument import Instrument, open_instrument  # noqa: E402
from controller.layouts import get_layout  # noqa: E402
from hardware_configs import CONFIG_DIR  # noqa: E402
from simulators import SimulatedSample, World  # noqa: E402

SURFACE = {
    "z0_um": 6.0,
    "tilt_x_um_per_mm": 0.8,
    "tilt_y_um_per_mm": -1.5,
    "bow_um": 3.0,
}
GRID = "3x1:3/3,5x2:3/3,7x3:3/3,5x2:2/2,5x2:4/3"


def parse_grid(text: str) -> list[dict[str, object]]:
    """``NXxNY:COARSE/PREDICTED,...`` -> focus setting overrides."""
    out = []
    for item in text.split(","):
        grid, steps = item.split(":")
        nx, ny = (int(v) for v in grid.split("x"))
        coarse, predicted = (float(v) for v in steps.split("/"))
        out.append(
            {
                "anchors": [nx, ny],
                "coarse_step_um": coarse,
                "predicted_step_um": predicted,
            }
        )
    return out


def parse_focus(text: str) -> dict[str, object]:
    """``KEY=VALUE,...`` -> setting overrides (values read as YAML)."""
    out: dict[str, object] = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def instrument(
    focus: dict[str, object],
    time_scale: float,
    surface: dict[str, object] | None = None,
) -> InstrumentConfig:
    data = load_yaml(CONFIG_DIR / "simulated.yaml")
    data["focus"] = {**data.get("focus", {}), **focus}
    data["simulation"]["time_scale"] = time_scale
    data["simulation"]["world"] = {"surface": {**SURFACE, **(surface or {})}}
    return InstrumentConfig.from_dict(data, base_dir=CONFIG_DIR)


def world_of(inst: Instrument) -> World:
    """The simulator's `World` behind a simulated instrument (the true surface)."""
    sample = inst.sample
    assert isinstance(sample, SimulatedSample), "not a simulated instrument"
    return sample.world


def run_one(
    focus: dict[str, object],
    seed: int,
    time_scale: float,
    surface: dict[str, object] | None = None,
) -> dict[str, object]:
    cfg = instrument(focus, time_scale, surface)
    layout = get_layout("cellsearch-5x35")
    plan = ScanPlan.build(layout, cfg)
    inst = open_instrument(cfg, layout, seed=seed)
    try:
        world = world_of(inst)
        # the device calls go through the Hardware facade, as in a scan
        hw = Hardware(
            inst.core,
            RetryPolicy(cfg.move_retries, cfg.snap_retries),
            channel_group=cfg.channel_group,
        )
        mapper = FocusMapper(hw, cfg, layout, (plan.fov_width_um, plan.fov_height_um))
        t0, clock0 = time.perf_counter(), world.clock_ms
        fmap = mapper.build()
        map_s = time.perf_counter() - t0
        instrument_s = (world.clock_ms - clock0) / 1000
        anchor_err = max(
            abs(float(a.z_um) - world.surface_z(a.x_um, a.y_um))
            for a in fmap.anchors
            if a.usable
        )
        errs = np.array(
            [
                fmap.z_of(f.x_um, f.y_um) - world.surface_z(f.x_um, f.y_um)
                for f in plan.fields
            ]
        )
        snaps = sum(a.snaps for a in fmap.anchors)
        return {
            "seed": seed,
            "anchors": f"{focus['anchors'][0]}x{focus['anchors'][1]}",  # type: ignore[index]
            "steps": f"{focus['coarse_step_um']}/{focus['predicted_step_um']}",
            "model": fmap.fit.model,
            "n_anchors": len(fmap.anchors),
            "snaps": snaps,
            "snaps_per_anchor": round(snaps / len(fmap.anchors), 1),
            "map_s": round(map_s, 2),
            "instrument_s": round(instrument_s, 2),
            "anchor_err_um": round(anchor_err, 3),
            "map_err_max_um": round(float(np.max(np.abs(errs))), 3),
            "map_err_rms_um": round(float(np.sqrt(np.mean(errs**2))), 3),
            "warnings": fmap.warnings,
        }
    finally:
        inst.close()


def qc_cost(seed: int) -> float:
    """Median ms of field_sharpness on one in-focus DAPI frame."""
    cfg = instrument({}, 0.0)
    layout = get_layout("cellsearch-5x35")
    inst = open_instrument(cfg, layout, seed=seed)
    try:
        w = world_of(inst)
        frame = w.renderer.frame(0.0, 0.0, w.surface_z(0.0, 0.0), 0, 20.0)
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            field_sharpness(frame)
            times.append((time.perf_counter() - t0) * 1000)
        return round(statistics.median(times), 2)
    finally:
        inst.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="51,52,53")
    p.add_argument(
        "--grid", default=GRID, help="NXxNY:COARSE/PREDICTED,... (steps in um)"
    )
    p.add_argument("--time-scale", type=float, default=0.0)
    p.add_argument(
        "--focus",
        default="",
        help="more focus settings for every run, KEY=VALUE,... (e.g. roi_px=0)",
    )
    p.add_argument(
        "--surface",
        default="",
        help="surface changes, KEY=VALUE,... (e.g. bow_um=8,tilt_x_um_per_mm=1.5)",
    )
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = parse_focus(args.focus)
    surface = {**SURFACE, **parse_focus(args.surface)}
    rows = [
        run_one({**f, **extra}, s, args.time_scale, surface)
        for f in parse_grid(args.grid)
        for s in seeds
    ]
    cols = [
        "anchors", "steps", "seed", "model", "snaps", "snaps_per_anchor",
        "instrument_s", "map_s", "anchor_err_um", "map_err_max_um", "map_err_rms_um",
    ]  # fmt: skip
    print(f"time_scale {args.time_scale}; surface {surface}; focus {extra}")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
        for w in r["warnings"]:  # type: ignore[attr-defined]
            print("   warning:", w)
    qc_ms = qc_cost(seeds[0])
    print(f"per-field QC (field_sharpness, one DAPI frame): {qc_ms} ms median")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_focus-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {
                "time_scale": args.time_scale,
                "focus": extra,
                "surface": surface,
                "rows": rows,
                "qc_ms_per_field": qc_ms,
                "machine": platform.platform(),
                "python": platform.python_version(),
            },
            indent=1,
        )
    )
    print("wrote", path)


if __name__ == "__main__":
    main()

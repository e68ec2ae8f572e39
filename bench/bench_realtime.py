"""A scan at real exposure and travel times against its hardware floor.

    python bench/bench_realtime.py [--fields N] [--seed 1] [--time-scale 1]

Runs `Scan` on the simulated instrument with ``simulation.time_scale`` 1: every
exposure, stage move and focus move takes its modelled time (the simulator's
timing model, counted on ``World.clock_ms``). The hardware floor is that clock:
the sum of exposures, stage and focus moves the scan asked for (focus map
included); nothing could be faster on this instrument. The bench prints the
scan's wall time (``Scan.run`` from the lock to the last output), the floor,
and the overhead: the budget is within 5 % of the floor.

Also printed: how much of the wall time the acquisition thread spent in the
simulated camera's rendering (``--profile-render``), which on real hardware is
the camera integrating, not software.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from controller.config import InstrumentConfig, load_yaml
from controller.hardware.instrument import open_instrument
from controller.layouts import get_layout
from controller.records import Detected, FocusMapRecorded, Record, Stored
from controller.runs.scan import Scan, ScanRequest
from hardware_configs import CONFIG_DIR
from simulators import SimulatedSample


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fields", type=int, default=None, help="default: all 175")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=1, help="detector workers")
    args = p.parse_args(argv)

    data = load_yaml(CONFIG_DIR / "simulated.yaml")
    data["simulation"]["time_scale"] = args.time_scale
    cfg = InstrumentConfig.from_dict(data, base_dir=CONFIG_DIR)
    layout = get_layout("cellsearch-5x35")
    work = Path(tempfile.mkdtemp(prefix="bench-realtime-"))
    inst = open_instrument(cfg, layout, seed=args.seed)
    try:
        sample = inst.sample
        assert isinstance(sample, SimulatedSample)
        world = sample.world
        req = ScanRequest(
            instrument=cfg,
            layout=layout,
            out=work / "cart",
            n_fields=args.fields,
            seed=args.seed,
            instrument_file=str(CONFIG_DIR / "simulated.yaml"),
        )
        clock0 = world.clock_ms
        t0 = time.perf_counter()
        scan = Scan(req, instrument=inst, detector_workers=args.workers)
        marks: dict[str, float] = {}
        map_clock: list[float] = []

        def mark(r: Record) -> None:
            now = time.perf_counter() - t0
            if isinstance(r, FocusMapRecorded):
                marks["focus map recorded"] = now
                map_clock.append(world.clock_ms)
            elif isinstance(r, Stored):
                marks.setdefault("first field stored", now)
                marks["last field stored"] = now
            elif isinstance(r, Detected):
                marks["last field detected"] = now

        scan.events.subscribe(mark)
        result = scan.run()
        wall = time.perf_counter() - t0
        floor = (world.clock_ms - clock0) / 1000 * args.time_scale
    finally:
        inst.close()
        shutil.rmtree(work, ignore_errors=True)
    over = wall / floor - 1 if floor else float("nan")
    print(f"fields {result.stored} of {result.planned}, frames {result.frames}")
    print("| time scale | wall | hardware floor | overhead |")
    print("|---|---|---|---|")
    print(
        f"| {args.time_scale:g} | {wall:.1f} s | {floor:.1f} s | {100 * over:+.1f} % |"
    )
    print(f"budget: within 5 % of the floor -> {'met' if over <= 0.05 else 'MISSED'}")
    if map_clock:
        map_floor = (map_clock[0] - clock0) / 1000 * args.time_scale
        print(
            f"focus map: floor {map_floor:.1f} s, recorded at "
            f"{marks['focus map recorded']:.1f} s"
        )
        print(
            f"scan after the map: floor {floor - map_floor:.1f} s, wall "
            f"{marks['last field stored'] - marks['focus map recorded']:.1f} s"
        )
    for k, v in marks.items():
        print(f"  {k}: {v:.1f} s")
    print(f"  outputs written: {wall:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

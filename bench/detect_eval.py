"""Shared by the detection benchmarks: render simulated fields, match to truth."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from analysis.detect import detect_field  # noqa: E402
from analysis.settings import DetectionSettings  # noqa: E402
from controller.config import InstrumentConfig  # noqa: E402
from controller.layouts import get_layout  # noqa: E402
from controller.plan import plan_fields  # noqa: E402
from hardware_configs import CONFIG_DIR  # noqa: E402
from simulators import KINDS, World, WorldConfig  # noqa: E402

CHANNELS = ("DAPI", "FITC", "PE", "APC")
MATCH_UM = 8.0


def instrument() -> InstrumentConfig:
    return InstrumentConfig.from_file(CONFIG_DIR / "simulated.yaml")


def make_world(
    seed: int, world: dict[str, Any], layout: str = "cellsearch-5x35"
) -> World:
    return World(WorldConfig.from_dict({**world, "seed": seed}), get_layout(layout))


def render_field(w: World, x: float, y: float, z_offset: float = 0.0) -> np.ndarray:
    """(4, Y, X) uint16 as the scanner would take it (default exposures)."""
    cfg = instrument()
    z = w.surface_z(x, y) + z_offset
    return np.stack(
        [
            w.renderer.frame(x, y, z, CHANNELS.index(c.name), c.exposure_ms)
            for c in cfg.channels
        ]
    )


@dataclass
class Tally:
    tp: int = 0
    fn: int = 0
    fp: int = 0
    fp_kinds: Counter = field(default_factory=Counter)
    fn_kinds: Counter = field(default_factory=Counter)
    true_ctc: int = 0
    called_ctc: int = 0
    fields: int = 0
    seconds: list[float] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.tp += other.tp
        self.fn += other.fn
        self.fp += other.fp
        self.fp_kinds.update(other.fp_kinds)
        self.fn_kinds.update(other.fn_kinds)
        self.true_ctc += other.true_ctc
        self.called_ctc += other.called_ctc
        self.fields += other.fields
        self.seconds += other.seconds

    @property
    def sensitivity(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def f1(self) -> float:
        s, p = self.sensitivity, self.precision
        return 2 * s * p / (s + p) if s + p else float("nan")


def match_field(w: World, x: float, y: float, objects: list[dict[str, Any]]) -> Tally:
    """Match called CTCs to true CTCs (greedy, nearest within MATCH_UM)."""
    px = w.pixel_size_um
    o = w.objects
    near = np.flatnonzero(
        (np.abs(o.x - x) <= w.fov_w / 2 + 20) & (np.abs(o.y - y) <= w.fov_h / 2 + 20)
    )
    rows, cols = w.to_pixel(x, y, o.x[near], o.y[near])
    inside = (rows >= 0) & (rows < w.height) & (cols >= 0) & (cols < w.width)
    kinds = o.kind[near]
    ctc = kinds == KINDS.index("CTC")
    truth = [
        (r, c) for r, c, k, i in zip(rows, cols, ctc, inside, strict=True) if k and i
    ]
    called = [(d["row"], d["col"]) for d in objects if d["label"] == "CTC"]
    t = Tally(true_ctc=len(truth), called_ctc=len(called), fields=1)
    used: set[int] = set()
    for r, c in called:
        best, bd = None, MATCH_UM / px
        for j, (tr, tc) in enumerate(truth):
            d = np.hypot(r - tr, c - tc)
            if j not in used and d <= bd:
                best, bd = j, d
        if best is not None:
            used.add(best)
            t.tp += 1
        else:
            t.fp += 1
            d = np.hypot(rows - r, cols - c)
            j = int(np.argmin(d)) if d.size else -1
            kind = KINDS[kinds[j]] if j >= 0 and d[j] * px <= 12 else "background/rim"
            t.fp_kinds[kind] += 1
    t.fn = len(truth) - len(used)
    for j, (tr, tc) in enumerate(truth):
        if j not in used:
            t.fn_kinds["missed"] += 1
    return t


def evaluate(
    seed: int,
    world: dict[str, Any],
    *,
    n_fields: int | None = None,
    z_offset: float = 0.0,
    settings: DetectionSettings | None = None,
    layout: str = "cellsearch-5x35",
) -> Tally:
    import time

    w = make_world(seed, world, layout)
    fields = plan_fields(w.layout, w.fov_w, w.fov_h)
    if n_fields is not None:
        fields = fields[:n_fields]
    total = Tally()
    for f in fields:
        data = render_field(w, f.x_um, f.y_um, z_offset)
        t0 = time.perf_counter()
        det = detect_field(
            data,
            CHANNELS,
            pixel_size_um=w.pixel_size_um,
            settings=settings,
            saturation=4095,
        )
        dt = time.perf_counter() - t0
        t = match_field(w, f.x_um, f.y_um, det.objects)
        t.seconds.append(dt)
        total.add(t)
    return total

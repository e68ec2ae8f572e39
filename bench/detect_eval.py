"""Shared by the detection benchmarks: render simulated fields, match to truth."""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from analysis.detect import detect_field  # noqa: E402
from analysis.settings import DetectionSettings  # noqa: E402
from controller.acquisition.plan import plan_fields  # noqa: E402
from controller.config import InstrumentConfig  # noqa: E402
from controller.layouts import get_layout  # noqa: E402
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
    fn_kinds: Counter = field(default_factory=Counter)  # missed CTCs by subtype
    #: missed CTCs by what the detector made of them: the label and reason of
    #: the nearest object it found within the match distance
    fn_reasons: Counter = field(default_factory=Counter)
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
        self.fn_reasons.update(other.fn_reasons)
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


def evaluate(
    seed: int,
    world: dict[str, Any],
    *,
    n_fields: int | None = None,
    z_offset: float = 0.0,
    settings: DetectionSettings | None = None,
    layout: str = "cellsearch-5x35",
) -> Tally:
    """Detect on every field and match called CTCs to true CTCs per cartridge.

    Matching is done in stage coordinates over the whole scanned area (optimal
    assignment within MATCH_UM), so a cell cut by a field border and counted in
    the neighbouring field is matched correctly.
    """
    return evaluate_many(
        seed,
        world,
        {"": detect_field},
        n_fields=n_fields,
        z_offset=z_offset,
        settings=settings,
        layout=layout,
    )[""]


def evaluate_many(
    seed: int,
    world: dict[str, Any],
    detectors: Mapping[str, Callable[..., Any]],
    *,
    n_fields: int | None = None,
    z_offset: float = 0.0,
    settings: DetectionSettings | None = None,
    layout: str = "cellsearch-5x35",
) -> dict[str, Tally]:
    """`evaluate` for several detectors (name -> a `detect_field`) on the same
    rendered fields, each field rendered once."""
    import time

    w = make_world(seed, world, layout)
    fields = plan_fields(w.layout, w.fov_w, w.fov_h)
    if n_fields is not None:
        fields = fields[:n_fields]
    o = w.objects
    px = w.pixel_size_um
    totals = {name: Tally(fields=len(fields)) for name in detectors}
    calls: dict[str, list[tuple[float, float]]] = {name: [] for name in detectors}
    found: dict[str, list[tuple[float, float, str]]] = {n: [] for n in detectors}
    truth_idx: list[int] = []
    # None: each detector with its own tree's default settings (a detector
    # of another revision has its own `DetectionSettings`)
    base = settings
    for f in fields:
        data = render_field(w, f.x_um, f.y_um, z_offset)
        x0, y0 = w.frame_origin(f.x_um, f.y_um)
        for name, detect in detectors.items():
            t0 = time.perf_counter()
            det = detect(
                data, CHANNELS, pixel_size_um=px, settings=base, saturation=4095
            )
            totals[name].seconds.append(time.perf_counter() - t0)
            calls[name] += [
                (x0 + d["col"] * px, y0 - d["row"] * px)
                for d in det.objects
                if d["label"] == "CTC"
            ]
            found[name] += [
                (x0 + d["col"] * px, y0 - d["row"] * px, f"{d['label']}: {d['reason']}")
                for d in det.objects
                if d["label"] != "CTC"
            ]
        truth_idx += [
            int(i)
            for i in w.objects_in(f.x_um, f.y_um)
            if o.kind[i] == KINDS.index("CTC")
        ]
    for name in detectors:
        _match(w, calls[name], truth_idx, totals[name], found[name])
    return totals


def _match(
    w: World,
    calls: list[tuple[float, float]],
    truth_idx: list[int],
    total: Tally,
    others: Sequence[tuple[float, float, str]] = (),
) -> None:
    from scipy.optimize import linear_sum_assignment

    o = w.objects
    total.true_ctc, total.called_ctc = len(truth_idx), len(calls)
    all_ctc = np.flatnonzero(o.kind == KINDS.index("CTC"))
    pairs: list[tuple[int, int]] = []
    if calls and truth_idx:
        cx = np.array([c[0] for c in calls])
        cy = np.array([c[1] for c in calls])
        dist = np.hypot(
            np.subtract.outer(cx, o.x[truth_idx]), np.subtract.outer(cy, o.y[truth_idx])
        )
        # pairs beyond the tolerance cost more than any set of pairs within it, so
        # the assignment maximises the matches first
        ci, ti = linear_sum_assignment(np.where(dist <= MATCH_UM, dist, 1e6))
        pairs = [(a, b) for a, b in zip(ci, ti, strict=True) if dist[a, b] <= MATCH_UM]
    total.tp = len(pairs)
    total.fn = len(truth_idx) - len(pairs)
    found = {b for _, b in pairs}
    for b, i in enumerate(truth_idx):
        if b not in found:  # missed CTCs by subtype: dim/bright, single/cluster
            total.fn_kinds[
                f"{'dim' if o.dim[i] else 'bright'}"
                f"/{'cluster' if o.cluster[i] >= 0 else 'single'}"
            ] += 1
            near = [
                (math.hypot(x - o.x[i], y - o.y[i]), why)
                for x, y, why in others
                if abs(x - o.x[i]) <= MATCH_UM and abs(y - o.y[i]) <= MATCH_UM
            ]
            near = [n for n in near if n[0] <= MATCH_UM]
            total.fn_reasons[min(near)[1] if near else "nothing found"] += 1
    matched = {a for a, _ in pairs}
    for a, (x, y) in enumerate(calls):
        if a in matched:
            continue
        # a CTC just outside the scanned area (partial scans only): not an error
        if np.hypot(o.x[all_ctc] - x, o.y[all_ctc] - y).min() <= MATCH_UM and not any(
            np.hypot(o.x[i] - x, o.y[i] - y) <= MATCH_UM for i in truth_idx
        ):
            continue
        total.fp += 1
        d = np.hypot(o.x - x, o.y - y)
        j = int(np.argmin(d))
        total.fp_kinds[KINDS[o.kind[j]] if d[j] <= 12 else "background/rim"] += 1


def load_detector(rev: str) -> Callable[..., Any]:
    """`detect_field` of the `analysis` package as committed at git revision
    `rev`, for a before/after comparison in one run. The whole package is
    taken from `rev` (detect.py calls psf.py, background.py, settings.py),
    under a package name of its own so that it sits beside today's."""
    import atexit
    import importlib
    import io
    import re
    import shutil
    import subprocess
    import tarfile
    import tempfile

    tag = "".join(ch if ch.isalnum() else "_" for ch in rev)[:24]
    pkg = f"analysis_before_{tag}"
    got = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "analysis"], capture_output=True
    )
    if got.returncode:
        why = got.stderr.decode(errors="replace").strip().splitlines()
        raise SystemExit(
            f"--before {rev}: no analysis package there ({why[-1] if why else 'git'})"
        )
    archive = got.stdout
    root = Path(tempfile.mkdtemp(prefix="detect-"))
    # its modules may import more of the package later: removed at exit
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    (root / "analysis").rename(root / pkg)
    for py in (root / pkg).glob("*.py"):
        text = py.read_text()
        text = re.sub(r"\b(from|import) analysis\b", rf"\1 {pkg}", text)
        py.write_text(text)
    sys.path.insert(0, str(root))
    try:
        mod = importlib.import_module(f"{pkg}.detect")
    finally:
        sys.path.remove(str(root))
    return mod.detect_field

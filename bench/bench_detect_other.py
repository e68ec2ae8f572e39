"""Benchmark: CTC detection on fields from a second, independent generator.

These are NOT the held-out targets of ``bench/bench_detect.py`` (the project's own
simulator on held-out seeds). The fields here come from ``bench/othergen.py``, a
generator written apart from `simulators` (other PSFs, cell shapes and texture,
camera model and placement), to check that the detector holds up on data drawn
differently from the data it was built with. There are no targets to pass; read
the numbers as a comparison, ideally before/after a change (``--before``).

Each field (1024 x 1024 px, 0.64 um) stands alone and is rendered once; the
detector of this tree (and with ``--before REV`` that of revision REV, see
``detect_eval.load_detector``) runs on it. Conditions (``othergen.CONDITIONS``):

``baseline``      150 leukocytes, 6 CTCs (one cluster), look-alikes 1x
``dense``         350 leukocytes
``lookalikes``    3x look-alikes, 70 % of them touching a bright CTC
``clusters-dim``  8 CTCs, half of them in clusters, 40 % of members dim
``all``           all of the above at once

Scoring per field: CTC calls are matched to true CTCs (optimal assignment within
12.5 px, 8 um). An unmatched call within 4 px of the frame edge is not counted;
a true CTC reaching past the frame counts as found when matched and is not
counted as missed otherwise. The table gives, per condition, the true CTCs, TP,
FP, FN, sensitivity (TP / (TP + FN)), precision, dim CTCs found (of the dim ones
inside the frame), and the median ``detect_field`` time per field; then false
positives by the kind of the nearest true object (a cytokeratin body or a
nucleus; ``none(>25px)`` when nothing is within 25 px, ``CTC(duplicate/split)``
for a second call on a CTC) and misses by CTC subtype. With ``--before`` it also
lists every CTC call that only one of the two detectors made (no CTC call of the
other within 3 px), with what the other made there and the nearest true object.

Usage::

    python bench/bench_detect_other.py                     # seeds 1,2; 8 fields
    python bench/bench_detect_other.py --seeds 1 --fields 4
    python bench/bench_detect_other.py --before 3ba26dc --conditions baseline,all

Each run prints its tables and writes them, with the per-field numbers, as JSON
to ``bench/out/bench_detect_other-<timestamp>.json`` (or ``--out``).
"""

from __future__ import annotations

import os

# One detector worker is one core: keep numpy/scipy from spreading over threads.
# Must happen before numpy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import detect_eval  # noqa: E402
from bench_detect import _env, _f, _json_default, _kinds, render_table  # noqa: E402
from detect_eval import REPO, detect_field, load_detector  # noqa: E402
from othergen import (  # noqa: E402
    CHANNELS,
    CONDITIONS,
    HEIGHT,
    PIXEL_UM,
    WIDTH,
    render_with_meta,
)

DEFAULT_OUT = REPO / "bench" / "out"
#: a call this close to a true CTC (px) matches it (8 um)
MATCH_PX = 12.5
#: unmatched calls this close to the frame edge (px) are not counted
BORDER_PX = 4
#: a false positive's nearest true object counts only this close (px)
NEAR_PX = 2 * MATCH_PX
#: two detectors' calls this close (px) are the same call
SAME_PX = 3.0
#: detector features kept with each listed difference
_FEATURES = ("ck_snr", "nucleus_inside", "axis_ratio", "solidity", "cluster_size")


@dataclass
class Tally(detect_eval.Tally):
    """Scores of one detector on some fields (`detect_eval.Tally`, with the
    dim CTCs present and found)."""

    dim_tp: int = 0
    dim_true: int = 0

    def add(self, other: detect_eval.Tally) -> None:
        super().add(other)
        if isinstance(other, Tally):
            self.dim_tp += other.dim_tp
            self.dim_true += other.dim_true

    @property
    def ms_median(self) -> float:
        return float(np.median(self.seconds)) * 1e3 if self.seconds else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "fields": self.fields,
            "true_ctc": self.true_ctc,
            "called_ctc": self.called_ctc,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "sensitivity": self.sensitivity,
            "precision": self.precision,
            "dim_tp": self.dim_tp,
            "dim_true": self.dim_true,
            "fp_kinds": dict(self.fp_kinds.most_common()),
            "fn_kinds": dict(self.fn_kinds.most_common()),
            "ms_median": self.ms_median,
        }


# --------------------------------------------------------------------- scoring


def _near_border(r: float, c: float) -> bool:
    return (
        r < BORDER_PX
        or c < BORDER_PX
        or r > HEIGHT - 1 - BORDER_PX
        or c > WIDTH - 1 - BORDER_PX
    )


def match(
    calls: Sequence[tuple[float, float]], ctcs: Sequence[dict[str, Any]]
) -> list[tuple[int, int]]:
    """(call index, true CTC index) pairs: optimal assignment within MATCH_PX."""
    if not calls or not ctcs:
        return []
    cr = np.array([c[0] for c in calls])
    cc = np.array([c[1] for c in calls])
    tr = np.array([t["row"] for t in ctcs])
    tc = np.array([t["col"] for t in ctcs])
    dist = np.hypot(np.subtract.outer(cr, tr), np.subtract.outer(cc, tc))
    # pairs beyond the tolerance cost more than any set of pairs within it
    ci, ti = linear_sum_assignment(np.where(dist <= MATCH_PX, dist, 1e6))
    return [
        (int(a), int(b)) for a, b in zip(ci, ti, strict=True) if dist[a, b] <= MATCH_PX
    ]


def nearest_truth(
    r: float, c: float, objs: Sequence[dict[str, Any]]
) -> tuple[float, dict[str, Any]] | None:
    """The true object nearest (r, c) by its centre or its nucleus, and the
    distance (px)."""
    best: tuple[float, dict[str, Any]] | None = None
    for o in objs:
        d = math.hypot(r - o["row"], c - o["col"])
        if "nuc_row" in o:
            d = min(d, math.hypot(r - o["nuc_row"], c - o["nuc_col"]))
        if best is None or d < best[0]:
            best = (d, o)
    return best


def _fp_kind(r: float, c: float, objs: Sequence[dict[str, Any]]) -> str:
    near = nearest_truth(r, c, objs)
    if near is None or near[0] > NEAR_PX:
        return f"none(>{NEAR_PX:g}px)"
    d, o = near
    if o["kind"] == "CTC" and d <= MATCH_PX:
        return "CTC(duplicate/split)"
    return str(o["kind"])


def _subtype(t: dict[str, Any]) -> str:
    return f"{'dim' if t['dim'] else 'bright'}/" + (
        "cluster" if t["cluster"] >= 0 else "single"
    )


def describe(o: dict[str, Any]) -> str:
    """A true object in a few words."""
    s = str(o["kind"])
    if o["kind"] == "CTC":
        where = (
            f"cluster {o['cluster']} of {o['cluster_size']}"
            if o["cluster"] >= 0
            else "single"
        )
        s += f"({'dim' if o['dim'] else 'bright'}, {where})"
    elif o["kind"] == "NUCLEUS_BESIDE_CK":
        s += f"(dim CK={o['dim']}, beside bright={o['beside_bright']})"
    if "touching_ctc" in o:
        s += f"(touching CTC={o['touching_ctc']})"
    if o.get("ck_mean") and o["kind"] != "WBC":
        s += f" CK {o['ck_mean']:.0f}"
    return s


def score_field(
    calls: Sequence[tuple[float, float]], objs: Sequence[dict[str, Any]]
) -> tuple[Tally, set[int]]:
    """Scores of one detector's CTC calls on one field, and the matched calls."""
    ctcs = [o for o in objs if o["kind"] == "CTC"]
    pairs = match(calls, ctcs)
    t = Tally(fields=1, true_ctc=len(ctcs), called_ctc=len(calls), tp=len(pairs))
    matched_calls = {a for a, _ in pairs}
    matched_truth = {b for _, b in pairs}
    for a, (r, c) in enumerate(calls):
        if a in matched_calls or _near_border(r, c):
            continue
        t.fp += 1
        t.fp_kinds[_fp_kind(r, c, objs)] += 1
    for b, ctc in enumerate(ctcs):
        if b not in matched_truth and not ctc["border_cut"]:
            t.fn += 1
            t.fn_kinds[_subtype(ctc)] += 1
    # counted as sensitivity is: every dim CTC found, and those missed but not
    # cut by the frame's edge
    t.dim_tp = sum(1 for _, b in pairs if ctcs[b]["dim"])
    t.dim_true = t.dim_tp + sum(
        1
        for b, x in enumerate(ctcs)
        if x["dim"] and b not in matched_truth and not x["border_cut"]
    )
    return t, matched_calls


def differences(
    name: str,
    found: dict[str, list[dict[str, Any]]],
    matched: dict[str, set[int]],
    objs: Sequence[dict[str, Any]],
) -> list[dict[str, Any]]:
    """CTC calls one detector made and the other did not (none within SAME_PX)."""
    out = []
    names = list(found)
    for a, b in ((names[0], names[1]), (names[1], names[0])):
        ctc_a = [o for o in found[a] if o["label"] == "CTC"]
        ctc_b = [o for o in found[b] if o["label"] == "CTC"]
        for i, o in enumerate(ctc_a):
            r, c = o["row"], o["col"]
            if any(math.hypot(r - x["row"], c - x["col"]) <= SAME_PX for x in ctc_b):
                continue
            there = sorted(
                (math.hypot(r - x["row"], c - x["col"]), x["label"], x["reason"])
                for x in found[b]
            )
            there = [x for x in there if x[0] <= SAME_PX]
            other = f"{there[0][1]} ({there[0][2]})" if there else "nothing"
            if i in matched[a]:
                effect = "TP"
            elif _near_border(r, c):
                effect = "FP (border, not counted)"
            else:
                effect = "FP"
            near = nearest_truth(r, c, objs)
            out.append(
                {
                    "field": name,
                    "only": a,
                    "effect": effect,
                    "row": round(float(r), 1),
                    "col": round(float(c), 1),
                    "other_made": other,
                    "truth": describe(near[1]) if near else "-",
                    "truth_px": round(near[0], 1) if near else None,
                    **{k: _plain(o.get(k)) for k in _FEATURES},
                }
            )
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return round(v, 3)
    return v if v is None or isinstance(v, (int, str, bool)) else str(v)


# --------------------------------------------------------------------- tables


#: the scores each table gives a detector, after the condition's own columns
_SCORES = ("TP", "FP", "FN", "sens", "prec", "dim found", "ms med")


def _score_cells(t: Tally) -> list[str]:
    return [
        str(t.tp),
        str(t.fp),
        str(t.fn),
        _f(t.sensitivity, ".3f"),
        _f(t.precision, ".3f"),
        f"{t.dim_tp}/{t.dim_true}",
        _f(t.ms_median, ".0f"),
    ]


def summary_table(rows: dict[str, Tally]) -> str:
    out = [
        [name, str(t.fields), str(t.true_ctc), str(t.called_ctc), *_score_cells(t)]
        for name, t in rows.items()
    ]
    return render_table(("condition", "fields", "true", "called", *_SCORES), out)


def compare_table(before: dict[str, Tally], after: dict[str, Tally]) -> str:
    """`summary_table`'s scores, each as ``before -> after``."""
    out = [
        [
            name,
            str(a.fields),
            str(a.true_ctc),
            *(
                f"{x} -> {y}"
                for x, y in zip(
                    _score_cells(before[name]), _score_cells(a), strict=True
                )
            ),
        ]
        for name, a in after.items()
    ]
    return render_table(("condition", "fields", "true", *_SCORES), out)


def kinds_table(rows: dict[str, dict[str, Tally]]) -> str:
    out = [
        [name + (f" [{det}]" if det else ""), _kinds(t.fp_kinds), _kinds(t.fn_kinds)]
        for det, by in rows.items()
        for name, t in by.items()
    ]
    return render_table(
        ("condition", "FP by nearest true object", "FN by CTC subtype"), out, (1,)
    )


def differences_table(diffs: Sequence[dict[str, Any]]) -> str:
    out = [
        [
            d["field"],
            d["only"],
            d["effect"],
            f"{d['row']:.0f},{d['col']:.0f}",
            d["other_made"],
            f"{d['truth_px']}",
            d["truth"],
        ]
        for d in diffs
    ]
    return render_table(
        (
            "field",
            "only in",
            "call is",
            "row,col",
            "the other made",
            "px",
            "nearest true object",
        ),
        out,
        (1, 2, 4),
    )


# --------------------------------------------------------------------- run


def _detect(
    detect: Callable[..., Any], img: np.ndarray
) -> tuple[list[dict[str, Any]], float]:
    t0 = time.perf_counter()
    det = detect(img, list(CHANNELS), pixel_size_um=PIXEL_UM, saturation=4095)
    dt = time.perf_counter() - t0
    found = [
        {
            "row": float(o["row"]),
            "col": float(o["col"]),
            "label": o["label"],
            "reason": o["reason"],
            **{k: o.get(k) for k in _FEATURES},
        }
        for o in det.objects
    ]
    return found, dt


def run(args: argparse.Namespace) -> int:
    seeds = _seeds(args.seeds)
    conds = _conditions(args.conditions)
    print(
        "ctcscan detection on a SECOND GENERATOR's fields (bench/othergen.py), "
        "not the held-out targets of bench_detect.py"
    )
    print(
        f"  seeds {','.join(map(str, seeds))}, conditions {','.join(conds)}, "
        f"{args.fields} fields per condition per seed "
        f"({WIDTH}x{HEIGHT} px, {PIXEL_UM} um), match within {MATCH_PX:g} px",
        flush=True,
    )
    detectors: dict[str, Callable[..., Any]] = {"": detect_field}
    if args.before:
        detectors = {"before": load_detector(args.before), "after": detect_field}
        print(f"  before: the analysis package at {args.before}; after: this tree")
    tallies = {d: {c: Tally() for c in conds} for d in detectors}
    per_field: list[dict[str, Any]] = []
    diffs: list[dict[str, Any]] = []
    render_s: list[float] = []
    t_all = time.perf_counter()
    for cond in conds:
        t_cond = time.perf_counter()
        for seed in seeds:
            for i in range(args.fields):
                name = f"{cond}_s{seed}_{i:02d}"
                t0 = time.perf_counter()
                img, objs, meta = render_with_meta(cond, seed, i)
                render_s.append(time.perf_counter() - t0)
                found: dict[str, list[dict[str, Any]]] = {}
                matched: dict[str, set[int]] = {}
                rec: dict[str, Any] = {
                    "field": name,
                    "psf": meta["psf"],
                    "gain": meta["gain"],
                    "true_ctc": sum(o["kind"] == "CTC" for o in objs),
                }
                for det, detect in detectors.items():
                    found[det], dt = _detect(detect, img)
                    calls = [
                        (o["row"], o["col"]) for o in found[det] if o["label"] == "CTC"
                    ]
                    t, matched[det] = score_field(calls, objs)
                    t.seconds.append(dt)
                    tallies[det][cond].add(t)
                    rec[det or "detector"] = {
                        "tp": t.tp,
                        "fp": t.fp,
                        "fn": t.fn,
                        "fp_kinds": dict(t.fp_kinds),
                        "fn_kinds": dict(t.fn_kinds),
                        "ms": round(dt * 1e3, 1),
                    }
                per_field.append(rec)
                if args.before:
                    diffs += differences(name, found, matched, objs)
        done = ", ".join(
            f"{d + ': ' if d else ''}TP {t.tp} FP {t.fp} FN {t.fn}"
            for d, by in tallies.items()
            for t in [by[cond]]
        )
        print(f"-- {cond}: {done} ({time.perf_counter() - t_cond:.0f} s)", flush=True)
    wall = time.perf_counter() - t_all

    rows: dict[str, dict[str, Tally]] = {}
    for det, by in tallies.items():
        total = Tally()
        for t in by.values():
            total.add(t)
        rows[det] = {**by, "TOTAL": total}
    print()
    if args.before:
        print("before -> after (second generator's fields, not the targets):")
        print(compare_table(rows["before"], rows["after"]))
    else:
        print("second generator's fields (not the held-out targets):")
        print(summary_table(rows[""]))
    print()
    print(kinds_table(rows))
    if args.before:
        print()
        tally = Counter((d["only"], d["effect"]) for d in diffs)
        parts = [f"only {a}, {e}: {n}" for (a, e), n in sorted(tally.items())]
        print(
            f"CTC calls only one detector made: {len(diffs)}"
            + (f" ({', '.join(parts)})" if parts else "")
        )
        if diffs:
            print(differences_table(diffs))
    print(f"\nwall {wall:.0f} s; render {np.median(render_s):.2f} s per field (median)")

    report = {
        "bench": "bench_detect_other",
        "what": "detector on a second generator's fields (bench/othergen.py), "
        "not the held-out targets",
        "command": [sys.executable, *sys.argv],
        "seeds": seeds,
        "conditions": {c: CONDITIONS[c].what for c in conds},
        "fields_per_condition_per_seed": args.fields,
        "before": args.before,
        "match_px": MATCH_PX,
        "border_px": BORDER_PX,
        "rows": {
            det or "detector": {n: t.as_dict() for n, t in by.items()}
            for det, by in rows.items()
        },
        "differences": diffs,
        "fields": per_field,
        "wall_s": wall,
        "render_s_median": float(np.median(render_s)),
        **_env(),
    }
    out = Path(args.out) if args.out else _default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=_json_default))
    print(f"\nJSON: {out}")
    return 0


# --------------------------------------------------------------------- CLI


def _default_out() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return DEFAULT_OUT / f"bench_detect_other-{stamp}.json"


def _seeds(text: str) -> list[int]:
    try:
        seeds = list(dict.fromkeys(int(s) for s in text.split(",") if s.strip()))
    except ValueError:
        raise SystemExit(
            f"--seeds: whole numbers, comma-separated; got {text!r}"
        ) from None
    if not seeds:
        raise SystemExit("no seeds given")
    return seeds


def _conditions(text: str) -> list[str]:
    names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown or not names:
        raise SystemExit(f"unknown condition {unknown}; known: {', '.join(CONDITIONS)}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="CTC detection on fields from a second, independent generator "
        "(bench/othergen.py; not the held-out targets of bench_detect.py)."
    )
    p.add_argument("--seeds", default="1,2", help="comma-separated (default 1,2)")
    p.add_argument(
        "--fields",
        type=int,
        default=8,
        help="fields per condition per seed (default 8)",
    )
    p.add_argument(
        "--conditions",
        default=",".join(CONDITIONS),
        help=f"comma-separated, from: {', '.join(CONDITIONS)} (default: all)",
    )
    p.add_argument(
        "--before",
        metavar="REV",
        default=None,
        help="also run the analysis package as of git revision REV on the same "
        "fields, side by side, and list the CTC calls only one of them made",
    )
    p.add_argument(
        "--out",
        default=None,
        help="the JSON report (default bench/out/bench_detect_other-<timestamp>.json)",
    )
    args = p.parse_args(argv)
    if args.fields < 1:
        p.error("--fields must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

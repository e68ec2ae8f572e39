"""Benchmark: one field's on-line detection against a fixed reference, and its memory.

Renders N fields of the simulated ``cellsearch-5x35`` cartridge per condition
(``default``: the default world; ``dense``: 400 leukocytes per field), stores
each as the scanner does (`FieldStore`, OME-TIFF), then runs in a fresh process
exactly what a detection worker runs: the worker's start-up
(`controller.runs.detector._worker_start`: one BLAS/OpenMP thread) and
`analysis.pipeline.analyze_field_file` on each stored file (read, detection, QC,
the candidates' pictures). In the same loop, on the same field, it times the
reference: ``scipy.ndimage.gaussian_filter(sigma=2)`` of each of the four
channels as float32 (the cast included). Prints, per condition, the median over
fields of each field's median milliseconds, their ratio (target <= 0.5), the
same for the CPU time of this thread (``time.thread_time``: waiting for a
core on a loaded machine left out) and for each field's fastest repeat, and
the worker process's peak RSS (``VmHWM``; target <= 200 MB) after its imports
and after a first pass over every field (before any reference is computed, so
the figure is the worker's alone).

Usage::

    python bench/bench_detect_worker.py                  # 8 fields x 2 conditions
    python bench/bench_detect_worker.py --fields 12 --repeat 5
    python bench/bench_detect_worker.py --before HEAD~3  # that revision too, in turns
    python bench/bench_detect_worker.py --profile 25     # cProfile of the worker pass

``--before REV`` extracts the repository at REV (``git archive``) and runs its
worker on the same files, alternating with the current tree ``--rounds`` times,
and checks that both give the same detection records (every object and feature;
the timing and file stamp left out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONDITIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "dense": {"population": {"wbc_per_field": 400}},
}


# ------------------------------------------------------------------ fields


def write_fields(out: Path, n: int, seed: int, conditions: Sequence[str]) -> None:
    """`n` fields per condition, spread over the plan, stored as a scan does."""
    sys.path.insert(0, str(REPO / "bench"))
    import numpy as np
    from detect_eval import instrument, make_world, render_field

    from controller.acquisition.plan import plan_fields
    from controller.runstore.fieldstore import AssembledField, FieldStore
    from controller.runstore.folder import RunFolder
    from controller.runstore.omexml import OmeXml

    class _NoSink:
        def emit(self, record: object) -> None:
            pass

    cfg = instrument()
    for cond in conditions:
        w = make_world(seed, CONDITIONS[cond])
        fields = plan_fields(w.layout, w.fov_w, w.fov_h)
        picks = np.linspace(0, len(fields) - 1, n).round().astype(int)
        folder = RunFolder(out / cond)
        folder.prepare()
        store = FieldStore(folder, OmeXml.for_instrument(cfg, "BENCH-0001"), _NoSink())
        for i in picks:
            f = fields[int(i)]
            data = render_field(w, f.x_um, f.y_um)
            stage = {"x_um": f.x_um, "y_um": f.y_um, "z_um": 0.0}
            store.store(AssembledField(f.name, data, cfg.channel_names, stage))


# ------------------------------------------------------------------ worker


def _rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process, MB: ``VmRSS`` and ``VmHWM``.

    Not ``ru_maxrss``: Linux carries it over an exec, so a process started by
    a large one reports the parent's peak as its own.
    """
    vals = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                vals[key] = int(rest.split()[0]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


def worker(args: argparse.Namespace) -> int:
    """The worker's part, in a fresh process: JSON on stdout."""
    t0 = time.perf_counter()
    from analysis.pipeline import FieldJob, analyze_field_file
    from controller.runs.detector import _worker_start
    from controller.runstore.results import encode_result

    _worker_start(os.getppid())
    import_s = time.perf_counter() - t0
    rss_imports = _rss_mb()
    root = Path(args.worker)
    out_dir = Path(tempfile.mkdtemp(prefix="detworker-"))
    jobs = {
        cond.name: [
            FieldJob(
                path=str(p),
                name=p.name.split(".")[0],
                out_dir=str(out_dir / cond.name),
                pixel_size_um=None,
                saturation=4095.0,
            )
            for p in sorted((cond / "fields").glob("*.ome.tif"))
        ]
        for cond in sorted(root.iterdir())
        if cond.is_dir()
    }
    # pass 1: the worker's own work only (peak RSS, records, profile)
    records: dict[str, Any] = {}
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
    first_s = []
    for _, js in jobs.items():
        for job in js:
            t = time.perf_counter()
            if prof is not None:
                prof.enable()
            rec = analyze_field_file(job)
            if prof is not None:
                prof.disable()
            first_s.append(time.perf_counter() - t)
            # as the detection file holds it (strict JSON: NaN as null)
            records[f"{Path(job.path).parent.parent.name}/{job.name}"] = json.loads(
                encode_result(
                    {
                        k: v
                        for k, v in rec.items()
                        if k not in ("seconds", "source", "file")
                    }
                )
            )
    rss_work = _rss_mb()
    if prof is not None:
        import io
        import pstats

        for key in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(key).print_stats(args.profile)
            sys.stderr.write(s.getvalue())
    # pass 2: the worker's work and the reference, in turns, on the same field
    import numpy as np
    from scipy import ndimage

    from analysis.fieldio import read_field_file

    def reference(data: np.ndarray) -> None:
        for plane in data:
            ndimage.gaussian_filter(plane.astype(np.float32), sigma=2)

    timing: dict[str, dict[str, list[float]]] = {}
    for cond, js in jobs.items():
        det_ms, ref_ms, det_min, ref_min, det_cpu, ref_cpu = [], [], [], [], [], []
        for job in js:
            data = read_field_file(job.path).data
            d, r, dc, rc = [], [], [], []
            for k in range(args.repeat):
                for which in ("det", "ref") if k % 2 == 0 else ("ref", "det"):
                    t, tc = time.perf_counter(), time.thread_time()
                    if which == "det":
                        analyze_field_file(job)
                        d.append(time.perf_counter() - t)
                        dc.append(time.thread_time() - tc)
                    else:
                        reference(data)
                        r.append(time.perf_counter() - t)
                        rc.append(time.thread_time() - tc)
            del data
            det_ms.append(1e3 * statistics.median(d))
            ref_ms.append(1e3 * statistics.median(r))
            det_min.append(1e3 * min(d))
            ref_min.append(1e3 * min(r))
            det_cpu.append(1e3 * statistics.median(dc))
            ref_cpu.append(1e3 * statistics.median(rc))
        timing[cond] = {
            "det_ms": det_ms,
            "ref_ms": ref_ms,
            "det_min_ms": det_min,
            "ref_min_ms": ref_min,
            "det_cpu_ms": det_cpu,
            "ref_cpu_ms": ref_cpu,
        }
    json.dump(
        {
            "import_s": import_s,
            "rss_after_imports_mb": rss_imports,
            "rss_after_work_mb": rss_work,
            "first_pass_ms": [1e3 * s for s in first_s],
            "timing": timing,
            "records": records,
        },
        sys.stdout,
    )
    return 0


# ------------------------------------------------------------------ driver


def run_worker(tree: Path, fields: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(REPO / "bench" / "bench_detect_worker.py"),
        "--worker",
        str(fields),
        "--repeat",
        str(args.repeat),
    ]
    if args.profile:
        cmd += ["--profile", str(args.profile)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    res = subprocess.run(
        cmd, cwd=tree, env=env, capture_output=True, text=True, check=False
    )
    if res.returncode:
        raise SystemExit(f"worker failed ({tree}):\n{res.stderr}")
    if args.profile:
        print(f"--- profile of the worker pass, {tree}", file=sys.stderr)
        sys.stderr.write(res.stderr)
    return json.loads(res.stdout)


def summary(name: str, r: dict[str, Any]) -> list[str]:
    """Table rows: per condition and over all fields, the median over fields of
    each field's median wall ms (worker, reference, ratio), of its median CPU
    ms (the ratio), and of its fastest repeat (the ratio)."""
    lines = []
    pooled: dict[str, list[float]] = {}

    def row(label: str, t: dict[str, list[float]]) -> str:
        m = {k: statistics.median(v) for k, v in t.items()}
        return (
            f"| {name} | {label} | {len(t['det_ms'])} | {m['det_ms']:.1f} | "
            f"{m['ref_ms']:.1f} | {m['det_ms'] / m['ref_ms']:.2f} | "
            f"{m['det_cpu_ms']:.1f} / {m['ref_cpu_ms']:.1f} = "
            f"{m['det_cpu_ms'] / m['ref_cpu_ms']:.2f} | "
            f"{m['det_min_ms'] / m['ref_min_ms']:.2f} |"
        )

    for cond, t in r["timing"].items():
        lines.append(row(cond, t))
        for k, v in t.items():
            pooled.setdefault(k, []).extend(v)
    lines.append(row("all", pooled))
    cur_i, _ = r["rss_after_imports_mb"]
    _, peak = r["rss_after_work_mb"]
    lines.append(
        f"| {name} | RSS | | after imports {cur_i:.0f} MB | worker peak "
        f"{peak:.0f} MB | | | |"
    )
    return lines


def driver(args: argparse.Namespace) -> int:
    conditions = args.conditions.split(",")
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        raise SystemExit(f"unknown conditions {sorted(unknown)}; known: {CONDITIONS}")
    with tempfile.TemporaryDirectory(prefix="detworker-") as tmp:
        fields = Path(tmp) / "fields"
        t = time.perf_counter()
        write_fields(fields, args.fields, args.seed, conditions)
        print(
            f"{args.fields} fields x {len(conditions)} conditions (seed {args.seed}) "
            f"rendered and stored in {time.perf_counter() - t:.1f} s; "
            f"{args.repeat} timings per field, median kept; load average "
            f"{os.getloadavg()[0]:.2f}",
            flush=True,
        )
        trees = [("current", REPO)]
        if args.before:
            before = Path(tmp) / "before"
            before.mkdir()
            got = subprocess.run(
                ["git", "-C", str(REPO), "archive", args.before], capture_output=True
            )
            if got.returncode:
                why = got.stderr.decode(errors="replace").strip().splitlines()
                raise SystemExit(
                    f"--before {args.before}: {why[-1] if why else 'no such revision'}"
                )
            tar = got.stdout
            subprocess.run(["tar", "-x", "-C", str(before)], input=tar, check=True)
            trees.insert(0, (args.before, before))
        results: dict[str, list[dict[str, Any]]] = {n: [] for n, _ in trees}
        for _ in range(args.rounds):
            for name, tree in trees:
                results[name].append(run_worker(tree, fields, args))
        head = (
            "| tree | fields | n | worker ms | reference ms | ratio "
            "| CPU ms: worker / reference = ratio | ratio, fastest repeats |"
        )
        print()
        print(head)
        print("|" + "---|" * 8)
        for name, runs in results.items():
            for r in runs:
                print("\n".join(summary(name, r)))
        print(f"\nload average after: {os.getloadavg()[0]:.2f}")
        if args.before:
            a = results[args.before][0]["records"]
            b = results["current"][0]["records"]
            diff = [k for k in a if a[k] != b.get(k)]
            print(
                f"records: {len(a)} fields, "
                + ("identical" if not diff else f"DIFFERENT in {diff}")
            )
            if diff:
                _show_diff(a[diff[0]], b[diff[0]])
                return 1
    return 0


def _show_diff(a: dict[str, Any], b: dict[str, Any]) -> None:
    for k in a:
        if a[k] != b.get(k) and k != "objects":
            print(f"  {k}: {a[k]} != {b.get(k)}")
    oa, ob = a["objects"], b["objects"]
    if len(oa) != len(ob):
        print(f"  objects: {len(oa)} != {len(ob)}")
    for x, y in zip(oa, ob, strict=False):
        if x != y:
            print("  first differing object:")
            for k in x:
                if x[k] != y.get(k):
                    print(f"    {k}: {x[k]} != {y.get(k)}")
            break


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fields", type=int, default=8, help="fields per condition")
    p.add_argument("--seed", type=int, default=2001, help="world seed")
    p.add_argument(
        "--conditions",
        default=",".join(CONDITIONS),
        help=f"comma-separated, from {', '.join(CONDITIONS)}",
    )
    p.add_argument("--repeat", type=int, default=3, help="timings per field")
    p.add_argument("--rounds", type=int, default=1, help="worker processes per tree")
    p.add_argument("--before", metavar="REV", help="also this git revision, in turns")
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="cProfile: top N rows"
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    raise SystemExit(main())

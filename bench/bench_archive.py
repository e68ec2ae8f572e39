"""Benchmark: re-analysis of stored cartridges, local process pool against Dask.

Scans `--cartridges` simulated cartridges of `--fields` fields each (once; or
reuses the run folders under `--inputs`), then analyses all of them with
``python -m controller analyze INPUTS... --out OUT`` in a fresh process per mode,
side by side in one run:

``local-2``   the local process pool, 2 workers (the default on 2 cores)
``dask-1``    ``--scheduler local --workers 1``: a LocalCluster of 1 process
``dask-2``    ``--scheduler local --workers 2``: a LocalCluster of 2 processes

Wall time includes starting the pool or the cluster (a real cost of the
command). It prints wall time, the CPU time of the command and its processes
(less sensitive than wall time to other work on a shared machine), fields
per second, the speed-up of 2 Dask workers
over 1, and Dask's overhead against the local pool (``dask-2 / local-2 - 1``;
target <= 10 %), and checks that every mode gives the same events.csv. It
also times Dask's fixed cost alone (import, start and close a LocalCluster of
2 workers that import the analysis, nothing analysed, less a bare process) and
the overhead beyond it.

Usage::

    python bench/bench_archive.py                        # 4 cartridges x 24 fields
    python bench/bench_archive.py --cartridges 8 --fields 40
    python bench/bench_archive.py --inputs /tmp/runs     # run folders already there
    python bench/bench_archive.py --before /tmp/old-tree # + dask-2 of another tree

``--before DIR`` adds the modes ``local-2-before`` and ``dask-2-before``:
``local-2`` and ``dask-2`` with ``DIR`` (a copy of an older tree, e.g. ``git
archive COMMIT | tar -x -C DIR``) first on ``PYTHONPATH``, in turns with the
others.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "local-2": ["--workers", "2"],
    "dask-1": ["--scheduler", "local", "--workers", "1"],
    "dask-2": ["--scheduler", "local", "--workers", "2"],
}


#: a 2-worker LocalCluster started (the workers importing the analysis, as
#: their first field would) and closed, nothing analysed
_IDLE_CLUSTER = """
from controller.runs.runners import dask_client
with dask_client("local", 2) as client:
    client.run(lambda: __import__("analysis.pipeline"))
"""
#: the same process without the cluster
_IDLE_PROCESS = "import controller.runs.runners"

#: Dask's own cost per task, apart from ctcscan's: N tasks that only compute
#: (``sum(range(size))``, a C loop holding the GIL, sized to a field's mean
#: analysis time) on a local process pool of 2 and on the 2-worker
#: LocalCluster ``analyze --scheduler local`` starts; start and close included
_FLOOR = r"""
import json, sys, time
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
if __name__ == "__main__":
    n_tasks, per_task = int(sys.argv[1]), float(sys.argv[2])
    t = time.perf_counter(); sum(range(4_000_000))
    size = int(4_000_000 / (time.perf_counter() - t) * per_task)
    out = {}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(sum, [range(size)] * n_tasks))
    out["pool"] = time.perf_counter() - t0
    from controller.runs.runners import dask_client
    t0 = time.perf_counter()
    with dask_client("local", 2) as client:
        client.gather(client.map(sum, [range(size)] * n_tasks, pure=False))
    out["dask"] = time.perf_counter() - t0
    print(json.dumps(out))
"""


def _scan(out: Path, seed: int, fields: int) -> None:
    subprocess.run(
        [sys.executable, "-m", "controller", "scan", "--out", str(out),
         "--seed", str(seed), "--fields", str(fields)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _mean_seconds(out: Path) -> float:
    """Mean analysis time of a field (the ledgers' ``detected`` lines)."""
    secs = [
        rec["seconds"]
        for ledger in out.glob("*/ledger.jsonl")
        for rec in map(json.loads, ledger.read_text().splitlines())
        if rec.get("event") == "detected"
    ]
    return sum(secs) / len(secs)


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cartridges", type=int, default=4)
    p.add_argument("--fields", type=int, default=24)
    p.add_argument("--inputs", type=Path, help="a folder of run folders to reuse")
    p.add_argument("--before", type=Path, help="a tree to run dask-2 of as well")
    p.add_argument(
        "--repeat", type=int, default=1, help="runs per mode, in turns (best kept)"
    )
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ctcscan-archive-") as tmp:
        root = args.inputs or Path(tmp) / "runs"
        if args.inputs is None:
            t0 = time.perf_counter()
            for k in range(args.cartridges):
                _scan(root / f"cart-{k:02d}", 1000 + k, args.fields)
            print(
                f"scanned {args.cartridges} cartridges x {args.fields} fields in "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
        inputs = sorted(
            p.absolute() for p in root.iterdir() if (p / "scan.json").is_file()
        )
        n_fields = sum(len(list((p / "fields").glob("*.ome.tif"))) for p in inputs)
        modes = {m: (opts, None) for m, opts in MODES.items()}
        if args.before is not None:
            for mode in ("local-2", "dask-2"):
                modes[f"{mode}-before"] = (MODES[mode], args.before.resolve())
        rows = dict.fromkeys(modes, float("inf"))
        cpu = dict.fromkeys(modes, float("inf"))
        faults = dict.fromkeys(modes, 0)
        events: dict[str, dict[str, bytes]] = {}
        # the modes in turns, so a drift of the machine's load hits them alike
        for rep in range(args.repeat):
            for mode, (opts, tree) in modes.items():
                out = Path(tmp) / f"out-{mode}-{rep}"
                env, cwd = dict(os.environ), None
                if tree is not None:  # `python -m` puts the working folder first
                    cwd = tree
                    env["PYTHONPATH"] = os.pathsep.join(
                        [str(tree), *filter(None, [env.get("PYTHONPATH")])]
                    )
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "controller", "analyze",
                     *map(str, inputs), "--out", str(out), *opts],
                    check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    env=env, cwd=cwd,
                )  # fmt: skip
                took = time.perf_counter() - t0
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                used = _cpu(after) - _cpu(before)
                faults[mode] = after.ru_minflt - before.ru_minflt
                rows[mode] = min(rows[mode], took)
                cpu[mode] = min(cpu[mode], used)
                events[mode] = {
                    p.name: (p / "events.csv").read_bytes() for p in out.iterdir()
                }
                print(
                    f"{mode:<13} run {rep + 1}: {took:7.1f} s  CPU {used:6.1f} s  "
                    f"{faults[mode] / n_fields:6.0f} page faults a field  "
                    f"{n_fields / took:6.2f} fields/s",
                    flush=True,
                )
        for mode, best in rows.items():
            print(
                f"{mode:<13} best {best:7.1f} s  CPU {cpu[mode]:6.1f} s  "
                f"{n_fields / best:6.2f} fields/s"
            )
        # the fixed part of Dask's cost: importing it, starting a LocalCluster
        # of 2 workers (each importing the analysis) and closing it, no fields
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", _IDLE_CLUSTER], check=True)
        fixed = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", _IDLE_PROCESS], check=True)
        fixed -= time.perf_counter() - t0
        same = all(events[m] == events["local-2"] for m in modes)
        speedup = rows["dask-1"] / rows["dask-2"]
        overhead = rows["dask-2"] / rows["local-2"] - 1
        print(
            f"{len(inputs)} cartridges, {n_fields} fields: 2 Dask workers "
            f"{speedup:.2f}x faster than 1; Dask overhead against the local pool "
            f"{overhead:+.1%} (target <= +10%), in CPU time "
            f"{cpu['dask-2'] / cpu['local-2'] - 1:+.1%}; identical events.csv: {same}"
        )
        if args.before is not None:
            print(
                f"dask-2 against dask-2 of {args.before}: wall "
                f"{rows['dask-2'] / rows['dask-2-before'] - 1:+.1%}, CPU "
                f"{cpu['dask-2'] / cpu['dask-2-before'] - 1:+.1%}; local-2 against "
                f"local-2 of it: wall "
                f"{rows['local-2'] / rows['local-2-before'] - 1:+.1%}"
                f", CPU {cpu['local-2'] / cpu['local-2-before'] - 1:+.1%}; Dask "
                f"overhead of the tree before against its own local pool: "
                f"{rows['dask-2-before'] / rows['local-2-before'] - 1:+.1%}"
            )
        print(
            f"Dask's fixed cost (import, start and close a 2-worker LocalCluster, "
            f"beyond a bare process): {fixed:.1f} s; overhead beyond it "
            f"{(rows['dask-2'] - fixed) / rows['local-2'] - 1:+.1%}"
        )
        # the same number of tasks as fields, each as long as a field's mean
        # analysis, with nothing of ctcscan in them: Dask's own share
        per_field = _mean_seconds(Path(tmp) / "out-local-2-0")
        floor = json.loads(
            subprocess.run(
                [sys.executable, "-c", _FLOOR, str(n_fields), str(per_field)],
                check=True, capture_output=True, text=True,
            ).stdout
        )  # fmt: skip
        print(
            f"Dask alone: {n_fields} compute-only tasks of {per_field * 1e3:.0f} ms "
            f"(a field's mean analysis): process pool {floor['pool']:.1f} s, "
            f"LocalCluster {floor['dask']:.1f} s: "
            f"{floor['dask'] / floor['pool'] - 1:+.1%}"
        )
        print(
            json.dumps(
                {
                    "cartridges": len(inputs),
                    "fields": n_fields,
                    "seconds": rows,
                    "cpu_seconds": {m: round(c, 2) for m, c in cpu.items()},
                    "page_faults_per_field": {
                        m: round(f / n_fields) for m, f in faults.items()
                    },
                    "speedup_2_over_1": round(speedup, 3),
                    "dask_overhead": round(overhead, 4),
                    "identical": same,
                    "dask_fixed_s": round(fixed, 2),
                    "compute_only_tasks_s": floor,
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

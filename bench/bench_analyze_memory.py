"""Benchmark: peak memory of ``ctcscan analyze`` by field size, up to the limit.

``analysis.fieldio.MAX_FIELD_BYTES`` refuses any field whose decoded pixels pass
256 MiB, from its metadata, before a pixel is read. This bench writes folders of
synthetic 4-channel uint16 fields (noise on a background, a few hundred bright
nuclei and cytokeratin blobs) at three sizes: 2048 x 2048 (32 MiB; a ctcscan
field is 1384 x 1036, 11 MiB), 4096 x 4096 (128 MiB) and 4096 x 8192 (256 MiB,
the limit); runs ``python -m controller analyze DIR --out OUT --workers N`` on
each in a fresh process; and reports the peak RSS of the largest single process
of that run (``RUSAGE_CHILDREN`` of a wrapper that only waits for it: the
analysing parent or one of its workers, whichever was larger) and its wall time.

Usage::

    python bench/bench_analyze_memory.py              # sizes 2048, 4096, 8192
    python bench/bench_analyze_memory.py --workers 2 --fields 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

SIZES = {"2048x2048": (2048, 2048), "4096x4096": (4096, 4096),
         "4096x8192 (limit)": (4096, 8192)}  # fmt: skip
NAMES = ["DAPI", "FITC", "PE", "APC"]

_WRAPPER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
    "print(rc, peak, time.perf_counter() - t)\n"
)


def _field(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    data = rng.normal(150, 5, size=(4, h, w)).astype(np.uint16)
    yy, xx = np.mgrid[-8:9, -8:9]
    disk = (yy**2 + xx**2 <= 36).astype(np.uint16)
    for _ in range(h * w // 40000):
        r, c = rng.integers(20, h - 20), rng.integers(20, w - 20)
        data[0, r - 8 : r + 9, c - 8 : c + 9] += 800 * disk
        if rng.random() < 0.3:
            data[2, r - 8 : r + 9, c - 8 : c + 9] += 600 * disk
        else:
            data[3, r - 8 : r + 9, c - 8 : c + 9] += 400 * disk
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--fields", type=int, default=2, help="fields per folder")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ctcscan-mem-") as tmp:
        for label, (h, w) in SIZES.items():
            src = Path(tmp) / f"in-{h}x{w}"
            src.mkdir()
            for k in range(args.fields):
                tifffile.imwrite(
                    src / f"f_{k:03d}.ome.tif",
                    _field(h, w, rng),
                    ome=True,
                    metadata={
                        "axes": "CYX",
                        "Channel": {"Name": NAMES},
                        "PhysicalSizeX": 0.64,
                        "PhysicalSizeY": 0.64,
                    },
                )
            cmd = [
                sys.executable, "-c", _WRAPPER, sys.executable, "-m", "controller",
                "analyze", str(src), "--out", str(Path(tmp) / f"out-{h}x{w}"),
                "--workers", str(args.workers),
            ]  # fmt: skip
            t0 = time.perf_counter()
            rc, peak, wall = subprocess.run(
                cmd, capture_output=True, text=True, check=True
            ).stdout.split()
            decoded = 4 * h * w * 2 / 2**20
            rows.append(
                {
                    "field": label,
                    "decoded_mib": decoded,
                    "exit": int(rc),
                    "peak_rss_mb": round(float(peak), 1),
                    "ratio": round(float(peak) / decoded, 2),
                    "seconds": round(float(wall), 1),
                }
            )
            print(
                f"{label:<20} {decoded:6.0f} MiB decoded  exit {rc}  peak RSS "
                f"{float(peak):7.0f} MB ({float(peak) / decoded:4.1f} x decoded)  "
                f"{float(wall):6.1f} s ({time.perf_counter() - t0:.0f} s with "
                "start-up)",
                flush=True,
            )
    print(json.dumps({"workers": args.workers, "fields": args.fields, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Soak benchmark: a queue of full simulated cartridges, resources over time.

Runs `controller.runs.queue.CartridgeQueue` in this process on the simulated
instrument (emulated loader on a pty, ``cellsearch-5x35`` cartridges, focus map
and on-line detection as shipped; the queue opens the instrument once for all
its cartridges) and samples every second:

- RSS of this process and of its children (the detector worker),
- threads of this process,
- open file descriptors of this process,

then prints per cartridge its duration and the resources when it started (its
``Loaded`` record on the queue's event stream), and for the whole run the first,
last and largest sample. Flat means: no growth from one cartridge to the next
beyond noise.

Usage::

    python bench/bench_soak.py                  # 8 cartridges, all fields
    python bench/bench_soak.py --cartridges 3 --fields 20

Writes ``bench/out/bench_soak-<timestamp>.json`` (samples included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.config import InstrumentConfig  # noqa: E402
from controller.layouts import get_layout  # noqa: E402
from controller.records import Loaded, Record  # noqa: E402
from controller.runs.queue import CartridgeQueue, QueueRequest  # noqa: E402
from hardware_configs import CONFIG_DIR  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE / 1e6
    except OSError:
        return 0.0


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def hwm_mb(pid: int | str) -> float:
    """Peak RSS (VmHWM) of a process, MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError):
        pass
    return 0.0


def reset_hwm() -> bool:
    """Start this process's VmHWM again from its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_faults() -> tuple[float, int]:
    """CPU seconds (user + system) and minor page faults of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def sample(t0: float) -> dict[str, float]:
    me = os.getpid()
    kids = children(me)
    return {
        "t": round(time.monotonic() - t0, 1),
        "rss_mb": round(rss_mb(me), 1),
        "hwm_mb": round(hwm_mb(me), 1),
        "children_rss_mb": round(sum(rss_mb(k) for k in kids), 1),
        "children_hwm_mb": round(max((hwm_mb(k) for k in kids), default=0.0), 1),
        "children": len(kids),
        "threads": threading.active_count(),
        "os_threads": len(os.listdir("/proc/self/task")),
        "fds": len(os.listdir("/proc/self/fd")),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cartridges", type=int, default=8)
    p.add_argument("--fields", type=int, default=None, help="fields per cartridge")
    p.add_argument("--out-dir", help="queue folder (default: a temporary one)")
    args = p.parse_args()
    inst = InstrumentConfig.from_file(CONFIG_DIR / "simulated.yaml")
    data = inst.model_dump(mode="json")
    data["loader"]["slots"] = {
        i: f"SOAK-{i:04d}" for i in range(1, args.cartridges + 1)
    }
    inst = InstrumentConfig.from_dict(data)
    tmp = tempfile.TemporaryDirectory(prefix="ctcscan-soak-")
    out = Path(args.out_dir) if args.out_dir else Path(tmp.name) / "queue"
    samples: list[dict[str, float]] = []
    marks: list[dict[str, object]] = []
    t0 = time.monotonic()
    stop = threading.Event()

    # per cartridge: the peak RSS of this process (VmHWM, reset at each
    # cartridge's start) and of its children (a new detector worker per
    # cartridge; sampled every second, a high-water mark, so nothing is missed
    # but its last second)
    worker_peak = [0.0]
    peaks: list[tuple[float, float]] = []
    # per cartridge: CPU seconds and minor page faults of this process (what
    # the heap's settings cost, in counts a loaded machine does not blur)
    work: list[tuple[float, int]] = []
    at_start = [cpu_faults()]
    resets = reset_hwm()

    def watch() -> None:
        while not stop.wait(1.0):
            s = sample(t0)
            worker_peak[0] = max(worker_peak[0], s["children_hwm_mb"])
            samples.append(s)

    def close_peak() -> None:
        s = sample(t0)
        peaks.append((s["hwm_mb"], max(worker_peak[0], s["children_hwm_mb"])))
        worker_peak[0] = 0.0
        cpu, faults = cpu_faults()
        work.append((cpu - at_start[0][0], faults - at_start[0][1]))
        at_start[0] = (cpu, faults)
        reset_hwm()

    def on_record(record: Record) -> None:
        # a cartridge is on the stage and about to be scanned
        if isinstance(record, Loaded):
            if marks:
                close_peak()
            else:
                at_start[0] = cpu_faults()
                reset_hwm()
            marks.append({"start": record.barcode, **sample(t0)})

    watcher = threading.Thread(target=watch, daemon=True)
    samples.append(sample(t0))
    watcher.start()
    q = CartridgeQueue(
        QueueRequest(
            instrument=inst,
            layout=get_layout("cellsearch-5x35"),
            out=out,
            instrument_file=str(CONFIG_DIR / "simulated.yaml"),
            n_fields=args.fields,
        ),
    )
    q.events.subscribe(on_record)
    outcomes = q.run()
    close_peak()
    marks.append({"start": "end", **sample(t0)})
    stop.set()
    watcher.join()
    print(f"{len(outcomes)} cartridges in {time.monotonic() - t0:.0f} s")
    print(
        "cartridge  status    CTC  duration_s  | at its start: "
        "RSS MB  worker MB  threads  fds  | peak: scan MB  worker MB  sum MB  "
        "| scan CPU s  faults k"
    )
    for k, (o, m) in enumerate(zip(outcomes, marks, strict=False)):
        scan_peak, worker = peaks[k] if k < len(peaks) else (0.0, 0.0)
        cpu, faults = work[k] if k < len(work) else (0.0, 0)
        print(
            f"{o.barcode:10} {o.status:9} {o.ctc_count!s:>4} {o.duration_s:10.1f}  | "
            f"{m['rss_mb']:16.0f} {m['children_rss_mb']:10.0f} {m['os_threads']:8} "
            f"{m['fds']:4}  | {scan_peak:13.0f} {worker:10.0f} "
            f"{scan_peak + worker:7.0f}  | {cpu:10.1f} {faults / 1000:9.1f}"
        )
    if not resets:
        print("(this kernel cannot reset VmHWM: the scan peaks are cumulative)")
    end = marks[-1]
    print(
        f"after the queue: RSS {end['rss_mb']:.0f} MB, worker "
        f"{end['children_rss_mb']:.0f} MB, threads {end['os_threads']}, "
        f"fds {end['fds']}"
    )
    for key in ("rss_mb", "children_rss_mb", "os_threads", "fds"):
        vals = [s[key] for s in samples]
        print(
            f"{key:16} first {vals[0]:8.1f}  last {vals[-1]:8.1f}  max {max(vals):8.1f}"
        )
    bench_out = ROOT / "bench" / "out"
    bench_out.mkdir(parents=True, exist_ok=True)
    path = bench_out / f"bench_soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {
                "cartridges": [o.__dict__ for o in outcomes],
                "marks": marks,
                "peaks_mb": [{"scan": a, "worker": b} for a, b in peaks],
                "scan_cpu_s_faults": work,
                "samples": samples,
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
            },
            indent=1,
        )
    )
    print("wrote", path)
    tmp.cleanup()


if __name__ == "__main__":
    main()

"""Does watching a scan slow it? A full simulated cartridge, with and without
the station serving its live page to a browser, side by side in one run.

    python bench/bench_station.py [--fields N] [--repeats 2] [--seed 1]

Each repeat runs ``ctcscan scan`` (zero exposure: the shipped simulated
instrument never waits) twice, in alternating order: alone, and with
``ctcscan serve`` running over the run's parent folder and headless Chromium
(Selenium) showing the run's live page (server-sent events, the last stored
field as a picture at most every two seconds, the candidates as they come). Without
Chromium, a Python client reads the event stream and fetches the last-field
picture on every stored field instead (a heavier viewer than the page).

Reports each scan's wall time (from the process start to its exit) and the
scan's own duration (the ledger's ``finished`` record), the CPU seconds the
station and the browser used, and the ratio with / without. The budget is
``<= 1.03``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants so far
    (the browser's renderer processes are grandchildren of its driver)."""
    tick = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu s)
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(d.name)] = (int(f[1]), (int(f[11]) + int(f[12])) / tick)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += table.get(p, (0, 0.0))[1]
        todo += [c for c, (parent, _) in table.items() if parent == p]
    return total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scan_cmd(out: Path, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "controller", "scan", "--out", str(out)]
    cmd += ["--seed", str(args.seed)]
    if args.fields:
        cmd += ["--fields", str(args.fields)]
    return cmd


def _duration(out: Path) -> float | None:
    for line in reversed((out / "ledger.jsonl").read_text().splitlines()):
        rec = json.loads(line)
        if rec.get("event") == "finished":
            return float(rec["duration_s"])
    return None


def _browser(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM or ""
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


class _PyViewer(threading.Thread):
    """Reads the event stream; fetches the last-field picture per stored field."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.pictures = 0

    def run(self) -> None:
        import requests

        with requests.get(f"{self.url}/events", stream=True, timeout=600) as r:
            event = None
            for raw in r.iter_lines(decode_unicode=True):
                if raw.startswith("event:"):
                    event = raw.split(":", 1)[1].strip()
                elif raw.startswith("data:") and event == "record":
                    rec = json.loads(raw.split(":", 1)[1])
                    if rec["event"] == "stored":
                        requests.get(f"{self.url}/pictures/last.png", timeout=60)
                        self.pictures += 1
                    if rec["event"] in ("finished", "stopped"):
                        return


def run_alone(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = work / "cart"
    t0 = time.perf_counter()
    subprocess.run(
        _scan_cmd(out, args),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return {"wall_s": time.perf_counter() - t0, "scan_s": _duration(out)}


def run_watched(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = work / "cart"
    work.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controller",
            "serve",
            "--root",
            str(work),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    driver = None
    try:
        import requests

        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{base}/api/runs", timeout=2)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        use_browser = bool(CHROMIUM and DRIVER) and not args.python_viewer
        if use_browser:
            driver = _browser(work.parent / f"profile-{work.name}")
            driver.get(f"{base}/")
        served0 = _cpu_s(serve.pid)
        t0 = time.perf_counter()
        scan = subprocess.Popen(
            _scan_cmd(out, args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while not (out / "ledger.jsonl").exists():
            time.sleep(0.02)
        viewer = None
        if driver is not None:
            driver.get(f"{base}/runs/cart")
            browser_pid = driver.service.process.pid
            browser0 = _cpu_s(browser_pid)
        else:
            viewer = _PyViewer(f"{base}/api/runs/cart")
            viewer.start()
        if scan.wait() != 0:
            raise RuntimeError(f"the scan failed (exit {scan.returncode})")
        wall = time.perf_counter() - t0
        served = _cpu_s(serve.pid) - served0
        browser = _cpu_s(browser_pid) - browser0 if driver is not None else None
        return {
            "wall_s": wall,
            "scan_s": _duration(out),
            "station_cpu_s": served,
            "browser_cpu_s": browser,
            "viewer": "chromium" if driver is not None else "python",
            "pictures": None if viewer is None else viewer.pictures,
        }
    finally:
        if driver is not None:
            driver.quit()
        serve.terminate()
        serve.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fields", type=int, default=0, help="0: the whole cartridge")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--python-viewer",
        action="store_true",
        help="a Python client instead of Chromium",
    )
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    args = p.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench-station-"))
    rows: dict[str, list[dict[str, Any]]] = {"alone": [], "watched": []}
    try:
        for k in range(args.repeats):
            order = ("alone", "watched") if k % 2 == 0 else ("watched", "alone")
            for mode in order:
                work = base / f"{mode}-{k}"
                fn = run_alone if mode == "alone" else run_watched
                r = fn(work, args)
                rows[mode].append(r)
                print(
                    f"repeat {k + 1} {mode:8s} "
                    + json.dumps(
                        {
                            a: (round(b, 2) if isinstance(b, float) else b)
                            for a, b in r.items()
                        }
                    ),
                    flush=True,
                )
                if not args.keep:
                    shutil.rmtree(work, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    a = statistics.median(r["wall_s"] for r in rows["alone"])
    w = statistics.median(r["wall_s"] for r in rows["watched"])
    sa = statistics.median(r["scan_s"] for r in rows["alone"])
    sw = statistics.median(r["scan_s"] for r in rows["watched"])
    print()
    print("| mode | scan wall (median) | scan duration (ledger) | ratio |")
    print("|---|---|---|---|")
    print(f"| alone | {a:.1f} s | {sa:.1f} s | 1.00 |")
    print(
        f"| with station + live page | {w:.1f} s | {sw:.1f} s | {w / a:.3f} "
        f"(duration {sw / sa:.3f}) |"
    )
    cpu = statistics.median(r["station_cpu_s"] for r in rows["watched"])
    print(
        f"station CPU {cpu:.1f} s per scan; budget: ratio <= 1.03 -> "
        f"{'met' if w / a <= 1.03 else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

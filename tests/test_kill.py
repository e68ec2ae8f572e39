"""kill -9 at random moments of a scan, then the same command again.

Each run is the real CLI in its own process, killed with SIGKILL at a seeded
random moment (start-up, focus map, acquisition, detection or report; one in
each twelfth of an uninterrupted run), then resumed by the same command. The
finished run must equal an uninterrupted one: the same fields with identical
pixels, every field stored once (a file that verifies is never acquired
again), no temporary files left, every field detected, and the same events.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from hardware_configs import CONFIG_DIR
from tests.conftest import read_field

KILLS = 12
FIELDS = 5


@pytest.fixture(scope="module")
def instrument_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The simulated scanner with a quick (2-anchor) focus map."""
    text = (CONFIG_DIR / "simulated.yaml").read_text()
    text = text.replace(
        "micromanager_config: simulated.cfg",
        "micromanager_config: " + str(CONFIG_DIR / "simulated.cfg"),
    )
    text = text.replace("  anchors: [5, 2]", "  anchors: [2, 1]")
    path = tmp_path_factory.mktemp("inst") / "quick.yaml"
    path.write_text(text)
    return path


def command(out: Path, yaml: Path) -> list[str]:
    return [
        sys.executable, "-m", "controller", "scan", "--out", str(out),
        "--instrument", str(yaml), "--layout", "test-3x4",
        "--fields", str(FIELDS), "--seed", "7",
    ]  # fmt: skip


def run(out: Path, yaml: Path, kill_after: float | None = None) -> int | None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        command(out, yaml),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    if kill_after is None:
        return proc.wait(timeout=600)
    try:
        proc.wait(timeout=kill_after)
        return proc.returncode  # finished before the kill
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the scan and its detector worker
        proc.wait()
        return None


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, instrument_yaml: Path
) -> tuple[Path, float]:
    base = tmp_path_factory.mktemp("ref")
    out = base / "run"
    t0 = time.monotonic()
    assert run(out, instrument_yaml) == 0
    first = time.monotonic() - t0
    # the kill moments are spread over a run's duration: the module's first
    # run can pay for cold caches, and moments past a warm run's end
    # interrupt nothing (a fresh-clone CI run once killed only 9 of 12)
    t0 = time.monotonic()
    assert run(base / "again", instrument_yaml) == 0
    return out, min(first, time.monotonic() - t0)


def ledger(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]


def check_equal(ref: Path, got: Path) -> None:
    names = sorted(p.name for p in (ref / "fields").iterdir())
    assert sorted(p.name for p in (got / "fields").iterdir()) == names
    for name in names:
        a, _, _ = read_field(ref / "fields" / name)
        b, _, _ = read_field(got / "fields" / name)
        assert np.array_equal(a, b), name
    records = ledger(got)
    stored = [r for r in records if r["event"] == "stored"]
    corrupt = {r["field"] for r in records if r["event"] == "corrupt"}
    per_field: dict[str, int] = {}
    for r in stored:
        per_field[r["field"]] = per_field.get(r["field"], 0) + 1
    for field, n in per_field.items():  # stored again only if found damaged
        assert n == 1 or field in corrupt, (field, n)
    for r in stored:
        if r is max(
            (s for s in stored if s["field"] == r["field"]), key=lambda s: s["t"]
        ):
            data = (got / r["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == r["sha256"]
    assert not list(got.rglob("*.tmp"))
    detected = {r["field"] for r in records if r["event"] == "detected"}
    assert detected == {n.split(".")[0] for n in names}
    assert (got / "events.csv").read_text() == (ref / "events.csv").read_text()
    a = json.loads((ref / "report.json").read_text())
    b = json.loads((got / "report.json").read_text())
    assert (a["ctc_count"], a["counts"]) == (b["ctc_count"], b["counts"])
    assert records[-1]["event"] == "finished"


def test_kill_9_at_random_moments_then_resume_matches_an_uninterrupted_run(
    tmp_path: Path, instrument_yaml: Path, reference: tuple[Path, float]
) -> None:
    ref, duration = reference
    rng = random.Random(20261124)
    # one seeded moment in each of KILLS equal slices of the run: every part of
    # it is interrupted, whatever the draw
    step = (duration - 0.3) / KILLS
    moments = [0.3 + (i + rng.random()) * step for i in range(KILLS)]

    def one(i: int) -> tuple[float, bool]:
        out = tmp_path / f"run-{i:02d}"
        killed = run(out, instrument_yaml, kill_after=moments[i]) is None
        assert run(out, instrument_yaml) == 0
        check_equal(ref, out)
        return moments[i], killed

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, range(KILLS)))
    killed = [t for t, k in results if k]
    # the moments really interrupted runs, spread over the whole run
    assert len(killed) >= KILLS - 2
    assert min(killed) < 0.25 * duration and max(killed) > 0.75 * duration


def queue_command(out: Path, yaml: Path) -> list[str]:
    return [
        sys.executable, "-m", "controller", "queue", "--out", str(out),
        "--instrument", str(yaml), "--layout", "test-3x4",
        "--fields", "2", "--slots", "1,2",
    ]  # fmt: skip


def run_queue(out: Path, yaml: Path, kill_after: float | None = None) -> int | None:
    proc = subprocess.Popen(
        queue_command(out, yaml),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if kill_after is None:
        return proc.wait(timeout=600)
    try:
        proc.wait(timeout=kill_after)
        return proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def test_kill_9_of_a_queue_then_resume_matches_an_uninterrupted_queue(
    tmp_path: Path, instrument_yaml: Path
) -> None:
    t0 = time.monotonic()
    assert run_queue(tmp_path / "ref", instrument_yaml) == 0
    duration = time.monotonic() - t0
    ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    rng = random.Random(7)
    moments = sorted(rng.uniform(0.5, duration) for _ in range(4))

    def one(i: int) -> None:
        out = tmp_path / f"q{i}"
        run_queue(out, instrument_yaml, kill_after=moments[i])
        assert run_queue(out, instrument_yaml) == 0
        got = json.loads((out / "summary.json").read_text())
        key = ("slot", "barcode", "status", "ctc_count")
        assert [[s[k] for k in key] for s in got] == [[s[k] for k in key] for s in ref]
        for s in ref:
            check_equal(tmp_path / "ref" / s["barcode"], out / s["barcode"])
        loads = [
            json.loads(x)["barcode"]
            for x in (out / "queue.jsonl").read_text().splitlines()
            if json.loads(x)["event"] == "loaded"
        ]
        # a cartridge is loaded again only if the kill came before it was done
        assert sorted(set(loads)) == ["SIM-0001", "SIM-0002"]

    with ThreadPoolExecutor(2) as pool:  # two queues at a time, as above
        list(pool.map(one, range(len(moments))))


@pytest.mark.parametrize("during", ["focus map", "acquisition"])
def test_a_hardware_call_that_never_returns_is_caught_and_the_run_resumes(
    tmp_path: Path, instrument_yaml: Path, reference: tuple[Path, float], during: str
) -> None:
    """The camera stops answering on a snap (it would for an hour); the watchdog
    (1 s here) ends the process with exit code 3, everything stored intact; the
    same command on the instrument once it answers again completes the run."""
    fmap = json.loads((reference[0] / "focus_map.json").read_text())
    # the 6th snap of the focus map; or, after the map's snaps and the dark
    # frame, field_002's FITC frame
    snap = 5
    if during == "acquisition":
        snap = sum(a["snaps"] for a in fmap["anchors"]) + 1 + 4 * 2 + 1
    text = instrument_yaml.read_text()
    hang = text.replace("snap_retries: 2", "snap_retries: 2\nwatchdog_s: 1.0").replace(
        "  world: {}", f"  world: {{hang_snaps: [{snap}]}}"
    )
    assert hang != text and "hang_snaps" in hang
    hang_yaml = tmp_path / "hang.yaml"
    hang_yaml.write_text(hang)
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = subprocess.run(
        command(out, hang_yaml), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - t0 < 60
    assert "has not returned" in proc.stderr and "watchdog 1 s" in proc.stderr
    records = ledger(out)
    assert (
        records[-1]["event"] == "stopped" and "has not returned" in records[-1]["error"]
    )
    assert "has not returned" in (out / "audit.log").read_text()
    assert run(out, instrument_yaml) == 0
    check_equal(reference[0], out)


def test_ctrl_c_in_a_queue_leaves_it_resumable(
    tmp_path: Path, instrument_yaml: Path
) -> None:
    out = tmp_path / "q"
    proc = subprocess.Popen(
        queue_command(out, instrument_yaml),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # wait until the first cartridge has stored a field, then press Ctrl-C
    deadline = time.monotonic() + 120
    while not list((out / "SIM-0001" / "fields").glob("*.ome.tif")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "resume" in stderr
    events = [json.loads(x) for x in (out / "queue.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "queue_stopped"
    assert run_queue(out, instrument_yaml) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["barcode"], s["status"]) for s in summary] == [
        ("SIM-0001", "complete"),
        ("SIM-0002", "complete"),
    ]
    first = ledger(out / "SIM-0001")
    assert any(r["event"] == "resumed" for r in first)  # continued, not redone
    assert sum(r["event"] == "stored" for r in first) == 2


def _deterministic(report: Path) -> str:
    """report.json without what may differ between two runs of the same fields:
    when and where it was written, timings, the scan's focus section."""
    r = json.loads(report.read_text())
    for key in ("generated_at", "source", "focus"):
        r.pop(key)
    r["qc"] = {k: v for k, v in r["qc"].items() if "seconds" not in k}
    return json.dumps(r, indent=1, sort_keys=True)


def test_the_same_fields_give_the_same_outputs_whatever_the_path(
    tmp_path: Path, instrument_yaml: Path
) -> None:
    """Uninterrupted; killed (-9), stopped with Ctrl-C and resumed; analysed
    again by 1 and by 2 worker processes: byte-identical events.csv and
    report.json (timestamps, timings and paths aside).

    Few cytokeratin fragments: some fields have too few single-stain objects
    to measure their own dye bleed-through, the case where a result could
    borrow from the fields detected before it."""
    text = instrument_yaml.read_text()
    sparse = text.replace("  world: {}", "  world: {population: {ck_fragment: 20}}")
    assert sparse != text
    yaml = tmp_path / "sparse.yaml"
    yaml.write_text(sparse)
    ref = tmp_path / "uninterrupted" / "run"
    t0 = time.monotonic()
    assert run(ref, yaml) == 0
    duration = time.monotonic() - t0
    measured = [
        bool(json.loads(p.read_text())["spillover_measured"].get("PE->APC"))
        for p in sorted((ref / "detections").iterdir())
    ]
    assert any(measured) and not all(measured)  # the case this test is about
    out = tmp_path / "interrupted" / "run"  # the same cartridge id
    assert run(out, yaml, kill_after=0.55 * duration) is None
    proc = subprocess.Popen(
        command(out, yaml),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    done = len(list((out / "fields").glob("*.ome.tif")))
    while len(list((out / "fields").glob("*.ome.tif"))) <= done:  # one more field
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert run(out, yaml) == 0
    records = ledger(out)
    assert [r["event"] for r in records].count("started") == 3  # three processes
    paths = {"uninterrupted": ref, "interrupted": out}
    for workers in ("1", "2"):
        dest = tmp_path / f"analysis-{workers}"
        proc2 = subprocess.run(
            [sys.executable, "-m", "controller", "analyze", str(ref), "--out",
             str(dest), "--workers", workers],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc2.returncode == 0, proc2.stderr
        paths[f"analyze --workers {workers}"] = dest
    events = {k: (p / "events.csv").read_bytes() for k, p in paths.items()}
    reports = {k: _deterministic(p / "report.json") for k, p in paths.items()}
    assert len(events["uninterrupted"].splitlines()) > 50  # many objects
    for k in paths:
        assert events[k] == events["uninterrupted"], k
        assert reports[k] == reports["uninterrupted"], k

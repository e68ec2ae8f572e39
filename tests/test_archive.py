"""Re-analysis of stored cartridges: many inputs, versioned analyses, compare,
and Dask clusters (a LocalCluster in-process; a real scheduler with worker
processes on 127.0.0.1, one worker killed mid-run, the scheduler lost).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from controller.runs.scan import ScanResult
from tests.conftest import invoke, one_line_error, run_scan
from tests.test_analyze import FILE_NAMES, MAP, _write
from tests.test_detect import Canvas
from tests.test_detector_worker import _resident_pages
from tests.test_integrity import _with_nan
from tests.test_kill import _deterministic


@pytest.fixture(scope="module")
def second_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another cartridge: 6 fields of another draw."""
    return run_scan(
        tmp_path_factory.mktemp("scan") / "cart-B", seed=5, n_fields=6
    ).run_dir


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock", "analyses"))
    return dest


def _detected(ledger: Path) -> Counter[str]:
    return Counter(
        json.loads(x)["field"]
        for x in ledger.read_text().splitlines()
        if json.loads(x)["event"] == "detected"
    )


def _times(run: Path, event: str) -> list[str]:
    """The ISO time stamps of `event` records in the run's ledger."""
    return [
        r["t"]
        for r in map(json.loads, (run / "ledger.jsonl").read_text().splitlines())
        if r["event"] == event
    ]


def _same_outputs(a: Path, b: Path) -> None:
    assert (a / "events.csv").read_bytes() == (b / "events.csv").read_bytes()
    assert _deterministic(a / "report.json") == _deterministic(b / "report.json")


def test_many_inputs_on_a_local_dask_cluster_equal_the_local_pool_and_resume(
    tmp_path: Path, small_scan: ScanResult, second_run: Path
) -> None:
    a = _copy(small_scan.run_dir, tmp_path / "in" / "cart-A")
    b = _copy(second_run, tmp_path / "in" / "cart-B")
    ome = tmp_path / "in" / "ome"  # a foreign folder: one field has NaN pixels
    ome.mkdir()
    for k in range(2):
        cv = Canvas(size=256, seed=k)
        cv.cell(90, 90)
        _write(ome / f"f_{k:03d}.ome.tif", cv.field(), FILE_NAMES, 0.64)
    _with_nan(ome / "f_001.ome.tif", slice(0, 40))
    args = ["--channels", MAP, "--workers", "2"]
    on_dask = ["--out", str(tmp_path / "dask"), "--scheduler", "local", *args]
    local = invoke(
        "analyze", str(tmp_path / "in"), "--recursive", "--out",
        str(tmp_path / "local"), *args,
    )  # fmt: skip
    dask = invoke("analyze", str(a), str(b), str(ome), *on_dask)
    if sys.platform.startswith("linux"):
        # the workers read each field for the last time: its pages may go
        # (a few header pages read outside the workers may stay)
        fields = sorted((a / "fields").glob("*.ome.tif"))
        cached = sum(map(_resident_pages, fields))
        total = sum(-(-p.stat().st_size // mmap.PAGESIZE) for p in fields)
        assert cached < 0.1 * total, (cached, total)
    for r in (local, dask):  # the bad field is named; the rest went on
        assert r.exit_code == 2 and "f_001.ome.tif" in r.stderr, r.output
        assert "cart-A" in r.stdout and "cart-B" in r.stdout
    for name, fields in [("cart-A", 12), ("cart-B", 6), ("ome", 1)]:
        _same_outputs(tmp_path / "local" / name, tmp_path / "dask" / name)
        counts = _detected(tmp_path / "dask" / name / "ledger.jsonl")
        assert sum(counts.values()) == fields and set(counts.values()) == {1}
    # the on-line result of each run folder is reproduced
    _same_outputs(a, tmp_path / "dask" / "cart-A")
    # the local pool takes the inputs in order, one pool for all of them: a
    # cartridge's outputs are written once its own fields are in, before the
    # next cartridge's (whose fields the workers go on with meanwhile)
    done = [
        _times(tmp_path / "local" / name, "analysis_finished")[0]
        for name in ("cart-A", "cart-B", "ome")
    ]
    assert done == sorted(done)
    assert done[0] >= max(_times(tmp_path / "local" / "cart-A", "detected"))
    # the same command resumes: nothing done is analysed again
    again = invoke("analyze", str(a), str(b), str(ome), *on_dask)
    assert again.exit_code == 2
    counts = _detected(tmp_path / "dask" / "cart-A" / "ledger.jsonl")
    assert sum(counts.values()) == 12 and set(counts.values()) == {1}


def test_reanalyses_are_versioned_beside_the_online_one_and_compared(
    tmp_path: Path, small_scan: ScanResult
) -> None:
    run = _copy(small_scan.run_dir, tmp_path / "cart-A")
    own = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert invoke("analyze", str(run), "--workers", "0").exit_code == 0
    (default,) = (run / "analyses").iterdir()
    _same_outputs(run, default)  # the same detector and settings as on-line
    strict = tmp_path / "strict.yaml"
    strict.write_text("detection:\n  min_ctc_diameter_um: 9.0\n")
    r = invoke("analyze", str(run), "--workers", "0", "--assay", str(strict))
    assert r.exit_code == 0, r.output
    (tight,) = (p for p in (run / "analyses").iterdir() if p != default)
    # the run folder's own results are untouched
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == own
    started = next(
        json.loads(x)
        for x in (tight / "ledger.jsonl").read_text().splitlines()
        if json.loads(x)["event"] == "analysis_started"
    )
    assert started["analysis_id"] == tight.name != default.name
    assert started["detector_version"] and len(started["settings_sha256"]) == 64
    # an output folder holds one analysis: another one is refused, not mixed in
    one_line_error(
        invoke("analyze", str(run), "--out", str(default), "--workers", "0",
               "--assay", str(strict)),
        "with another detector or settings",
    )  # fmt: skip
    csv_path = tmp_path / "changes.csv"
    r = invoke("compare", str(run), str(tight), "--csv", str(csv_path))
    assert r.exit_code == 0, r.output
    n_before = json.loads((run / "report.json").read_text())["ctc_count"]
    n_after = json.loads((tight / "report.json").read_text())["ctc_count"]
    assert n_after < n_before  # 9 um excludes some of the simulated CTCs
    rows = [x.split(",") for x in csv_path.read_text().splitlines()[1:]]
    lost = [x for x in rows if x[4] == "CTC" and x[5] != "CTC"]
    gained = [x for x in rows if x[4] != "CTC" and x[5] == "CTC"]
    assert len(lost) - len(gained) == n_before - n_after > 0
    assert f"{n_after - n_before:+d}" in r.stdout
    # --csv never replaces a file that is there: the run's own events.csv stays
    events = (run / "events.csv").read_bytes()
    for there in (run / "events.csv", csv_path):
        one_line_error(
            invoke("compare", str(run), str(tight), "--csv", str(there)),
            "exists already: not overwritten",
        )
    assert (run / "events.csv").read_bytes() == events


# ---------------------------------------------------------------- a real cluster


def test_a_local_clusters_workers_run_with_the_local_pools_heap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A field runs on a Dask worker's thread: one malloc arena and a trim
    threshold the nanny does not lower to 64 kB, or every field faults its
    pages in again (`controller.heap`)."""
    from controller.runs.runners import dask_client

    for name in ("MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    with dask_client("local", 1) as client:
        (arenas,) = client.run(os.getenv, "MALLOC_ARENA_MAX").values()
        (trim,) = client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_").values()
        (limit,) = client.run(_memory_limit).values()
    assert (arenas, trim) == ("1", str(256 * 2**20))
    assert limit is None  # nothing polls the worker's memory


def _memory_limit(dask_worker: object) -> object:
    return dask_worker.memory_manager.memory_limit  # type: ignore[attr-defined]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Cluster:
    """`dask scheduler` and `dask worker` processes on 127.0.0.1."""

    def __init__(self, tmp: Path, workers: int) -> None:
        self.tmp = tmp
        file = tmp / "scheduler.json"
        file.unlink(missing_ok=True)
        dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
        self.scheduler = _start(
            [*dask, "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(file)],
            tmp / "scheduler.log",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not file.exists() or not file.read_text().strip():
            assert time.monotonic() < deadline and self.scheduler.poll() is None
            time.sleep(0.1)
        time.sleep(0.2)
        self.address = json.loads(file.read_text())["address"]
        worker = [sys.executable, "-m", "distributed.cli.dask_worker", self.address]
        opts = ["--nworkers", "1", "--nthreads", "1", "--no-dashboard"]
        self.workers = [
            _start([*worker, *opts], tmp / f"worker-{i}.log") for i in range(workers)
        ]

    def close(self) -> None:
        for p in [*self.workers, self.scheduler]:
            _stop(p)


def _analyze(inputs: list[Path], out: Path, address: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "controller", "analyze", *map(str, inputs),
         "--out", str(out), "--scheduler", address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_detected(out: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while sum(sum(_detected(p).values()) for p in out.glob("*/ledger.jsonl")) < n:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)


def test_a_worker_killed_mid_run_and_a_lost_scheduler_on_a_real_cluster(
    tmp_path: Path, small_scan: ScanResult, second_run: Path
) -> None:
    inputs = [
        _copy(small_scan.run_dir, tmp_path / "in" / "cart-A"),
        _copy(second_run, tmp_path / "in" / "cart-B"),
    ]
    fields = {"cart-A": 12, "cart-B": 6}
    out = tmp_path / "out"
    cluster = Cluster(tmp_path, workers=2)
    try:
        proc = _analyze(inputs, out, cluster.address)
        _wait_detected(out, 2, proc)
        _stop(cluster.workers[0])  # kill -9 a worker (and its nanny) mid-run
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    finally:
        cluster.close()
    for name, n in fields.items():
        counts = _detected(out / name / "ledger.jsonl")
        assert sum(counts.values()) == n and set(counts.values()) == {1}
    _same_outputs(inputs[0], out / "cart-A")
    _same_outputs(inputs[1], out / "cart-B")

    # the scheduler is lost mid-run: one line; on a new cluster the same
    # command resumes and every field still has exactly one result
    out2 = tmp_path / "out2"
    cluster = Cluster(tmp_path, workers=1)
    try:
        proc = _analyze(inputs, out2, cluster.address)
        _wait_detected(out2, 1, proc)
        _stop(cluster.scheduler)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2
        lines = err.strip().splitlines()
        assert "lost the Dask scheduler" in lines[-1] and "resume" in lines[-1]
        assert "Traceback" not in err
    finally:
        cluster.close()
    done_before = sum(sum(_detected(p).values()) for p in out2.glob("*/ledger.jsonl"))
    assert 1 <= done_before < sum(fields.values())
    cluster = Cluster(tmp_path, workers=1)
    try:
        proc = _analyze(inputs, out2, cluster.address)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    finally:
        cluster.close()
    for name, n in fields.items():
        counts = _detected(out2 / name / "ledger.jsonl")
        assert sum(counts.values()) == n and set(counts.values()) == {1}
        _same_outputs(out / name, out2 / name)


def test_a_scheduler_that_cannot_be_reached_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from controller.runs import runners

    # a refused connection is known at once: the client's own retries until
    # its timeout (made long here) are not waited for
    monkeypatch.setattr(runners, "CONNECT_TIMEOUT_S", 120.0)
    src = tmp_path / "ome"
    src.mkdir()
    _write(src / "f_000.ome.tif", Canvas(size=128).field(), FILE_NAMES, 0.64)
    r = invoke("analyze", str(src), "--out", str(tmp_path / "o"), "--channels", MAP,
               "--scheduler", "tcp://127.0.0.1:9")  # fmt: skip
    one_line_error(
        r, "cannot reach the Dask scheduler at tcp://127.0.0.1:9: connection refused"
    )
    r = invoke("analyze", str(src), "--out", str(tmp_path / "o"), "--channels", MAP,
               "--scheduler", "tcp://scheduler.invalid:8786")  # fmt: skip
    one_line_error(r, "unknown host 'scheduler.invalid'")
    one_line_error(
        invoke("analyze", str(src), "--out", str(tmp_path / "o"), "--scheduler", "x"),
        "--scheduler takes tcp://HOST:PORT or 'local'",
    )


def test_an_address_that_is_no_dask_scheduler_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A web server (a scheduler's dashboard port, say) and a port that
    accepts and never answers: one line each, in seconds, never a hang or a
    traceback (the client read an HTTP answer as a message length)."""
    import http.server
    import socket
    import threading

    from controller.runs import runners

    monkeypatch.setattr(runners, "CONNECT_TIMEOUT_S", 2.0)
    src = tmp_path / "ome"
    src.mkdir()
    _write(src / "f_000.ome.tif", Canvas(size=128).field(), FILE_NAMES, 0.64)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        for port in (web.server_address[1], silent.getsockname()[1]):
            t0 = time.monotonic()
            address = f"tcp://127.0.0.1:{port}"
            r = invoke("analyze", str(src), "--out", str(tmp_path / "o"),
                       "--channels", MAP, "--scheduler", address)  # fmt: skip
            one_line_error(r, f"Dask scheduler at tcp://127.0.0.1:{port}")
            assert time.monotonic() - t0 < 30
            assert not (tmp_path / "o").exists()  # nothing written
    finally:
        web.shutdown()
        silent.close()


def test_a_result_the_cluster_cannot_write_is_one_line_and_resumes(
    tmp_path: Path,
) -> None:
    # the workers write the results: a disk that refuses one stops the
    # analysis with the disk's error (no field is failed) and the resume hint
    src = tmp_path / "ome"
    src.mkdir()
    for k in range(2):
        cv = Canvas(size=192, seed=k)
        cv.cell(90, 90)
        _write(src / f"f_{k:03d}.ome.tif", cv.field(), FILE_NAMES, 0.64)
    out = tmp_path / "o"
    args = ["analyze", str(src), "--out", str(out), "--channels", MAP,
            "--scheduler", "local", "--workers", "1"]  # fmt: skip
    assert invoke(*args).exit_code == 0
    cart = out  # one input: the output folder is its analysis
    ledger = cart / "ledger.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    last = max(i for i, x in enumerate(lines) if json.loads(x)["event"] == "detected")
    field = json.loads(lines[last])["field"]
    ledger.write_text("".join(lines[:last]))  # as if stopped before that field
    result = cart / "detections" / f"{field}.json"
    result.unlink()
    result.mkdir()  # the result's name cannot be written
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    error = r.stderr.strip().splitlines()[-1]  # after the progress bar's last state
    assert error == (
        f"error: cannot write {result}: Is a directory; every field finished so "
        "far is kept: run the same command again to resume"
    )
    events = [json.loads(x)["event"] for x in ledger.read_text().splitlines()]
    assert "detect_failed" not in events
    assert not list(cart.rglob("*.tmp"))  # the failed write left nothing behind
    result.rmdir()
    assert invoke(*args).exit_code == 0
    assert (
        set(_detected(ledger).values()) == {1} and sum(_detected(ledger).values()) == 2
    )

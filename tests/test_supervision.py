"""One owner per run, supervised threads, signals and child processes.

Real processes, real signals, real file systems: two CLI processes started
together on one folder; a detection or ledger write refused by the file system
(as an unprivileged user), a read-only remount in a mount namespace; SIGTERM,
SIGHUP and Ctrl-C to the process group; kill -9 of the scanning process alone.
Each fault ends in a `stopped` record (where the ledger can still take one) or
a clear error, never "complete", and the same command then completes the run
to the same result as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from controller.errors import ScannerError
from controller.hardware.instrument import Instrument, open_instrument
from controller.layouts import get_layout
from controller.records import Record, Stored
from controller.runs.scan import Scan, ScanRequest
from controller.runstore.folder import RunFolder
from controller.runstore.lock import (
    LOCK_FILE,
    OWNER_FILE,
    FolderLock,
    FolderLockedError,
)
from hardware_configs import CONFIG_DIR
from tests.conftest import SIM_YAML, read_back_only, read_field, sim_instrument

FIELDS = 4
SEED = 5
NO_FOCUS = {"enabled": False}
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def quick_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The simulated scanner with a quick (2-anchor) focus map."""
    text = (CONFIG_DIR / "simulated.yaml").read_text()
    text = text.replace(
        "micromanager_config: simulated.cfg",
        "micromanager_config: " + str(CONFIG_DIR / "simulated.cfg"),
    ).replace("  anchors: [5, 2]", "  anchors: [2, 1]")
    path = tmp_path_factory.mktemp("inst") / "quick.yaml"
    path.write_text(text)
    return path


def command(out: Path, yaml: Path, fields: int = FIELDS) -> list[str]:
    return [
        sys.executable, "-m", "controller", "scan", "--out", str(out),
        "--instrument", str(yaml), "--layout", "test-3x4",
        "--fields", str(fields), "--seed", str(SEED),
    ]  # fmt: skip


def ledger(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "ledger.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, quick_yaml: Path) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = subprocess.run(command(out, quick_yaml), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def same_run(ref: Path, got: Path) -> None:
    """`got` finished with the same fields (pixels) and events as `ref`."""
    names = sorted(p.name for p in (ref / "fields").iterdir())
    assert sorted(p.name for p in (got / "fields").iterdir()) == names
    for name in names:
        a, _, _ = read_field(ref / "fields" / name)
        b, _, _ = read_field(got / "fields" / name)
        assert np.array_equal(a, b), name
    assert (got / "events.csv").read_text() == (ref / "events.csv").read_text()
    assert ledger(got)[-1]["event"] == "finished"


def wait_for_a_field(run: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list((run / "fields").glob("*.ome.tif")):
        assert time.monotonic() < deadline and proc.poll() is None, "no field stored"
        time.sleep(0.02)


# ---------------------------------------------------------------- one owner


def test_two_scans_started_together_on_one_folder_one_refused(
    tmp_path: Path, quick_yaml: Path, reference: Path
) -> None:
    out = tmp_path / "run"
    procs = [
        subprocess.Popen(
            command(out, quick_yaml),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    owner = next(p for p, (code, _) in zip(procs, results, strict=True) if code == 0)
    flat = " ".join(refused.split())
    assert flat.startswith("error:") and "Traceback" not in refused
    assert f"in use by pid {owner.pid} on " in flat
    stored = [r["field"] for r in ledger(out) if r["event"] == "stored"]
    assert sorted(stored) == sorted(set(stored))  # every field stored once
    same_run(reference, out)


def test_a_refused_process_waits_for_the_holders_note_to_name_it(
    tmp_path: Path,
) -> None:
    # the holder writes its note just after taking the lock: a process refused
    # in between finds none, or the note of an earlier holder that has ended
    folder = tmp_path / "run"
    folder.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    assert gone.wait() == 0
    note = folder / OWNER_FILE
    holding = FileLock(str(folder / LOCK_FILE), timeout=0, thread_local=False)
    holding.acquire()
    try:
        # the ended holder's note, then the living holder's 0.3 s after
        note.write_text(
            json.dumps({"pid": gone.pid, "host": socket.gethostname(), "since": "t0"})
        )
        later = threading.Timer(
            0.3,
            note.write_text,
            [
                json.dumps(
                    {"pid": os.getpid(), "host": socket.gethostname(), "since": "t1"}
                )
            ],
        )
        later.start()
        with pytest.raises(FolderLockedError, match=f"in use by pid {os.getpid()} on "):
            FolderLock(folder).acquire()
        later.join()
        # no note comes: after the wait, the refusal says what it can
        note.unlink()
        t0 = time.monotonic()
        with pytest.raises(FolderLockedError, match="in use by another process"):
            FolderLock(folder).acquire()
        assert time.monotonic() - t0 < 10
    finally:
        holding.release()


def test_two_queues_started_together_on_one_folder_one_refused(
    tmp_path: Path, quick_yaml: Path
) -> None:
    out = tmp_path / "q"
    cmd = [
        sys.executable, "-m", "controller", "queue", "--out", str(out),
        "--instrument", str(quick_yaml), "--layout", "test-3x4",
        "--fields", "1", "--slots", "1",
    ]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    assert sorted(code for code, _ in results) == [0, 2], results
    assert "queue folder" in next(e for c, e in results if c == 2)
    events = [
        json.loads(x)["event"] for x in (out / "queue.jsonl").read_text().splitlines()
    ]
    assert events.count("loaded") == 1 and events.count("queue_finished") == 1


# ---------------------------------------------------------------- supervised threads


@contextlib.contextmanager
def as_nobody() -> Iterator[None]:
    """This process (every thread) writes files as an unprivileged user."""
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder anyone may write to (the scan runs as `nobody` there)."""
    root = Path(tempfile.mkdtemp(prefix="ctcscan-perm-"))
    root.chmod(0o777)
    yield root
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def sim() -> Iterator[Instrument]:
    """A simulated instrument opened once, by the test, for several scans."""
    cfg = sim_instrument(focus=NO_FOCUS)
    inst = open_instrument(cfg, get_layout("test-3x4"), seed=SEED)
    yield inst
    inst.close()


def request(out: Path) -> ScanRequest:
    return ScanRequest(
        instrument=sim_instrument(focus=NO_FOCUS),
        layout=get_layout("test-3x4"),
        out=out,
        instrument_file=str(SIM_YAML),
        seed=SEED,
        n_fields=FIELDS,
    )


@pytest.fixture(scope="module")
def in_process_reference(
    tmp_path_factory: pytest.TempPathFactory, sim: Instrument
) -> Path:
    out = tmp_path_factory.mktemp("ref-inproc") / "run"
    result = Scan(request(out), instrument=sim, detector_workers=0).run()
    assert result.complete
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
@pytest.mark.parametrize(
    ("target", "mode"), [("detections", 0o555), ("ledger.jsonl", 0o444)]
)
def test_a_write_refused_mid_run_stops_it_and_a_resume_completes(
    open_folder: Path,
    sim: Instrument,
    in_process_reference: Path,
    target: str,
    mode: int,
) -> None:
    """Permission denied on detections/ or on the ledger while the scan runs:
    the run stops with that error at once (never "complete"), and once the
    folder is writable again the same request completes it identically."""
    run = open_folder / "run"

    def refuse(r: Record) -> None:
        if isinstance(r, Stored) and r.field == "field_000":
            (run / target).chmod(mode)

    job = Scan(request(run), instrument=sim, detector_workers=0)
    job.events.subscribe(refuse)
    t0 = time.monotonic()
    with as_nobody(), pytest.raises(ScannerError, match="Permission denied"):
        job.run()
    assert time.monotonic() - t0 < 60
    records = ledger(run)
    assert not any(r["event"] == "finished" for r in records)
    if target == "detections":  # the ledger can still say why it stopped
        assert records[-1]["event"] == "stopped"
        assert "Permission denied" in records[-1]["error"]
    audit = (run / "audit.log").read_text()
    assert "ERROR" in audit and "Permission denied" in audit
    (run / target).chmod(0o755 if target == "detections" else 0o644)
    again = Scan(request(run), instrument=sim, detector_workers=0).run()
    assert again.complete and not again.failed
    same_run(in_process_reference, run)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare for a private mount namespace",
)
def test_a_read_only_remount_mid_run_is_one_error_then_resumes(
    tmp_path: Path, quick_yaml: Path, reference: Path
) -> None:
    """The run folder's file system turns read-only under a running scan: in
    a private mount namespace, a read-only bind mount of the same folder is
    laid over the one the scan writes to (remounting that one read-only is
    refused while the scan holds its lock file open for writing), so every
    file the scan opens from then on is on a read-only file system."""
    real, mnt = tmp_path / "disk", tmp_path / "mnt"
    real.mkdir()
    mnt.mkdir()
    # a scan that keeps some real time (exposures, stage moves at a quarter
    # of their hardware time: about 0.1 s a field), so that the remount
    # lands while fields are still to be stored; with no waits at all the
    # remaining 11 fields can be stored before the file system turns
    paced = tmp_path / "paced.yaml"
    text = quick_yaml.read_text()
    assert "time_scale: 0.0" in text
    paced.write_text(text.replace("time_scale: 0.0", "time_scale: 0.25"))
    scan = " ".join(command(mnt / "run", paced, fields=12))
    script = f"""
set -u
mount --bind {real} {mnt}
{scan} > {tmp_path}/out.txt 2> {tmp_path}/err.txt &
pid=$!
for i in $(seq 1 3000); do
  ls {mnt}/run/fields/*.ome.tif >/dev/null 2>&1 && break
  sleep 0.02
done
mount --bind {real} {mnt} && mount -o remount,ro,bind {mnt}
wait $pid
echo $? > {tmp_path}/code.txt
"""
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if "Operation not permitted" in proc.stderr or "cannot" in proc.stderr:
        pytest.skip(f"no private mount namespace here: {proc.stderr.strip()}")
    code = int((tmp_path / "code.txt").read_text())
    err = (tmp_path / "err.txt").read_text()
    assert code == 2, err
    assert "Traceback" not in err
    assert "Read-only file system" in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    records = ledger(real / "run")
    assert not any(r["event"] == "finished" for r in records)
    # writable again (outside the namespace): the same command completes
    done = subprocess.run(
        command(real / "run", paced, fields=12),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    stored = [r["field"] for r in ledger(real / "run") if r["event"] == "stored"]
    assert len(set(stored)) == 12


# ---------------------------------------------------------------- signals, children


def children_of(pid: int) -> set[int]:
    """Processes whose parent is `pid` (read from /proc)."""
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.add(int(d.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize(
    ("sig", "code", "name"),
    [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGHUP, 129, "SIGHUP")],
)
def test_sigterm_and_sighup_stop_like_ctrl_c_and_the_run_resumes(
    tmp_path: Path, quick_yaml: Path, reference: Path, sig: int, code: int, name: str
) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        command(out, quick_yaml),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_a_field(out, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "resume" in err
    last = ledger(out)[-1]
    assert last["event"] == "stopped" and last["canceled"]
    assert f"interrupted by the operator ({name})" in (out / "audit.log").read_text()
    assert subprocess.run(command(out, quick_yaml), timeout=300).returncode == 0
    same_run(reference, out)


def test_ctrl_c_twice_to_the_process_group_is_one_line_and_a_stopped_record(
    tmp_path: Path, quick_yaml: Path
) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        command(out, quick_yaml, fields=12),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_a_field(out, proc)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: every process
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # impatient operator
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) <= 1
    records = ledger(out)
    assert records[-1]["event"] == "stopped"
    assert not any(r["event"] == "detect_failed" for r in records)


def test_no_child_or_temporary_folder_outlives_a_killed_scan(
    tmp_path: Path, quick_yaml: Path
) -> None:
    """kill -9 of the scanning process alone: its detector worker and the
    multiprocessing resource tracker notice and leave; nothing is left in the
    temporary folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "run"
    proc = subprocess.Popen(
        command(out, quick_yaml, fields=12),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    wait_for_a_field(out, proc)
    deadline = time.monotonic() + 30
    kids: set[int] = set()
    while time.monotonic() < deadline and not kids:  # the worker has started
        kids = children_of(proc.pid)
        time.sleep(0.05)
    assert kids, "no detector worker was started"
    kids |= {g for k in kids for g in children_of(k)}
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(k) for k in kids):
        time.sleep(0.1)
    assert not [k for k in kids if alive(k)]
    assert not list(tmp.iterdir())
    assert RunFolder(out).ledger.read()  # the ledger is intact


# ---------------------------------------------------------------- instrument owners


def test_a_scan_runs_on_a_core_the_caller_opened(tmp_path: Path) -> None:
    """A program that already has a core open (a GUI, a notebook) scans on it;
    ctcscan leaves the core and its devices to that program."""
    from pymmcore_plus import CMMCorePlus

    from controller.config import InstrumentConfig

    cfg = InstrumentConfig.from_file(CONFIG_DIR / "demo-adapters.yaml")
    core = CMMCorePlus()
    import mm_test_adapters

    core.setDeviceAdapterSearchPaths([mm_test_adapters.device_adapter_path()])
    core.loadSystemConfiguration(cfg.micromanager_config)
    try:
        inst = Instrument.on_core(core, cfg)
        req = ScanRequest(
            instrument=cfg,
            layout=get_layout("test-3x4"),
            out=tmp_path / "run",
            n_fields=2,
        )
        # the demo camera's pattern holds no cells (detecting on it takes
        # minutes): the fields are read back, nothing more
        result = Scan(
            req, instrument=inst, detector_workers=0, run_job=read_back_only
        ).run()
        assert result.complete and result.stored == 2
        assert result.detected == 2 and not result.detect_failed
        inst.close()  # not ours: the devices stay loaded
        assert core.getCameraDevice() and core.getLoadedDevices()
        core.snapImage()
    finally:
        core.unloadAllDevices()


def test_a_run_folder_written_before_typed_records_still_resumes(
    tmp_path: Path,
) -> None:
    """`tests/data/run-before-records`: scan.json, focus_map.json and the
    ledger of a 3-field run written before records had kinds and versions (its
    pixel data left out). Every line reads as a typed record; the resume finds
    the field files missing, says so, and acquires them again."""
    run = tmp_path / "cart-old"
    shutil.copytree(DATA / "run-before-records", run)
    folder = RunFolder(run)
    old = folder.ledger.read()
    assert len(old) == 9 and folder.ledger.skipped == []
    assert [r.kind for r in old][-1] == "finished"
    req = ScanRequest(
        instrument=sim_instrument(),
        layout=get_layout("test-3x4"),
        out=run,
        instrument_file=str(SIM_YAML),
        seed=3,
        n_fields=3,
    )
    result = Scan(req, detector_workers=0).run()
    assert result.complete and result.stored == 3 and result.focus_map_reused
    records = ledger(run)
    assert sorted(r["field"] for r in records if r["event"] == "corrupt") == [
        "field_000", "field_001", "field_002",
    ]  # fmt: skip
    # the same cartridge, the same result as the old run reported
    before = json.loads((DATA / "run-before-records" / "report.json").read_text())
    assert result.report is not None
    assert (result.report.ctc_count, result.report.counts) == (
        before["ctc_count"],
        before["counts"],
    )


# ---------------------------------------------------------------- one watchdog


@pytest.fixture(scope="module")
def bowed_yaml(tmp_path_factory: pytest.TempPathFactory, quick_yaml: Path) -> Path:
    """A bowed cartridge under a plane focus map: some fields need re-focus."""
    text = (
        quick_yaml.read_text()
        .replace(
            "  world: {}",
            "  world: {surface: {bow_um: 8.0, tilt_x_um_per_mm: 0.5, "
            "tilt_y_um_per_mm: 0.0}}",
        )
        .replace("  search_range_um: 20", "  search_range_um: 20\n  model: plane")
    )
    path = tmp_path_factory.mktemp("bowed") / "bowed.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def bowed_reference(tmp_path_factory: pytest.TempPathFactory, bowed_yaml: Path) -> Path:
    out = tmp_path_factory.mktemp("bowed-ref") / "run"
    proc = subprocess.run(command(out, bowed_yaml, fields=12), capture_output=True)
    assert proc.returncode == 0, proc.stderr
    return out


def snap_number(ref: Path, during: str) -> int:
    """The simulator's (0-based) snap count at the first snap of `during`:
    the map's snaps, the dark frame, then per field its DAPI frame, its
    FITC frame (taken while the DAPI frame is judged), any re-focus search
    snaps, and its other frames."""
    fmap = json.loads((ref / "focus_map.json").read_text())
    n = sum(a["snaps"] for a in fmap["anchors"])
    if during == "dark frame":
        return n
    n += 1
    stored = {r["field"]: r for r in ledger(ref) if r["event"] == "stored"}
    refocused = {r["field"] for r in ledger(ref) if r["event"] == "refocused"}
    for f in json.loads((ref / "scan.json").read_text())["fields"]:
        if f["name"] in refocused:
            return n + 2  # after its DAPI and FITC frames
        n += 4 + stored[f["name"]]["focus"]["search_snaps"]
    raise AssertionError("no field was re-focused")


@pytest.mark.parametrize("during", ["dark frame", "re-focus"])
def test_a_hang_in_the_dark_frame_or_a_refocus_is_caught_and_resumes(
    tmp_path: Path, bowed_yaml: Path, bowed_reference: Path, during: str
) -> None:
    snap = snap_number(bowed_reference, during)
    text = bowed_yaml.read_text()
    hang = text.replace("snap_retries: 2", "snap_retries: 2\nwatchdog_s: 1.0").replace(
        "world: {surface:", f"world: {{hang_snaps: [{snap}], surface:"
    )
    assert "hang_snaps" in hang and "watchdog_s" in hang
    hang_yaml = tmp_path / "hang.yaml"
    hang_yaml.write_text(hang)
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = subprocess.run(
        command(out, hang_yaml, fields=12), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - t0 < 60
    word = "dark frame" if during == "dark frame" else "snap at focus"
    assert "has not returned" in proc.stderr and word in proc.stderr, proc.stderr
    last = ledger(out)[-1]
    assert last["event"] == "stopped" and "has not returned" in last["error"]
    done = subprocess.run(command(out, bowed_yaml, fields=12), capture_output=True)
    assert done.returncode == 0, done.stderr
    same_run(bowed_reference, out)


def test_a_hang_inside_a_queue_ends_the_queue_with_exit_3_and_it_resumes(
    tmp_path: Path, quick_yaml: Path
) -> None:
    """A hung call in a queue's cartridge is not "one failed cartridge": the
    queue stops at once (exit 3), leaves the loader and the instrument alone,
    and the same command later finishes every cartridge."""
    hang_yaml = tmp_path / "hang.yaml"
    text = quick_yaml.read_text()
    hang_yaml.write_text(
        text.replace("snap_retries: 2", "snap_retries: 2\nwatchdog_s: 1.0").replace(
            "  world: {}", "  world: {hang_snaps: [5]}"
        )
    )
    out = tmp_path / "q"

    def queue(yaml: Path) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable, "-m", "controller", "queue", "--out", str(out),
            "--instrument", str(yaml), "--layout", "test-3x4",
            "--fields", "1", "--slots", "1,2",
        ]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    t0 = time.monotonic()
    hung = queue(hang_yaml)
    assert hung.returncode == 3, hung.stderr
    assert time.monotonic() - t0 < 90
    assert "has not returned" in hung.stderr
    events = [
        json.loads(x)["event"] for x in (out / "queue.jsonl").read_text().splitlines()
    ]
    assert events.count("loaded") == 1 and "unloaded" not in events
    done = queue(quick_yaml)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["barcode"], s["status"]) for s in summary] == [
        ("SIM-0001", "complete"),
        ("SIM-0002", "complete"),
    ]


def test_a_killed_queue_leaves_nothing_in_the_temporary_folder(
    tmp_path: Path, quick_yaml: Path
) -> None:
    """The loader emulator's port link lives in the (locked) queue folder:
    kill -9 of a queue leaves no folder behind in the temporary directory."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "q"
    cmd = [
        sys.executable, "-m", "controller", "queue", "--out", str(out),
        "--instrument", str(quick_yaml), "--layout", "test-3x4",
        "--fields", "3", "--slots", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp)}, start_new_session=True,
    )  # fmt: skip
    wait_for_a_field(out / "SIM-0001", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(tmp.iterdir())
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TMPDIR": str(tmp)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not list(tmp.iterdir())

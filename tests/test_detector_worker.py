"""The on-line detector: what its worker processes import at start-up, and
waiting until what was offered to it has been dispatched."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import mmap
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from analysis.pipeline import FieldJob, analyze_field_file
from controller.records import Detected
from controller.runs.detector import (
    OnlineDetector,
    _needs_main,
    _spawn_context,
    _WorkerContext,
)
from controller.runstore.durable import forget_cached, write_durably
from controller.runstore.folder import RunFolder
from controller.runstore.ledger import RunLog
from controller.runstore.results import ResultWriteError, encode_result, store_result
from controller.supervise import Supervisor


@pytest.fixture
def main_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The process's ``__main__`` is a script that leaves a file when it runs
    (as the ``ctcscan`` script or a benchmark is, when the scanning process
    starts from one); returns that file's path."""
    ran = tmp_path / "main-ran"
    script = tmp_path / "main_script.py"
    script.write_text(
        f"from pathlib import Path\nPath({str(ran)!r}).write_text('ran')\n"
    )
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "__spec__", None)
    monkeypatch.setattr(main, "__file__", str(script), raising=False)
    return ran


def _start_one(context: Any) -> int:
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(os.getpid).result(timeout=60)


def test_a_plain_spawned_process_runs_the_parents_main_script(
    main_script: Path,
) -> None:
    # what the workers avoid: spawn re-runs the main script in every child
    assert _start_one(multiprocessing.get_context("spawn")) != os.getpid()
    assert main_script.read_text() == "ran"


def test_a_detection_worker_starts_without_the_parents_main_script(
    main_script: Path,
) -> None:
    main = sys.modules["__main__"]
    before = (main.__spec__, main.__file__)
    assert _start_one(_WorkerContext()) != os.getpid()
    assert not main_script.exists()
    assert (main.__spec__, main.__file__) == before  # put back after the start


def _in_main(job: FieldJob) -> dict[str, Any]:
    return {}


def test_a_job_defined_in_the_main_script_keeps_it_in_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    main = sys.modules["__main__"]
    monkeypatch.setattr(_in_main, "__module__", "__main__")
    monkeypatch.setattr(main, "_in_main", _in_main, raising=False)
    assert _needs_main(_in_main)
    assert not _needs_main(analyze_field_file)
    for run_job, lean in ((analyze_field_file, True), (_in_main, False)):
        assert isinstance(_spawn_context(run_job), _WorkerContext) is lean


# ------------------------------------------------------------ wait_dispatched


class _Gated:
    """Detection on the dispatcher's own thread (``workers=0``: one field at a
    time) that holds field `held` until `gate` is set."""

    def __init__(self, tmp_path: Path, held: str) -> None:
        self.folder = RunFolder(tmp_path / "run")
        self.folder.prepare()
        self.held = held
        self.gate = threading.Event()
        self.started = threading.Event()  # `held` has been taken
        self.ran: list[str] = []
        self.at_return: list[str] | None = None
        self.supervisor = Supervisor()
        self.detector = OnlineDetector(
            self.folder,
            lambda name: name,  # type: ignore[arg-type,return-value]
            RunLog(self.folder.ledger),
            self.supervisor,
            workers=0,
            run_job=self.run,  # type: ignore[arg-type]
        )

    def run(self, name: str) -> dict[str, Any]:
        if name == self.held:
            self.started.set()
            assert self.gate.wait(60)
        self.ran.append(name)
        return {"field": name, "counts": {"CTC": 0}, "objects": []}

    def detected(self) -> list[str]:
        return [r.field for r in self.folder.ledger.read() if isinstance(r, Detected)]

    @contextlib.contextmanager
    def waiting(self) -> Iterator[threading.Event]:
        """`wait_dispatched` on a thread of its own; the event is set when it
        returns, with what had run by then in `self.at_return`."""
        returned = threading.Event()

        def wait() -> None:
            self.detector.wait_dispatched()
            self.at_return = list(self.ran)
            returned.set()

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        try:
            yield returned
        finally:
            self.gate.set()
            waiter.join(60)
            assert not waiter.is_alive(), "wait_dispatched never returned"


def test_wait_dispatched_returns_once_every_field_offered_has_gone(
    tmp_path: Path,
) -> None:
    g = _Gated(tmp_path, held="b")
    g.detector.add_backlog(["a", "b", "c"])
    with g.waiting() as returned:
        # "c" is taken only after "b", held, is done
        assert not returned.wait(0.2)
        g.gate.set()
        assert returned.wait(60)
    assert g.at_return[:2] == ["a", "b"]
    # nothing offered since: it returns at once
    g.detector.wait_dispatched()
    assert g.detector.close()["detected"] == 3
    assert sorted(g.detected()) == ["a", "b", "c"]
    assert g.supervisor.error is None


def test_wait_dispatched_returns_when_the_detector_stops_with_fields_left(
    tmp_path: Path,
) -> None:
    # a run stopping: close(drain=False) drops what was not dispatched
    g = _Gated(tmp_path / "stop", held="a")
    g.detector.add_backlog(["a", "b", "c"])
    with g.waiting() as returned:
        assert g.started.wait(60)
        closing = threading.Thread(target=g.detector.close, kwargs={"drain": False})
        closing.start()
        assert returned.wait(60)  # while "a" is still held
        assert g.at_return == []
    closing.join(60)
    assert g.detected() == ["a"]
    # the dispatcher dies (the results cannot be written), fields still waiting
    g = _Gated(tmp_path / "dead", held="a")
    g.folder.detections_dir.rmdir()
    g.folder.detections_dir.write_text("not a folder")
    g.detector.add_backlog(["a", "b", "c"])
    with g.waiting() as returned:
        g.gate.set()
        assert returned.wait(60)
    assert isinstance(g.supervisor.error, OSError)
    assert g.at_return == ["a"] and g.detected() == []
    g.detector.wait_dispatched()  # after the end, too
    g.detector.close()


# ------------------------------------------------- results written by workers


def _small_result(job: str) -> dict[str, Any]:
    """A field's record, computed in a worker process (whose pid it keeps)."""
    return {
        "field": job,
        "counts": {"CTC": 1, "leukocyte": 2},
        "seconds": 0.25,
        "source": "10:20",
        "pid": os.getpid(),
        "objects": [{"x": 1.5, "label": "CTC"}],
    }


def _detector(
    tmp_path: Path,
    workers: int,
    run_job: Callable[[Any], dict[str, Any]] = _small_result,
    make_job: Callable[[str], Any] = str,
) -> tuple[OnlineDetector, RunFolder, Supervisor]:
    folder = RunFolder(tmp_path / "run")
    folder.prepare()
    supervisor = Supervisor()
    detector = OnlineDetector(
        folder,
        make_job,
        RunLog(folder.ledger),
        supervisor,
        workers=workers,
        run_job=run_job,  # type: ignore[arg-type]
    )
    return detector, folder, supervisor


def test_a_worker_writes_the_detection_file_the_ledger_records(
    tmp_path: Path,
) -> None:
    detector, folder, supervisor = _detector(tmp_path, workers=1)
    detector.add_backlog(["f1", "f2"])
    assert detector.close()["detected"] == 2 and supervisor.error is None
    records = [r for r in folder.ledger.read() if isinstance(r, Detected)]
    assert sorted(r.field for r in records) == ["f1", "f2"]
    for r in records:
        data = folder.detection_path(r.field).read_bytes()
        result = json.loads(data)
        assert result["field"] == r.field and result["pid"] != os.getpid()
        assert data == encode_result(result)  # strict, compact JSON
        assert r.sha256 == hashlib.sha256(data).hexdigest()
        assert (r.counts, r.seconds, r.source) == (result["counts"], 0.25, "10:20")


def test_a_result_a_worker_cannot_write_stops_the_run_not_the_field(
    tmp_path: Path,
) -> None:
    # the disk's error is the run's: no field is recorded as failed
    detector, folder, supervisor = _detector(tmp_path, workers=1)
    folder.detections_dir.rmdir()
    folder.detections_dir.write_text("not a folder")
    detector.add_backlog(["f1", "f2"])
    detector.close()
    error = supervisor.error
    assert isinstance(error, ResultWriteError), error
    assert "f1" in str(error) or "f2" in str(error)
    events = [r.event for r in folder.ledger.read()]
    assert "detected" not in events and "detect_failed" not in events


def test_a_result_written_twice_at_once_leaves_the_other_writer_alone(
    tmp_path: Path,
) -> None:
    # a Dask worker that outlived its scheduler may be mid-way through the
    # result a resumed run writes: each writes through a temporary of its own
    folder = RunFolder(tmp_path / "run")
    folder.prepare()
    path = folder.detection_path("f1")
    others = [
        path.with_name(path.name + ".tmp"),  # the name every writer once shared
        path.with_name(path.name + ".5eed5eed.tmp"),
    ]
    for other in others:
        other.write_bytes(b'{"half": ')
    record = _small_result("f1")
    stored = store_result(folder.root, "f1", record)
    assert path.read_bytes() == encode_result(record)
    assert stored.sha256 == hashlib.sha256(encode_result(record)).hexdigest()
    assert all(o.read_bytes() == b'{"half": ' for o in others)
    assert sorted(p.name for p in folder.detections_dir.iterdir()) == sorted(
        [path.name] + [o.name for o in others]
    )


def test_a_result_that_cannot_be_written_leaves_no_temporary(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    folder.prepare()
    folder.detection_path("f1").mkdir()  # the rename into place fails
    for _ in range(3):
        with pytest.raises(ResultWriteError, match="Is a directory"):
            store_result(folder.root, "f1", _small_result("f1"))
    assert [p.name for p in folder.detections_dir.iterdir()] == ["f1.json"]


# ------------------------------------------------------------- the page cache


def _resident_pages(path: Path) -> int:
    """How many of `path`'s pages are in the page cache (``mincore(2)``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        start = ctypes.c_char.from_buffer(m)
        try:
            rc = libc.mincore(
                ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), vec
            )
        finally:
            del start
            m.close()
    assert rc == 0, os.strerror(ctypes.get_errno())
    return sum(v & 1 for v in vec)


@pytest.mark.skipif(
    not hasattr(os, "posix_fadvise") or not sys.platform.startswith("linux"),
    reason="page-cache advice and mincore(2) are Linux's",
)
def test_a_field_leaves_the_page_cache_once_detected_or_failed(
    tmp_path: Path,
) -> None:
    # a scan writes 2 GB of fields a cartridge and reads each back once: the
    # detector lets the system drop a field's pages after its last reading,
    # whether its detection succeeded or failed
    # ...and an analysis of stored fields, whose folder is not theirs: the
    # file its job read ("stored", in another run's folder) leaves
    stored = tmp_path / "other-run" / "fields" / "stored.ome.tif"
    stored.parent.mkdir(parents=True)

    def make_job(name: str) -> FieldJob:
        path = stored if name == "stored" else folder.field_path(name)
        return FieldJob(path=str(path), name=name, out_dir=str(folder.root))

    def run_job(job: FieldJob) -> dict[str, Any]:
        data = Path(job.path).read_bytes()
        if job.name == "bad":
            raise ValueError("not a field")
        return {"field": job.name, "counts": {"CTC": 0}, "bytes": len(data)}

    detector, folder, supervisor = _detector(
        tmp_path, workers=0, run_job=run_job, make_job=make_job
    )
    files = {n: folder.field_path(n) for n in ("ok", "bad")} | {"stored": stored}
    for path in files.values():
        write_durably(path, os.urandom(256 * 1024))
        assert _resident_pages(path) > 0  # written, cached
    detector.add_backlog(list(files))
    stats = detector.close()
    assert (stats["detected"], stats["failed"]) == (2, 1)
    assert supervisor.error is None
    for name, path in files.items():
        assert _resident_pages(path) == 0, name
        assert path.stat().st_size == 256 * 1024  # untouched


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX's")
def test_forgetting_a_file_replaced_by_a_pipe_or_gone_does_not_wait(
    tmp_path: Path,
) -> None:
    # a field's name taken by a named pipe (nothing writes to it) or removed:
    # the advice is skipped, the dispatcher's thread is not held
    pipe, gone = tmp_path / "field_001.ome.tif", tmp_path / "field_002.ome.tif"
    os.mkfifo(pipe)
    done = threading.Event()

    def forget() -> None:
        forget_cached(pipe)
        forget_cached(gone)
        done.set()

    threading.Thread(target=forget, daemon=True).start()
    assert done.wait(10)

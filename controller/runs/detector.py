"""On-line detection: every stored field is analysed while the scan goes on.

`OnlineDetector.offer(name)` is called once a field is durably stored; it only
appends the name to a backlog and returns. A dispatcher thread keeps at most
`2 x workers` fields in flight in a worker process (the second core), each worker
reading the field back from its stored file (from the page cache, cheaper than
copying 11 MB between processes); once a field's result is in, its file's pages
may leave the page cache (`forget_cached`). So detection may lag but never blocks
acquisition, never drops a field, and holds no pixels in the scanning process.

Each field's result depends on that field's file and the assay alone, never on
which fields came before it, how many workers ran or whether the run was
interrupted: bleed-through a field is too sparse to measure comes from the
assay's configured calibration (`DetectionSettings.spillover`), not from other
fields.

A worker imports what detection needs and nothing of the scanning process's
main script (`_WorkerContext`): started the usual way, a spawned process first
runs its parent's ``__main__`` (the ``ctcscan`` script: the command line, the
queue, pymmcore-plus, the web station's imports), 21-26 MB of its peak RSS.

Each result is written durably as ``detections/<field>.json`` by the worker
that computed it (`controller.runstore.results`: only its hash and counts come
back) and then recorded with a ``detected`` ledger line; a field whose
analysis fails gets a ``detect_failed`` line with the reason. A worker
process that dies is replaced and its fields retried (twice at most).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import multiprocessing
import multiprocessing.context
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import (
    FIRST_COMPLETED,
    CancelledError,
    Future,
    ProcessPoolExecutor,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from analysis.fieldio import FieldReadError
from analysis.pipeline import FieldJob, analyze_field_file
from analysis.psf import prepare as prepare_blur_model
from controller.events import RecordSink
from controller.heap import keep_freed_blocks
from controller.records import Detected, DetectFailed, Record, Stored
from controller.runstore.durable import forget_cached
from controller.runstore.folder import RunFolder
from controller.runstore.results import (
    ResultWriteError,
    StoredResult,
    analyze_and_store,
)
from controller.supervise import Supervisor

__all__ = ["DetectionWriter", "OnlineDetector", "WorkerPool", "failure_reason"]

logger = logging.getLogger("ctcscan.detector")

#: How many times a field is retried after its worker process died.
_MAX_CRASHES = 2


_LIMITS: Any = None

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}

#: how often a worker checks that the process that started it is still there
PARENT_CHECK_S = 0.5


def prepare_worker() -> None:
    """What a process that analyses fields does once, before its first field
    (a local pool's worker, a Dask worker): the rest of its fields run faster.

    * One BLAS/OpenMP thread per worker process: there is one worker per core
      already; a multi-threaded BLAS then spends more on waking threads than on
      the small matrix products of the background estimate (measured: 15 ms
      instead of 0.7 ms per product, detection 247 ms instead of 149 ms on a
      crowded field).
    * Freed full-frame arrays stay in the heap for the next field
      (`controller.heap.keep_freed_blocks`: 2 ms of page faults a field instead
      of 11-13 ms, the same peak RSS).
    * The blur model's tables (`analysis.psf`, 0.15-0.25 s once per process).
    """
    global _LIMITS
    if _LIMITS is not None:
        return
    from threadpoolctl import threadpool_limits

    keep_freed_blocks()
    _LIMITS = threadpool_limits(limits=1)
    prepare_blur_model()


def _worker_start(parent: int) -> None:
    """Worker start-up.

    * Ctrl-C, SIGTERM and SIGHUP sent to the whole process group are the
      scanning process's to handle (it stops after the current frame and then
      closes the pool); a worker ignores them instead of dying with a traceback.
    * A worker whose parent is gone (``kill -9``) exits by itself, so no worker
      and no multiprocessing resource tracker outlives the run.
    * `prepare_worker`, now: while the scan measures its focus map, not on
      the first field.
    """
    prepare_worker()
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="ctcscan-parent-watch", daemon=True).start()


#: taken while a worker starts with the parent's main module hidden
_MAIN_HIDDEN = threading.Lock()


@contextlib.contextmanager
def _parent_main_hidden() -> Iterator[None]:
    """While a process starts: the parent's ``__main__`` names no file or module.

    `multiprocessing` tells a spawned child to run its parent's main script (or
    import its main module) so that functions defined there can be unpickled;
    it reads ``__main__.__spec__`` and ``__main__.__file__`` when the process
    starts. A detection worker needs no function of the main script (see
    `_needs_main`), only the analysis, so for the start they are hidden, under
    a lock (two starts at once restore what was there), and put back.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    with _MAIN_HIDDEN:
        spec, has_file = main.__spec__, "__file__" in main.__dict__
        path = main.__file__ if has_file else None
        main.__spec__ = None
        if has_file:
            del main.__file__
        try:
            yield
        finally:
            main.__spec__ = spec
            if has_file:
                main.__file__ = path


class _WorkerProcess(multiprocessing.context.SpawnProcess):
    """A spawned worker that does not run its parent's main script."""

    def start(self) -> None:
        with _parent_main_hidden():
            super().start()


class _WorkerContext(multiprocessing.context.SpawnContext):
    """Spawn, without the parent's main script in the worker (`_WorkerProcess`)."""

    Process = _WorkerProcess


def _spawn_context(
    run_job: Callable[..., Any],
) -> multiprocessing.context.SpawnContext:
    """How workers for `run_job` start: without the main script, unless
    `run_job` lives there."""
    if _needs_main(run_job):
        return multiprocessing.get_context("spawn")
    return _WorkerContext()


def _needs_main(fn: Callable[..., Any]) -> bool:
    """Whether a worker must import the parent's main module to unpickle `fn`
    (a function defined in the script that was run, as benchmarks do)."""
    try:
        return b"__main__" in pickle.dumps(fn)
    except Exception:  # not picklable here: the pool will say so, as before
        return True


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Ignore the terminal's stop signals for the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            # None: a handler installed outside Python; the default is the
            # closest Python can restore
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


class WorkerPool:
    """Detection worker processes, started now, that may serve one detector
    after another (`run_local`: the cartridges of an analysis share one pool,
    so none pays the workers' start-up again).

    A worker that dies breaks its executor: `broken` replaces it once, for
    whichever detector saw it first; later submissions go to the new one.
    """

    def __init__(
        self,
        workers: int,
        run_job: Callable[[FieldJob], Mapping[str, Any]] = analyze_field_file,
    ) -> None:
        self.workers = workers
        self._context = _spawn_context(run_job)
        self._lock = threading.Lock()
        self._closed = False
        self._executor: ProcessPoolExecutor | None = self._start()

    def submit(
        self, fn: Callable[[FieldJob], Any], job: FieldJob
    ) -> tuple[Future, ProcessPoolExecutor]:
        """`fn(job)` on a worker; the future and the executor it went to."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the detection workers were stopped")
            if self._executor is None:
                self._executor = self._new()
            try:
                return self._executor.submit(fn, job), self._executor
            except BrokenProcessPool:  # a worker died since the last result
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = self._new()
                return self._executor.submit(fn, job), self._executor

    def broken(self, executor: ProcessPoolExecutor) -> None:
        """A job of `executor` lost its worker: shut it down, unless it was
        already replaced (the next submission starts a new one)."""
        with self._lock:
            if executor is self._executor:
                executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None

    def close(self, *, wait: bool = True) -> None:
        """Stop the workers (after the jobs they have); with ``wait=False``
        return at once and let them exit in the background (0.1-0.3 s of a
        process with the analysis loaded), when no job of theirs is pending."""
        with self._lock:
            executor, self._executor = self._executor, None
            self._closed = True
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)

    def _new(self) -> ProcessPoolExecutor:
        # spawn: the scanning process has threads and a C++ core; fork would
        # copy them half-alive into the worker
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=self._context,
            initializer=_worker_start,
            initargs=(os.getpid(),),
        )

    def _start(self) -> ProcessPoolExecutor:
        """The executor, its processes started now with the terminal's
        signals ignored.

        Ctrl-C (and SIGTERM, SIGHUP) to the process group reach every process.
        An ignored signal stays ignored across exec, and a Python started so
        never installs its KeyboardInterrupt handler; a worker that is still
        importing therefore cannot die of a Ctrl-C with a traceback (measured:
        a 39-line traceback before). Signal dispositions can be changed on the
        main thread only; elsewhere the workers ignore them from their
        initializer on.
        """
        with _signals_ignored():
            pool = self._new()
            for _ in range(self.workers):  # one start-up per worker, now
                pool.submit(os.getpid)
        return pool


class OnlineDetector:
    """Bounded, non-blocking detection of stored fields.

    Parameters
    ----------
    folder : RunFolder
        Run folder: field files are read from it, results written into it.
    make_job : callable
        ``make_job(name) -> FieldJob`` for a stored field.
    sink : RecordSink
        Receives a `Detected` or `DetectFailed` record for every field.
    supervisor : Supervisor
        The run's supervisor: the dispatcher thread runs under it, so an error
        that is not one field's (the results cannot be written) stops the run.
    workers : int
        Worker processes; 0 runs detection on a thread of this process.
    run_job : callable
        The analysis (default `analyze_field_file`); must be picklable when
        `workers` > 0.

    Subscribe `on_record` to the run's events to detect every `Stored` field.
    """

    def __init__(
        self,
        folder: RunFolder,
        make_job: Callable[[str], FieldJob],
        sink: RecordSink,
        supervisor: Supervisor,
        *,
        workers: int = 1,
        run_job: Callable[[FieldJob], Mapping[str, Any]] = analyze_field_file,
        pool: WorkerPool | None = None,
    ) -> None:
        self.folder = folder
        self.make_job = make_job
        self.sink = sink
        self.workers = pool.workers if pool is not None else workers
        self.run_job = run_job
        self.writer = DetectionWriter(folder, sink)
        self.max_in_flight = max(1, 2 * self.workers)
        self.stats = {
            "offered": 0,
            "detected": 0,
            "failed": 0,
            "restarts": 0,
            "max_backlog": 0,
        }
        self._backlog: collections.deque[str] = collections.deque()
        self._crashes: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        #: notified (under `_lock`) when the backlog empties or the dispatcher ends
        self._dispatched = threading.Condition(self._lock)
        self._ended = False  # the dispatcher's loop is over, however it ended
        self._wake = threading.Event()
        self._closing = threading.Event()
        #: the workers: a pool of this detector's own, closed with it, or one
        #: that outlives it (`WorkerPool`, given)
        self._own_pool = pool is None and self.workers > 0
        self._pool = WorkerPool(self.workers, run_job) if self._own_pool else pool
        #: the executor each job went to: a broken one is replaced once
        self._pool_of: dict[Future, ProcessPoolExecutor] = {}
        #: the file each field's job reads (the run's own field, or one of
        #: another run folder when this folder is an analysis's)
        self._source: dict[str, Path] = {}
        self._thread = supervisor.spawn("ctcscan-detect", self._run)

    def on_record(self, record: Record) -> None:
        """Event subscriber: a stored field is offered for detection."""
        if isinstance(record, Stored):
            self.offer(record.field)

    # ------------------------------------------------------------------ public

    def offer(self, name: str) -> None:
        """A field was stored: queue it for detection (never blocks)."""
        with self._lock:
            self._backlog.append(name)
            self.stats["offered"] += 1
            self.stats["max_backlog"] = max(
                self.stats["max_backlog"], len(self._backlog)
            )
        self._wake.set()

    def add_backlog(self, names: Iterable[str]) -> None:
        """Fields stored earlier (a resumed run) that still need detection."""
        for name in names:
            self.offer(name)

    def wait_dispatched(self) -> None:
        """Wait until every field offered so far has gone to a worker (or the
        detector stopped): what is offered to another detector on the same
        `WorkerPool` after this comes after these fields."""
        with self._dispatched:
            self._dispatched.wait_for(lambda: not self._backlog or self._ended)

    @property
    def closed(self) -> bool:
        """`close` was called."""
        return self._closing.is_set()

    def close(self, *, drain: bool = True) -> dict[str, int]:
        """Detect everything offered (or, with ``drain=False``, only what is
        in flight: a stopping run leaves the rest to its resume), then stop
        the workers; return the stats."""
        if not drain:
            with self._lock:
                self._backlog.clear()
                self._dispatched.notify_all()
        self._closing.set()
        self._wake.set()
        self._thread.join()
        return dict(self.stats)

    # ------------------------------------------------------------------ worker

    def _submit(self, name: str) -> Future:
        job = self.make_job(name)
        if isinstance(job, FieldJob):
            self._source[name] = Path(job.path)
        # the worker writes the result itself; only its summary comes back
        task = functools.partial(
            analyze_and_store, self.run_job, str(self.folder.root), name
        )
        if self.workers == 0:
            fut: Future = Future()
            try:
                fut.set_result(task(job))
            except Exception as e:  # reported through the future, like a worker
                fut.set_exception(e)
            return fut
        assert self._pool is not None
        fut, executor = self._pool.submit(task, job)
        self._pool_of[fut] = executor
        return fut

    def _run(self) -> None:
        in_flight: dict[Future, str] = {}
        try:
            while True:
                start: list[str] = []
                with self._lock:  # only take names here: offer() must never wait
                    while self._backlog and len(in_flight) + len(start) < (
                        self.max_in_flight
                    ):
                        start.append(self._backlog.popleft())
                    if start and not self._backlog:
                        self._dispatched.notify_all()
                    idle = not self._backlog and not in_flight and not start
                for name in start:
                    try:
                        in_flight[self._submit(name)] = name
                    except Exception as e:  # the dispatcher must not die
                        self._failed(name, f"could not start detection: {e}")
                if idle:
                    if self._closing.is_set():
                        return
                    self._wake.wait(0.2)
                    self._wake.clear()
                    continue
                done, _ = wait(
                    list(in_flight), timeout=0.2, return_when=FIRST_COMPLETED
                )
                for fut in done:
                    self._finish(in_flight.pop(fut), fut)
        finally:
            try:
                if self._own_pool and self._pool is not None:
                    # every result is in: the run need not wait for the exit
                    self._pool.close(wait=bool(in_flight))
            finally:
                with self._lock:  # nothing more is dispatched: no one waits
                    self._ended = True
                    self._dispatched.notify_all()

    def _finish(self, name: str, fut: Future) -> None:
        pool = self._pool_of.pop(fut, None)
        try:
            stored = fut.result()
        except ResultWriteError:
            # the run's disk, not the field: the dispatcher dies with it and
            # the supervisor stops the run
            raise
        except (BrokenProcessPool, CancelledError) as e:
            # a job of a pool that broke under another field was canceled
            # with it: try again, it is not this field's crash
            if isinstance(e, BrokenProcessPool):
                self._crashes[name] += 1
                self.stats["restarts"] += 1
                if pool is not None and self._pool is not None:
                    self._pool.broken(pool)
            if self._crashes[name] <= _MAX_CRASHES:
                logger.warning("detection worker died on %s; retrying", name)
                with self._lock:
                    self._backlog.appendleft(name)
                return
            self._failed(name, "the detection worker died on this field")
            return
        except Exception as e:  # a bad file or an analysis bug: record, go on
            self._failed(name, failure_reason(e))
            return
        # an error here is the run's, not the field's: the dispatcher dies
        # with it and the supervisor stops the run
        self.writer.recorded(name, stored)
        self.stats["detected"] += 1
        self._done_with(name)

    def _failed(self, name: str, reason: str) -> None:
        self.stats["failed"] += 1
        self.writer.failed(name, reason)
        self._done_with(name)

    def _done_with(self, name: str) -> None:
        """The file field `name`'s job read has been read for the last time in
        this run: its pages may leave the page cache (`forget_cached`)."""
        source = self._source.pop(name, None)
        if source is not None:
            forget_cached(source)


def failure_reason(e: BaseException) -> str:
    """Why a field's analysis failed, in one line: a bad file's message names
    the file; anything else is named by its type."""
    if isinstance(e, FieldReadError):
        return str(e)
    return f"{type(e).__name__}: {e}"


class DetectionWriter:
    """Where a field's detection result goes: ``detections/<field>.json``
    written durably (strict JSON, `controller.runstore.results`, by the
    process that computed it), then a `Detected` record with its sha256 and
    the stamp of the field file it came from; or a `DetectFailed` record.
    Shared by the on-line detector and the analysis of stored fields, local
    or on a cluster."""

    def __init__(self, folder: RunFolder, sink: RecordSink) -> None:
        self.folder = folder
        self.sink = sink

    def recorded(self, name: str, stored: StoredResult) -> None:
        """Field `name`'s result is durable (written by a worker): record it."""
        self.sink.emit(
            Detected(
                field=name,
                counts=stored.counts,
                seconds=stored.seconds,
                sha256=stored.sha256,
                source=stored.source,
            )
        )

    def failed(self, name: str, reason: str) -> None:
        logger.error("detection failed on %s: %s", name, reason)
        self.sink.emit(DetectFailed(field=name, reason=reason))

"""Where the fields of an analysis are analysed: a local process pool, or Dask.

Both runners take the cartridges to analyse (a `Cartridge`: its output folder,
its record sink, the fields still pending), a job maker and a `finished`
callback. They deliver every field's result through the cartridge's
`DetectionWriter` as it arrives, so whatever finished is durable if the rest
never does, and call ``finished(cartridge)`` as soon as a cartridge's last
field is in: its outputs are written while the other cartridges' fields are
still being analysed.

- `run_local`: the on-line detector (`OnlineDetector`) per cartridge, all on
  one `WorkerPool` started once; a cartridge's fields are queued as soon as
  the previous one's are: bounded in-flight fields, a dead worker replaced
  and its field retried.
- `run_dask`: one task per field over all cartridges on a Dask cluster (an
  existing scheduler, or a `LocalCluster`), the workers reading the field files
  themselves: no pixels pass through the scheduler. A worker that dies has its
  fields rescheduled by Dask; a field whose task keeps killing workers fails
  with that reason. A scheduler that cannot be reached, or is lost for
  `LOST_AFTER_S`, is a `ClusterError`; the same command then resumes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any, Protocol, TypeVar

from analysis.pipeline import FieldJob, analyze_field_file
from controller.errors import ClusterError, StorageError
from controller.heap import ARENA_MAX
from controller.runs.detector import (
    DetectionWriter,
    OnlineDetector,
    WorkerPool,
    _parent_main_hidden,
    failure_reason,
    prepare_worker,
)
from controller.runstore.durable import forget_cached
from controller.runstore.folder import RunFolder
from controller.runstore.ledger import RunLog
from controller.runstore.results import (
    ResultWriteError,
    StoredResult,
    analyze_and_store,
)
from controller.supervise import Supervisor

__all__ = [
    "LOST_AFTER_S",
    "analyze_one_thread",
    "dask_client",
    "run_dask",
    "run_local",
]

logger = logging.getLogger("ctcscan.runners")


class Cartridge(Protocol):
    """What a runner needs of one cartridge's analysis."""

    @property
    def out(self) -> RunFolder: ...

    @property
    def log(self) -> RunLog | None: ...

    @property
    def pending(self) -> list[str]: ...


JobMaker = Callable[[Any], Callable[[str], FieldJob]]
C = TypeVar("C", bound=Cartridge)
#: called with a cartridge once its last pending field has a result
Finished = Callable[[C], None]

#: how long the scheduler may be unreachable before the analysis gives up
LOST_AFTER_S = 20.0
#: how long connecting to a scheduler may take
CONNECT_TIMEOUT_S = 10.0
#: how long a reachable scheduler may take to have a worker: a cluster's
#: workers may still be starting (a batch queue's jobs, a loaded machine)
WORKERS_WAIT_S = 60.0


def run_local(
    carts: Sequence[C], job_maker: JobMaker, workers: int, finished: Finished[C]
) -> None:
    """Analyse the cartridges' pending fields in local worker processes.

    One pool of workers serves every cartridge (started once). A cartridge's
    fields go to it as soon as all the previous cartridge's have, so the
    workers go on with them while that one's last fields finish and its
    outputs are written; the cartridges finish in order.
    """
    pool = WorkerPool(workers) if workers > 0 else None
    running: list[tuple[C, OnlineDetector, Supervisor]] = []
    try:
        for cart in carts:
            assert cart.log is not None
            supervisor = Supervisor()
            detector = OnlineDetector(
                cart.out,
                job_maker(cart),
                cart.log,
                supervisor,
                workers=workers,
                pool=pool,
            )
            detector.add_backlog(cart.pending)
            running.append((cart, detector, supervisor))
            if len(running) > 1:
                _finish_local(*running.pop(0), finished)
            detector.wait_dispatched()  # the next cartridge's fields after these
        while running:
            _finish_local(*running.pop(0), finished)
    finally:
        for _, detector, _ in running:  # an error: stop those still running
            detector.close(drain=False)
        if pool is not None:
            pool.close()


def _finish_local(
    cart: C, detector: OnlineDetector, supervisor: Supervisor, finished: Finished[C]
) -> None:
    detector.close()
    supervisor.raise_error()
    finished(cart)


def analyze_one_thread(job: FieldJob) -> StoredResult:
    """A Dask task: one field, its result written by the worker into the
    job's output folder (`analyze_and_store`: only its hash and counts go
    back through the scheduler), in a worker process that has done the local
    pool's worker start-up (`prepare_worker`: one BLAS thread, freed frames
    kept in the heap, the blur model's tables) from its first field on. The
    field's pages may then leave the page cache (`forget_cached`), as the
    local pool's are."""
    prepare_worker()
    try:
        return analyze_and_store(analyze_field_file, job.out_dir, job.name, job)
    finally:  # its last reading in this analysis: the pages may go
        forget_cached(Path(job.path))


@contextlib.contextmanager
def dask_client(scheduler: str, workers: int) -> Iterator[Any]:
    """A client of the Dask cluster (with at least one worker), closed after.

    Parameters
    ----------
    scheduler : str
        ``tcp://HOST:PORT`` of a running scheduler, or ``local`` for a
        `distributed.LocalCluster` of `workers` single-threaded processes.

    Raises
    ------
    ClusterError
        The scheduler cannot be reached, or has no workers.
    """
    client, cluster = _connect(scheduler, workers)
    try:
        yield client
    finally:
        for thing in (client, cluster):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # a lost scheduler: nothing left to close
                    logger.debug("closing %s failed", thing, exc_info=True)


def run_dask(
    client: Any,
    carts: Sequence[C],
    job_maker: JobMaker,
    where: str,
    finished: Finished[C],
) -> None:
    """Analyse the cartridges' pending fields on the cluster of `client`
    (`dask_client`); `where` names it in errors."""
    _run(client, carts, job_maker, where, finished)


def _connect(scheduler: str, workers: int) -> tuple[Any, Any]:
    from distributed import Client, LocalCluster

    if scheduler == "local":
        import dask

        # the nannies pass this config on to their workers
        with dask.config.set(_local_config()), _parent_main_hidden():
            cluster = LocalCluster(
                n_workers=max(1, workers),
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                # the scheduler's own HTTP routes (health, metrics) start even
                # without a dashboard, on the dashboard's port 8787 by default,
                # with a warning when that is taken: any free loopback port
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                silence_logs=logging.ERROR,
                # no memory limit, as the local pool has none: neither the
                # nanny nor the worker polls the worker's memory every 100 ms
                memory_limit=0,
            )
        return Client(cluster), cluster
    if why := _unreachable(scheduler):  # the client would retry the whole timeout
        raise ClusterError(f"cannot reach the Dask scheduler at {scheduler}: {why}")
    client = _client_within(Client, scheduler)
    try:
        client.wait_for_workers(1, timeout=WORKERS_WAIT_S)
    except (OSError, TimeoutError):
        client.close()
        raise ClusterError(
            f"the Dask scheduler at {scheduler} has no workers (waited "
            f"{WORKERS_WAIT_S:.0f} s); start some with: dask worker {scheduler}"
        ) from None
    return client, None


def _client_within(client_type: Any, scheduler: str) -> Any:
    """``Client(scheduler)``, or a one-line `ClusterError` within about
    `CONNECT_TIMEOUT_S`. Something that is no Dask scheduler can make the
    client hang (an HTTP server such as a dashboard: its timeout does not
    cover the handshake) or fail in any way (it read an HTTP answer as a
    message length: MemoryError), so it is made on a thread of its own,
    left behind (a daemon) if it does not return."""
    box: dict[str, Any] = {}

    def make() -> None:
        try:
            box["client"] = client_type(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
        except BaseException as e:  # anything: said in one line below
            box["error"] = e

    t = threading.Thread(target=make, name="ctcscan-dask-connect", daemon=True)
    t.start()
    t.join(CONNECT_TIMEOUT_S + 5)
    if t.is_alive():
        raise ClusterError(
            f"no answer from a Dask scheduler at {scheduler} within "
            f"{CONNECT_TIMEOUT_S + 5:.0f} s: is it a scheduler's address (often "
            "port 8786; 8787 is its dashboard)?"
        )
    if "error" in box:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {scheduler}: {_one_line(box['error'])}"
        )
    return box["client"]


#: how long the probe of `_unreachable` waits for an answer
_PROBE_TIMEOUT_S = 2.0


def _unreachable(scheduler: str) -> str | None:
    """Why a ``tcp://`` scheduler cannot be reached, when that is plain at
    once: its host name does not resolve, or the host refuses connections to
    its port (nothing listens there). Anything else (no answer, another
    protocol) is left to the client and its timeout: None."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(scheduler)
        if scheme != "tcp":
            return None
        host, port = parse_host_port(location)
        socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
    except socket.gaierror:
        return f"unknown host {host!r}"
    except ConnectionRefusedError:
        return "connection refused (is a scheduler running there?)"
    except (OSError, ValueError):
        return None
    return None


#: the heap's trim threshold of an analysing process (`keep_freed_blocks`)
_TRIM_THRESHOLD = 256 * 2**20


def _local_config() -> dict[str, Any]:
    """The Dask settings of a `LocalCluster` on this machine: its scheduler,
    nannies and the client share the process of the command, and its
    workers share the cores with them.

    * The workers' statistical profiler samples every thread every 10 ms:
      CPU a field's analysis needs on a small machine. Off.
    * Each process's system monitor (CPU, memory, disk and network counters
      for the dashboard, which a local analysis does not start) every 2 s
      instead of every 0.5 s, without the disk counters.
    * The workers' heap as a local pool worker's (`controller.heap`): one
      malloc arena (the field runs on a worker thread, whose own arena gave
      back its pages after every field: 1,000-3,000 page faults a field more
      than the local pool's workers) and the freed blocks kept for the next
      field. Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_`` to 64 kB in the
      worker's environment, which `keep_freed_blocks` leaves alone as if the
      operator had set it: it is set here to the threshold that call sets.
      Values the operator put in the environment are kept.
    """
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    for name, value in (
        ("MALLOC_ARENA_MAX", ARENA_MAX),
        ("MALLOC_TRIM_THRESHOLD_", _TRIM_THRESHOLD),
    ):
        if name not in os.environ:
            environ[name] = value
    return {
        "distributed.worker.profile.enabled": False,
        "distributed.admin.system-monitor.interval": "2s",
        "distributed.admin.system-monitor.disk": False,
        "distributed.nanny.pre-spawn-environ": environ,
    }


def _run(
    client: Any,
    carts: Sequence[C],
    job_maker: JobMaker,
    where: str,
    finished: Finished[C],
) -> None:
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    owner: dict[str, tuple[int, DetectionWriter, str]] = {}
    left = [len(cart.pending) for cart in carts]
    jobs: list[FieldJob] = []
    for i, cart in enumerate(carts):
        assert cart.log is not None
        writer = DetectionWriter(cart.out, cart.log)
        make_job = job_maker(cart)
        for name in cart.pending:
            owner[f"ctcscan-{token}-{i}-{name}"] = (i, writer, name)
            jobs.append(make_job(name))
    # one message to the scheduler for all the tasks, not one per field
    futures = client.map(analyze_one_thread, jobs, key=list(owner), pure=False)
    pending = as_completed(futures)
    del futures, jobs
    lost_since: float | None = None
    while not pending.is_empty():
        batch = pending.next_batch(block=False)
        # the finished fields' summaries in one round trip, not one a field
        finished_now = [fut for fut in batch if fut.status == "finished"]
        stored = dict(
            zip(
                [fut.key for fut in finished_now],
                _gather(client, finished_now, where),
                strict=True,
            )
        )
        for fut in batch:
            status = fut.status  # read once: it changes under us
            if (
                fut.key not in stored
                and status in ("lost", "pending", "finished")
                and client.status == "running"
            ):
                # its result went with a worker that died after computing it
                # (the scheduler computes it again), or came back while the
                # others were gathered: it comes back here then
                pending.add(fut)
                continue
            i, writer, name = owner.pop(fut.key)
            if fut.key in stored:
                writer.recorded(name, stored[fut.key])
            elif status == "error":
                error = fut.exception()
                if isinstance(error, ResultWriteError):
                    # the output folder's disk, no field's fault: one line
                    raise StorageError(
                        f"{error}; every field finished so far is kept: run "
                        "the same command again to resume"
                    ) from None
                writer.failed(name, failure_reason(error))
            else:  # cancelled or lost with the scheduler: resume does it
                raise ClusterError(
                    f"lost the Dask scheduler at {where} (the task of {name} was "
                    f"{status}); every field finished so far is kept: run the "
                    "same command again to resume"
                )
            fut.release()
            left[i] -= 1
            if left[i] == 0:
                finished(carts[i])
        if batch:
            continue
        if client.status == "running":
            lost_since = None
        else:
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > LOST_AFTER_S:
                raise ClusterError(
                    f"lost the Dask scheduler at {where} ({client.status}); "
                    "every field finished so far is kept: run the same "
                    "command again to resume"
                )
        time.sleep(0.05)


def _gather(client: Any, futures: list[Any], where: str) -> list[StoredResult]:
    if not futures:
        return []
    try:
        return list(client.gather(futures))
    except (OSError, TimeoutError, CancelledError) as e:
        raise ClusterError(
            f"lost the Dask scheduler at {where} ({_one_line(e)}); every field "
            "finished so far is kept: run the same command again to resume"
        ) from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__

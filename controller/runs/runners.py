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
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from analysis.pipeline import FieldJob, analyze_field_file
from controller.errors import ClusterError
from controller.runs.detector import (
    DetectionWriter,
    OnlineDetector,
    WorkerPool,
    failure_reason,
    prepare_worker,
)
from controller.runstore.folder import RunFolder
from controller.runstore.ledger import RunLog
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


def analyze_one_thread(job: FieldJob) -> Mapping[str, Any]:
    """A Dask task: one field, in a worker process that has done the local
    pool's worker start-up (`prepare_worker`: one BLAS thread, freed frames
    kept in the heap, the blur model's tables) from its first field on."""
    prepare_worker()
    return analyze_field_file(job)


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

        # the workers' statistical profiler samples every thread every 10 ms:
        # CPU a field's analysis needs on a small machine (the nannies pass
        # this config on to their workers)
        with dask.config.set({"distributed.worker.profile.enabled": False}):
            cluster = LocalCluster(
                n_workers=max(1, workers),
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
        return Client(cluster), cluster
    try:
        client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
    except (OSError, TimeoutError, ValueError) as e:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {scheduler}: {_one_line(e)}"
        ) from None
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError):
        client.close()
        raise ClusterError(
            f"the Dask scheduler at {scheduler} has no workers (waited "
            f"{CONNECT_TIMEOUT_S:.0f} s); start some with: dask worker {scheduler}"
        ) from None
    return client, None


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
    futures = []
    for i, cart in enumerate(carts):
        assert cart.log is not None
        writer = DetectionWriter(cart.out, cart.log)
        make_job = job_maker(cart)
        for name in cart.pending:
            key = f"ctcscan-{token}-{i}-{name}"
            futures.append(
                client.submit(analyze_one_thread, make_job(name), key=key, pure=False)
            )
            owner[key] = (i, writer, name)
    pending = as_completed(futures)
    del futures
    lost_since: float | None = None
    while not pending.is_empty():
        batch = pending.next_batch(block=False)
        for fut in batch:
            i, writer, name = owner.pop(fut.key)
            if fut.status == "finished":
                writer.done(name, fut.result())
            elif fut.status == "error":
                writer.failed(name, failure_reason(fut.exception()))
            else:  # cancelled or lost with the scheduler: resume does it
                raise ClusterError(
                    f"lost the Dask scheduler at {where} (the task of {name} was "
                    f"{fut.status}); every field finished so far is kept: run the "
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


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__

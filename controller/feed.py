"""The seam between acquisition and on-line analysis.

`DetectorFeed` receives every stored field. `offer` never blocks: the field goes
into a small bounded queue, or, when the analyser is behind, only its name is kept
and the worker later reads it back from its stored file. So analysis may lag but
never stalls acquisition, never drops a field, and holds at most `maxsize` fields
in memory. Each result is written to the ledger as an ``analyzed`` line.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from controller.assembler import AssembledField
from controller.store import RunFolder, read_field

__all__ = ["DetectorFeed", "FieldAnalyzer"]

logger = logging.getLogger("ctcscan.feed")


class FieldAnalyzer(Protocol):
    """What the feed calls for each field: pixels (C, Y, X) -> a JSON-able summary."""

    def __call__(
        self, data: np.ndarray, channel_names: Sequence[str], pixel_size_um: float
    ) -> Mapping[str, Any]: ...


class DetectorFeed:
    """Bounded, non-blocking feed of stored fields to a `FieldAnalyzer`.

    Parameters
    ----------
    folder : RunFolder
        Where stored fields are read back from, and whose ledger gets results.
    analyzer : FieldAnalyzer
        The on-line analysis.
    pixel_size_um : float
        Passed to the analyser.
    maxsize : int
        Fields held in memory at most.
    on_result : callable, optional
        ``on_result(name, result)`` after each field (for progress displays).
    """

    def __init__(
        self,
        folder: RunFolder,
        analyzer: FieldAnalyzer,
        *,
        pixel_size_um: float,
        maxsize: int = 2,
        on_result: Callable[[str, Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.folder = folder
        self.analyzer = analyzer
        self.pixel_size_um = pixel_size_um
        self.on_result = on_result
        self._q: queue.Queue[AssembledField] = queue.Queue(maxsize=maxsize)
        self._backlog: collections.deque[str] = collections.deque()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self.stats = {
            "offered": 0,
            "in_memory": 0,
            "from_disk": 0,
            "analyzed": 0,
            "errors": 0,
        }
        self._thread = threading.Thread(
            target=self._run, name="ctcscan-detect", daemon=True
        )
        self._thread.start()

    def offer(self, field: AssembledField) -> bool:
        """Hand over a stored field without waiting; False if it went to the backlog."""
        with self._lock:
            self.stats["offered"] += 1
        try:
            self._q.put_nowait(field)
            return True
        except queue.Full:
            with self._lock:
                self._backlog.append(field.spec.name)
            return False

    def add_backlog(self, names: Iterable[str]) -> None:
        """Fields stored earlier (e.g. before a resume) that still need analysis."""
        with self._lock:
            self._backlog.extend(names)

    def close(self) -> None:
        """Finish every queued and backlogged field, then stop."""
        self._closing.set()
        self._thread.join()

    # ------------------------------------------------------------------ worker

    def _next(self) -> tuple[str, np.ndarray, Sequence[str], str] | None:
        try:
            f = self._q.get(timeout=0.05)
            return f.spec.name, f.data, f.channel_names, "memory"
        except queue.Empty:
            pass
        with self._lock:
            name = self._backlog.popleft() if self._backlog else None
        if name is None:
            return None
        data, names, _ = read_field(self.folder.field_path(name))
        return name, data, names, "disk"

    def _run(self) -> None:
        while True:
            try:
                item = self._next()
            except Exception as e:  # unreadable stored file: record, go on
                logger.error("cannot read a stored field back: %s", e)
                self.stats["errors"] += 1
                continue
            if item is None:
                if self._closing.is_set() and self._q.empty():
                    with self._lock:
                        if not self._backlog:
                            return
                continue
            name, data, channel_names, source = item
            try:
                result = dict(self.analyzer(data, channel_names, self.pixel_size_um))
            except Exception as e:  # an analyser bug must not lose the scan
                logger.exception("analysis failed on %s", name)
                self.stats["errors"] += 1
                self.folder.ledger.append(
                    "analysis_failed", field=name, reason=f"{type(e).__name__}: {e}"
                )
                continue
            with self._lock:
                self.stats["analyzed"] += 1
                self.stats["in_memory" if source == "memory" else "from_disk"] += 1
            self.folder.ledger.append("analyzed", field=name, source=source, **result)
            if self.on_result is not None:
                self.on_result(name, result)

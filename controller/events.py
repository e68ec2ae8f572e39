"""The event stream of a run: typed records, one subscriber list.

A run (scan, queue, analysis) publishes every record it writes to its ledger or
journal here, after the line is durable. Progress bars, the audit log and tests
subscribe; nobody passes ``on_*`` callables around. The stream carries the same
`controller.records` objects a viewer reads back from the files, so a live
subscriber and a later reader of ``ledger.jsonl`` see the same thing.

A subscriber that raises is logged and left out of that one event; the others
still receive it (psygnal, which pymmcore-plus uses, would stop at the first
raising slot).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from controller.records import Record

__all__ = ["EventStream", "RecordSink", "Subscriber"]

logger = logging.getLogger("ctcscan.events")

Subscriber = Callable[[Record], None]


class RecordSink(Protocol):
    """Where a part of a run sends its records (a run's `RunLog`: written to
    the ledger, then published)."""

    def emit(self, record: Record) -> Any: ...


class EventStream:
    """Subscribers receive every published record, on the publishing thread."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call `fn(record)` for every record; returns the unsubscribe function."""
        with self._lock:
            self._subscribers.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subscribers:
                    self._subscribers.remove(fn)

        return unsubscribe

    def publish(self, record: Record) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for fn in subscribers:
            try:
                fn(record)
            except Exception:  # one bad observer must not silence the others
                logger.exception("event subscriber %r failed on %s", fn, record.kind)

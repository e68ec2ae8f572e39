"""The ledger: a run's (or a queue's) append-only file of typed records.

Every line is one `controller.records` record, sealed into the file's hash
chain (`controller.runstore.chain`), written whole and fsync'd before `append`
returns. Reading is forgiving where a crash can reach and strict where only a
hand can: a torn line (a crash mid-write) is ignored and the next append starts
on a fresh line; a line that is not a record this code knows is skipped and
counted (`Ledger.skipped`). But a line whose seal does not match (edited,
or a line before it removed or inserted), or a whole line without a seal
among sealed ones (a crash tears a line, it does not write one unsealed), is
no line the program wrote: reading refuses the file (`LedgerTampered`, on
the first problem `check_lines` finds, the one check `ctcscan verify` runs
too), so no resume, queue or sign-off acts on it.

`RunLog` is a run's record sink: the ledger line first, then the run's event
stream, so whatever a subscriber sees is already durable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from controller.errors import StorageError
from controller.events import EventStream
from controller.records import (
    Corrupt,
    Detected,
    DetectFailed,
    Failed,
    Record,
    RecordError,
    Stored,
    dump_line,
    parse_line,
)
from controller.runstore.chain import append_sealed, check_lines

__all__ = ["Ledger", "LedgerState", "LedgerTampered", "RunLog"]

logger = logging.getLogger("ctcscan.ledger")

R = TypeVar("R", bound=Record)


class Ledger:
    """Append-only JSON-lines file of typed records."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.skipped: list[str] = []
        self._lock = threading.Lock()
        self._warned = 0  # skipped lines already reported

    def append(self, record: R) -> R:
        """Write `record` as one sealed line (`controller.runstore.chain`) and
        fsync it; returns it.

        Raises
        ------
        StorageError
            The line could not be written durably.
        """
        body = dump_line(record).rstrip("\n")
        try:
            with self._lock:
                append_sealed(self.path, body)
        except OSError as e:
            raise StorageError(
                f"cannot write to {self.path}: {e.strerror or e}"
            ) from None
        return record

    def read(self) -> list[Record]:
        """Every readable record in order (see the module docstring).

        Raises
        ------
        StorageError
            The file exists but cannot be read; `LedgerTampered`: its seals
            do not hold.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StorageError(f"cannot read {self.path}: {e.strerror or e}") from None
        lines = raw.split(b"\n")
        lines.pop()  # b"" after the last newline, or a torn last line
        records: list[Record] = []
        self.skipped = []
        chain = check_lines(raw)
        # (a torn last line is a crash's, and read as nothing)
        if broken := chain.problems[1:] if chain.cut_short else chain.problems:
            raise LedgerTampered(
                f"{self.path} {broken[0]}; nothing in it is trusted and the "
                "file is left as it is (`ctcscan verify` lists every problem; "
                "restore the file, or start a new folder)"
            )
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(parse_line(line))
            except RecordError as e:
                self.skipped.append(f"line {n}: {e}")
        if len(self.skipped) > self._warned:  # say it once, not at every read
            self._warned = len(self.skipped)
            logger.warning(
                "%s: %d unreadable line(s) skipped (%s)",
                self.path,
                len(self.skipped),
                self.skipped[0],
            )
        return records


class LedgerTampered(StorageError):
    """A ledger holds a line the program did not write as it stands."""


class RunLog:
    """A run's record sink: the ledger line first, then the event stream."""

    def __init__(self, ledger: Ledger, events: EventStream | None = None) -> None:
        self.ledger = ledger
        self.events = events or EventStream()

    def emit(self, record: R) -> R:
        self.ledger.append(record)
        self.events.publish(record)
        return record


@dataclass
class LedgerState:
    """What the ledger says about each field (the last word wins).

    `detected` holds the fields whose detection file belongs to their current
    stored file and whose latest analysis succeeded: a detection file left by
    an earlier try that has since failed is never counted again.
    """

    stored: dict[str, Stored] = field(default_factory=dict)
    failed: dict[str, Failed] = field(default_factory=dict)
    detected: set[str] = field(default_factory=set)

    @classmethod
    def from_records(cls, records: Iterable[Record]) -> LedgerState:
        state = cls()
        for r in records:
            if isinstance(r, Stored):
                state.stored[r.field] = r
                state.failed.pop(r.field, None)
                state.detected.discard(r.field)
            elif isinstance(r, Failed):
                state.failed[r.field] = r
            elif isinstance(r, Corrupt):
                state.stored.pop(r.field, None)
                state.detected.discard(r.field)
            elif isinstance(r, Detected):
                state.detected.add(r.field)
            elif isinstance(r, DetectFailed):  # a later try failed: no result
                state.detected.discard(r.field)
        return state

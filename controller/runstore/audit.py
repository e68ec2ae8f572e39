"""The audit log: an append-only, tamper-evident record of who did what, when.

One ``audit.log`` per run folder (and one per queue folder). Each line is a
JSON object, every field escaped by JSON, sealed into the file's hash chain
(`controller.runstore.chain`):

    {"t":"2026-11-24T23:50:01.123Z","operator":"alice","verb":"START",
     "text":"scan of CS-0001: ctcscan 0.1.0, ...","chain":"<sha256>"}

UTC time, operator (one word), an upper-case verb, free text. Lines are appended
with O_APPEND and fsync'd, never rewritten: the log survives a crash up to its
last line, and the ledger (machine-readable) stays the source of truth for
resume. `ctcscan verify` checks the chain. `read_entries` gives the entries.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller.errors import StorageError
from controller.records import (
    DetectFailed,
    DeviceEvent,
    Failed,
    FocusMapRecorded,
    Record,
)
from controller.runstore.chain import append_sealed

__all__ = [
    "AuditLog",
    "AuditTrail",
    "config_hash",
    "current_operator",
    "read_entries",
]

logger = logging.getLogger("ctcscan.audit")


def current_operator() -> str:
    """The logged-in user, or ``unknown`` when there is none."""
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (some containers)
        return "unknown"


def config_hash(*parts: Any) -> str:
    """sha256 (first 16 hex digits) of the canonical JSON of `parts`, and of
    the bytes of every file path among them."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path) and p.is_file():
            h.update(p.read_bytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class AuditLog:
    """Appends lines to `path` for `operator`; safe from several threads."""

    def __init__(self, path: str | Path, operator: str | None = None) -> None:
        self.path = Path(path)
        # one word of printable characters: a name cannot start a forged line
        name = "_".join((operator or current_operator()).split())
        self.operator = "".join(c for c in name if c.isprintable()) or "unknown"
        self._lock = threading.Lock()

    def write(self, verb: str, text: str, *, required: bool = False) -> None:
        """Append one entry; an unwritable log is reported, not raised (the
        audit log must not hide the run's own error), but for a `required`
        entry (a run's first: no run starts without its audit trail).

        Raises
        ------
        StorageError
            A `required` entry could not be written.
        """
        now = (
            datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        )
        body = json.dumps(
            {
                "t": now,
                "operator": self.operator,
                "verb": "".join(verb.upper().split()),
                "text": " ".join(text.split()),
            },
            ensure_ascii=False,
        )
        with self._lock:
            try:
                append_sealed(self.path, body)
            except OSError as e:
                if required:
                    raise StorageError(
                        f"audit log {self.path} is not writable "
                        f"({e.strerror or e}); nothing was started"
                    ) from None
                logger.error("audit log %s unwritable (%s): %s", self.path, e, body)

    def read(self) -> list[str]:
        """The log's lines as text (``time  operator  VERB  text``); lines
        written before entries were JSON come back as they are."""
        return [_as_text(e) for e in read_entries(self.path)]


def read_entries(path: str | Path) -> list[dict[str, str]]:
    """Every entry of an audit log: ``t``, ``operator``, ``verb``, ``text``
    (an older plain-text line is one ``text``)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in raw.decode("utf-8", "replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict):
            out.append({k: str(entry.get(k, "")) for k in _FIELDS})
        elif line.strip():
            out.append({"t": "", "operator": "", "verb": "", "text": line})
    return out


_FIELDS = ("t", "operator", "verb", "text")


def _as_text(e: dict[str, str]) -> str:
    return "  ".join(v for v in (e["t"], e["operator"], e["verb"], e["text"]) if v)


class AuditTrail:
    """Subscriber of a run's events that writes the audit lines they call for:
    device errors and recoveries, failed fields and detections, the focus map
    and its warnings."""

    def __init__(self, log: AuditLog) -> None:
        self.log = log

    def __call__(self, r: Record) -> None:
        if isinstance(r, DeviceEvent):
            if r.device == "loader":
                self.log.write(f"LOADER-{r.what}", r.message)
            elif r.recovered:
                self.log.write("RECOVERED", f"{r.what}, {r.message}")
            else:
                self.log.write("DEVICE-ERROR", f"{r.what}: {r.message}")
        elif isinstance(r, Failed):
            self.log.write(
                "FIELD-FAILED", f"{r.field} after {r.attempts} attempts: {r.reason}"
            )
        elif isinstance(r, DetectFailed):
            self.log.write("DETECT-FAILED", f"{r.field}: {r.reason}")
        elif isinstance(r, FocusMapRecorded) and not r.reused:
            self.log.write(
                "FOCUS",
                f"focus map measured: {r.model} from {r.used}/{r.anchors} anchors, "
                f"rms {r.rms_um or 0:.2f} um, {r.seconds or 0:.1f} s",
            )
            for w in r.warnings:
                self.log.write("WARNING", w)

"""The audit log: an append-only, human-readable record of who did what, when.

One ``audit.log`` per run folder (and one per queue folder). Each line is

    2026-11-24T23:50:01.123Z  alice  START  scan of CS-0001: ctcscan 0.1.0, ...

UTC time, operator, an upper-case verb, free text. Lines are appended with
O_APPEND and fsync'd, never rewritten: the log survives a crash up to its last
line, and the ledger (machine-readable) stays the source of truth for resume.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller.records import (
    DetectFailed,
    DeviceEvent,
    Failed,
    FocusMapRecorded,
    Record,
)

__all__ = ["AuditLog", "AuditTrail", "config_hash", "current_operator"]

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

    def write(self, verb: str, text: str) -> None:
        now = (
            datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        )
        line = f"{now}  {self.operator}  {verb.upper()}  {' '.join(text.split())}\n"
        data = line.encode("utf-8", "replace")
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:  # the audit log must never hide the run's error
                logger.error("audit log %s unwritable (%s): %s", self.path, e, line)

    def read(self) -> list[str]:
        try:
            return self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []


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

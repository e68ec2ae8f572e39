"""The run folder: its paths, durable writes, and checks before a run.

Run folder layout::

    RUN_DIR/.lock, .owner.json  the owning process (`controller.runstore.lock`)
    RUN_DIR/scan.json           request, layout, instruments, fields, version
    RUN_DIR/ledger.jsonl        typed records (`controller.records`), append-only
    RUN_DIR/focus_map.json      the focus map the fields were imaged with
    RUN_DIR/fields/field_NNN.ome.tif
    RUN_DIR/detections/field_NNN.json   on-line detection result per field
    RUN_DIR/events.csv, report.json, report.html, candidates/   cartridge outputs
    RUN_DIR/audit.log           who did what, when
    RUN_DIR/ground_truth.json   simulated instruments only
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from controller.errors import DiskSpaceError, StorageError
from controller.records import Written
from controller.runstore.durable import write_durably, write_durably_from
from controller.runstore.ledger import Ledger
from controller.runstore.lock import in_use
from controller.runstore.results import (
    CANDIDATES_DIR,
    DETECTIONS_DIR,
    detection_file,
)

__all__ = [
    "FIELD_SUFFIX",
    "RunFolder",
    "check_ours",
    "no_folder",
    "write_durably",
    "write_durably_from",
]

FIELD_SUFFIX = ".ome.tif"

#: files of the folder's top level that the program writes through a temporary
_OWN_TOP = frozenset(
    {
        "scan.json",
        "focus_map.json",
        "ground_truth.json",
        "report.json",
        "report.html",
        "events.csv",
        "summary.json",
    }
)
_OWN_FIELD = re.compile(r"field_\d+\.ome\.tif\.tmp")
#: `temporary_name`, unique or not
_OWN_DETECTION = re.compile(r"[^/]+\.json(\.[0-9a-f]{8})?\.tmp")
_OWN_CANDIDATE = re.compile(r"[^/]+_\d{3}\.png(\.[0-9a-f]{8})?\.tmp")


def no_folder(path: Path) -> StorageError:
    """The error for a path given as a folder that is none: a file, or
    nothing at all."""
    if path.exists():
        return StorageError(f"{path}: a file, not a folder")
    return StorageError(f"{path}: no such folder")


#: what a start that was refused or cut short (kill -9 at any moment) may
#: have left in a folder: the lock, its owner note and the note's temporary,
#: the writability probe, the audit log, temporaries of the first files
_START_LEFTOVERS = frozenset(
    {".lock", ".owner.json", ".owner.json.tmp", ".write-probe", "audit.log"}
    | {f"{name}.tmp" for name in _OWN_TOP}
)


def check_ours(root: Path, journal: str, other: str, what: str) -> None:
    """Refuse, before anything is written there, a folder that is neither new,
    empty, nor one this program keeps as `what` (its `journal` file: resumed;
    no `other` journal: never the other kind of folder): someone's files would
    be overwritten or removed. Only what a start cut short may have left
    (`_START_LEFTOVERS`; empty ``fields/`` and ``detections/``) is taken as
    the program's own."""
    try:
        names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    except OSError as e:
        raise StorageError(
            f"{root}: cannot read the folder ({e.strerror or e})"
        ) from None
    if other in names:
        kind = "a queue folder" if other == "queue.jsonl" else "a run folder"
        raise StorageError(
            f"--out {root} is {kind} ({other}), not {what}; choose another --out"
        )
    if journal in names or (journal == "ledger.jsonl" and "scan.json" in names):
        return  # (a run's scan.json comes before its first ledger line)
    if in_use(root):  # a start of ours under way: its lock names the holder
        return

    def leftover(name: str) -> bool:
        path = root / name
        if name in _START_LEFTOVERS:
            return True
        with contextlib.suppress(OSError):
            if name in ("fields", DETECTIONS_DIR) and path.is_dir():
                return not any(path.iterdir())
        return False

    theirs = [n for n in names if not leftover(n)]
    if theirs:
        raise StorageError(
            f"--out {root} holds files this program did not write "
            f"({', '.join(theirs[:3])}{', ...' if len(theirs) > 3 else ''}); "
            "choose a new or empty folder"
        )


class RunFolder:
    """Paths and housekeeping of one run folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.fields_dir = self.root / "fields"
        self.scan_json = self.root / "scan.json"
        self.ground_truth_json = self.root / "ground_truth.json"
        self.focus_map_json = self.root / "focus_map.json"
        self.detections_dir = self.root / DETECTIONS_DIR
        self.ledger = Ledger(self.root / "ledger.jsonl")

    def field_path(self, name: str) -> Path:
        return self.fields_dir / f"{name}{FIELD_SUFFIX}"

    def detection_path(self, name: str) -> Path:
        return detection_file(self.root, name)

    def prepare(self, *, fields: bool = True) -> None:
        """Create the folder and prove it is writable; remove torn temp files.

        ``fields=False`` prepares an analysis-only folder (no ``fields/``).
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if fields:
                self.fields_dir.mkdir(exist_ok=True)
            self.detections_dir.mkdir(exist_ok=True)
            probe = self.root / ".write-probe"
            try:
                probe.write_bytes(b"ok")
            finally:  # a full disk may create it and then refuse its bytes
                with contextlib.suppress(FileNotFoundError):
                    probe.unlink()
        except OSError as e:
            raise StorageError(
                f"output folder {self.root} is not writable: {e.strerror or e}"
            ) from None
        self.remove_torn_temporaries()

    def remove_torn_temporaries(self) -> None:
        """Remove the temporary files a crash left mid-write: only those the
        program itself writes (a user's ``*.tmp`` in the folder is left alone)."""
        torn = [p for p in self.root.glob("*.tmp") if p.name[:-4] in _OWN_TOP]
        torn += [
            p for p in self.fields_dir.glob("*.tmp") if _OWN_FIELD.fullmatch(p.name)
        ]
        torn += [
            p
            for p in self.detections_dir.glob("*.tmp")
            if _OWN_DETECTION.fullmatch(p.name)
        ]
        torn += [
            p
            for p in (self.root / CANDIDATES_DIR).glob("*.tmp")
            if _OWN_CANDIDATE.fullmatch(p.name)
        ]
        for tmp in torn:
            tmp.unlink(missing_ok=True)

    def check_free_space(self, needed_bytes: int) -> None:
        """Refuse to start when the folder's disk cannot hold `needed_bytes`."""
        free = shutil.disk_usage(self.root).free
        if free < needed_bytes:
            raise DiskSpaceError(
                f"not enough free disk in {self.root}: the scan needs "
                f"{needed_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
            )

    def write_json(self, path: Path, data: Any, *, compact: bool = False) -> None:
        """`data` as JSON, durably: indented, or `compact` (one line, by the
        C encoder: 4 MB in 0.08 s instead of 0.3 s)."""
        if compact:
            text = json.dumps(data, separators=(",", ":"))
        else:
            text = json.dumps(data, indent=1)
        try:
            write_durably(path, text.encode())
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e.strerror or e}") from None

    def digests(self, *names: str) -> dict[str, str]:
        """sha256 of files of the folder (names relative to it) that exist,
        for a `Written` record.

        Raises
        ------
        StorageError
            A file is there but cannot be read.
        """
        out = {}
        for name in names:
            try:
                with open(self.root / name, "rb") as f:
                    out[name] = hashlib.file_digest(f, "sha256").hexdigest()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise StorageError(
                    f"cannot read {self.root / name}: {e.strerror or e}"
                ) from None
        return out

    def check_as_written(self, name: str) -> bool:
        """Whether the folder's file `name` was recorded by a `Written` record
        (False: never; a crash between the write and the record). A file
        that differs from its latest record (edited by hand) is refused.

        Raises
        ------
        StorageError
            The file is not what was written, or cannot be read.
        """
        recorded = None
        for r in self.ledger.read():
            if isinstance(r, Written) and name in r.files:
                recorded = r.files[name]
        if recorded is None:
            return False
        if self.digests(name).get(name) != recorded:
            raise StorageError(
                f"{self.root / name} is not the file this program wrote "
                "(its sha256 differs from the ledger's); nothing in it is used: "
                "restore it, or choose another --out"
            )
        return True

    def read_json(self, path: Path) -> dict[str, Any] | None:
        """A JSON file of the run folder; None when absent."""
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StorageError(f"{path}: unreadable ({e})") from None

    def read_scan_json(self) -> dict[str, Any] | None:
        return self.read_json(self.scan_json)

    def verify(self, name: str, sha256: str) -> bool:
        """Whether the field file exists and hashes to `sha256`.

        Raises
        ------
        StorageError
            The file is there but cannot be read now (permissions, I/O): that
            is no evidence that it is damaged, so nothing is decided.
        """
        path = self.field_path(name)
        try:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StorageError(
                f"cannot read {path} to verify it: {e.strerror or e}; "
                "fix access to the run folder, then resume"
            ) from None
        return digest == sha256


def folder_name(text: str, reserved: frozenset[str] = frozenset()) -> str:
    """A folder name for an identifier (a barcode, a cartridge id): `text`
    itself when it is a plain name (ASCII letters, digits, ``-_.``, no leading
    or trailing dot, not one of `reserved`, compared in lower case); otherwise
    a plain form of it and the first 8 hex digits of its sha256, so two
    identifiers never share a folder (``a/b`` and ``a_b``, ``..`` and ``...``)
    and none leaves the folder it is made in."""
    plain = "".join(
        c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in text
    ).strip(".")[:64]
    if plain == text and plain.lower() not in reserved:
        return plain
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{plain or 'cartridge'}-{digest[:8]}"

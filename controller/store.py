"""The run folder: durable field files and the append-only ledger.

Storage is the source of truth. A field counts as stored only when its OME-TIFF is
complete on disk (written to a temporary name, fsync'd, renamed into place, the
folder fsync'd) and its ``stored`` ledger line, with the file's sha256, is fsync'd.

Run folder layout::

    RUN_DIR/scan.json           request, layout, instruments, fields, version
    RUN_DIR/ledger.jsonl        planned, resumed, stored, failed, detected, finished
    RUN_DIR/fields/field_NNN.ome.tif
    RUN_DIR/detections/field_NNN.json   on-line detection result per field
    RUN_DIR/events.csv, report.json, report.html, candidates/   cartridge outputs
    RUN_DIR/ground_truth.json   simulated instruments only
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tifffile

from controller.assembler import AssembledField
from controller.errors import DiskSpaceError, StorageError

__all__ = [
    "FieldStore",
    "Ledger",
    "LedgerState",
    "RunFolder",
    "StoreWorker",
    "StoredField",
]

FIELD_SUFFIX = ".ome.tif"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either nothing or all of it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Ledger:
    """Append-only JSON-lines journal; every line is fsync'd before returning."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, event: str, **data: Any) -> dict[str, Any]:
        record = {"t": _now(), "event": event, **data}
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return record

    def read(self) -> list[dict[str, Any]]:
        """All complete records; a torn last line (crash mid-write) is ignored."""
        if not self.path.exists():
            return []
        records = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # torn final line
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records


@dataclass(frozen=True)
class StoredField:
    name: str
    path: Path
    sha256: str
    nbytes: int


@dataclass
class LedgerState:
    """What the ledger says about each field (the last word wins)."""

    stored: dict[str, dict[str, Any]]
    failed: dict[str, dict[str, Any]]
    detected: set[str]

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> LedgerState:
        stored: dict[str, dict[str, Any]] = {}
        failed: dict[str, dict[str, Any]] = {}
        detected: set[str] = set()
        for r in records:
            ev, name = r.get("event"), r.get("field")
            if not isinstance(name, str):
                continue
            if ev == "stored":
                stored[name] = dict(r)
                failed.pop(name, None)
                detected.discard(name)
            elif ev == "failed":
                failed[name] = dict(r)
            elif ev in ("corrupt", "missing"):
                stored.pop(name, None)
                detected.discard(name)
            elif ev == "detected":
                detected.add(name)
        return cls(stored, failed, detected)


class RunFolder:
    """Paths and housekeeping of one run folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.fields_dir = self.root / "fields"
        self.scan_json = self.root / "scan.json"
        self.ground_truth_json = self.root / "ground_truth.json"
        self.focus_map_json = self.root / "focus_map.json"
        self.detections_dir = self.root / "detections"
        self.ledger = Ledger(self.root / "ledger.jsonl")

    def field_path(self, name: str) -> Path:
        return self.fields_dir / f"{name}{FIELD_SUFFIX}"

    def detection_path(self, name: str) -> Path:
        return self.detections_dir / f"{name}.json"

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
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise StorageError(
                f"output folder {self.root} is not writable: {e.strerror or e}"
            ) from None
        for tmp in [
            *self.root.glob("*.tmp"),
            *self.fields_dir.glob("*.tmp"),
            *self.detections_dir.glob("*.tmp"),
        ]:
            tmp.unlink()

    def check_free_space(self, needed_bytes: int) -> None:
        """Refuse to start when the folder's disk cannot hold `needed_bytes`."""
        free = shutil.disk_usage(self.root).free
        if free < needed_bytes:
            raise DiskSpaceError(
                f"not enough free disk in {self.root}: the scan needs "
                f"{needed_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
            )

    def write_json(self, path: Path, data: Any) -> None:
        write_durably(path, json.dumps(data, indent=1).encode())

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
        """Whether the field file exists and hashes to `sha256`."""
        path = self.field_path(name)
        try:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:
            return False
        return digest == sha256


class FieldStore:
    """Writes fields as OME-TIFF (axes CYX) into a run folder, durably.

    Parameters
    ----------
    folder : RunFolder
        Where to write.
    pixel_size_um : float
        Physical pixel size recorded in the OME metadata.
    """

    def __init__(self, folder: RunFolder, pixel_size_um: float) -> None:
        self.folder = folder
        self.pixel_size_um = pixel_size_um

    def encode(self, field: AssembledField) -> bytes:
        """The OME-TIFF bytes of one field."""
        n_ch = field.data.shape[0]
        st = field.stage
        plane = {
            "PositionX": [st.get("x_um", field.spec.x_um)] * n_ch,
            "PositionXUnit": ["µm"] * n_ch,
            "PositionY": [st.get("y_um", field.spec.y_um)] * n_ch,
            "PositionYUnit": ["µm"] * n_ch,
            "PositionZ": [st.get("z_um", field.spec.z_um)] * n_ch,
            "PositionZUnit": ["µm"] * n_ch,
        }
        buf = io.BytesIO()
        tifffile.imwrite(
            buf,
            field.data,
            ome=True,
            photometric="minisblack",
            metadata={
                "axes": "CYX",
                "Name": field.spec.name,
                "Channel": {"Name": list(field.channel_names)},
                "PhysicalSizeX": self.pixel_size_um,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": self.pixel_size_um,
                "PhysicalSizeYUnit": "µm",
                "Plane": plane,
            },
        )
        return buf.getvalue()

    def store(self, field: AssembledField) -> StoredField:
        """Write the field durably, then record it in the ledger."""
        name = field.spec.name
        data = self.encode(field)
        digest = hashlib.sha256(data).hexdigest()
        path = self.folder.field_path(name)
        try:
            write_durably(path, data)
        except OSError as e:
            raise StorageError(
                f"cannot store {name} in {path.parent}: {e.strerror or e}"
            ) from None
        self.folder.ledger.append(
            "stored",
            field=name,
            file=str(path.relative_to(self.folder.root)),
            sha256=digest,
            bytes=len(data),
            stage=field.stage,
            focus=field.focus,
            acquired_at=field.acquired_at,
        )
        return StoredField(name, path, digest, len(data))


class StoreWorker:
    """Stores fields on its own thread, fed through a bounded queue.

    `put` blocks only while the queue is full (back-pressure bounds memory); after
    a storage error it refuses new fields with that error instead of blocking.
    """

    def __init__(
        self,
        store: FieldStore,
        *,
        maxsize: int = 4,
        on_stored: Callable[[AssembledField, StoredField], None] | None = None,
    ) -> None:
        self.store = store
        self.on_stored = on_stored
        self.error: StorageError | None = None
        self._q: queue.Queue[AssembledField | None] = queue.Queue(maxsize=maxsize)
        self._thread = threading.Thread(
            target=self._run, name="ctcscan-store", daemon=True
        )
        self._thread.start()

    def put(self, field: AssembledField) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self._q.put(field, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Store everything queued, then stop the thread."""
        self._q.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (field := self._q.get()) is not None:
            if self.error is not None:
                continue  # drain without storing after a failure
            try:
                stored = self.store.store(field)
            except StorageError as e:
                self.error = e
                continue
            if self.on_stored is not None:
                self.on_stored(field, stored)

"""Field storage: whole fields as OME-TIFF, durably, on a thread of their own.

Storage is the source of truth. A field counts as stored only when its OME-TIFF
is complete on disk (written to a temporary name, fsync'd, renamed into place,
the folder fsync'd) and its `Stored` record, with the file's sha256, is in the
ledger. `StoreWorker` does this on its own thread behind a bounded queue (the
acquisition thread waits only while the queue is full); a storage error stops
the run through its `Supervisor`, never silently.
"""

from __future__ import annotations

import hashlib
import io
import queue
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tifffile

from controller.config import StorageSettings
from controller.errors import StorageError
from controller.events import RecordSink
from controller.records import Stored
from controller.runstore.folder import RunFolder, write_durably_from
from controller.runstore.omexml import OmeXml, PlaneInfo
from controller.supervise import Supervisor

__all__ = ["AssembledField", "FieldStore", "StoreWorker", "StoredField"]


@dataclass
class AssembledField:
    """All channels of one field, as acquired.

    Attributes
    ----------
    name : str
        The field's name (``field_NNN``).
    data : ndarray, shape (C, Y, X), or a tuple of C (Y, X) frames
        Pixels, channel order as in `channel_names` (`pixels` stacks frames,
        on the storage thread rather than the acquisition's).
    stage : dict
        Stage position of the field: ``x_um``, ``y_um``, ``z_um`` (read back
        at acquisition where the engine could).
    focus : dict or None
        The field's focus QC record (`controller.focus.qc.FieldFocus`), if judged.
    acquired_at : str
        When the field's acquisition began (ISO 8601, UTC).
    exposure_ms : tuple
        Per channel, the exposure its frame reported (None: unknown); empty
        when no frame reported one.
    plane_stage : tuple
        Per channel, the stage position its frame was taken at; empty: every
        channel at `stage`.
    """

    name: str
    data: np.ndarray | tuple[np.ndarray, ...]
    channel_names: tuple[str, ...]
    stage: dict[str, float]
    focus: dict[str, Any] | None = None
    acquired_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    exposure_ms: tuple[float | None, ...] = ()
    plane_stage: tuple[dict[str, float], ...] = ()

    def pixels(self) -> np.ndarray:
        """The (C, Y, X) pixels (frames stacked once, when first asked)."""
        if isinstance(self.data, tuple):
            self.data = np.stack(self.data)
        return self.data


@dataclass(frozen=True)
class StoredField:
    name: str
    path: Path
    sha256: str
    nbytes: int


class FieldStore:
    """Writes fields as OME-TIFF (axes CYX) into a run folder, durably.

    Parameters
    ----------
    folder : RunFolder
        Where to write.
    ome : OmeXml
        Renders each field's OME metadata (`controller.runstore.omexml`).
    sink : RecordSink
        Receives a `Stored` record per field.
    storage : StorageSettings
        Lossless compression of the pixels (default none).
    """

    def __init__(
        self,
        folder: RunFolder,
        ome: OmeXml,
        sink: RecordSink,
        storage: StorageSettings | None = None,
    ) -> None:
        self.folder = folder
        self.ome = ome
        self.sink = sink
        self.storage = storage or StorageSettings()
        self._tiff_args = self.storage.tifffile_args

    def planes(self, field: AssembledField) -> list[PlaneInfo]:
        """Per channel: its frame's exposure (else the configured one) and the
        stage position it was taken at (else the field's)."""
        out = []
        for c, ch in enumerate(field.channel_names):
            exposure = field.exposure_ms[c] if c < len(field.exposure_ms) else None
            if exposure is None:
                exposure = self.ome.default_exposure(ch)
            st = field.plane_stage[c] if c < len(field.plane_stage) else field.stage
            out.append(
                PlaneInfo(exposure, st.get("x_um"), st.get("y_um"), st.get("z_um"))
            )
        return out

    def metadata(self, field: AssembledField) -> str:
        """The OME-XML of one field."""
        data = field.pixels()
        return self.ome.xml(
            name=field.name,
            shape=data.shape,
            dtype=data.dtype,
            channel_names=field.channel_names,
            acquired_at=field.acquired_at,
            planes=self.planes(field),
        )

    def encode(self, field: AssembledField) -> memoryview:
        """The OME-TIFF bytes of one field: one page per channel (compressed
        as `storage` says), the OME-XML in the first page's ImageDescription.
        A view of the encoder's buffer, not a copy of it (11 MB a field)."""
        buf = io.BytesIO()
        self.write_to(buf, field)
        return buf.getbuffer()

    def write_to(self, f: BinaryIO, field: AssembledField) -> None:
        """Encode the field (as `encode`) into an open, seekable file."""
        tifffile.imwrite(
            f,
            field.pixels(),
            photometric="minisblack",
            description=self.metadata(field).encode("utf-8"),
            metadata=None,  # no tifffile JSON description: the OME-XML says it all
            **self._tiff_args,
        )

    def store(self, field: AssembledField) -> StoredField:
        """Write the field durably, then record it in the ledger.

        The encoder writes straight into the temporary file and the sha256 is
        taken of that file's bytes (from the page cache) before it is renamed
        into place: no 11 MB copy of the field's file in memory."""
        name = field.name
        path = self.folder.field_path(name)
        try:
            digest, size = write_durably_from(
                path, lambda f: self.write_to(f, field), hasher=hashlib.sha256
            )
        except OSError as e:
            raise StorageError(
                f"cannot store {name} in {path.parent}: {e.strerror or e}"
            ) from None
        self.sink.emit(
            Stored(
                field=name,
                file=str(path.relative_to(self.folder.root)),
                sha256=digest,
                bytes=size,
                stage=field.stage,
                focus=field.focus,
                acquired_at=field.acquired_at,
            )
        )
        return StoredField(name, path, digest, size)


class StoreWorker:
    """Stores fields on a supervised thread, fed through a bounded queue.

    `put` blocks only while the queue is full (back-pressure bounds memory).
    After any error the thread drains the queue without storing, the
    supervisor stops the run, and `put` raises `StorageError` at once.
    """

    def __init__(
        self, store: FieldStore, supervisor: Supervisor, *, maxsize: int = 4
    ) -> None:
        self.store = store
        self.supervisor = supervisor
        self.error: BaseException | None = None
        self._q: queue.Queue[AssembledField | None] = queue.Queue(maxsize=maxsize)
        self._thread = supervisor.spawn("ctcscan-store", self._run)

    def put(self, field: AssembledField) -> None:
        while True:
            if self.error is not None:
                raise StorageError(f"storage stopped: {self.error}")
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
                self.store.store(field)
            except BaseException as e:  # any storage error stops the run
                self.error = e
                self.supervisor.fail(e, "storage")

"""Typed records: every line of a run's ledger and of a queue's journal.

Each record is a frozen pydantic model with a kind (the JSON key ``event``, as
run folders have always had it) and a schema version ``v``. They are written and
read here only (`dump_line`, `parse_line`), and the run's event stream
(`controller.events`) carries the same objects: what a progress bar, the audit
log or a viewer of the ledger sees is one and the same record.

Compatibility: lines written before records carried a version (``v`` absent)
are read as version 1; unknown keys are ignored, so a newer writer's extra
fields do not make an older reader fail; an unknown kind, a line that is not a
JSON object, or one whose fields do not validate is skipped with a warning
(`Ledger.skipped` lists them), never fatal to a resume.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from controller.errors import one_line

__all__ = [
    "RECORD_TYPES",
    "AnalysisFinished",
    "AnalysisStarted",
    "CartridgeDone",
    "Corrupt",
    "DetectFailed",
    "Detected",
    "DeviceEvent",
    "Failed",
    "Finished",
    "FocusAnchorDone",
    "FocusFailed",
    "FocusMapRecorded",
    "Loaded",
    "LoaderSeen",
    "Planned",
    "QueueFinished",
    "QueueStarted",
    "QueueStopped",
    "Record",
    "Refocused",
    "Resumed",
    "Started",
    "Stopped",
    "Stored",
    "Unloaded",
    "Written",
    "dump_line",
    "now",
    "parse_line",
]

logger = logging.getLogger("ctcscan.records")

#: schema version written by this code
SCHEMA_VERSION = 1


def now() -> str:
    """UTC time stamp of a record (ISO 8601, milliseconds)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Record(BaseModel):
    """Base of every ledger and journal record."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: ClassVar[str]
    t: str = Field(default_factory=now)
    v: int = SCHEMA_VERSION

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes`, validated."""
        return type(self).model_validate({**self.model_dump(), **changes})


# ---------------------------------------------------------------- a run's ledger


class Started(Record):
    """A scan (or its resume) began: who owns the run folder, and the plan size."""

    event: Literal["started"] = "started"
    kind: ClassVar[str] = "started"
    cartridge_id: str
    planned: int
    resumed: int = 0
    operator: str = ""
    pid: int = 0
    host: str = ""


class Planned(Record):
    event: Literal["planned"] = "planned"
    kind: ClassVar[str] = "planned"
    fields: list[str]
    channels: list[str]


class Resumed(Record):
    event: Literal["resumed"] = "resumed"
    kind: ClassVar[str] = "resumed"
    skipped: int
    remaining: list[str]


class FocusAnchorDone(Record):
    """One anchor of the focus map measured (progress for viewers)."""

    event: Literal["focus_anchor"] = "focus_anchor"
    kind: ClassVar[str] = "focus_anchor"
    index: int
    done: int
    total: int
    x_um: float
    y_um: float
    z_um: float | None = None
    status: str = ""


class FocusMapRecorded(Record):
    event: Literal["focus_map"] = "focus_map"
    kind: ClassVar[str] = "focus_map"
    reused: bool
    model: str
    anchors: int | None = None
    used: int | None = None
    rms_um: float | None = None
    seconds: float | None = None
    warnings: list[str] = Field(default_factory=list)


class FocusFailed(Record):
    event: Literal["focus_failed"] = "focus_failed"
    kind: ClassVar[str] = "focus_failed"
    reason: str


class Stored(Record):
    """A field is durable: its file is in place and hashes to `sha256`."""

    event: Literal["stored"] = "stored"
    kind: ClassVar[str] = "stored"
    field: str
    file: str
    sha256: str
    bytes: int
    stage: dict[str, float] = Field(default_factory=dict)
    focus: dict[str, Any] | None = None
    acquired_at: str = ""


class Failed(Record):
    event: Literal["failed"] = "failed"
    kind: ClassVar[str] = "failed"
    field: str
    reason: str
    attempts: int = 0


class Corrupt(Record):
    event: Literal["corrupt"] = "corrupt"
    kind: ClassVar[str] = "corrupt"
    field: str
    reason: str


class FocusTry(BaseModel):
    model_config = ConfigDict(frozen=True)
    z_um: float | None = None
    sharpness: float | None = None


class Refocused(Record):
    event: Literal["refocused"] = "refocused"
    kind: ClassVar[str] = "refocused"
    field: str
    first: FocusTry
    second: FocusTry
    kept: Literal["first", "second"]
    reason: str = ""
    search_snaps: int = 0
    seconds: float = 0.0


class Detected(Record):
    """A field's detection file is durable and hashes to `sha256`."""

    event: Literal["detected"] = "detected"
    kind: ClassVar[str] = "detected"
    field: str
    counts: dict[str, int] | None = None
    seconds: float | None = None
    sha256: str | None = None  # absent in runs written before it was recorded
    #: size and modification time (ns) of the field file analysed, "size:mtime"
    source: str | None = None


class DetectFailed(Record):
    event: Literal["detect_failed"] = "detect_failed"
    kind: ClassVar[str] = "detect_failed"
    field: str
    reason: str


class DeviceEvent(Record):
    """A failed hardware call, or a retry that recovered from one."""

    event: Literal["device"] = "device"
    kind: ClassVar[str] = "device"
    device: str = ""
    what: str
    message: str
    recovered: bool = False


class Written(Record):
    """Files of the folder were (re)written: their names relative to the
    folder and sha256. The latest record of a file is the one it must match."""

    event: Literal["written"] = "written"
    kind: ClassVar[str] = "written"
    files: dict[str, str]


class _RunEnd(Record):
    stored: int = 0
    resumed: int = 0
    failed: list[str] = Field(default_factory=list)
    canceled: bool = False
    error: str | None = None
    during: str | None = None
    duration_s: float = 0.0
    focus_s: float = 0.0
    refocused: list[str] = Field(default_factory=list)


class Stopped(_RunEnd):
    """The run ended before every field was stored: resumable."""

    event: Literal["stopped"] = "stopped"
    kind: ClassVar[str] = "stopped"


class Finished(_RunEnd):
    event: Literal["finished"] = "finished"
    kind: ClassVar[str] = "finished"


class AnalysisStarted(Record):
    """An analysis of stored fields starts (or resumes: `done` fields already
    have a current result). `analysis_id` names the detector version and the
    settings; an output folder holds one analysis id."""

    event: Literal["analysis_started"] = "analysis_started"
    kind: ClassVar[str] = "analysis_started"
    input: str
    fields: int
    done: int = 0
    analysis_id: str | None = None  # absent in analyses written before it
    detector_version: str | None = None
    settings_sha256: str | None = None


class AnalysisFinished(Record):
    event: Literal["analysis_finished"] = "analysis_finished"
    kind: ClassVar[str] = "analysis_finished"
    ctc_count: int
    failed: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------- a queue's journal


class QueueStarted(Record):
    event: Literal["queue_started"] = "queue_started"
    kind: ClassVar[str] = "queue_started"
    operator: str = ""
    pid: int = 0
    host: str = ""


class LoaderSeen(Record):
    event: Literal["loader"] = "loader"
    kind: ClassVar[str] = "loader"
    identity: Any = None
    inventory: dict[int, str | None] = Field(default_factory=dict)


class Loaded(Record):
    event: Literal["loaded"] = "loaded"
    kind: ClassVar[str] = "loaded"
    slot: int
    barcode: str


class Unloaded(Record):
    event: Literal["unloaded"] = "unloaded"
    kind: ClassVar[str] = "unloaded"
    slot: int
    barcode: str


class CartridgeDone(Record):
    """One row of a queue's summary: a cartridge's outcome."""

    event: Literal["cartridge"] = "cartridge"
    kind: ClassVar[str] = "cartridge"
    slot: int
    barcode: str
    status: Literal["complete", "incomplete", "failed", "stopped"]
    ctc_count: int | None = None
    cutoff: int | None = None
    at_or_above_cutoff: bool | None = None
    duration_s: float = 0.0
    reason: str = ""
    run_dir: str = ""


class QueueStopped(Record):
    event: Literal["queue_stopped"] = "queue_stopped"
    kind: ClassVar[str] = "queue_stopped"
    reason: str = ""
    cartridges: int | None = None


class QueueFinished(Record):
    event: Literal["queue_finished"] = "queue_finished"
    kind: ClassVar[str] = "queue_finished"
    reason: str = ""
    cartridges: int | None = None


RECORD_TYPES: dict[str, type[Record]] = {
    cls.kind: cls
    for cls in (
        Started,
        Planned,
        Resumed,
        FocusAnchorDone,
        FocusMapRecorded,
        FocusFailed,
        Stored,
        Failed,
        Corrupt,
        Refocused,
        Detected,
        DetectFailed,
        DeviceEvent,
        Written,
        Stopped,
        Finished,
        AnalysisStarted,
        AnalysisFinished,
        QueueStarted,
        LoaderSeen,
        Loaded,
        Unloaded,
        CartridgeDone,
        QueueStopped,
        QueueFinished,
    )
}

AnyRecord = Annotated[
    Started
    | Planned
    | Resumed
    | FocusAnchorDone
    | FocusMapRecorded
    | FocusFailed
    | Stored
    | Failed
    | Corrupt
    | Refocused
    | Detected
    | DetectFailed
    | DeviceEvent
    | Written
    | Stopped
    | Finished
    | AnalysisStarted
    | AnalysisFinished
    | QueueStarted
    | LoaderSeen
    | Loaded
    | Unloaded
    | CartridgeDone
    | QueueStopped
    | QueueFinished,
    Field(discriminator="event"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyRecord)


def dump_line(record: Record) -> str:
    """The JSON line of `record` (newline included)."""
    return record.model_dump_json(exclude_none=False) + "\n"


class RecordError(ValueError):
    """A line that is not a record this code can read."""


def parse_line(line: str | bytes) -> Record:
    """The record of one JSON line.

    Raises
    ------
    RecordError
        Not UTF-8, not JSON, not an object, an unknown kind, or invalid fields.
    """
    try:
        text = line.decode("utf-8") if isinstance(line, bytes) else line
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # also 5000-digit ints, deep nesting
        raise RecordError(f"not a JSON line ({e})") from None
    if not isinstance(data, dict):
        raise RecordError(f"not a record but a JSON {type(data).__name__}")
    kind = data.get("event")
    if not isinstance(kind, str) or kind not in RECORD_TYPES:
        raise RecordError(f"unknown record kind {kind!r}")
    version = data.get("v", 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise RecordError(f"{kind} record of schema version {version!r}")
    try:
        return _ADAPTER.validate_python(data)  # type: ignore[no-any-return]
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RecordError(one_line(f"{kind} record: {where}: {first['msg']}")) from None

"""The cartridge outputs of a scan: events.csv, report.json, report.html.

Built from what the run folder holds (the ledger's records and the fields'
detection files), never from the scanning process's memory, so a resumed run
writes the same outputs as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from analysis.report import (
    Report,
    ReportContext,
    event_columns,
    event_rows,
    events_csv_text,
    read_report,
    write_outputs,
)
from analysis.stitch import object_place, stitch
from controller.acquisition.plan import ScanPlan
from controller.config import AssayConfig, InstrumentConfig
from controller.errors import StorageError
from controller.focus.surface import FocusMap
from controller.records import Detected, Record
from controller.runstore.folder import RunFolder
from controller.runstore.ledger import LedgerState
from controller.runstore.results import decode_result
from controller.runstore.review import signed_off

logger = logging.getLogger("ctcscan.outputs")

__all__ = ["DetectionCache", "focus_report", "load_records", "write_scan_outputs"]


class DetectionCache:
    """Detection files read as the detector records them, so the outputs at
    the end of a scan need not read them again.

    Per field it keeps the sha256 of the bytes it read, the record without
    its non-CTC objects' features (what the report needs: the counts, the
    CTC objects, the per-field values; a few MB for a cartridge, not the
    40 MB of whole records) and the field's events.csv rows (`event_rows`)
    under the columns of every field read so far. `load_records` takes a
    field from here only when the ledger's current `Detected` record names
    that sha256, and `events_csv` reuses rows only when their columns are the
    final ones: the outputs are those of reading the folder at the end.

    Subscribe `on_record` to the run's events: it reads each file on the
    thread that recorded it (the detector's, not the acquisition's).
    """

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder
        self._slim: dict[str, tuple[str, dict[str, Any]]] = {}
        self._rows: dict[str, tuple[tuple[str, ...], str]] = {}
        self._keys: dict[str, frozenset[str]] = {}
        self._features: set[str] = set()
        self._lock = threading.Lock()

    def on_record(self, record: Record) -> None:
        if isinstance(record, Detected) and record.sha256:
            self.take(record.field, record.sha256)

    def take(self, name: str, sha256: str) -> None:
        """Read one field's detection file; a file that cannot be read, does
        not hash to `sha256` or is not a detection record is left to
        `load_records` (which says what is wrong with it)."""
        try:
            data = self.folder.detection_path(name).read_bytes()
            if hashlib.sha256(data).hexdigest() != sha256:
                return
            rec = decode_result(data)
            objects = rec["objects"]
            keys = frozenset(k for o in objects for k in o)
            with self._lock:
                features = self._features | keys
            cols = event_columns([{"objects": [dict.fromkeys(features)]}])
            rows = event_rows(rec, cols)
        except Exception:  # an optimisation only: the file is read again later
            return
        slim = {**rec, "objects": [_slim(o) for o in objects]}
        with self._lock:
            self._features |= keys
            self._slim[name] = (sha256, slim)
            self._rows[name] = (cols, rows)
            self._keys[name] = keys

    def get(self, name: str, sha256: str | None) -> dict[str, Any] | None:
        with self._lock:
            hit = self._slim.get(name)
        return hit[1] if hit is not None and sha256 and hit[0] == sha256 else None

    def events_csv(self, records: Sequence[dict[str, Any]]) -> str | None:
        """events.csv of `records` (as `load_records` returned them, some
        from here) with the rows made ahead; None when the columns grew after
        a field's rows were made here (its whole record is not kept: the
        caller reads the files again)."""
        with self._lock:
            here = {id(slim): n for n, (_, slim) in self._slim.items()}
            rows, keys = dict(self._rows), dict(self._keys)
        feats: set[str] = set()
        mine: dict[str, tuple[tuple[str, ...], str]] = {}
        for r in records:
            name = here.get(id(r))
            if name is not None:
                feats |= keys[name]
                mine[name] = rows[name]
            else:
                feats.update(k for o in r["objects"] for k in o)
        cols = event_columns([{"objects": [dict.fromkeys(feats)]}])
        if any(c != cols for c, _ in mine.values()):
            return None
        return events_csv_text(
            sorted(records, key=lambda r: r["field"]),
            cols,
            {n: text for n, (_, text) in mine.items()},
        )


def _slim(o: dict[str, Any]) -> dict[str, Any]:
    """An object as the report and the stitching need it: a CTC whole, any
    other its label and what the stitching reads of it (`object_place`)."""
    if o.get("label") == "CTC":
        return o
    return {"label": o.get("label"), **object_place(o)}


def load_records(
    folder: RunFolder,
    names: Iterable[str],
    state: LedgerState,
    *,
    cache: DetectionCache | None = None,
    current: Mapping[str, str | None] | None = None,
) -> list[dict[str, Any]]:
    """The detection records of the given fields that the ledger says are
    current (`LedgerState.detected`): a file left by an earlier acquisition of
    the field, or by an earlier analysis, is not one of them.

    A missing file leaves its field unanalysed (a resume detects it again).
    With a `cache`, a field whose `current` sha256 (of its latest `Detected`
    record) is the cached file's is not read again.

    Raises
    ------
    StorageError
        A current detection file cannot be read or is no JSON.
    """
    out = []
    for name in names:
        if name not in state.detected:
            continue
        if cache is not None and current is not None:
            hit = cache.get(name, current.get(name))
            if hit is not None:
                out.append(hit)
                continue
        path = folder.detection_path(name)
        try:
            out.append(decode_result(path.read_bytes()))
        except (
            FileNotFoundError
        ):  # not analysed: the report says so, a resume redoes it
            continue
        except (OSError, ValueError) as e:
            raise StorageError(
                f"{path}: the ledger records this detection but it cannot be "
                f"read ({getattr(e, 'strerror', None) or e})"
            ) from None
    return out


def write_scan_outputs(
    folder: RunFolder,
    *,
    cartridge_id: str,
    assay: AssayConfig,
    instrument: InstrumentConfig,
    plan: ScanPlan,
    fmap: FocusMap | None,
    fmap_reused: bool,
    acquisition_s: float,
    focus_qc_s: float,
    cache: DetectionCache | None = None,
) -> Report:
    """events.csv, report.json, report.html from the fields' detections
    (those already read by `cache` taken from it); a cell that overlapping
    fields saw twice counts once (`analysis.stitch`).

    A run whose review is signed keeps the outputs that were signed: they are
    read back, never written again.
    """
    if (signed := signed_off(folder.root)) is not None:
        logger.warning(
            "%s: the review was signed by %s at %s; its outputs are kept as signed",
            folder.root,
            signed.reviewer,
            signed.t,
        )
        return read_report(folder.root / "report.json")
    names = [f.name for f in plan.fields]
    ledger = list(folder.ledger.read())
    state = LedgerState.from_records(ledger)
    current = {r.field: r.sha256 for r in ledger if isinstance(r, Detected)}
    failed = {
        n: r.reason
        for n, r in state.failed.items()
        if n in names and n not in state.stored
    }
    map_s = 0.0 if fmap is None or fmap_reused else fmap.seconds
    records = load_records(folder, names, state, cache=cache, current=current)
    events = stitched = None
    if cache is not None:
        # rows made ahead hold every object: only when the stitching drops none
        stitched = stitch(records, assay.stitch)
        if not stitched.dropped:
            events = cache.events_csv(records)
        if events is None:  # read the whole records again
            records, stitched = load_records(folder, names, state), None
    return write_outputs(
        folder.root,
        records,
        ReportContext(
            cartridge_id=cartridge_id,
            indication=assay.indication,
            cutoff=assay.cutoff,
            blood_volume_ml=assay.blood_volume_ml,
            fields_planned=names,
            cartridge_fields=plan.layout.n_fields,
            fields_failed=failed,
            source=str(folder.root),
            extra_qc={
                "acquisition_seconds": round(acquisition_s, 2),
                "focus_seconds": round(map_s + focus_qc_s, 2),
            },
            focus=focus_report(plan, state, fmap, fmap_reused, instrument, focus_qc_s),
            stitch=assay.stitch,
        ),
        events_csv=events,
        stitched=stitched,
    )


def focus_report(
    plan: ScanPlan,
    state: LedgerState,
    fmap: FocusMap | None,
    reused: bool,
    instrument: InstrumentConfig,
    qc_s: float,
) -> dict[str, Any] | None:
    """The focus section of the report: map, anchors, per-field focus."""
    if fmap is None:
        return None
    fields = []
    for f in plan.fields:
        rec = state.stored.get(f.name)
        foc = (rec.focus if rec is not None else None) or {}
        stage = rec.stage if rec is not None else {}
        fields.append(
            {
                "name": f.name,
                "x_um": f.x_um,
                "y_um": f.y_um,
                "z_planned_um": f.z_um,
                "z_um": foc.get("z_um", stage.get("z_um")),
                "sharpness": foc.get("sharpness"),
                "refocused": bool(foc.get("refocused")),
            }
        )
    map_s = 0.0 if reused else fmap.seconds
    ref = fmap.reference_sharpness
    return {
        "enabled": fmap.enabled,
        "model": fmap.fit.model,
        "reused": reused,
        "rms_um": fmap.rms_um,
        "max_residual_um": fmap.max_residual_um,
        "warnings": fmap.warnings,
        "reference_sharpness": ref,
        "threshold": (None if ref is None else ref * instrument.focus.qc_min_relative),
        "map_seconds": round(map_s, 3),
        "qc_seconds": round(qc_s, 3),
        "seconds": round(map_s + qc_s, 3),
        "fov_um": [plan.fov_width_um, plan.fov_height_um],
        "anchors": [
            {
                **{
                    k: getattr(a, k)
                    for k in ("index", "x_um", "y_um", "z_um", "status", "source")
                },
                "used": a.usable,
            }
            for a in fmap.anchors
        ],
        "fields": fields,
    }

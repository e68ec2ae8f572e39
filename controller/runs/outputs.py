"""The cartridge outputs of a scan: events.csv, report.json, report.html.

Built from what the run folder holds (the ledger's records and the fields'
detection files), never from the scanning process's memory, so a resumed run
writes the same outputs as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from analysis.report import Report, ReportContext, read_report, write_outputs
from controller.acquisition.plan import ScanPlan
from controller.config import AssayConfig, InstrumentConfig
from controller.errors import StorageError
from controller.focus.surface import FocusMap
from controller.runstore.folder import RunFolder
from controller.runstore.ledger import LedgerState
from controller.runstore.review import signed_off

logger = logging.getLogger("ctcscan.outputs")

__all__ = ["focus_report", "load_records", "write_scan_outputs"]


def load_records(
    folder: RunFolder, names: Iterable[str], state: LedgerState
) -> list[dict[str, Any]]:
    """The detection records of the given fields that the ledger says are
    current (`LedgerState.detected`): a file left by an earlier acquisition of
    the field, or by an earlier analysis, is not one of them.

    A missing file leaves its field unanalysed (a resume detects it again).

    Raises
    ------
    StorageError
        A current detection file cannot be read or is no JSON.
    """
    out = []
    for name in names:
        if name not in state.detected:
            continue
        path = folder.detection_path(name)
        try:
            out.append(json.loads(path.read_bytes()))
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
) -> Report:
    """events.csv, report.json, report.html from the fields' detections; a
    cell that overlapping fields saw twice counts once (`analysis.stitch`).

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
    state = LedgerState.from_records(folder.ledger.read())
    failed = {
        n: r.reason
        for n, r in state.failed.items()
        if n in names and n not in state.stored
    }
    map_s = 0.0 if fmap is None or fmap_reused else fmap.seconds
    return write_outputs(
        folder.root,
        load_records(folder, names, state),
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

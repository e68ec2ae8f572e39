"""One field file in, one detection record out: shared by on-line and off-line use.

`analyze_field_file` is a plain function of a picklable `FieldJob`, so it runs in a
worker process as well as in-thread. It writes the review images of the field's
CTC candidates itself and returns a JSON-ready record.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analysis.detect import DEFAULT_ROLES, detect_field
from analysis.fieldio import FieldReadError, read_field_file
from analysis.gallery import candidate_png
from analysis.qc import channel_qc
from analysis.settings import DetectionSettings

__all__ = ["FieldJob", "analyze_field_file"]


@dataclass(frozen=True)
class FieldJob:
    """What to analyse and how.

    Attributes
    ----------
    path : str
        The field file (OME-TIFF, axes CYX).
    name : str
        The field's name in outputs.
    out_dir : str
        Folder whose ``candidates/`` receives the review images.
    roles : dict
        Assay channel name -> role.
    rename : dict, optional
        Assay channel name -> channel name in the file.
    pixel_size_um : float, optional
        Used when the file's metadata has none.
    saturation : float, optional
        Saturating pixel value (default: the dtype maximum).
    stage : dict, optional
        Stage position of the field, when known better than the file says.
    """

    path: str
    name: str
    out_dir: str
    settings: DetectionSettings = field(default_factory=DetectionSettings)
    roles: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ROLES))
    rename: dict[str, str] | None = None
    pixel_size_um: float | None = None
    saturation: float | None = None
    stage: dict[str, float] | None = None


def analyze_field_file(job: FieldJob) -> dict[str, Any]:
    """Detect and classify the objects of one field file.

    Returns
    -------
    dict
        ``field``, ``file``, ``pixel_size_um``, ``channels``, ``stage``,
        ``background``, ``noise``, ``spillover``, ``qc``, ``counts``, ``objects``
        (rows with ``field``, ``stage_x_um``, ``stage_y_um`` and a ``candidate``
        image path for CTCs) and ``seconds``.

    Raises
    ------
    FieldReadError
        The file is unreadable, lacks a needed channel, or has no pixel size
        and none was given.
    """
    t0 = time.perf_counter()
    required = [n for n, r in job.roles.items() if r != "marker"]
    ff = read_field_file(job.path, rename=job.rename, required=required)
    _check_finite(ff.path, ff.data, ff.channel_names)
    px = ff.pixel_size_um or job.pixel_size_um
    if not px:
        raise FieldReadError(
            f"{job.path}: no pixel size in the metadata; give one with --pixel-size"
        )
    det = detect_field(
        ff.data,
        ff.channel_names,
        pixel_size_um=px,
        settings=job.settings,
        roles=job.roles,
        saturation=job.saturation,
    )
    qc = channel_qc(ff.data, ff.channel_names, saturation=job.saturation)
    stage = dict(job.stage or ff.stage)
    _, h, w = ff.data.shape
    out = Path(job.out_dir) / "candidates"
    ctcs = sorted(
        (o for o in det.objects if o["label"] == "CTC"), key=lambda o: -o["score"]
    )
    for o in det.objects:
        o["field"] = job.name
        o["stage_x_um"] = (
            round(stage["x_um"] + (o["col"] - (w - 1) / 2) * px, 1)
            if "x_um" in stage
            else float("nan")
        )
        o["stage_y_um"] = (
            round(stage["y_um"] - (o["row"] - (h - 1) / 2) * px, 1)
            if "y_um" in stage
            else float("nan")
        )
    if ctcs:
        out.mkdir(parents=True, exist_ok=True)
    for k, o in enumerate(ctcs):
        png = out / f"{job.name}_{k:03d}.png"
        candidate_png(
            png,
            ff.data,
            ff.channel_names,
            job.roles,
            (o["row"], o["col"]),
            pixel_size_um=px,
            background=det.background,
            noise=det.noise,
            title=f"{job.name} score {o['score']:.2f}",
        )
        o["candidate"] = f"candidates/{png.name}"
    return _json_ready(
        {
            "field": job.name,
            "file": str(job.path),
            "pixel_size_um": px,
            "channels": ff.channel_names,
            "shape": [h, w],
            "stage": stage,
            "background": det.background,
            "noise": det.noise,
            "spillover": det.spillover,
            "spillover_measured": det.spillover_measured,
            "qc": qc,
            "counts": det.counts(),
            "objects": det.objects,
            "seconds": round(time.perf_counter() - t0, 4),
        }
    )


def _check_finite(path: Path, data: np.ndarray, names: list[str]) -> None:
    """A float field with NaN or infinite pixels has no background, noise or
    signal there: it is refused, not analysed into a silent zero."""
    if data.dtype.kind != "f":
        return
    for name, plane in zip(names, data, strict=True):
        if bad := int(np.count_nonzero(~np.isfinite(plane))):
            raise FieldReadError(
                f"{path}: {bad} pixels of {name} are not numbers (NaN or "
                "infinite); the field cannot be analysed"
            )


def _json_ready(value: Any) -> Any:
    """`value` with every float that is not finite (a feature that does not
    apply, a stage position that is unknown) as None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value

"""One field file in, one detection record out: shared by on-line and off-line use.

`analyze_field_file` is a plain function of a picklable `FieldJob`, so it runs in a
worker process as well as in-thread. It writes the review images of the field's
CTC candidates itself and returns a JSON-ready record.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from analysis.detect import DEFAULT_ROLES, detect_field
from analysis.fieldio import FieldReadError, read_field_file
from analysis.gallery import candidate_png
from analysis.qc import channel_qc
from analysis.review import review_flag
from analysis.settings import DetectionSettings, StitchSettings

__all__ = [
    "FieldJob",
    "analysis_identity",
    "analyze_field_file",
    "detector_version",
    "file_stamp",
]


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
        The run (or analysis) folder: its ``candidates/`` receives the review
        images, and a Dask task writes the result into its ``detections/``.
    roles : dict
        Assay channel name -> role.
    rename : dict, optional
        Assay channel name -> channel name in the file.
    pixel_size_um : float, optional
        Used when the file's metadata has none.
    saturation : float, optional
        Saturating pixel value, when the file does not state its bit depth
        (OME ``SignificantBits``); default the dtype maximum.
    stage : dict, optional
        Stage position of the field, when known better than the file says.
    pixel_affine : tuple of 6 float, optional
        The pixel-size affine transform (Micro-Manager's ``(a, b, tx, c, d,
        ty)``, `analysis.stitch`) placing the field's pixels on the stage; by
        default an unrotated camera at the pixel size.
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
    pixel_affine: tuple[float, float, float, float, float, float] | None = None


def analyze_field_file(job: FieldJob) -> dict[str, Any]:
    """Detect and classify the objects of one field file.

    Returns
    -------
    dict
        ``field``, ``file``, ``pixel_size_um``, ``channels``, ``stage``,
        ``background``, ``noise``, ``spillover``, ``qc``, ``counts``, ``objects``
        (rows with ``field``, ``stage_x_um``, ``stage_y_um`` and a ``candidate``
        image path for CTCs) and ``seconds``. A feature that does not apply,
        or a stage position that is unknown, is NaN; the detection file
        (`controller.runstore.results.encode_result`) writes it as null.

    Raises
    ------
    FieldReadError
        The file is unreadable, lacks a needed channel, or has no pixel size
        and none was given.
    """
    t0 = time.perf_counter()
    source = file_stamp(job.path)
    required = [n for n, r in job.roles.items() if r != "marker"]
    ff = read_field_file(job.path, rename=job.rename, required=required)
    keep = [i for i, n in enumerate(ff.channel_names) if n in job.roles]
    if len(keep) < len(ff.channel_names):
        # a channel the assay does not name takes no part (the debris rules
        # weigh every channel the detector is given)
        ff = dataclasses.replace(
            ff, data=ff.data[keep], channel_names=[ff.channel_names[i] for i in keep]
        )
    _check_finite(ff.path, ff.data, ff.channel_names)
    _check_signal(ff.path, ff.data, ff.channel_names, required)
    px = ff.pixel_size_um or job.pixel_size_um
    if not px:
        raise FieldReadError(
            f"{job.path}: no pixel size in the metadata; give one with --pixel-size"
        )
    # a 12-bit camera's data in 16-bit words saturates at 4095, as its file
    # states (OME SignificantBits, which its checksum covers in a run folder)
    saturation = ff.saturation if ff.saturation is not None else job.saturation
    det = detect_field(
        ff.data,
        ff.channel_names,
        pixel_size_um=px,
        settings=job.settings,
        roles=job.roles,
        saturation=saturation,
    )
    # the background and noise the detection's thresholds stood on, not a
    # second estimate of them (nor a second pass for the maxima)
    qc = channel_qc(
        ff.data,
        ff.channel_names,
        saturation=saturation,
        background=det.background,
        noise=det.noise,
        maxima=det.maxima,
    )
    if ff.saturation is not None:
        over = [(n, q["max"]) for n, q in qc.items() if q["max"] > ff.saturation]
        if over:  # the file's own bit depth is false: its saturation with it
            raise FieldReadError(
                f"{job.path}: its OME SignificantBits ({ff.significant_bits}) puts "
                f"saturation at {ff.saturation:g}, but {over[0][0]} reaches "
                f"{over[0][1]:g}; the field cannot be analysed"
            )
    stage = dict(job.stage or ff.stage)
    _, h, w = ff.data.shape
    out = Path(job.out_dir) / "candidates"
    ctcs = sorted(
        (o for o in det.objects if o["label"] == "CTC"), key=lambda o: -o["score"]
    )
    for o in det.objects:
        o["field"] = job.name
        o["review"] = review_flag(o, job.settings)
        o["stage_x_um"], o["stage_y_um"] = _stage_of(o, stage, (h, w), px, job)
    if ctcs:
        out.mkdir(parents=True, exist_ok=True)
    pictures: dict[str, str] = {}  # candidates/NAME.png -> sha256, for verify
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
        pictures[o["candidate"]] = hashlib.sha256(png.read_bytes()).hexdigest()
    return {
        "field": job.name,
        "file": str(job.path),
        "pixel_size_um": px,
        "channels": ff.channel_names,
        "shape": [h, w],
        "stage": stage,
        "pixel_affine": None if job.pixel_affine is None else list(job.pixel_affine),
        "background": det.background,
        "noise": det.noise,
        "spillover": det.spillover,
        "spillover_measured": det.spillover_measured,
        "qc": qc,
        "counts": det.counts(),
        "objects": det.objects,
        "candidates": pictures,
        "seconds": round(time.perf_counter() - t0, 4),
        "source": source,
    }


def _stage_of(
    o: dict[str, Any],
    stage: dict[str, float],
    shape: tuple[int, int],
    px: float,
    job: FieldJob,
) -> tuple[float, float]:
    """Stage position (um, 0.1 um) of an object's centre; NaN where the
    field's stage position is unknown."""
    h, w = shape
    dc, dr = o["col"] - (w - 1) / 2, o["row"] - (h - 1) / 2
    if job.pixel_affine is None:
        x = stage["x_um"] + dc * px if "x_um" in stage else float("nan")
        y = stage["y_um"] - dr * px if "y_um" in stage else float("nan")
    else:
        a, b, tx, c, d, ty = job.pixel_affine
        x = stage.get("x_um", float("nan")) + a * dc + b * dr + tx
        y = stage.get("y_um", float("nan")) + c * dc + d * dr + ty
    return round(x, 1), round(y, 1)


def file_stamp(path: str | Path) -> str | None:
    """``"size:mtime_ns"`` of a file (None when it is not there): a stored
    result of a file whose stamp has changed since is redone on resume."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


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


def _check_signal(
    path: Path, data: np.ndarray, names: list[str], needed: Sequence[str]
) -> None:
    """A stain's channel of one value throughout (a dead camera channel, a
    blank plane written in its place), or but for a few hot pixels (at most
    1 in `_DEAD_FRACTION`: fewer than one small cell covers), holds no signal
    to judge by: the field is refused, not counted as if that stain were
    absent from every cell."""
    for name in needed:
        plane = data[names.index(name)]
        sample = plane[::16, ::16].ravel()
        # the sample first: a live channel is told apart at 1/256 of a pass
        value = np.partition(sample, sample.size // 2)[sample.size // 2]
        if np.count_nonzero(sample != value) > sample.size // 100 + 1:
            continue
        others = plane.size - int(np.count_nonzero(plane == value))
        if others <= plane.size * _DEAD_FRACTION:
            but = "throughout" if not others else f"in all but {others} pixel(s)"
            raise FieldReadError(
                f"{path}: channel {name} holds one value ({value}) {but}: "
                "no signal; the field cannot be analysed"
            )


#: the share of a stain channel's pixels that may differ from its one value
#: and still leave it dead (1e-4: 143 pixels of a 1384 x 1036 field)
_DEAD_FRACTION = 1e-4


#: the modules whose code decides a field's detection record
_DETECTOR_MODULES = (
    "background.py",
    "detect.py",
    "fieldio.py",
    "gallery.py",
    "pipeline.py",
    "psf.py",
    "qc.py",
    "review.py",
    "settings.py",
)


@functools.cache
def detector_version() -> str:
    """The installed ctcscan version and a digest of the analysis code
    (``0.1.0+a1b2c3d4``): any change to how fields are analysed changes it."""
    try:
        release = version("ctcscan")
    except PackageNotFoundError:
        release = "0+unknown"
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _DETECTOR_MODULES:
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    return f"{release}+{h.hexdigest()[:8]}"


def analysis_identity(
    settings: DetectionSettings,
    roles: dict[str, str],
    rename: dict[str, str] | None = None,
    pixel_size_um: float | None = None,
    stitch: StitchSettings | None = None,
) -> tuple[str, str]:
    """``(analysis id, settings sha256)``: the id (12 hex digits) names the
    detector version and everything a user sets (the stitching of overlapping
    fields too); the same fields analysed under the same id give the same
    results."""
    settings_sha = hashlib.sha256(
        json.dumps(
            {
                "settings": settings.model_dump(mode="json"),
                "roles": roles,
                "rename": rename,
                "pixel_size_um": pixel_size_um,
                **({} if stitch is None else {"stitch": stitch.model_dump()}),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    aid = hashlib.sha256(f"{detector_version()}\n{settings_sha}".encode()).hexdigest()
    return aid[:12], settings_sha

"""napari reader for ctcscan run folders (and analysis folders of one).

Opening a run folder in napari gives one image layer per channel, each a lazy
mosaic of the whole cartridge, and a points layer of the detected events. napari
itself is never imported: the reader returns napari's ``(data, kwargs,
layer_type)`` tuples, and the npe2 manifest (``analysis/napari.yaml``) points
napari at `napari_get_reader`.

World coordinates
-----------------
napari's world axes are ``(-stage_y_um, stage_x_um)``: world x is stage x, world
y is stage y negated (`world_from_stage`). Image rows run towards smaller stage y
(row 0 of a field at its largest y), so with this convention every field is shown
as the camera saw it, rows downwards, and a cell's point lands on its pixels. The
position napari shows under the cursor at world ``(a, b)`` is stage
``x = b``, ``y = -a`` micrometres.

Mosaic
------
Every field planned in ``scan.json`` gets its place in the mosaic from the
stage position read back when it was stored (the ledger's ``stored`` line, the
position ``events.csv`` uses; the planned one for a field never stored) and the
pixel size. Where fields overlap (a planned overlap, a stage landing a few um
off) the first field of the plan shows; a field whose file is missing is zeros,
and so are gaps. A camera turned against the stage (``scan.json``'s
``pixel_affine``, Micro-Manager's pixel-size affine) turns the whole mosaic
with it: its layers then carry napari's ``affine`` (world from mosaic pixel)
instead of ``scale`` and ``translate``, each field placed to the nearest whole
pixel, so a point sits on its cell's pixels whatever the rotation.

Each layer's data is a multiscale pyramid (a list of dask arrays, factor 4 per
level, until the longest side is at most `PYRAMID_MAX_PX`), so napari reads only
the fields in view, at the resolution it draws. Each chunk of every level is one
field (or a gap): computing one field's region reads that field's file only, and
only the one channel (one TIFF page) the layer shows. A field file that cannot be
read is drawn as zeros with a warning naming it.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import tifffile

from analysis.fieldio import FieldFile, FieldReadError, read_field_file
from analysis.stitch import Affine, check_affine, default_affine

__all__ = [
    "CHANNEL_COLORMAPS",
    "LABEL_COLORS",
    "PYRAMID_FACTOR",
    "PYRAMID_MAX_PX",
    "REVIEW_COLOR",
    "RunFolderError",
    "napari_get_reader",
    "read_run",
    "stage_from_world",
    "world_from_stage",
]

LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[str | Sequence[str]], list[LayerData]]

FIELD_SUFFIX = ".ome.tif"

#: napari colormap of each channel, by channel name ...
CHANNEL_COLORMAPS = {"DAPI": "blue", "FITC": "green", "PE": "yellow", "APC": "magenta"}
#: ... or, for other channel names, by the channel's role in the assay
ROLE_COLORMAPS = {
    "nucleus": "blue",
    "marker": "green",
    "epithelial": "yellow",
    "leukocyte": "magenta",
}
#: ring colour of an event, by label (RGBA); CTCs are also drawn larger
LABEL_COLORS: dict[str, tuple[float, float, float, float]] = {
    "CTC": (1.0, 1.0, 1.0, 1.0),
    "DOUBLE_POSITIVE": (1.0, 0.4, 0.5, 1.0),
    "CK_FRAGMENT": (1.0, 1.0, 0.5, 1.0),
    "DEBRIS": (0.63, 0.32, 0.18, 1.0),
    "WBC": (0.5, 0.5, 0.5, 1.0),
    "OTHER": (0.7, 0.7, 0.7, 1.0),
}
#: ring colour of a candidate flagged for review (a true ``review`` column)
REVIEW_COLOR = (1.0, 0.55, 0.0, 1.0)
_UNKNOWN_COLOR = (0.7, 0.7, 0.7, 1.0)
#: point diameters in um: CTCs (and candidates for review), other events
CTC_SIZE_UM, EVENT_SIZE_UM = 30.0, 15.0

#: downsampling factor between pyramid levels
PYRAMID_FACTOR = 4
#: the coarsest level's longest side is at most this many pixels
PYRAMID_MAX_PX = 2048

_FALSE = {"", "0", "false", "no", "n", "none", "nan", "f"}


class RunFolderError(ValueError):
    """A run folder cannot be shown; the message names the file and the reason."""


def world_from_stage(x_um: Any, y_um: Any) -> np.ndarray:
    """napari world coordinates ``(-y, x)`` of stage positions (um).

    Parameters
    ----------
    x_um, y_um : float or array-like
        Stage x and y in micrometres.

    Returns
    -------
    ndarray, shape (2,) or (N, 2)
        World coordinates in napari's axis order (vertical, horizontal).
    """
    x, y = np.asarray(x_um, dtype=float), np.asarray(y_um, dtype=float)
    return np.stack([-y, x], axis=-1)


def stage_from_world(world: Any) -> tuple[Any, Any]:
    """Stage ``(x_um, y_um)`` of napari world coordinates; the inverse of
    `world_from_stage`."""
    w = np.asarray(world, dtype=float)
    return w[..., 1], -w[..., 0]


def napari_get_reader(path: str | Sequence[str]) -> ReaderFunction | None:
    """The reader of `path` if it is a ctcscan run folder, else None.

    Parameters
    ----------
    path : str or list of str
        What napari was asked to open; a list is read only if it holds one path.

    Returns
    -------
    callable or None
        `read_run` for a run folder (``scan.json`` and ``fields/``), its
        ``scan.json``, or the output folder of ``ctcscan analyze`` run on one;
        None otherwise (an OME-TIFF folder without ``scan.json`` included).
    """
    one = _single(path)
    if one is None:
        return None
    try:
        found = _locate(Path(one))
    except (OSError, ValueError):
        return None
    return read_run if found is not None else None


def read_run(path: str | Sequence[str]) -> list[LayerData]:
    """Layers of a run folder (or of an analysis folder of one).

    Parameters
    ----------
    path : str or list of one str
        The run folder, or the ``ctcscan analyze`` output folder of one (images
        from the run, events from the analysis).

    Returns
    -------
    list of (data, kwargs, layer_type)
        One ``"image"`` layer per channel, in the files' channel order: data a
        list of dask arrays (the mosaic, then coarser levels), kwargs ``name``,
        ``colormap``, ``blending`` (additive), ``contrast_limits`` (from one
        field), ``scale`` and ``translate`` (world = ``(-stage y, stage x)`` um),
        ``multiscale`` and ``metadata``. Then, if the folder has ``events.csv``,
        one ``"points"`` layer named ``events``: a point per row at its stage
        position, features ``label``, ``score``, ``field``, ``marker_positive``,
        ``reason`` (and ``review`` when the file has that column), ring colour by
        label, CTCs larger.

    Raises
    ------
    RunFolderError
        `path` is not a run folder or analysis folder of one, or ``scan.json`` /
        ``events.csv`` cannot be read.
    """
    one = _single(path)
    found = _locate(Path(one)) if one is not None else None
    if found is None:
        raise RunFolderError(f"{path}: not a ctcscan run folder or analysis of one")
    run_dir, out_dir = found
    mosaic = _Mosaic.open(run_dir)
    layers = mosaic.image_layers()
    events = out_dir / "events.csv"
    if events.is_file():
        layers.append(_points_layer(events, mosaic))
    return layers


# -- finding the run -------------------------------------------------------------


def _single(path: str | Sequence[str]) -> str | None:
    if isinstance(path, (str, Path)):
        return str(path)
    paths = list(path)
    return str(paths[0]) if len(paths) == 1 else None


def _is_run(folder: Path) -> bool:
    return (folder / "scan.json").is_file() and (folder / "fields").is_dir()


def _locate(path: Path) -> tuple[Path, Path] | None:
    """``(run folder, folder of the events)`` for `path`, or None."""
    if path.name == "scan.json" and path.is_file():
        path = path.parent  # the run folder's scan.json opens the run
    if not path.is_dir():
        return None
    if _is_run(path):
        return path, path
    ledger = path / "ledger.jsonl"
    if (path / "scan.json").exists() or not ledger.is_file():
        return None
    source = _analysis_input(ledger)
    if source is not None and _is_run(source):
        return source, path
    return None


def _analysis_input(ledger: Path) -> Path | None:
    """The input of the latest analysis recorded in an analysis folder's
    ledger (its ``analysis_started`` lines), or None."""
    source = None
    with ledger.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if '"analysis_started"' not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn line
            if (
                isinstance(rec, dict)
                and rec.get("event") == "analysis_started"
                and isinstance(rec.get("input"), str)
            ):
                source = rec["input"]
    if source is None:
        return None
    src = Path(source)
    return src if src.is_absolute() else ledger.parent / src


def _stored_stage(ledger: Path) -> dict[str, tuple[float, float]]:
    """Field name -> the stage (x, y) um read back when it was stored, from a
    run's ledger (the last ``stored`` line of a field counts)."""
    out: dict[str, tuple[float, float]] = {}
    try:
        f = ledger.open(encoding="utf-8", errors="replace")
    except OSError:
        return out
    with f:
        for line in f:
            if '"stored"' not in line:
                continue
            try:
                rec = json.loads(line)
                stage = rec["stage"]
                x, y = float(stage["x_um"]), float(stage["y_um"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn line, or no position
            if rec.get("event") == "stored" and math.isfinite(x) and math.isfinite(y):
                out[str(rec.get("field"))] = (x, y)
    return out


# -- the mosaic ------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    """A field of the plan (``scan.json``)."""

    name: str
    path: Path
    x_um: float
    y_um: float
    edge: bool


@dataclass(frozen=True)
class _Placed:
    """A field of the plan and the mosaic pixel of its first pixel."""

    name: str
    path: Path
    row0: int
    col0: int
    x_um: float
    y_um: float


@dataclass(frozen=True)
class _Mosaic:
    run_dir: Path
    cartridge_id: str
    pixel_size_um: float
    field_shape: tuple[int, int]
    dtype: np.dtype
    channels: list[str]
    colormaps: list[str]
    contrast: list[tuple[float, float]]
    fields: list[_Placed]
    shape: tuple[int, int]
    translate: tuple[float, float]
    #: world ``(-y, x)`` from a pixel offset ``(row, col)``; None: ``pixel_size_um``
    #: times the identity (an unturned camera)
    linear: tuple[tuple[float, float], tuple[float, float]] | None
    affine: Affine

    @classmethod
    def open(cls, run_dir: Path) -> _Mosaic:
        scan_json = run_dir / "scan.json"
        scan = _read_json(scan_json)
        planned = _planned(scan, scan_json)
        landed = _stored_stage(run_dir / "ledger.jsonl")
        planned = [
            replace(f, x_um=landed[f.name][0], y_um=landed[f.name][1])
            if f.name in landed
            else f
            for f in planned
        ]
        probe = _probe(run_dir, planned)
        px = (probe.pixel_size_um if probe else None) or scan.get("pixel_size_um")
        if not isinstance(px, (int, float)) or not math.isfinite(px) or px <= 0:
            raise RunFolderError(f"{scan_json}: no pixel size")
        if probe is not None:
            _, h, w = probe.data.shape
            dtype = probe.data.dtype
            channels = list(probe.channel_names)
            contrast = [_contrast(plane) for plane in probe.data]
        else:  # no readable field: zeros the size of the configured camera
            try:
                camera = scan["instrument"]["camera"]
                h, w = int(camera["height"]), int(camera["width"])
                top = float(2 ** int(camera.get("bit_depth", 16)) - 1)
                channels = [str(c) for c in scan["request"]["channels"]]
            except (KeyError, TypeError, ValueError):
                raise RunFolderError(
                    f"{run_dir / 'fields'}: no readable field file, and "
                    f"{scan_json} names no camera size and channels"
                ) from None
            dtype = np.dtype(np.uint16)
            contrast = [(0.0, top)] * len(channels)
        roles = scan.get("assay", {}).get("channels", {})
        cmaps = [
            CHANNEL_COLORMAPS.get(c, ROLE_COLORMAPS.get(roles.get(c, ""), "gray"))
            for c in channels
        ]
        affine = _affine(scan, scan_json, float(px))
        a, b, tx, c, d, ty_ = affine
        # world (-y, x) of a pixel offset (row, col) from the frame centre
        lin = np.array([[-d, -c], [b, a]])
        turned = not (b == 0 and c == 0 and a == px and d == -px)
        # world position of each field's first pixel centre (row 0, col 0)
        centre = np.array([(h - 1) / 2, (w - 1) / 2])
        corners = [
            np.array([-f.y_um - ty_, f.x_um + tx]) - lin @ centre for f in planned
        ]
        if not turned:
            origin = (min(cw[0] for cw in corners), min(cw[1] for cw in corners))
            at = [
                ((cw[0] - origin[0]) / px, (cw[1] - origin[1]) / px) for cw in corners
            ]
        else:  # in the camera's pixel axes, the mosaic turned as a whole
            inv = np.linalg.inv(lin)
            q = [inv @ cw for cw in corners]
            q0 = np.array([min(v[0] for v in q), min(v[1] for v in q)])
            world0 = lin @ q0
            origin = (float(world0[0]), float(world0[1]))
            at = [(v[0] - q0[0], v[1] - q0[1]) for v in q]
        placed = [
            _Placed(
                name=f.name,
                path=f.path,
                row0=round(r),
                col0=round(cl),
                x_um=f.x_um,
                y_um=f.y_um,
            )
            for f, (r, cl) in zip(planned, at, strict=True)
        ]
        shape = (max(p.row0 for p in placed) + h, max(p.col0 for p in placed) + w)
        cartridge = scan.get("request", {}).get("cartridge_id") or run_dir.name
        return cls(
            run_dir=run_dir,
            cartridge_id=str(cartridge),
            pixel_size_um=float(px),
            field_shape=(h, w),
            dtype=np.dtype(dtype),
            channels=channels,
            colormaps=cmaps,
            contrast=contrast,
            fields=placed,
            shape=shape,
            translate=(float(origin[0]), float(origin[1])),
            linear=((lin[0, 0], lin[0, 1]), (lin[1, 0], lin[1, 1])) if turned else None,
            affine=affine,
        )

    def levels(self) -> list[int]:
        """Downsampling factor of each pyramid level, 1 first."""
        out = [1]
        while max(-(-s // out[-1]) for s in self.shape) > PYRAMID_MAX_PX:
            out.append(out[-1] * PYRAMID_FACTOR)
        return out

    def level(self, channel: int, factor: int = 1) -> da.Array:
        """The mosaic of one channel, downsampled by `factor`.

        Pixel ``(i, j)`` of a level is the mean of the mosaic's block
        ``[i * factor, (i + 1) * factor) x [j * factor, (j + 1) * factor)`` over
        one field (the first in the plan where a block straddles two fields).
        """
        h, w = self.field_shape
        tiles = []
        for f in self.fields:
            if not f.path.is_file():
                continue  # never stored (failed, or not yet scanned): zeros
            offset = (f.row0 % factor, f.col0 % factor)
            load = dask.delayed(_load_tile, pure=True)(
                str(f.path), channel, (h, w), self.dtype.str, factor, offset
            )
            th = len(_block_starts(h, factor, offset[0]))
            tw = len(_block_starts(w, factor, offset[1]))
            arr = da.from_delayed(load, shape=(th, tw), dtype=self.dtype)
            tiles.append((f.row0 // factor, f.col0 // factor, arr))
        shape = (-(-self.shape[0] // factor), -(-self.shape[1] // factor))
        return _assemble(shape, self.dtype, tiles)

    def image_layers(self) -> list[LayerData]:
        px = self.pixel_size_um
        meta = {
            "run": str(self.run_dir),
            "cartridge_id": self.cartridge_id,
            "world": "(-stage_y_um, stage_x_um)",
            "pixel_size_um": px,
            "fields": {f.name: (f.row0, f.col0) for f in self.fields},
        }
        factors = self.levels()
        place: dict[str, Any] = {"scale": (px, px), "translate": self.translate}
        if self.linear is not None:
            (l00, l01), (l10, l11) = self.linear
            ty, tx = self.translate
            place = {"affine": [[l00, l01, ty], [l10, l11, tx], [0.0, 0.0, 1.0]]}
            meta["pixel_affine"] = list(self.affine)
        return [
            (
                [self.level(i, k) for k in factors],
                {
                    "name": name,
                    "colormap": cmap,
                    "blending": "additive",
                    "contrast_limits": list(limits),
                    **place,
                    "multiscale": True,
                    "metadata": {**meta, "channel": name},
                },
                "image",
            )
            for i, (name, cmap, limits) in enumerate(
                zip(self.channels, self.colormaps, self.contrast, strict=True)
            )
        ]


def _affine(scan: dict[str, Any], scan_json: Path, px: float) -> Affine:
    """The run's pixel-size affine (``scan.json``; an unturned camera when it
    names none)."""
    inst = scan.get("instrument")
    given = inst.get("pixel_affine") if isinstance(inst, dict) else None
    if given is None:
        return default_affine(px)
    try:
        return check_affine(given, px)
    except ValueError as e:
        raise RunFolderError(f"{scan_json}: {e}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path}: cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: not a JSON object")
    return data


def _planned(scan: dict[str, Any], scan_json: Path) -> list[_Field]:
    """The planned fields of ``scan.json``: name, stage centre, edge."""
    fields = scan.get("fields")
    if not isinstance(fields, list) or not fields:
        raise RunFolderError(f"{scan_json}: no planned fields")
    out = []
    for k, f in enumerate(fields):
        try:
            name = f["name"]
            x, y = float(f["x_um"]), float(f["y_um"])
        except (KeyError, TypeError, ValueError):
            raise RunFolderError(
                f"{scan_json}: planned field {k} has no name or stage x_um, y_um"
            ) from None
        if not isinstance(name, str) or "/" in name or "\\" in name:
            raise RunFolderError(f"{scan_json}: planned field {k}: bad name {name!r}")
        if not (math.isfinite(x) and math.isfinite(y)):
            raise RunFolderError(f"{scan_json}: {name}: stage position not finite")
        path = scan_json.parent / "fields" / f"{name}{FIELD_SUFFIX}"
        out.append(_Field(name, path, x, y, bool(f.get("edge", False))))
    return out


def _probe(run_dir: Path, planned: list[_Field]) -> FieldFile | None:
    """One stored field, read whole: shape, dtype, channels and the contrast of
    the mosaic come from it. An inner field if there is one (edge fields hold the
    bright cartridge wall), the nearest to the centre of the plan."""
    xs, ys = [f.x_um for f in planned], [f.y_um for f in planned]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    order = sorted(
        planned, key=lambda f: (f.edge, math.hypot(f.x_um - cx, f.y_um - cy))
    )
    for f in order:
        if not f.path.is_file():
            continue
        try:
            return read_field_file(f.path)
        except FieldReadError as e:
            warnings.warn(str(e), RuntimeWarning, stacklevel=3)
    return None


def _contrast(plane: np.ndarray) -> tuple[float, float]:
    """Display range of a channel from one field: its 0.5th and 99.95th
    percentiles (the brightest cells saturate, the background is dark)."""
    lo, hi = (float(v) for v in np.percentile(plane, [0.5, 99.95]))
    return lo, hi if hi > lo else lo + 1.0


@dataclass(frozen=True)
class _Tile:
    """A tile clipped to the mosaic: rows ``r0:r1``, columns ``c0:c1`` of the
    mosaic hold ``array[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0]``."""

    r0: int
    r1: int
    c0: int
    c1: int
    row0: int
    col0: int
    array: da.Array


def _assemble(
    shape: tuple[int, int], dtype: np.dtype, tiles: list[tuple[int, int, da.Array]]
) -> da.Array:
    """A 2-D dask array of `shape` with each tile ``(row0, col0, array)`` in
    place, zeros elsewhere. The chunks are cut at every tile edge, so each chunk
    lies inside one tile (the first listed, where tiles overlap) or in none."""
    height, width = shape
    rows, cols = {0, height}, {0, width}
    kept = []
    for row0, col0, arr in tiles:
        t = _Tile(
            max(row0, 0),
            min(row0 + arr.shape[0], height),
            max(col0, 0),
            min(col0 + arr.shape[1], width),
            row0,
            col0,
            arr,
        )
        if t.r1 > t.r0 and t.c1 > t.c0:
            rows |= {t.r0, t.r1}
            cols |= {t.c0, t.c1}
            kept.append(t)
    rb, cb = sorted(rows), sorted(cols)
    owner: list[list[_Tile | None]] = [[None] * (len(cb) - 1) for _ in rb[1:]]
    for t in kept:
        for i in range(bisect.bisect_left(rb, t.r0), bisect.bisect_left(rb, t.r1)):
            for j in range(bisect.bisect_left(cb, t.c0), bisect.bisect_left(cb, t.c1)):
                if owner[i][j] is None:
                    owner[i][j] = t
    blocks = []
    for i in range(len(rb) - 1):
        row = []
        for j in range(len(cb) - 1):
            rs, re, cs, ce = rb[i], rb[i + 1], cb[j], cb[j + 1]
            o = owner[i][j]
            if o is None:
                row.append(da.zeros((re - rs, ce - cs), dtype=dtype))
            else:
                row.append(
                    o.array[rs - o.row0 : re - o.row0, cs - o.col0 : ce - o.col0]
                )
        blocks.append(row)
    return da.block(blocks)


def _load_tile(
    path: str,
    channel: int,
    shape: tuple[int, int],
    dtype: str,
    factor: int = 1,
    offset: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """One channel of one field file, downsampled by `factor` on the mosaic's
    block grid (the field starts `offset` pixels into a block); zeros (and a
    warning naming the file) when the file cannot be read."""
    h, w = shape
    try:
        plane = _read_plane(path, channel)
        if plane.shape != (h, w) or plane.dtype != np.dtype(dtype):
            raise FieldReadError(
                f"{path}: {plane.shape[0]} x {plane.shape[1]} {plane.dtype.name}, "
                f"unlike the run's other fields ({h} x {w} {np.dtype(dtype).name})"
            )
    except FieldReadError as e:
        warnings.warn(f"{e}; shown as zeros", RuntimeWarning, stacklevel=2)
        rs, cs = (
            _block_starts(h, factor, offset[0]),
            _block_starts(w, factor, offset[1]),
        )
        return np.zeros((len(rs), len(cs)), dtype)
    return _downsample(plane, factor, offset)


def _read_plane(path: str, channel: int) -> np.ndarray:
    """Pixels of one channel of a field file (one TIFF page where the file
    stores one page per channel, as ctcscan's do)."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if series.ndim == 2 and channel == 0:
                return np.asarray(series.asarray())
            if series.ndim != 3 or not 0 <= channel < series.shape[0]:
                raise FieldReadError(
                    f"{path}: no channel {channel} in a {series.axes} "
                    f"{tuple(series.shape)} series"
                )
            if len(series.pages) == series.shape[0]:
                return np.asarray(series.asarray(key=channel))
            return np.asarray(series.asarray()[channel])
    except FieldReadError:
        raise
    except FileNotFoundError:
        raise FieldReadError(f"{path}: no such file") from None
    except Exception as e:  # tifffile raises assorted errors on corrupt data
        raise FieldReadError(
            f"{path}: not a readable TIFF ({type(e).__name__}: {e})"
        ) from None


def _block_starts(n: int, factor: int, offset: int) -> np.ndarray:
    """Where the blocks of `factor` pixels start in a run of `n` pixels that
    begins `offset` pixels into a block: 0, then every block boundary."""
    first = (factor - offset) % factor
    starts = np.arange(first, n, factor)
    return starts if first == 0 else np.concatenate([[0], starts])


def _downsample(
    plane: np.ndarray, factor: int, offset: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """Means of the plane over the mosaic's `factor` x `factor` blocks (the
    plane starts `offset` pixels into a block; blocks cut by its edges are
    averaged over the part inside), in the plane's dtype."""
    if factor == 1:
        return plane
    h, w = plane.shape
    ri, ci = _block_starts(h, factor, offset[0]), _block_starts(w, factor, offset[1])
    sums = np.add.reduceat(np.add.reduceat(plane, ri, axis=0, dtype=np.float64), ci, 1)
    counts = np.outer(np.diff(np.append(ri, h)), np.diff(np.append(ci, w)))
    means = sums / counts
    if plane.dtype.kind in "iu":
        means = np.rint(means)
    return means.astype(plane.dtype)


# -- the events ------------------------------------------------------------------


def _points_layer(path: Path, mosaic: _Mosaic) -> LayerData:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise RunFolderError(f"{path}: cannot be read ({e})") from None
    missing = [
        c for c in ("field", "label", "stage_x_um", "stage_y_um") if c not in header
    ]
    if missing:
        raise RunFolderError(f"{path}: no column {', '.join(missing)}")
    a, b, tx, c, d, ty = mosaic.affine
    h, w = mosaic.field_shape
    where = {f.name: f for f in mosaic.fields}
    xs, ys = [], []
    for r in rows:
        x, y = _number(r.get("stage_x_um")), _number(r.get("stage_y_um"))
        fld = where.get(r["field"])
        if not (math.isfinite(x) and math.isfinite(y)) and fld is not None:
            # no stage position in the file: from the field's position
            dc = _number(r.get("col")) - (w - 1) / 2
            dr = _number(r.get("row")) - (h - 1) / 2
            x = fld.x_um + a * dc + b * dr + tx
            y = fld.y_um + c * dc + d * dr + ty
        xs.append(x)
        ys.append(y)
    placed = [
        math.isfinite(x) and math.isfinite(y) for x, y in zip(xs, ys, strict=True)
    ]
    if not all(placed):
        warnings.warn(
            f"{path}: {placed.count(False)} events without a stage position "
            "are not shown",
            RuntimeWarning,
            stacklevel=3,
        )
        rows = [r for r, ok in zip(rows, placed, strict=True) if ok]
        xs = [x for x, ok in zip(xs, placed, strict=True) if ok]
        ys = [y for y, ok in zip(ys, placed, strict=True) if ok]
    labels = np.array([r["label"] for r in rows], dtype=object)
    features: dict[str, np.ndarray] = {
        "label": labels,
        "score": np.array([_number(r.get("score")) for r in rows], dtype=float),
        "field": np.array([r["field"] for r in rows], dtype=object),
        "marker_positive": np.array(
            [_flag(r.get("marker_positive")) for r in rows], dtype=bool
        ),
        "reason": np.array([r.get("reason") or "" for r in rows], dtype=object),
    }
    review = np.zeros(len(rows), dtype=bool)
    if "review" in header:
        review = np.array([_flag(r.get("review")) for r in rows], dtype=bool)
        features["review"] = review
    ctc = labels == "CTC"
    colors = np.array(
        [LABEL_COLORS.get(str(lab), _UNKNOWN_COLOR) for lab in labels], dtype=float
    ).reshape(-1, 4)
    colors[review & ~ctc] = REVIEW_COLOR
    sizes = np.where(ctc | review, CTC_SIZE_UM, EVENT_SIZE_UM).astype(float)
    symbols = np.where(review & ~ctc, "square", "disc")
    data = world_from_stage(xs, ys).reshape(-1, 2)
    return (
        data,
        {
            "name": "events",
            "ndim": 2,
            "features": features,
            "size": sizes,
            "symbol": symbols,
            "face_color": "transparent",
            "border_color": colors,
            "border_width": 0.1,
            "border_width_is_relative": True,
            "metadata": {
                "run": str(mosaic.run_dir),
                "events": str(path),
                "world": "(-stage_y_um, stage_x_um)",
            },
        },
        "points",
    )


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _flag(text: str | None) -> bool:
    return (text or "").strip().lower() not in _FALSE

"""Each cell counted once: a cartridge's fields joined in stage coordinates.

A real stage lands a few um away from its target and a camera sits slightly
rotated to the stage, so fields that abut on paper leave thin gaps and overlaps;
a scan therefore plans a small overlap. Each field is detected on its own
(`analysis.detect`); here the cartridge's objects are placed on the stage, from
each field's read-back stage position and the pixel-size affine transform
(Micro-Manager's ``(a, b, tx, c, d, ty)``: a pixel ``(col, row)`` offset from
the frame centre moves ``(a col + b row + tx, c col + d row + ty)`` um on the
stage), and two rules make each cell count once:

1. **left to a neighbour**: an object whose stage position another field holds
   deeper inside (farther from all its edges) by more than `margin_um` is that
   field's. A cell cut by an edge is thus counted where it is whole, whichever
   edge cuts it. An object the detector already left to the field next door
   (`analysis.settings.CUT_REASON`: its nucleus' centre beyond the edge)
   claims no depth of its own, and its field claims nothing within
   `tolerance_um` of it: the view next door stays even where the overlap is too
   thin for that view to be the deeper one.
2. **merged**: objects of two fields within `tolerance_um` of each other, each
   inside the other's field (both fields imaged that spot), are one cell seen
   twice; the one deepest inside its field is kept (ties: field name, then
   object id).

Fields that do not overlap (abutting exactly) have no spot imaged twice, so
neither rule applies and the count is the detector's half-open tiling. The
result depends on the records only, not on their order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analysis.settings import CUT_REASON, StitchSettings

__all__ = [
    "MAX_ROTATION_DEG",
    "FieldGeometry",
    "Stitching",
    "check_affine",
    "default_affine",
    "object_key",
    "object_place",
    "stitch",
]

Affine = tuple[float, float, float, float, float, float]


def default_affine(pixel_size_um: float) -> Affine:
    """The affine of an unrotated camera: x grows with column, y shrinks with
    row (row 0 of a frame at its largest y)."""
    return (pixel_size_um, 0.0, 0.0, 0.0, -pixel_size_um, 0.0)


def object_key(field_name: str, k: int) -> str:
    """The id of the `k`-th object (by row, then column) of a field; the same
    as `analysis.report.object_id`."""
    return f"{field_name}-{k:04d}"


def object_place(o: Mapping[str, Any]) -> dict[str, Any]:
    """What `stitch` reads of a detected object: its place (``row``, ``col``)
    and, only when the detector's edge rule left it next door, that
    ``reason``. The slim stand-in for an object wherever a record is kept for
    the stitching (the scan's outputs, the station's live candidates)."""
    out = {"row": o.get("row"), "col": o.get("col")}
    if o.get("reason") == CUT_REASON:
        out["reason"] = CUT_REASON
    return out


#: the largest camera rotation a plan along the stage axes tiles (degrees)
MAX_ROTATION_DEG = 5.0


def check_affine(affine: Any, pixel_size_um: float) -> Affine:
    """`affine` as 6 floats, or ValueError (one line) when it is not a camera
    turned at most `MAX_ROTATION_DEG` against the stage at `pixel_size_um`.

    A camera turned by t maps a pixel offset (col, row) to
    ``p (cos t col + sin t row, sin t col - cos t row)`` (row 0 at the largest
    y): so ``a = -d`` and ``b = c``, within 1 % of p. A mirrored, sheared or
    stretched camera, or a translation beyond one pixel, is refused: the
    stitching places objects by it, and a wrong one miscounts without a sign.
    """
    try:
        vals = tuple(float(v) for v in affine)
    except (TypeError, ValueError):
        got = repr(affine)[:60]
        raise ValueError(f"pixel_affine must be 6 numbers, got {got}") from None
    if len(vals) != 6 or not all(map(math.isfinite, vals)):
        raise ValueError(f"pixel_affine must be 6 finite numbers, got {list(vals)}")
    a, b, tx, c, d, ty = vals
    p = pixel_size_um
    scale = math.sqrt(abs(a * d - b * c))
    if abs(scale - p) > 0.01 * p:
        raise ValueError(
            f"pixel_affine scales {scale:.4g} um per pixel, but the pixel size "
            f"is {p:g} um"
        )
    if abs(a + d) > 0.01 * p or abs(b - c) > 0.01 * p:
        raise ValueError(
            f"pixel_affine {list(vals)} is not a turned camera (a = -d and b = c: "
            "a mirrored, sheared or stretched image is fixed on the camera)"
        )
    turn = math.degrees(math.atan2(b, a))
    if abs(turn) > MAX_ROTATION_DEG:
        raise ValueError(
            f"pixel_affine turns the camera {turn:.2f} degrees against the stage; "
            f"fields are planned along the stage axes, so at most "
            f"{MAX_ROTATION_DEG:g} degrees: align the camera"
        )
    if max(abs(tx), abs(ty)) > p:
        raise ValueError(
            f"pixel_affine's translation ({tx:g}, {ty:g}) um exceeds a pixel; the "
            "frame centre is where the stage reads"
        )
    return vals  # type: ignore[return-value]


@dataclass(frozen=True)
class FieldGeometry:
    """Where a field's pixels lie on the stage.

    Attributes
    ----------
    x_um, y_um : float
        Stage position of the frame centre (read back from the stage).
    height, width : int
        Frame size in pixels.
    affine : tuple of 6 float
        Pixel-size affine transform, Micro-Manager's order.
    """

    name: str
    x_um: float
    y_um: float
    height: int
    width: int
    affine: Affine

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> FieldGeometry | None:
        """The geometry of a detection record; None without a stage position,
        frame shape or pixel size."""
        stage = record.get("stage") or {}
        shape = record.get("shape")
        px = record.get("pixel_size_um")
        x, y = stage.get("x_um"), stage.get("y_um")
        if x is None or y is None or not shape or not px:
            return None
        aff = record.get("pixel_affine")
        affine = tuple(float(v) for v in aff) if aff else default_affine(float(px))
        if len(affine) != 6 or not all(map(math.isfinite, affine)):
            return None
        a, b, _, c, d, _ = affine
        if abs(a * d - b * c) < 1e-12:
            return None
        return cls(
            str(record["field"]),
            float(x),
            float(y),
            int(shape[0]),
            int(shape[1]),
            affine,  # type: ignore[arg-type]
        )

    @property
    def scale_um(self) -> float:
        """um per pixel."""
        a, b, _, c, d, _ = self.affine
        return math.sqrt(abs(a * d - b * c))

    @property
    def half_diagonal_um(self) -> float:
        return 0.5 * math.hypot(self.width, self.height) * self.scale_um

    def to_stage(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(n, 2) stage x, y (um) of pixel positions."""
        a, b, tx, c, d, ty = self.affine
        dc = cols - (self.width - 1) / 2
        dr = rows - (self.height - 1) / 2
        return np.stack(
            [self.x_um + a * dc + b * dr + tx, self.y_um + c * dc + d * dr + ty],
            axis=-1,
        )

    def depth(self, points: np.ndarray) -> np.ndarray:
        """How far inside this field (um, to its nearest edge) stage points lie;
        negative outside."""
        a, b, tx, c, d, ty = self.affine
        det = a * d - b * c
        px = points[:, 0] - self.x_um - tx
        py = points[:, 1] - self.y_um - ty
        dc = (d * px - b * py) / det
        dr = (a * py - c * px) / det
        # pixel centres run 0..n-1; a frame's pixels reach half a pixel beyond
        half_w, half_h = self.width / 2, self.height / 2
        inside = np.minimum(half_w - np.abs(dc), half_h - np.abs(dr))
        return inside * self.scale_um


@dataclass
class Stitching:
    """Which objects of a cartridge are counted elsewhere.

    Attributes
    ----------
    left : dict
        Object id -> the field that holds its position deeper inside.
    merged : dict
        Object id -> the id of the object kept for the same cell.
    """

    settings: StitchSettings
    left: dict[str, str] = field(default_factory=dict)
    merged: dict[str, str] = field(default_factory=dict)

    @property
    def dropped(self) -> frozenset[str]:
        return frozenset(self.left) | frozenset(self.merged)

    def summary(self) -> dict[str, Any]:
        """What the report says of it."""
        return {
            "tolerance_um": self.settings.tolerance_um,
            "margin_um": self.settings.margin_um,
            "left_to_neighbour": len(self.left),
            "merged": len(self.merged),
        }


@dataclass
class _Field:
    """A field's objects in id order (by row, then column)."""

    geom: FieldGeometry
    points: np.ndarray  # (n, 2) stage um
    own: np.ndarray  # depth in its own field; 0 for objects left next door
    cut: np.ndarray  # bool: left next door by the detector's edge rule

    def id(self, k: int) -> str:
        return object_key(self.geom.name, k)


def _field(rec: Mapping[str, Any], geom: FieldGeometry) -> _Field:
    objs = rec["objects"]
    rows = np.array([float(o["row"]) for o in objs], dtype=float)
    cols = np.array([float(o["col"]) for o in objs], dtype=float)
    cut = np.array([o.get("reason") == CUT_REASON for o in objs], dtype=bool)
    # the order of the ids: row, then column, ties as listed (a stable sort)
    order = np.lexsort((cols, rows))
    points = geom.to_stage(rows[order], cols[order]).reshape(-1, 2)
    own = geom.depth(points)
    own[cut[order]] = 0.0
    return _Field(geom, points, own, cut[order])


def _neighbours(fields: Sequence[_Field]) -> list[tuple[int, int]]:
    """Pairs of fields whose frames may overlap."""
    out = []
    for i, f in enumerate(fields):
        for j in range(i + 1, len(fields)):
            g = fields[j]
            reach = f.geom.half_diagonal_um + g.geom.half_diagonal_um
            if math.hypot(f.geom.x_um - g.geom.x_um, f.geom.y_um - g.geom.y_um) < reach:
                out.append((i, j))
    return out


def _near(points: np.ndarray, f: _Field, radius: float) -> np.ndarray:
    """Which `points` lie within `radius` of an object of `f` that its edge
    rule left next door."""
    cut = f.points[f.cut]
    if not len(cut) or not len(points):
        return np.zeros(len(points), dtype=bool)
    diff = points[:, None, :] - cut[None, :, :]
    return np.asarray((np.hypot(diff[..., 0], diff[..., 1]) <= radius).any(axis=1))


def stitch(records: Sequence[Mapping[str, Any]], settings: StitchSettings) -> Stitching:
    """The objects of `records` (detection records of one cartridge) that are
    counted in another field or as another object (see the module docstring).

    Records without a stage position or frame shape take no part.
    """
    result = Stitching(settings)
    fields = []
    for rec in sorted(records, key=lambda r: str(r["field"])):
        geom = FieldGeometry.of(rec)
        if geom is not None and rec.get("objects"):
            fields.append(_field(rec, geom))
    pairs = _neighbours(fields)
    # rule 1: left to the field holding the position deepest
    best = [np.full(len(f.own), -np.inf) for f in fields]
    best_at = [np.full(len(f.own), -1) for f in fields]
    inside: dict[tuple[int, int], np.ndarray] = {}
    for i, j in pairs:
        for a, b in ((i, j), (j, i)):
            d = fields[b].geom.depth(fields[a].points)
            inside[a, b] = d
            # where field b's own view of a cell is left next door by its edge
            # rule, b makes no claim to that cell
            gone = _near(fields[a].points, fields[b], settings.tolerance_um)
            d = np.where(gone, -np.inf, d)
            better = d > best[a]
            best[a] = np.where(better, d, best[a])
            best_at[a] = np.where(better, b, best_at[a])
    kept = []
    for a, f in enumerate(fields):
        gone = best[a] > f.own + settings.margin_um
        for k in np.flatnonzero(gone):
            result.left[f.id(int(k))] = fields[int(best_at[a][k])].geom.name
        kept.append(~gone)
    # rule 2: one cell seen whole in two fields
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def root(n: tuple[int, int]) -> tuple[int, int]:
        while parent.get(n, n) != n:
            n = parent[n]
        return n

    tol = settings.tolerance_um
    for i, j in pairs:
        si = np.flatnonzero(kept[i] & (inside[i, j] > 0))
        sj = np.flatnonzero(kept[j] & (inside[j, i] > 0))
        if not len(si) or not len(sj):
            continue
        diff = fields[i].points[si][:, None, :] - fields[j].points[sj][None, :, :]
        close = np.argwhere(np.hypot(diff[..., 0], diff[..., 1]) <= tol)
        for u, v in close:
            ra, rb = root((i, int(si[u]))), root((j, int(sj[v])))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for n in parent:
        groups.setdefault(root(n), []).append(n)
    for members in groups.values():
        members = sorted(set(members) | {root(members[0])})
        # the deepest inside its field; ties: the first field (fields are in
        # name order), then the first object
        keep = min(members, key=lambda n: (-float(fields[n[0]].own[n[1]]), n))
        for n in members:
            if n != keep:
                result.merged[fields[n[0]].id(n[1])] = fields[keep[0]].id(keep[1])
    return result

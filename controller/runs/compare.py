"""``ctcscan compare A B``: what changed between two analyses of the same cartridges.

A side is an analysis folder or a run folder (``report.json`` + ``events.csv``),
or a folder of them (an archive re-analysis): cartridges are paired by the
cartridge id of their reports. For each pair: the two CTC counts, and every
object whose label changed, matched by field and position (centres within
`MATCH_PX` pixels, nearest first), or that only one side found.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from analysis.report import Report, read_report
from controller.errors import StorageError
from controller.runstore.folder import no_folder

__all__ = ["MATCH_PX", "CartridgeChange", "ObjectChange", "compare"]

#: objects of the two sides closer than this (pixels, same field) are one object
MATCH_PX = 3.0


@dataclass(frozen=True)
class ObjectChange:
    """An object labelled differently by the two sides (or found by one only:
    the other label is empty)."""

    cartridge: str
    field: str
    row: float
    col: float
    label_a: str
    label_b: str


@dataclass
class CartridgeChange:
    """One cartridge in both, or one, of the sides."""

    cartridge: str
    ctc_a: int | None
    ctc_b: int | None
    objects: list[ObjectChange] = field(default_factory=list)

    @property
    def change(self) -> int | None:
        if self.ctc_a is None or self.ctc_b is None:
            return None
        return self.ctc_b - self.ctc_a


def _analyses(side: Path) -> dict[str, tuple[Path, Report]]:
    """cartridge id -> analysis folder and its report, for a folder or a
    folder of them."""
    if not side.is_dir():
        raise no_folder(side)
    if (side / "report.json").is_file():
        candidates: Iterator[Path] = iter([side])
    else:
        candidates = (p.parent for p in sorted(side.glob("*/report.json")))
    out: dict[str, tuple[Path, Report]] = {}
    for folder in candidates:
        report = _report(folder)
        cid = report.cartridge_id
        if cid in out:
            raise StorageError(
                f"{side}: cartridge {cid} is analysed twice ({out[cid][0]} and "
                f"{folder})"
            )
        out[cid] = (folder, report)
    if not out:
        raise StorageError(f"{side}: no analysis (report.json) in it or under it")
    return out


def _report(folder: Path) -> Report:
    """The folder's report.json, or a one-line `StorageError`."""
    path = folder / "report.json"
    try:
        return read_report(path)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(k) for k in first["loc"]) or "the report"
        raise StorageError(
            f"{path}: not a ctcscan report ({where}: {first['msg']}"
            + (f"; {e.error_count() - 1} more" if e.error_count() > 1 else "")
            + ")"
        ) from None
    except (OSError, ValueError) as e:
        raise StorageError(f"{path}: unreadable ({e})") from None


def _objects(folder: Path, report: Report) -> dict[str, list[tuple[float, float, str]]]:
    """field -> (row, col, label) of every object of events.csv, which must
    hold as many as its `report` counts (a damaged or cut table is no table
    of that analysis)."""
    path = folder / "events.csv"
    out: dict[str, list[tuple[float, float, str]]] = {}
    n = 0
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.DictReader(f)
            missing = [
                c
                for c in ("field", "row", "col", "label")
                if c not in (rows.fieldnames or [])
            ]
            if missing:
                raise ValueError(f"no column {missing[0]!r}")
            for row in rows:
                out.setdefault(row["field"], []).append(
                    (float(row["row"]), float(row["col"]), row["label"])
                )
                n += 1
    except (OSError, KeyError, TypeError, ValueError, csv.Error) as e:
        raise StorageError(f"{path}: unreadable ({e})") from None
    counted = sum(report.counts.values())
    if n != counted:
        raise StorageError(
            f"{path}: {n} objects, where its report.json counts {counted}; "
            "one of them is damaged or from another analysis"
        )
    return out


def _changes(
    cid: str, a: tuple[Path, Report], b: tuple[Path, Report]
) -> list[ObjectChange]:
    oa, ob = _objects(*a), _objects(*b)
    changes = []
    for fld in sorted(set(oa) | set(ob)):
        left, right = oa.get(fld, []), ob.get(fld, [])
        pairs = sorted(
            (math.hypot(r1 - r2, c1 - c2), i, j)
            for i, (r1, c1, _) in enumerate(left)
            for j, (r2, c2, _) in enumerate(right)
            if abs(r1 - r2) <= MATCH_PX and abs(c1 - c2) <= MATCH_PX
        )
        used_a: set[int] = set()
        used_b: set[int] = set()
        for d, i, j in pairs:
            if d > MATCH_PX or i in used_a or j in used_b:
                continue
            used_a.add(i)
            used_b.add(j)
            if left[i][2] != right[j][2]:
                changes.append(
                    ObjectChange(cid, fld, *left[i][:2], left[i][2], right[j][2])
                )
        changes += [
            ObjectChange(cid, fld, r, c, lab, "")
            for i, (r, c, lab) in enumerate(left)
            if i not in used_a
        ]
        changes += [
            ObjectChange(cid, fld, r, c, "", lab)
            for j, (r, c, lab) in enumerate(right)
            if j not in used_b
        ]
    return sorted(changes, key=lambda o: (o.field, o.row, o.col))


def compare(a: Path, b: Path) -> list[CartridgeChange]:
    """Per-cartridge changes from side `a` to side `b` (see the module docstring).

    Raises
    ------
    StorageError
        A side is no analysis, or a report or events.csv cannot be read.
    """
    left, right = _analyses(a), _analyses(b)
    out = []
    for cid in sorted(set(left) | set(right)):
        ca = left[cid][1].ctc_count if cid in left else None
        cb = right[cid][1].ctc_count if cid in right else None
        item = CartridgeChange(cid, ca, cb)
        if cid in left and cid in right:
            item.objects = _changes(cid, left[cid], right[cid])
        out.append(item)
    return out

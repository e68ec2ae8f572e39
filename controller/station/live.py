"""The station's view of its root: what the web application asks, answered from
files (`Catalog`, `RunView`, `RunReview`, pictures)."""

from __future__ import annotations

import json
import logging
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import tifffile

from analysis.detect import DEFAULT_ROLES
from analysis.report import object_id as make_object_id
from analysis.settings import StitchSettings
from analysis.stitch import object_place, stitch
from controller.runstore.review import FEATURES, ReviewError
from controller.station.pictures import (
    Thumbnails,
    candidate_tile_png,
    field_png,
    mosaic_png,
    png_bytes,
)
from controller.station.review import RunReview, read_events, regular_file
from controller.station.runs import Catalog, NoSuchRun, RunView

__all__ = ["Station"]

#: what the stitching needs of a detection record besides its objects
_GEOMETRY = ("stage", "shape", "pixel_size_um", "pixel_affine")


@dataclass(frozen=True)
class _Live:
    """One detection file as the live candidate list needs it."""

    rows: list[dict[str, Any]]  # CTC calls and flagged objects, with their ids
    where: dict[str, Any]  # field, geometry and objects' places (`stitch`)
    version: tuple[int, int] | None = None  # the file's size and mtime_ns


logger = logging.getLogger("ctcscan.station")

#: the stride of the last-field picture and of the cartridge picture
LAST_STEP = 8
MOSAIC_STEP = 16


class Station:
    """Everything the pages show, for the runs under `root`."""

    def __init__(self, root: Path) -> None:
        self.catalog = Catalog(root)
        self.root = self.catalog.root
        self.thumbs = Thumbnails()
        self._json_cache: OrderedDict[Path, tuple[int, int, Any]] = OrderedDict()
        self._cand_cache: dict[Path, tuple[tuple[int, int], _Live]] = {}
        #: per run folder, its live candidates stitched, and what of: the
        #: detected fields' file versions and the stitch settings
        self._live_cache: dict[Path, tuple[Any, list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ files

    def _inside(self, path: Path) -> Path:
        """`path` resolved, if it lies inside the root (else no such run)."""
        p = path.resolve()
        if not p.is_relative_to(self.root):
            raise NoSuchRun(str(path))
        return p

    def _json(self, path: Path, *, keep: bool = True) -> Any:
        """A JSON file's content, cached by size and modification time; a
        symlink or anything but a regular file is not read."""
        try:
            st = path.lstat()
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        with self._lock:
            hit = self._json_cache.get(path)
            if hit and hit[:2] == (st.st_size, st.st_mtime_ns):
                return hit[2]
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        if keep:
            with self._lock:
                self._json_cache[path] = (st.st_size, st.st_mtime_ns, data)
                self._json_cache.move_to_end(path)
                while len(self._json_cache) > 64:
                    self._json_cache.popitem(last=False)
        return data

    def _run(self, run: str) -> RunView:
        view = self.catalog.view(run)
        if view.kind == "queue":
            raise NoSuchRun(run)
        return view

    def _scan(self, view: RunView) -> dict[str, Any]:
        data = self._json(view.folder / "scan.json")
        return data if isinstance(data, dict) else {}

    def _roles(self, view: RunView) -> dict[str, str]:
        assay = self._scan(view).get("assay") or {}
        roles = assay.get("channels")
        return dict(roles) if isinstance(roles, dict) else dict(DEFAULT_ROLES)

    # --------------------------------------------------------- overview

    def overview(self) -> list[dict[str, Any]]:
        rows = []
        for name, kind in self.catalog.find():
            try:
                status = self.catalog.view(name).status()
                if status["kind"] == "run":
                    status["review"] = self._review_state(name)
            except NoSuchRun:
                continue
            except Exception as e:  # one unreadable folder hides no other
                logger.warning("%s: %s", name, e)
                status = {
                    "run": name,
                    "kind": kind,
                    "state": "unreadable",
                    "error": f"{type(e).__name__}: {e}",
                }
            rows.append(status)
        return rows

    def _review_state(self, run: str) -> dict[str, Any] | None:
        view = self._run(run)
        if not (view.folder / "events.csv").exists():
            return None
        try:
            s = RunReview(view.folder).summary()
        except (ReviewError, OSError, ValueError):
            return None
        return {
            "state": s["state"],
            "reviewed_count": s["reviewed_count"],
            "candidates": s["candidates_total"],
        }

    def reviewed_count(self, run: str) -> int | None:
        st = self._review_state(run)
        return None if st is None or st["state"] != "signed" else st["reviewed_count"]

    # -------------------------------------------------------- candidates

    def _live_rows(self, view: RunView) -> list[dict[str, Any]]:
        """Candidates from the detection files while there is no events.csv:
        the same objects and ids events.csv will have, without those the
        stitching leaves to another field or merges (overlapping fields).

        Stitched again only when a detected field or the version (size,
        mtime) of its detection file changed, or the stitch settings did:
        otherwise the list of the last call (shared: not to be changed)."""
        names = sorted(view.detected_fields())
        lives = [
            self._field_candidates(view.folder / "detections", name) for name in names
        ]
        settings = self._stitch_settings(view)
        versions = tuple(zip(names, (live.version for live in lives), strict=True))
        key = (versions, settings)
        with self._lock:
            hit = self._live_cache.get(view.folder)
            if hit is not None and hit[0] == key:
                return hit[1]
        rows = [r for live in lives for r in live.rows]
        if rows:
            try:
                dropped = stitch([live.where for live in lives], settings).dropped
            except (KeyError, TypeError, ValueError) as e:  # a damaged record
                logger.warning("%s: candidates not stitched (%s)", view.folder, e)
                dropped = frozenset()
            rows = [r for r in rows if r["object_id"] not in dropped]
        with self._lock:
            self._live_cache[view.folder] = (key, rows)
        return rows

    def _stitch_settings(self, view: RunView) -> StitchSettings:
        """The run's stitch settings (``scan.json``'s assay; the defaults when
        it names none or unreadable ones)."""
        given = (self._scan(view).get("assay") or {}).get("stitch")
        try:
            return StitchSettings.model_validate(given or {})
        except ValueError:
            return StitchSettings()

    def _field_candidates(self, folder: Path, name: str) -> _Live:
        """The CTC calls and flagged objects of one detection file, with their
        ids, and where its objects lie (for the stitching), kept per file
        version (not the file's hundreds of other objects' features)."""
        path = folder / f"{name}.json"
        try:
            st = path.lstat()
        except OSError:
            return _Live([], {"field": name})
        key = (st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._cand_cache.get(path)
            if hit is not None and hit[0] == key:
                return hit[1]
        rec = self._json(path, keep=False)
        live = _Live([], {"field": name}, key)
        try:
            live = self._parse_candidates(name, rec, key) or live
        except (KeyError, TypeError, AttributeError, ValueError):
            logger.warning("%s: not a detection record; no candidates from it", path)
        with self._lock:
            self._cand_cache[path] = (key, live)
        return live

    @staticmethod
    def _parse_candidates(
        name: str, rec: Any, version: tuple[int, int]
    ) -> _Live | None:
        if isinstance(rec, dict):
            objs = sorted(rec.get("objects", []), key=lambda o: (o["row"], o["col"]))
            rows = [
                {**o, "object_id": make_object_id(name, k)}
                for k, o in enumerate(objs)
                if o.get("label") == "CTC" or o.get("review")
            ]
            where = {k: rec[k] for k in _GEOMETRY if k in rec}
            where["field"] = name
            where["objects"] = [object_place(o) for o in objs]
            return _Live(rows, where, version)
        return None

    def candidates(self, run: str, reviewer: str | None) -> dict[str, Any]:
        view = self._run(run)
        if (view.folder / "events.csv").exists():
            out = RunReview(view.folder).candidates(reviewer)
        else:
            rows = self._live_rows(view)
            ctc = [r for r in rows if r.get("label") == "CTC"]
            flagged = [r for r in rows if r.get("label") != "CTC" and r.get("review")]
            out = {
                "state": "scanning" if view.running() else "not_ready",
                "machine_count": len(ctc),
                "candidates": [
                    {
                        "object_id": r["object_id"],
                        "field": r["field"],
                        "row": r["row"],
                        "col": r["col"],
                        "stage_x_um": r.get("stage_x_um"),
                        "stage_y_um": r.get("stage_y_um"),
                        "label": r["label"],
                        "reason": r.get("reason", ""),
                        "review": r.get("review", ""),
                        "score": r.get("score"),
                        "features": {k: r.get(k) for k in FEATURES if k in r},
                        "decision": None,
                    }
                    for r in ctc + flagged
                ],
                "objects": [],
            }
        for c in out["candidates"]:
            base = f"/api/runs/{_q(view.name)}/tiles/{_q(c['object_id'])}"
            names = ["overlay", *self._channels(view, c["field"])]
            c["tiles"] = {n: f"{base}/{_q(n)}.png" for n in names}
        return out

    def _channels(self, view: RunView, field: str) -> list[str]:
        """The channel names of a field's file: the scan's (every field has
        them), or, for an analysis of other files, its detection record's."""
        planned = (self._scan(view).get("request") or {}).get("channels")
        if isinstance(planned, list) and planned:
            return [str(c) for c in planned]
        rec = self._json(view.folder / "detections" / f"{field}.json")
        if isinstance(rec, dict) and isinstance(rec.get("channels"), list):
            return [str(c) for c in rec["channels"]]
        return []

    def review_summary(self, run: str) -> dict[str, Any]:
        view = self._run(run)
        return RunReview(view.folder).summary()

    def decide(
        self, run: str, reviewer: str, object_id: str, decision: str, comment: str
    ) -> Any:
        view = self._run(run)
        if view.running():
            raise ReviewError("the scan of this run is still going on")
        return RunReview(view.folder).decide(reviewer, object_id, decision, comment)

    def sign(self, run: str, reviewer: str) -> Any:
        view = self._run(run)
        if view.running():
            raise ReviewError("the scan of this run is still going on")
        return RunReview(view.folder).sign(reviewer)

    # ---------------------------------------------------------- pictures

    def _field_file(self, view: RunView, field: str) -> Path:
        rec = view.stored().get(field)
        if rec is not None:
            path = view.folder / rec.file
        else:  # an analysis: the file its detection record names
            det = self._json(view.folder / "detections" / f"{field}.json")
            if not isinstance(det, dict) or not det.get("file"):
                raise NoSuchRun(field)
            path = Path(det["file"])
            if not path.is_absolute():
                path = view.folder / path
        path = self._inside(path)
        if not path.is_file():
            raise NoSuchRun(field)
        return path

    def last_field_png(self, run: str) -> bytes:
        view = self._run(run)
        last = view.status()["last_field"]
        if last is None:
            return png_bytes(np.zeros((8, 8, 3), np.uint8))
        path = self._field_file(view, last)
        names = self._channels(view, last)
        thumbs = self.thumbs.get(path, tuple(range(len(names))), LAST_STEP)
        return field_png(thumbs, names)

    def _grid(self, view: RunView) -> tuple[list[dict[str, Any]], int, int]:
        fields = self._scan(view).get("fields") or []
        rows = 1 + max((int(f.get("row", 0)) for f in fields), default=0)
        cols = 1 + max((int(f.get("col", 0)) for f in fields), default=0)
        return fields, rows, cols

    def _mosaic_channels(self, view: RunView, field: str) -> tuple[int, int]:
        names = self._channels(view, field)
        roles = self._roles(view)
        by_role = {roles.get(n): i for i, n in enumerate(names)}
        return by_role.get("nucleus", 0), by_role.get("epithelial", 1)

    def mosaic_png(self, run: str) -> bytes:
        view = self._run(run)
        fields, rows, cols = self._grid(view)
        tiles = {}
        for f in fields:
            try:
                path = self._field_file(view, f["name"])
            except NoSuchRun:
                continue
            ch = self._mosaic_channels(view, f["name"])
            try:
                tiles[(int(f["row"]), int(f["col"]))] = self.thumbs.get(
                    path, ch, MOSAIC_STEP
                )
            except Exception as e:  # one unreadable field stays dark
                logger.warning("%s: %s", path, e)
        data, _, _ = mosaic_png(tiles, rows, cols)
        return data

    def mosaic_layout(self, run: str) -> dict[str, Any]:
        """Where each field and each candidate lies on the cartridge picture."""
        view = self._run(run)
        fields, rows, cols = self._grid(view)
        shape = None
        for f in fields:
            det = self._json(view.folder / "detections" / f"{f['name']}.json")
            if isinstance(det, dict) and det.get("shape"):
                shape = det["shape"]
                break
        if shape is None:
            return {"width": 0, "height": 0, "fields": [], "candidates": []}
        th, tw = -(-shape[0] // MOSAIC_STEP), -(-shape[1] // MOSAIC_STEP)
        where = {f["name"]: (int(f["row"]), int(f["col"])) for f in fields}
        marks = []
        for c in self.candidates(run, None)["candidates"]:
            if c["field"] not in where or c["row"] is None:
                continue
            r, k = where[c["field"]]
            marks.append(
                {
                    "object_id": c["object_id"],
                    "label": c["label"],
                    "review": c["review"],
                    "x": round(k * tw + c["col"] / MOSAIC_STEP, 1),
                    "y": round(r * th + c["row"] / MOSAIC_STEP, 1),
                }
            )
        return {
            "width": cols * tw,
            "height": rows * th,
            "fields": [
                {"name": n, "x": k * tw, "y": r * th, "w": tw, "h": th}
                for n, (r, k) in where.items()
            ],
            "candidates": marks,
        }

    def focus(self, run: str) -> dict[str, Any] | None:
        """The focus section of the report, or one built from the run so far."""
        view = self._run(run)
        report = self._json(view.folder / "report.json")
        if isinstance(report, dict) and report.get("focus"):
            return dict(report["focus"])
        fmap = self._json(view.folder / "focus_map.json")
        scan = self._scan(view)
        if not isinstance(fmap, dict) or not scan.get("fields"):
            return None
        stored = view.stored()
        fields = []
        for f in scan["fields"]:
            rec = stored.get(f["name"])
            foc = (rec.focus if rec is not None else None) or {}
            fields.append(
                {
                    "name": f["name"],
                    "x_um": f["x_um"],
                    "y_um": f["y_um"],
                    "z_um": foc.get("z_um", f.get("z_um")),
                    "sharpness": foc.get("sharpness"),
                    "refocused": bool(foc.get("refocused")),
                }
            )
        anchors = [
            {
                **{k: a.get(k) for k in ("index", "x_um", "y_um", "z_um", "status")},
                "source": a.get("source", ""),
                "used": a.get("status") in ("ok", "remeasured", "confirmed")
                and a.get("z_um") is not None,
            }
            for a in fmap.get("anchors", [])
        ]
        return {
            "enabled": fmap.get("enabled", True),
            "model": (fmap.get("fit") or {}).get("model", "?"),
            "reused": False,
            "rms_um": fmap.get("rms_um", 0.0),
            "max_residual_um": fmap.get("max_residual_um", 0.0),
            "warnings": fmap.get("warnings", []),
            "threshold": None,
            "map_seconds": fmap.get("seconds", 0.0),
            "qc_seconds": 0.0,
            "seconds": fmap.get("seconds", 0.0),
            "fov_um": scan.get("fov_um", [1, 1]),
            "anchors": anchors,
            "fields": fields,
        }

    def tile_png(self, run: str, object_id: str, panel: str) -> bytes:
        view = self._run(run)
        field = object_id.rsplit("-", 1)[0]
        det = self._json(view.folder / "detections" / f"{field}.json")
        if not isinstance(det, dict):
            raise NoSuchRun(object_id)
        objs = sorted(det.get("objects", []), key=lambda o: (o["row"], o["col"]))
        ids = {make_object_id(field, k): o for k, o in enumerate(objs)}
        events = view.folder / "events.csv"
        # the reviewed version of the events names the objects
        if events.exists():
            regular_file(events, view.folder)
            if object_id not in read_events(events).ids:
                raise NoSuchRun(object_id)
        o = ids.get(object_id)
        names = [str(c) for c in det.get("channels", [])]
        if o is None or panel not in ("overlay", *names):
            raise NoSuchRun(object_id)
        path = self._field_file(view, field)
        px = float(det.get("pixel_size_um") or 0.64)
        half = max(4, round(20.0 / px))
        r, c = round(o["row"]), round(o["col"])
        with tifffile.TiffFile(path) as tf:
            h, w = tf.pages[0].shape[:2]
            r0, r1 = max(r - half, 0), min(r + half, h)
            c0, c1 = max(c - half, 0), min(c + half, w)
            crop = np.stack(
                [tf.pages[i].asarray()[r0:r1, c0:c1] for i in range(len(names))]
            )
        return candidate_tile_png(
            crop,
            names,
            self._roles(view),
            (o["row"] - r0, o["col"] - c0),
            panel,
            pixel_size_um=px,
            background=det.get("background", {}),
            noise=det.get("noise", {}),
        )


def _q(text: str) -> str:
    return quote(text, safe="")

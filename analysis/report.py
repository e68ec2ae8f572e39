"""Cartridge outputs from per-field detection records: events, report, web page.

`write_outputs` takes the records of `analysis.pipeline.analyze_field_file` and
writes ``events.csv`` (one row per object), ``report.json`` and ``report.html``
(count, cut-off statement, counts per label, quality figures and the gallery of
CTC candidates sorted by score). With `ReportContext.stitch` (a scan's fields,
placed on the stage) a cell seen by two overlapping fields counts once
(`analysis.stitch`): the objects counted elsewhere are left out of all three.
Every file is written to a temporary name and renamed, so a reader never sees
half a report.
"""

from __future__ import annotations

import contextlib
import csv
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from analysis.detect import LABELS
from analysis.settings import StitchSettings
from analysis.stitch import Stitching, object_key, stitch

__all__ = [
    "EVENT_COLUMNS",
    "Report",
    "ReportContext",
    "event_columns",
    "event_rows",
    "events_csv_text",
    "focus_html",
    "object_id",
    "read_report",
    "rewrite_report",
    "summarize",
    "write_outputs",
]

#: schema version of report.json written here
REPORT_VERSION = 1

#: The first columns of events.csv; the features follow.
EVENT_COLUMNS = (
    "object_id",
    "field",
    "row",
    "col",
    "stage_x_um",
    "stage_y_um",
    "label",
    "score",
    "marker_positive",
    "reason",
    "review",
)


class ReportContext(BaseModel):
    """What the report needs beyond the detections.

    Every value comes from the run (the assay's indication, cut-off and blood
    volume among them): nothing here restates a default of the assay.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    cartridge_id: str
    indication: str
    cutoff: int
    blood_volume_ml: float
    #: field names planned (default: the fields with a detection record)
    fields_planned: list[str] | None = None
    #: field name -> why it has no result
    fields_failed: dict[str, str] = Field(default_factory=dict)
    #: fields of the whole cartridge, when only some were scanned
    cartridge_fields: int | None = None
    source: str = ""
    extra_qc: dict[str, float] = Field(default_factory=dict)
    #: the focus map and per-field focus, drawn as a picture
    focus: dict[str, Any] | None = None
    #: join overlapping fields in stage coordinates (`analysis.stitch`); None:
    #: every field's objects count (fields of unknown placement)
    stitch: StitchSettings | None = None


class FailedField(BaseModel):
    model_config = ConfigDict(frozen=True)
    field: str
    reason: str


class FieldsSummary(BaseModel):
    model_config = ConfigDict(frozen=True)
    planned: int
    cartridge: int
    analyzed: int
    failed: list[FailedField]
    not_analyzed: list[str]


class Report(BaseModel):
    """report.json: the cartridge's count against the cut-off, with what it
    rests on. Written by `write_outputs`, read by `read_report`."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: Literal["report"] = "report"
    v: int = REPORT_VERSION
    cartridge_id: str
    indication: str
    cutoff: int
    ctc_count: int
    at_or_above_cutoff: bool
    statement: str
    counts: dict[str, int]
    ctc_marker_positive: int
    fields: FieldsSummary
    qc: dict[str, Any]
    focus: dict[str, Any] | None = None
    #: how overlapping fields were joined: settings, objects left to a
    #: neighbouring field, objects merged as one cell (`analysis.stitch`)
    stitching: dict[str, Any] | None = None
    #: the readers' signed review (`controller.station`): the reviewed count,
    #: the readers, their agreement and the sign-off
    review: dict[str, Any] | None = None
    source: str = ""
    generated_at: str = ""


def read_report(path: str | Path) -> Report:
    """The report of a run or analysis folder's ``report.json``."""
    return Report.model_validate_json(Path(path).read_bytes())


def _atomic_write(path: Path, text: str) -> None:
    """`text` into `path` whole or not at all (a full disk leaves neither the
    half-written file nor its temporary)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # fsync and write name no file
        raise


def _feature_columns(records: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: set[str] = set()
    for rec in records:
        for o in rec["objects"]:
            seen.update(o)
    seen.difference_update(EVENT_COLUMNS)
    seen.discard("candidate")
    return sorted(seen)


def _or_unknown(v: Any) -> str:
    """A value for the page: unknown (None, NaN) as ``?``."""
    return "?" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _row_col(o: Mapping[str, Any]) -> tuple[Any, Any]:
    return (o["row"], o["col"])


def event_columns(records: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """The columns of events.csv for these records."""
    return (*EVENT_COLUMNS, *_feature_columns(records), "candidate")


def event_rows(
    rec: Mapping[str, Any], cols: Sequence[str], drop: frozenset[str] = frozenset()
) -> str:
    """The rows of events.csv of one field's record (objects by row, then
    column), under the columns `cols` (`event_columns` of all the records):
    an object's missing columns and NaN values empty; the objects whose ids
    are in `drop` (counted in another field) left out."""
    at_id = list(cols).index("object_id")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    field = rec["field"]
    for k, o in enumerate(sorted(rec["objects"], key=_row_col)):
        get = o.get
        # v != v: NaN only (None, strings and numbers equal themselves)
        row = [("" if v != v else v) for v in [get(c, "") for c in cols]]
        row[at_id] = oid = object_id(field, k)
        if oid not in drop:
            writer.writerow(row)
    return buf.getvalue()


def events_csv_text(
    records: Sequence[Mapping[str, Any]],
    cols: Sequence[str],
    rows: Mapping[str, str] | None = None,
    drop: frozenset[str] = frozenset(),
) -> str:
    """events.csv: a header, then each record's `event_rows` under `cols`
    (`event_columns` of all the records) less the objects in `drop`, taken
    from `rows` (by field, made without a drop) where they were made already
    and the field loses nothing."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(cols)
    parts = [buf.getvalue()]
    cut = {oid.rsplit("-", 1)[0] for oid in drop}
    for rec in records:
        made = rows.get(rec["field"]) if rows and rec["field"] not in cut else None
        parts.append(made if made is not None else event_rows(rec, cols, drop))
    return "".join(parts)


def _events_csv(
    records: Sequence[Mapping[str, Any]], drop: frozenset[str] = frozenset()
) -> str:
    return events_csv_text(records, event_columns(records), drop=drop)


def object_id(field: str, k: int) -> str:
    """The id of the `k`-th object (by row, then column) of `field` in
    events.csv: what a reader's decision names. Objects counted in another
    field keep their number, so ids do not depend on the stitching."""
    return object_key(field, k)


def _without(
    records: Sequence[Mapping[str, Any]], drop: frozenset[str]
) -> list[Mapping[str, Any]]:
    """The records less the objects whose ids are in `drop`."""
    if not drop:
        return list(records)
    out: list[Mapping[str, Any]] = []
    for rec in records:
        objs = sorted(rec["objects"], key=lambda o: (o["row"], o["col"]))
        out.append(
            {
                **rec,
                "objects": [
                    o
                    for k, o in enumerate(objs)
                    if object_id(rec["field"], k) not in drop
                ],
            }
        )
    return out


def summarize(records: Sequence[Mapping[str, Any]], ctx: ReportContext) -> Report:
    """The content of report.json."""
    counts = dict.fromkeys(LABELS, 0)
    marker = 0
    for rec in records:
        for o in rec["objects"]:
            counts[o["label"]] += 1
            marker += bool(o["label"] == "CTC" and o.get("marker_positive"))
    n_ctc = counts["CTC"]
    cutoff = ctx.cutoff
    planned = list(ctx.fields_planned or [r["field"] for r in records])
    analyzed = {r["field"] for r in records}
    failed = dict(ctx.fields_failed)
    missing = [f for f in planned if f not in analyzed and f not in failed]
    reached = n_ctc >= cutoff
    statement = (
        f"{n_ctc} CTC per {ctx.blood_volume_ml:g} mL: "
        f"{'at or above' if reached else 'below'} the cut-off of {cutoff} "
        f"({ctx.indication})."
    )
    whole = int(ctx.cartridge_fields or len(planned))
    if whole > len(planned):
        statement += (
            f" Partial scan: {len(planned)} of {whole} fields of the "
            "cartridge; the count covers only those."
        )
    if failed or missing:
        statement += (
            f" {len(failed) + len(missing)} of {len(planned)} fields were "
            "not analysed: the count is a lower bound."
        )

    def per_channel(key: str, reduce: Any) -> dict[str, float]:
        vals: dict[str, list[float]] = {}
        for rec in records:
            for ch, v in rec.get(key, {}).items():
                vals.setdefault(ch, []).append(float(v))
        return {ch: round(float(reduce(v)), 3) for ch, v in vals.items()}

    sat: dict[str, list[float]] = {}
    for rec in records:
        for ch, q in rec.get("qc", {}).items():
            sat.setdefault(ch, []).append(float(q.get("saturated_fraction", 0.0)))
    return Report(
        cartridge_id=ctx.cartridge_id,
        indication=ctx.indication,
        cutoff=cutoff,
        ctc_count=n_ctc,
        at_or_above_cutoff=reached,
        statement=statement,
        counts=counts,
        ctc_marker_positive=marker,
        fields=FieldsSummary(
            planned=len(planned),
            cartridge=whole,
            analyzed=len(analyzed),
            failed=[FailedField(field=k, reason=v) for k, v in failed.items()],
            not_analyzed=missing,
        ),
        qc={
            "background_median": per_channel("background", np.median),
            "noise_median": per_channel("noise", np.median),
            "saturated_fraction_max": {ch: round(max(v), 5) for ch, v in sat.items()},
            "analysis_seconds_per_field": round(
                float(np.mean([r.get("seconds", 0.0) for r in records]))
                if records
                else 0.0,
                4,
            ),
            **ctx.extra_qc,
        },
        focus=dict(ctx.focus) if ctx.focus else None,
        source=ctx.source,
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{margin-bottom:.2em} .verdict{font-size:1.3em;padding:.6em 1em;border-radius:6px}
.above{background:#fde2e2;border:1px solid #d33}
.below{background:#e2f3e5;border:1px solid #393}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
.gallery figure{margin:0 0 1em 0} .gallery img{max-width:100%;image-rendering:pixelated}
figcaption{font-size:.9em;color:#555}
.focusmap svg{max-width:100%;height:auto;background:#fafafa}
"""


_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def _color(t: float) -> str:
    """Viridis colour of t in 0..1."""
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return "#" + "".join(f"{round(a[k] + f * (b[k] - a[k])):02x}" for k in range(3))


def _focus_panel(
    focus: Mapping[str, Any], key: str, lo: float, hi: float, title: str, unit: str
) -> str:
    """One SVG map of the cartridge: fields coloured by `key`, anchors, refocus."""
    e = html.escape
    fields = focus["fields"]
    fw, fh = focus["fov_um"]
    xs = [f["x_um"] for f in fields] + [a["x_um"] for a in focus["anchors"]]
    ys = [f["y_um"] for f in fields] + [a["y_um"] for a in focus["anchors"]]
    x0, x1 = min(xs) - fw / 2, max(xs) + fw / 2
    y0, y1 = min(ys) - fh / 2, max(ys) + fh / 2
    scale = 1100 / max(x1 - x0, 1.0)
    w, h = (x1 - x0) * scale, (y1 - y0) * scale

    def sx(x: float) -> float:
        return (x - x0) * scale

    def sy(y: float) -> float:
        return (y1 - y) * scale

    span = hi - lo if hi > lo else 1.0
    parts = []
    for f in fields:
        v = f.get(key)
        fill = "#ccc" if v is None else _color((v - lo) / span)
        cls = "field refocused" if f.get("refocused") else "field"
        stroke = (
            'stroke="#e00" stroke-width="3"'
            if f.get("refocused")
            else ('stroke="#fff" stroke-width="0.5"')
        )
        val = "none" if v is None else f"{v:.2f}{unit}"
        parts.append(
            f'<rect class="{cls}" data-field="{e(f["name"])}" data-value="{val}" '
            f'x="{sx(f["x_um"] - fw / 2):.1f}" y="{sy(f["y_um"] + fh / 2):.1f}" '
            f'width="{fw * scale:.1f}" height="{fh * scale:.1f}" fill="{fill}" '
            f"{stroke}><title>{e(f['name'])}: {val}</title></rect>"
        )
    for a in focus["anchors"]:
        used = a["used"]
        z = "failed" if a["z_um"] is None else f"{a['z_um']:.2f} um"
        parts.append(
            f'<circle class="anchor{"" if used else " unused"}" '
            f'cx="{sx(a["x_um"]):.1f}" cy="{sy(a["y_um"]):.1f}" r="6" '
            f'fill="{"#fff" if used else "#e00"}" stroke="#000" stroke-width="1.5">'
            f"<title>anchor {e(str(a['index']))} ({e(a['source'])}, {e(a['status'])}): "
            f"{z}</title></circle>"
        )
    return (
        f'<figure class="focusmap" id="focus-{key}">'
        '<svg xmlns="http://www.w3.org/2000/svg" '
        f'width="{w:.0f}" height="{h:.0f}" viewBox="0 0 {w:.0f} {h:.0f}">'
        + "".join(parts)
        + f"</svg><figcaption>{e(title)}: colour {lo:.2f} (dark) to {hi:.2f}{unit} "
        "(yellow); circles are anchors (red: unused); red outline: re-focused "
        "field.</figcaption></figure>"
    )


class _FocusAnchor(BaseModel):
    model_config = ConfigDict(extra="ignore")
    index: int
    x_um: float
    y_um: float
    z_um: float | None = None
    status: str = ""
    source: str = ""
    used: bool = True


class _FocusField(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    x_um: float
    y_um: float
    z_um: float | None = None
    sharpness: float | None = None
    refocused: bool = False


class _FocusSection(BaseModel):
    """The focus section as `focus_html` draws it: a section read from a file
    that does not fit is not drawn."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    enabled: bool = True
    model: str = "?"
    reused: bool = False
    rms_um: float = 0.0
    max_residual_um: float = 0.0
    warnings: list[str] = Field(default_factory=list)
    threshold: float | None = None
    map_seconds: float = 0.0
    qc_seconds: float = 0.0
    seconds: float = 0.0
    fov_um: tuple[float, float] = (1.0, 1.0)
    anchors: list[_FocusAnchor] = Field(default_factory=list)
    fields: list[_FocusField] = Field(default_factory=list)


def focus_html(focus: Mapping[str, Any] | None) -> str:
    """The focus section of a report page (map pictures, anchors, re-focused
    fields); a section that does not fit its schema is named, not drawn."""
    if not focus:  # e.g. fields analysed after the fact: no focus record
        return ""
    try:
        checked = _FocusSection.model_validate(focus).model_dump()
    except ValidationError as err:
        where = ".".join(str(x) for x in err.errors()[0]["loc"])
        return (
            "<h2>Focus</h2><p>The focus record cannot be drawn "
            f"({html.escape(where)}).</p>"
        )
    focus = checked
    if not focus.get("enabled"):
        return "<h2>Focus</h2><p>Focus map off: every field at one z.</p>"
    e = html.escape
    fields = focus["fields"]
    zs = [f["z_um"] for f in fields if f.get("z_um") is not None]
    sharp = [f["sharpness"] for f in fields if f.get("sharpness") is not None]
    refocused = [f["name"] for f in fields if f.get("refocused")]
    panels = ""
    if zs:
        panels += _focus_panel(
            focus, "z_um", min(zs), max(zs), "Focus z of each field", " um"
        )
    if sharp:
        thr = focus.get("threshold") or min(sharp)
        panels += _focus_panel(
            focus,
            "sharpness",
            min(min(sharp), thr),
            max(sharp),
            f"Sharpness of each field (re-focus below {thr:.2f})",
            "",
        )
    warn = "".join(f"<li>{e(w)}</li>" for w in focus.get("warnings", []))
    used = sum(a["used"] for a in focus["anchors"])
    reused = " (recorded map reused)" if focus.get("reused") else ""
    return f"""<h2>Focus</h2>
<p id="focus-summary">{e(focus["model"])} focus map from {used} of
{len(focus["anchors"])} anchors{reused},
rms residual {focus["rms_um"]:.2f} um, max {focus["max_residual_um"]:.2f} um.
Time on focus {focus["seconds"]:.1f} s (map {focus["map_seconds"]:.1f} s, per-field
checks and re-focus {focus["qc_seconds"]:.1f} s). Re-focused fields:
<span id="refocused">{e(", ".join(refocused)) or "none"}</span>.</p>
{f"<ul id='focus-warnings'>{warn}</ul>" if warn else ""}{panels}"""


def _number(v: Any, spec: str) -> str:
    """A number for the page, or ``n/a`` for anything else."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return "n/a"
    return format(v, spec)


def _share(v: Any) -> str:
    return "n/a" if _number(v, ".0%") == "n/a" else format(v, ".0%")


def _review_html(review: Mapping[str, Any] | None, machine: int) -> str:
    if not review:
        return ""
    e = html.escape
    kappa = review.get("kappa")
    so = review.get("signoff") or {}
    readers = ", ".join(str(r) for r in review.get("readers", []))
    adj = review.get("adjudicator")
    return f"""<h2>Review</h2><table id="review">
<tr><th>machine count</th><td id="machine-count">{machine}</td></tr>
<tr><th>reviewed count</th><td id="reviewed-count">{
        e(str(review.get("reviewed_count")))
    }</td></tr>
<tr><th>readers</th><td id="readers">{e(readers)}</td></tr>
<tr><th>adjudicator</th><td>{e(str(adj)) if adj else "none needed"}</td></tr>
<tr><th>agreement</th><td id="agreement">{_share(review.get("agreement"))} of
{e(str(review.get("candidates", 0)))} candidates, Cohen's kappa
{_number(kappa, ".2f")}</td></tr>
<tr><th>signed</th><td id="signoff">{e(str(so.get("reviewer", "")))} at
{e(str(so.get("t", "")))}, sha256 {e(str(so.get("sha256", "")))}</td></tr></table>
"""


def _html(report: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> str:
    e = html.escape
    ctcs = sorted(
        (o for r in records for o in r["objects"] if o["label"] == "CTC"),
        key=lambda o: -o["score"],
    )
    verdict = "above" if report["at_or_above_cutoff"] else "below"
    rows = "".join(
        f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in report["counts"].items()
    )
    qc_rows = "".join(
        f"<tr><td>{e(ch)}</td><td>{report['qc']['background_median'].get(ch, '')}"
        f"</td><td>{report['qc']['noise_median'].get(ch, '')}</td><td>"
        f"{report['qc']['saturated_fraction_max'].get(ch, '')}</td></tr>"
        for ch in report["qc"]["background_median"]
    )
    failed = "".join(
        f"<li>{e(f['field'])}: {e(f['reason'])}</li>"
        for f in report["fields"]["failed"]
    )
    figures = "".join(
        f'<figure data-score="{o["score"]}"><img src="{e(o.get("candidate", ""))}" '
        f'alt="CTC candidate {e(o["field"])} ({o["row"]:.0f}, {o["col"]:.0f})">'
        f"<figcaption>#{i + 1} score {o['score']:.2f} · {e(o['field'])} row "
        f"{o['row']:.0f} col {o['col']:.0f} · stage "
        f"({_or_unknown(o.get('stage_x_um'))}, {_or_unknown(o.get('stage_y_um'))}) "
        f"um · {o['diameter_um']:.1f} um · marker "
        f"{'positive' if o.get('marker_positive') else 'negative'}</figcaption>"
        "</figure>"
        for i, o in enumerate(ctcs)
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>CTC report {e(str(report["cartridge_id"]))}</title><style>{_CSS}</style></head>
<body>
<h1>Cartridge {e(str(report["cartridge_id"]))}</h1>
<p id="count">CTC count: <strong>{report["ctc_count"]}</strong>
({report["ctc_marker_positive"]} marker-positive)</p>
{_review_html(report.get("review"), report["ctc_count"])}
<p class="verdict {verdict}" id="statement">{e(report["statement"])}</p>
<p>Fields analysed: {report["fields"]["analyzed"]} of {report["fields"]["planned"]}.
</p>{f"<ul id='failed'>{failed}</ul>" if failed else ""}
<h2>Objects by label</h2><table id="counts"><tr><th>label</th><th>count</th></tr>
{rows}</table>
<h2>Image quality</h2><table id="qc"><tr><th>channel</th><th>background (DN)</th>
<th>noise (DN)</th><th>max saturated fraction</th></tr>{qc_rows}</table>
{focus_html(report.get("focus"))}
<h2>CTC candidates, by score</h2>
<p>Every object called CTC, for review. Tiles: overlay (DAPI blue, cytokeratin green,
CD45 red, marker yellow), then each channel; bar 10 um.</p>
<div class="gallery" id="gallery">{figures or "<p>No CTC candidates.</p>"}</div>
<p><small>Generated {e(report["generated_at"])} from {e(report["source"])}</small></p>
</body></html>
"""


#: the files `write_outputs` writes
OUTPUT_FILES = ("events.csv", "report.json", "report.html")


def write_outputs(
    out_dir: str | Path,
    records: Sequence[Mapping[str, Any]],
    ctx: ReportContext,
    *,
    events_csv: str | None = None,
    stitched: Stitching | None = None,
) -> Report:
    """Write events.csv, report.json and report.html into `out_dir`; return
    the report (`ctx`: what it needs beyond the detections; `events_csv`:
    the file's text when the caller made it already, by `events_csv_text`;
    `stitched`: `stitch(records, ctx.stitch)` when the caller has it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: r["field"])
    drop: frozenset[str] = frozenset()
    stitching = None
    if ctx.stitch is not None:
        joined = stitched if stitched is not None else stitch(records, ctx.stitch)
        drop, stitching = joined.dropped, joined.summary()
    counted = _without(records, drop)
    report = summarize(counted, ctx).model_copy(update={"stitching": stitching})
    # text made ahead knows nothing of the stitching: used only when it drops
    # nothing
    text = events_csv if events_csv is not None and not drop else None
    _atomic_write(out / "events.csv", text or _events_csv(records, drop))
    _write_report(out, report, counted)
    return report


def _write_report(
    out: Path, report: Report, records: Sequence[Mapping[str, Any]]
) -> None:
    _atomic_write(out / "report.json", report.model_dump_json(indent=1))
    _atomic_write(out / "report.html", _html(report.model_dump(mode="json"), records))


def rewrite_report(
    out_dir: str | Path,
    records: Sequence[Mapping[str, Any]],
    review: Mapping[str, Any],
) -> Report:
    """report.json and report.html of `out_dir` again, with the readers'
    `review` added; events.csv and everything else in the report unchanged."""
    out = Path(out_dir)
    report = read_report(out / "report.json").model_copy(
        update={"review": dict(review)}
    )
    records = sorted(records, key=lambda r: r["field"])
    if (st := report.stitching) is not None:  # the same objects as before
        settings = StitchSettings(
            tolerance_um=st["tolerance_um"], margin_um=st["margin_um"]
        )
        records = _without(records, stitch(records, settings).dropped)
    _write_report(out, report, records)
    return report

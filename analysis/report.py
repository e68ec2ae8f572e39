"""Cartridge outputs from per-field detection records: events, report, web page.

`write_outputs` takes the records of `analysis.pipeline.analyze_field_file` and
writes ``events.csv`` (one row per object), ``report.json`` and ``report.html``
(count, cut-off statement, counts per label, quality figures and the gallery of
CTC candidates sorted by score). Every file is written to a temporary name and
renamed, so a reader never sees half a report.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from analysis.detect import LABELS

__all__ = ["EVENT_COLUMNS", "summarize", "write_outputs"]

#: The first columns of events.csv; the features follow.
EVENT_COLUMNS = (
    "field",
    "row",
    "col",
    "stage_x_um",
    "stage_y_um",
    "label",
    "score",
    "marker_positive",
    "reason",
)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _feature_columns(records: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for rec in records:
        for o in rec["objects"]:
            for k in o:
                if k not in EVENT_COLUMNS and k != "candidate":
                    seen.setdefault(k, None)
    return sorted(seen)


def _events_csv(records: Sequence[Mapping[str, Any]]) -> str:
    cols = [*EVENT_COLUMNS, *_feature_columns(records), "candidate"]
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for rec in records:
        for o in sorted(rec["objects"], key=lambda o: (o["row"], o["col"])):
            writer.writerow(
                {
                    k: ("" if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in o.items()
                }
            )
    return buf.getvalue()


def summarize(
    records: Sequence[Mapping[str, Any]], ctx: Mapping[str, Any]
) -> dict[str, Any]:
    """The content of report.json."""
    counts = dict.fromkeys(LABELS, 0)
    marker = 0
    for rec in records:
        for o in rec["objects"]:
            counts[o["label"]] += 1
            marker += bool(o["label"] == "CTC" and o.get("marker_positive"))
    n_ctc = counts["CTC"]
    cutoff = int(ctx.get("cutoff", 5))
    planned = list(ctx.get("fields_planned") or [r["field"] for r in records])
    analyzed = {r["field"] for r in records}
    failed = dict(ctx.get("fields_failed") or {})
    missing = [f for f in planned if f not in analyzed and f not in failed]
    reached = n_ctc >= cutoff
    statement = (
        f"{n_ctc} CTC per {ctx.get('blood_volume_ml', 7.5):g} mL: "
        f"{'at or above' if reached else 'below'} the cut-off of {cutoff} "
        f"({ctx.get('indication', 'metastatic-breast')})."
    )
    whole = int(ctx.get("cartridge_fields") or len(planned))
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
    return {
        "cartridge_id": ctx.get("cartridge_id", ""),
        "indication": ctx.get("indication", "metastatic-breast"),
        "cutoff": cutoff,
        "ctc_count": n_ctc,
        "at_or_above_cutoff": reached,
        "statement": statement,
        "counts": counts,
        "ctc_marker_positive": marker,
        "fields": {
            "planned": len(planned),
            "cartridge": whole,
            "analyzed": len(analyzed),
            "failed": [{"field": k, "reason": v} for k, v in failed.items()],
            "not_analyzed": missing,
        },
        "qc": {
            "background_median": per_channel("background", np.median),
            "noise_median": per_channel("noise", np.median),
            "saturated_fraction_max": {ch: round(max(v), 5) for ch, v in sat.items()},
            "analysis_seconds_per_field": round(
                float(np.mean([r.get("seconds", 0.0) for r in records]))
                if records
                else 0.0,
                4,
            ),
            **dict(ctx.get("extra_qc") or {}),
        },
        "source": str(ctx.get("source", "")),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{margin-bottom:.2em} .verdict{font-size:1.3em;padding:.6em 1em;border-radius:6px}
.above{background:#fde2e2;border:1px solid #d33}
.below{background:#e2f3e5;border:1px solid #393}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
.gallery figure{margin:0 0 1em 0} .gallery img{max-width:100%;image-rendering:pixelated}
figcaption{font-size:.9em;color:#555}
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
        f"{o['row']:.0f} col {o['col']:.0f} · stage ({o['stage_x_um']}, "
        f"{o['stage_y_um']}) um · {o['diameter_um']:.1f} um · marker "
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
<p class="verdict {verdict}" id="statement">{e(report["statement"])}</p>
<p>Fields analysed: {report["fields"]["analyzed"]} of {report["fields"]["planned"]}.
</p>{f"<ul id='failed'>{failed}</ul>" if failed else ""}
<h2>Objects by label</h2><table id="counts"><tr><th>label</th><th>count</th></tr>
{rows}</table>
<h2>Image quality</h2><table id="qc"><tr><th>channel</th><th>background (DN)</th>
<th>noise (DN)</th><th>max saturated fraction</th></tr>{qc_rows}</table>
<h2>CTC candidates, by score</h2>
<p>Every object called CTC, for review. Tiles: overlay (DAPI blue, cytokeratin green,
CD45 red, marker yellow), then each channel; bar 10 um.</p>
<div class="gallery" id="gallery">{figures or "<p>No CTC candidates.</p>"}</div>
<p><small>Generated {e(report["generated_at"])} from {e(report["source"])}</small></p>
</body></html>
"""


def write_outputs(
    out_dir: str | Path, records: Sequence[Mapping[str, Any]], ctx: Mapping[str, Any]
) -> dict[str, Any]:
    """Write events.csv, report.json and report.html into `out_dir`.

    `ctx` says what the report needs beyond the detections: ``cartridge_id``,
    ``indication``, ``cutoff``, ``blood_volume_ml``, ``fields_planned`` (names),
    ``fields_failed`` ({name: reason}), ``cartridge_fields`` (fields of the
    whole cartridge, when only some were scanned), ``source`` and ``extra_qc``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: r["field"])
    report = summarize(records, ctx)
    _atomic_write(out / "events.csv", _events_csv(records))
    _atomic_write(out / "report.json", json.dumps(report, indent=1))
    _atomic_write(out / "report.html", _html(report, records))
    return report

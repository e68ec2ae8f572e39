"""Data integrity under careless or hostile input: nothing lost, nothing wrong.

Each test reproduces something a careless or hostile user did to a run, an
analysis or a queue, and checks that the program neither produces a wrong
number nor damages what it did not create.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from analysis.fieldio import MAX_FIELD_BYTES
from analysis.report import _events_csv
from controller.records import Detected
from controller.runs.outputs import DetectionCache, load_records
from controller.runs.queue import _folder_name
from controller.runs.scan import ScanResult
from controller.runstore.chain import append_sealed, unseal
from controller.runstore.folder import RunFolder
from controller.runstore.ledger import LedgerState
from tests.conftest import invoke, one_line_error
from tests.test_analyze import FILE_NAMES, MAP, _write
from tests.test_detect import Canvas

FAST = ["--channels", MAP, "--workers", "1"]


def _strict_json(path: Path) -> dict:
    """The file as strict JSON: a bare NaN or Infinity is refused."""

    def refuse(token: str) -> None:
        raise ValueError(f"{path}: {token} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _fields(folder: Path, ctcs: list[int]) -> Path:
    """An OME-TIFF folder: field k holds ctcs[k] CTCs and a leukocyte."""
    folder.mkdir(parents=True)
    for k, n in enumerate(ctcs):
        cv = Canvas(size=256, seed=k)
        for j in range(n):
            cv.cell(60 + 70 * j, 80 + 60 * j)
        cv.leukocyte(200, 200)
        _write(folder / f"f_{k:03d}.ome.tif", cv.field(), FILE_NAMES, 0.64)
    return folder


def _with_nan(path: Path, block: slice | None) -> None:
    """Rewrite a field as float32 with a NaN block (or all NaN) in DAPI."""
    data = tifffile.imread(path).astype(np.float32)
    if block is None:
        data[:] = np.nan
    else:
        data[0, block, block] = np.nan
    _write(path, data, FILE_NAMES, 0.64)


# ---------------------------------------------------------------- analyze --out


def test_an_output_folder_holding_another_analysis_is_refused(tmp_path: Path) -> None:
    a = _fields(tmp_path / "A", [2, 2])
    b = _fields(tmp_path / "B", [0])
    _with_nan(b / "f_000.ome.tif", None)  # B's only field fails detection
    out = tmp_path / "O"
    assert invoke("analyze", str(a), "--out", str(out), *FAST).exit_code == 0
    before = (out / "report.json").read_bytes()
    one_line_error(
        invoke("analyze", str(b), "--out", str(out), *FAST), "holds the analysis of"
    )
    assert (out / "report.json").read_bytes() == before


def test_a_field_that_fails_on_reanalysis_is_not_counted_from_the_last_one(
    tmp_path: Path,
) -> None:
    a = _fields(tmp_path / "A", [2, 1])
    out = tmp_path / "O"
    assert invoke("analyze", str(a), "--out", str(out), *FAST).exit_code == 0
    assert _strict_json(out / "report.json")["ctc_count"] == 3
    _with_nan(a / "f_001.ome.tif", np.s_[:40])  # the same input, since damaged
    r = invoke("analyze", str(a), "--out", str(out), *FAST)
    assert r.exit_code == 2 and "not numbers" in r.stderr
    report = _strict_json(out / "report.json")
    assert report["ctc_count"] == 2  # field 1's earlier CTC is not counted again
    assert [f["field"] for f in report["fields"]["failed"]] == ["f_001"]
    assert report["fields"]["analyzed"] == 1


def test_the_input_a_run_folder_or_foreign_files_are_never_the_output(
    tmp_path: Path, small_scan: ScanResult
) -> None:
    run = tmp_path / "run"
    shutil.copytree(small_scan.run_dir, run, ignore=shutil.ignore_patterns(".lock"))
    report = (run / "report.json").read_bytes()
    one_line_error(invoke("analyze", str(run), "--out", str(run)), "input folder")
    assert (run / "report.json").read_bytes() == report  # the focus section kept
    other = tmp_path / "other-run"
    shutil.copytree(run, other)
    one_line_error(
        invoke("analyze", str(run), "--out", str(other)), "a scan's run folder"
    )
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tmp").write_text("work")
    (mine / "report.html").write_text("my own report")
    one_line_error(invoke("analyze", str(run), "--out", str(mine)), "other files")
    assert (mine / "thesis.tmp").read_text() == "work"
    assert (mine / "report.html").read_text() == "my own report"


# ---------------------------------------------------------------- field data


@pytest.mark.parametrize("block", [np.s_[:40], None], ids=["NaN block", "all NaN"])
def test_nan_pixels_fail_the_field_and_every_output_is_strict_json(
    tmp_path: Path, block: slice | None
) -> None:
    src = _fields(tmp_path / "A", [1, 1])
    _with_nan(src / "f_000.ome.tif", block)
    out = tmp_path / "O"
    r = invoke("analyze", str(src), "--out", str(out), *FAST)
    assert r.exit_code == 2
    assert "f_000.ome.tif" in r.stderr and "pixels of DAPI are not numbers" in r.stderr
    report = _strict_json(out / "report.json")
    assert report["ctc_count"] == 1 and report["fields"]["analyzed"] == 1
    assert [f["field"] for f in report["fields"]["failed"]] == ["f_000"]
    for path in (out / "detections").iterdir():
        _strict_json(path)


def test_an_outsized_or_tiny_field_is_refused_from_its_metadata(
    tmp_path: Path,
) -> None:
    big = tmp_path / "big"
    big.mkdir()
    # 3.2 GB decoded, a sparse file on disk: refused before a pixel is read
    tifffile.imwrite(
        big / "f_000.ome.tif",
        shape=(4, 20000, 20000),
        dtype="uint16",
        ome=True,
        metadata={"axes": "CYX", "Channel": {"Name": FILE_NAMES}},
    )
    assert MAX_FIELD_BYTES < 4 * 20000 * 20000 * 2
    one_line_error(
        invoke("analyze", str(big), "--out", str(tmp_path / "o1"), *FAST),
        "f_000.ome.tif",
        "3.0 GiB decoded",
    )
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    _write(tiny / "f_000.ome.tif", np.ones((4, 1, 1), np.uint16), FILE_NAMES, 0.64)
    one_line_error(
        invoke("analyze", str(tiny), "--out", str(tmp_path / "o2"), *FAST),
        "1 x 1 px is too small",
    )


def test_worker_counts_that_make_no_sense_are_refused(tmp_path: Path) -> None:
    src = _fields(tmp_path / "A", [1])
    for n in ("-1", "-64"):
        one_line_error(
            invoke("analyze", str(src), "--out", str(tmp_path / n), "--workers", n),
            "--workers must be 0 (in this process) or more",
        )


# ---------------------------------------------------------------- scans, queues


def test_a_renamed_run_folder_names_the_cartridge_id_to_resume_it(
    tmp_path: Path, small_scan: ScanResult
) -> None:
    renamed = tmp_path / "renamed"
    shutil.copytree(small_scan.run_dir, renamed, ignore=shutil.ignore_patterns(".lock"))
    r = invoke(
        "scan", "--out", str(renamed), "--layout", "test-3x4", "--seed", "3"
    )  # fmt: skip
    one_line_error(r, "holds a different scan", "--cartridge-id cart-A")


def test_barcodes_never_share_a_folder_or_leave_the_queue_folder() -> None:
    barcodes = [
        "A1", ".A1", "..", "...", "a/b", "a_b", "../../evil", "STOP", "stop",
        "audit.log", "queue.jsonl", "é", "_", "-", "x" * 200,
    ]  # fmt: skip
    names = [_folder_name(b) for b in barcodes]
    assert len(set(names)) == len(names), names
    assert _folder_name("A1") == "A1" and _folder_name("SIM-0001") == "SIM-0001"
    for name in names:
        assert "/" not in name and name not in (".", "..") and not name.startswith(".")
        assert len(name) <= 80


def test_a_queue_of_colliding_and_hostile_cartridge_ids_scans_each_apart(
    tmp_path: Path,
) -> None:
    holder = tmp_path / "holder.yaml"
    ids = ["../../evil", "a/b", "a_b"]
    holder.write_text(
        "cartridges:\n"
        + "".join(
            f"  - {{id: {json.dumps(i)}, center_x_um: 0, center_y_um: 0}}\n"
            for i in ids
        )
    )
    q = tmp_path / "deep" / "q"
    r = invoke(
        "queue", "--out", str(q), "--cartridges", str(holder),
        "--layout", "test-3x4", "--fields", "1",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads((q / "summary.json").read_text())
    assert [s["status"] for s in summary] == ["complete"] * 3
    dirs = [Path(s["run_dir"]) for s in summary]
    assert len(set(dirs)) == 3 and all(d.parent == q for d in dirs)
    for d, i in zip(dirs, ids, strict=True):
        assert json.loads((d / "scan.json").read_text())["request"]["cartridge_id"] == i
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["q"]
    code, text = _verify(q)
    assert code == 0 and "3 folders" in text, text
    for name in ("queue.jsonl", "summary.json"):
        _flip(q / name)
        code, text = _verify(q)
        assert code == 1 and f"problem: {name}" in text, text


@pytest.mark.parametrize(
    ("slots", "needle"),
    [
        ("0,99", "numbered from 1"),
        ("1,1", "slot 1 is given twice"),
        ("2,99", "not 99"),
        ("", "got none"),  # had scanned every slot
    ],
)
def test_loader_slots_that_do_not_exist_or_repeat_are_refused(
    tmp_path: Path, slots: str, needle: str
) -> None:
    q = tmp_path / "q"
    r = invoke("queue", "--out", str(q), "--slots", slots, "--fields", "1")
    one_line_error(r, needle)
    assert not list(q.glob("*/fields"))  # nothing was scanned


@pytest.mark.parametrize("fields", ["0", "-5"])
def test_a_queue_s_fields_below_one_are_refused_before_any_cartridge(
    tmp_path: Path, fields: str
) -> None:
    # each of 8 cartridges had been loaded and failed, in 8 run folders
    q = tmp_path / "q"
    one_line_error(invoke("queue", "--out", str(q), "--fields", fields), "at least 1")
    assert not q.exists()


# ---------------------------------------------------------------- verify


def _flip(path: Path, at: float = 0.5) -> None:
    """Change one byte of a file, a fraction `at` into it (written as a new
    file: `path` may be a hard link into another run folder)."""
    data = bytearray(path.read_bytes())
    i = min(len(data) - 2, int(len(data) * at))
    data[i] ^= 0x01
    _rewrite(path, bytes(data))


def _rewrite(path: Path, data: bytes) -> None:
    """Replace the file at `path`, leaving any other link to it as it was."""
    path.unlink()
    path.write_bytes(data)


def _linked_copy(run: Path, dest: Path) -> Path:
    """A copy of a run folder whose files are hard links to the original's
    (130 MB of fields not copied again per case): change files in it only
    with `_rewrite`."""
    shutil.copytree(
        run, dest, ignore=shutil.ignore_patterns(".lock"), copy_function=os.link
    )
    return dest


def _verify(folder: Path) -> tuple[int, str]:
    r = invoke("verify", str(folder))
    return r.exit_code, r.stdout


KINDS = [
    "audit.log",
    "ledger.jsonl",
    "fields/field_004.ome.tif",
    "detections/field_004.json",
    "scan.json",
    "focus_map.json",
    "ground_truth.json",
    "events.csv",
    "report.json",
    "report.html",
]


def test_verify_finds_one_changed_byte_in_each_kind_of_file(
    tmp_path: Path, small_scan: ScanResult
) -> None:
    code, text = _verify(small_scan.run_dir)
    assert code == 0 and text.startswith("ok:"), text
    assert "12 fields, 12 detections, " in text and "note" not in text
    assert " pictures, 6 files" in text, text
    for kind in KINDS:
        for at in (0.5, 0.999):  # a middle line, and the last line of a log
            run = tmp_path / f"{kind.replace('/', '_')}-{at}"
            _linked_copy(small_scan.run_dir, run)
            _flip(run / kind, at)
            code, text = _verify(run)
            assert code == 1, (kind, at, text)
            assert f"problem: {kind}" in text, (kind, at, text)
    # the changes stayed in the copies
    assert _verify(small_scan.run_dir)[0] == 0


def test_verify_finds_a_removed_or_inserted_log_line(
    tmp_path: Path, small_scan: ScanResult
) -> None:
    for name, change in [
        ("ledger.jsonl", lambda lines: lines[:5] + lines[6:]),
        ("ledger.jsonl", lambda lines: lines[1:]),
        ("audit.log", lambda lines: [*lines[:1], lines[1], *lines[1:]]),
        ("audit.log", lambda lines: [lines[0], b'{"t":"x","text":"forged"}\n']),
    ]:
        run = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        _linked_copy(small_scan.run_dir, run)
        lines = (run / name).read_bytes().splitlines(keepends=True)
        _rewrite(run / name, b"".join(change(lines)))
        code, text = _verify(run)
        assert code == 1 and f"problem: {name}: line" in text, (name, text)
    # the changes stayed in the copies
    assert _verify(small_scan.run_dir)[0] == 0


def test_verify_finds_a_candidate_picture_changed_or_removed(
    tmp_path: Path, small_scan: ScanResult
) -> None:
    # the pictures readers review were in no record: changed, they passed
    pngs = sorted((small_scan.run_dir / "candidates").glob("*.png"))
    assert pngs
    for change in ("flip", "remove"):
        run = _linked_copy(small_scan.run_dir, tmp_path / change)
        png = run / "candidates" / pngs[-1].name
        if change == "flip":
            _flip(png)
        else:
            png.unlink()
        code, text = _verify(run)
        why = "changed since it was written" if change == "flip" else "missing"
        assert code == 1 and f"candidates/{png.name}: {why}" in text, text


def test_verify_takes_a_torn_line_for_a_crash_and_misses_no_audit_log(
    tmp_path: Path, small_scan: ScanResult
) -> None:
    # a line a crash cut short, after which the resume appended afresh: the
    # folder is as the program left it (verify had failed it forever)
    run = _linked_copy(small_scan.run_dir, tmp_path / "torn")
    lines = (run / "ledger.jsonl").read_bytes().splitlines(keepends=True)
    _rewrite(run / "ledger.jsonl", b"".join([*lines[:9], lines[9][:50]]))
    append_sealed(run / "ledger.jsonl", unseal(lines[9])[0].decode())  # afresh
    code, text = _verify(run)
    assert code == 0 and "line(s) 10 were torn by a crash" in text, text
    # two crashes, the second cutting the append after the first: a resume
    # reads the lines before them, no tampering
    twice = b"".join([*lines[:9], lines[9][:50], b"\n", lines[10][:30]])
    _rewrite(run / "ledger.jsonl", twice)
    assert len(RunFolder(run).ledger.read()) == 9
    # an audit log removed: the scan wrote one
    gone = _linked_copy(small_scan.run_dir, tmp_path / "gone")
    (gone / "audit.log").unlink()
    code, text = _verify(gone)
    assert code == 1 and "problem: audit.log: missing" in text, text


def test_outputs_read_ahead_only_what_the_ledger_calls_current(tmp_path: Path) -> None:
    """A detection file read as it was recorded is used by the outputs only
    while the ledger's current record names the sha256 of the bytes read."""
    folder = RunFolder(tmp_path / "run")
    folder.prepare()
    folder.detections_dir.mkdir(parents=True, exist_ok=True)

    def detect(name: str, objects: list[dict[str, object]]) -> Detected:
        data = json.dumps({"field": name, "objects": objects}).encode()
        folder.detection_path(name).write_bytes(data)
        return Detected(field=name, sha256=hashlib.sha256(data).hexdigest())

    ctc = {"label": "CTC", "row": 1, "col": 2, "score": 0.9, "area": 3}
    wbc = {"label": "WBC", "row": 5, "col": 1, "score": 0.1, "area": 4}
    cache = DetectionCache(folder)
    first = [detect("field_000", [ctc, wbc]), detect("field_001", [wbc])]
    for r in first:
        cache.on_record(r)
    state = LedgerState.from_records(first)
    current = {r.field: r.sha256 for r in first}
    folder.detection_path("field_000").write_text("not json")  # read already
    got = load_records(folder, ["field_000"], state, cache=cache, current=current)
    # CTC objects whole, others their label and place (for the stitching)
    assert got[0]["objects"][0] == ctc
    assert got[0]["objects"][1] == {"label": "WBC", "row": 5, "col": 1}
    # detected again: the ledger's sha256 is the new file's, the cache's is not
    again = detect("field_001", [wbc, wbc])
    current["field_001"] = again.sha256
    got = load_records(folder, ["field_001"], state, cache=cache, current=current)
    assert got[0]["objects"] == [wbc, wbc]
    # a file that does not hash as its record says is not read ahead
    folder.detection_path("field_002").write_text("{}")
    cache.on_record(Detected(field="field_002", sha256="0" * 64))
    assert cache.get("field_002", "0" * 64) is None


def test_events_csv_from_rows_made_ahead_is_the_same_file(tmp_path: Path) -> None:
    """Rows made as the detections were recorded give the events.csv of the
    whole records; when a later field brings a new column, the cache says so
    (None) and the outputs read the files again."""
    folder = RunFolder(tmp_path / "run")
    folder.prepare()
    folder.detections_dir.mkdir(parents=True, exist_ok=True)
    recs = [
        {
            "field": f"field_{i:03d}",
            "objects": [
                {"label": "CTC", "row": 3, "col": 1, "score": 0.5, "area": 2.5},
                {"label": "WBC", "row": 1, "col": 9, "score": float("nan")},
            ],
        }
        for i in range(3)
    ]
    cache = DetectionCache(folder)
    ledger = []
    for rec in recs:
        data = json.dumps(rec).encode()
        folder.detection_path(rec["field"]).write_bytes(data)
        ledger.append(
            Detected(field=rec["field"], sha256=hashlib.sha256(data).hexdigest())
        )
        cache.on_record(ledger[-1])
    state = LedgerState.from_records(ledger)
    current = {r.field: r.sha256 for r in ledger}
    names = [r["field"] for r in recs]
    got = load_records(folder, names, state, cache=cache, current=current)
    whole = load_records(folder, names, state)
    assert cache.events_csv(got) == _events_csv(whole)
    # a field outside the cache with a new column: rows made ahead are stale
    extra = {
        "field": "field_009",
        "objects": [{"label": "WBC", "row": 0, "col": 0, "new": 1}],
    }
    assert cache.events_csv([*got, extra]) is None

"""`ctcscan analyze` on OME-TIFF folders written here and on a scan's run folder."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from controller.runs.scan import ScanResult
from tests.conftest import invoke, one_line_error
from tests.test_detect import NAMES, Canvas

FILE_NAMES = ["Hoechst", "HER2", "CK", "CD45"]  # another instrument's names
MAP = "DAPI=Hoechst,FITC=HER2,PE=CK,APC=CD45"


def _write(
    path: Path,
    data: np.ndarray,
    names: list[str],
    px: float | None,
    bits: int | None = None,
) -> None:
    meta: dict = {"axes": "CYX", "Channel": {"Name": names}}
    if px is not None:
        meta.update(PhysicalSizeX=px, PhysicalSizeY=px)
    if bits is not None:
        meta["SignificantBits"] = bits
    meta["Plane"] = {
        "PositionX": [100.0] * len(names),
        "PositionY": [200.0] * len(names),
    }
    tifffile.imwrite(path, data, ome=True, photometric="minisblack", metadata=meta)


def _folder(tmp: Path, *, px: float | None = 0.64, n: int = 3) -> Path:
    """n fields; field k holds k CTCs and a leukocyte."""
    folder = tmp / "ome"
    folder.mkdir()
    for k in range(n):
        cv = Canvas(size=256, seed=k)
        for j in range(k):
            cv.cell(60 + 70 * j, 80 + 60 * j)
        cv.leukocyte(200, 200)
        _write(folder / f"scan_{k:03d}.ome.tif", cv.field(), FILE_NAMES, px)
    return folder


def test_analyze_an_ome_tiff_folder(tmp_path: Path) -> None:
    src = _folder(tmp_path)
    out = tmp_path / "out"
    r = invoke(
        "analyze", str(src), "--out", str(out), "--channels", MAP, "--workers", "1"
    )
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["ctc_count"] == 0 + 1 + 2
    assert report["fields"] == {
        "planned": 3,
        "cartridge": 3,
        "analyzed": 3,
        "failed": [],
        "not_analyzed": [],
    }
    with open(out / "events.csv") as f:
        rows = list(csv.DictReader(f))
    ctcs = [r for r in rows if r["label"] == "CTC"]
    assert sorted({r["field"] for r in rows}) == ["scan_000", "scan_001", "scan_002"]
    assert sorted(r["field"] for r in ctcs) == ["scan_001", "scan_002", "scan_002"]
    assert {r["label"] for r in rows} >= {"CTC", "WBC"}
    # stage position from the OME Plane: the field centre is at (100, 200) um
    for r in ctcs:
        x = 100 + (float(r["col"]) - 127.5) * 0.64
        assert float(r["stage_x_um"]) == pytest.approx(x, abs=0.2)
    pngs = sorted((out / "candidates").glob("*.png"))
    assert len(pngs) == 3
    assert all(r["candidate"].startswith("candidates/") for r in ctcs)
    html = (out / "report.html").read_text()
    assert html.count("<figure") == 3 and "below the cut-off of 5" in html


def test_reanalysing_a_run_folder_matches_the_online_result(
    small_scan: ScanResult, tmp_path: Path
) -> None:
    online = json.loads((small_scan.run_dir / "report.json").read_text())
    out = tmp_path / "again"
    r = invoke("analyze", str(small_scan.run_dir), "--out", str(out), "--workers", "0")
    assert r.exit_code == 0, r.output
    again = json.loads((out / "report.json").read_text())
    assert again["ctc_count"] == online["ctc_count"]
    assert again["counts"] == online["counts"]
    assert again["cartridge_id"] == online["cartridge_id"] == "cart-A"
    assert (small_scan.run_dir / "events.csv").read_text() == (
        out / "events.csv"
    ).read_text()


def test_a_12_bit_field_saturates_at_4095_in_a_plain_folder(tmp_path: Path) -> None:
    # the file states the camera's bit depth (OME SignificantBits): its
    # largest value, not the 16-bit word's, is saturation, in a run folder or
    # not. A blob saturated in DNA and cytokeratin is debris, not a cell
    folder = tmp_path / "ome"
    folder.mkdir()
    cv = Canvas(size=256, seed=3)
    cv.blob(128, 128, 10, (9000, 0, 9000, 0))
    cv.cell(60, 60)
    _write(folder / "f_000.ome.tif", cv.field(), NAMES, 0.64, bits=12)
    out = tmp_path / "out"
    r = invoke("analyze", str(folder), "--out", str(out), "--workers", "0")
    assert r.exit_code == 0, r.output
    with open(out / "events.csv") as f:
        rows = list(csv.DictReader(f))
    blob = min(
        rows, key=lambda o: abs(float(o["row"]) - 128) + abs(float(o["col"]) - 128)
    )
    assert blob["label"] == "DEBRIS" and "saturated" in blob["reason"], blob
    assert json.loads((out / "report.json").read_text())["ctc_count"] == 1


def test_a_bit_depth_the_pixels_contradict_is_refused(tmp_path: Path) -> None:
    # SignificantBits 8 on pixels up to 4095: every bright pixel would count
    # as saturated (every cell debris), so the field is refused instead
    folder = tmp_path / "ome"
    folder.mkdir()
    cv = Canvas(size=128, seed=1)
    cv.cell(64, 64)
    _write(folder / "f.ome.tif", cv.field(), NAMES, 0.64, bits=8)
    r = invoke("analyze", str(folder), "--out", str(tmp_path / "o"), "--workers", "0")
    assert r.exit_code == 2, r.output
    assert "SignificantBits (8) puts saturation at 255" in " ".join(r.output.split())


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ({"instrument": {"camera": {"bit_depth": "abc"}}}, "bit_depth"),
        ({"instrument": {"camera": {"bit_depth": 10**6}}}, "bit_depth"),
        ({"layout": {"rows": "x", "cols": 5}}, "damaged"),
        ({"fields": "abc"}, "damaged"),
        ({"fields": [{}]}, "damaged"),
        ({"request": []}, "damaged"),
    ],
)
def test_a_damaged_scan_json_is_one_line(
    small_scan: ScanResult, tmp_path: Path, damage: dict, needle: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(
        small_scan.run_dir, run, ignore=shutil.ignore_patterns("analyses", ".lock")
    )
    scan = json.loads((run / "scan.json").read_text())
    scan.update(damage)
    (run / "scan.json").write_text(json.dumps(scan))
    r = invoke("analyze", str(run), "--out", str(tmp_path / "o"), "--workers", "0")
    one_line_error(r, "scan.json", needle)


@pytest.mark.parametrize("damage", ["another field's", "{}", "truncated"])
def test_a_resumed_analysis_redoes_a_result_replaced_since(
    tmp_path: Path, damage: str
) -> None:
    # the ledger records each result's sha256: a detection file replaced or
    # damaged since is analysed again, not counted as it now reads
    src = _folder(tmp_path)
    out = tmp_path / "out"
    args = ("analyze", str(src), "--out", str(out), "--channels", MAP)
    assert invoke(*args, "--workers", "0").exit_code == 0
    det = out / "detections"
    good = (det / "scan_001.json").read_bytes()
    (det / "scan_001.json").write_bytes(
        {
            "another field's": (det / "scan_002.json").read_bytes(),
            "{}": b"{}",
            "truncated": good[: len(good) // 2],
        }[damage]
    )
    r = invoke(*args, "--workers", "0")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "report.json").read_text())["ctc_count"] == 3
    again = json.loads((det / "scan_001.json").read_bytes())
    assert again["objects"] == json.loads(good)["objects"]
    with open(out / "events.csv") as f:
        fields = [row["field"] for row in csv.DictReader(f) if row["label"] == "CTC"]
    assert sorted(fields) == ["scan_001", "scan_002", "scan_002"]


def test_a_planned_field_without_its_file_is_no_complete_analysis(
    small_scan: ScanResult, tmp_path: Path
) -> None:
    # a field the scan planned and did not fail, whose file is gone (or not
    # yet written by a scan still running): the analysis is not complete
    run = tmp_path / "run"
    shutil.copytree(
        small_scan.run_dir, run, ignore=shutil.ignore_patterns("analyses", ".lock")
    )
    gone = sorted((run / "fields").glob("*.ome.tif"))[1]
    gone.unlink()
    r = invoke("analyze", str(run), "--out", str(tmp_path / "o"), "--workers", "0")
    assert r.exit_code == 2, r.output
    name = gone.name.split(".")[0]
    assert f"field {name} was planned by its scan but has no file" in " ".join(
        r.output.split()
    )


def test_pixel_size_missing_then_given(tmp_path: Path) -> None:
    src = _folder(tmp_path, px=None, n=1)
    one_line_error(
        invoke("analyze", str(src), "--out", str(tmp_path / "o"), "--channels", MAP),
        "scan_000.ome.tif",
        "pixel size",
        "--pixel-size",
    )
    r = invoke(
        "analyze",
        str(src),
        "--out",
        str(tmp_path / "o"),
        "--channels",
        MAP,
        "--pixel-size",
        "0.64",
        "--workers",
        "0",
    )
    assert r.exit_code == 0, r.output


def test_file_without_the_needed_channels(tmp_path: Path) -> None:
    src = _folder(tmp_path, n=1)
    one_line_error(
        invoke("analyze", str(src), "--out", str(tmp_path / "o")),
        "scan_000.ome.tif",
        "DAPI",
        "--channels",
    )


def test_corrupt_file_is_named(tmp_path: Path) -> None:
    src = _folder(tmp_path, n=2)
    good = (src / "scan_000.ome.tif").read_bytes()
    (src / "scan_001.ome.tif").write_bytes(good[: len(good) // 3])
    one_line_error(
        invoke("analyze", str(src), "--out", str(tmp_path / "o"), "--channels", MAP),
        "scan_001.ome.tif",
        "corrupt",
    )
    (src / "scan_001.ome.tif").write_bytes(b"not a tiff at all")
    one_line_error(
        invoke("analyze", str(src), "--out", str(tmp_path / "o"), "--channels", MAP),
        "scan_001.ome.tif",
        "not a readable TIFF",
    )


def test_a_cartridge_refused_among_several_is_listed_with_its_fields(
    tmp_path: Path,
) -> None:
    bad = _folder(tmp_path, n=2)
    (bad / "scan_001.ome.tif").write_bytes(b"not a tiff at all")
    good = tmp_path / "good"
    good.mkdir()
    (good / "scan_000.ome.tif").write_bytes((bad / "scan_000.ome.tif").read_bytes())
    r = invoke("analyze", str(bad), str(good), "--out", str(tmp_path / "o"),
               "--channels", MAP, "--workers", "0")  # fmt: skip
    assert r.exit_code == 2, r.output
    flat = " ".join(r.stdout.split())
    assert "0/2" in flat and "1/1" in flat, r.stdout  # not "0/0"
    assert "scan_001.ome.tif" in r.stderr


def test_empty_or_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    one_line_error(
        invoke("analyze", str(tmp_path / "empty"), "--out", str(tmp_path / "o")),
        "no OME-TIFF field files",
    )
    one_line_error(
        invoke("analyze", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")),
        "no such folder",
    )


def test_a_refused_output_folder_keeps_nothing_of_the_command(
    tmp_path: Path,
) -> None:
    src = _folder(tmp_path, n=1)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("a reader's notes")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for out, why in (
        (theirs, "holds other files"),
        (src, "is the input folder"),
    ):
        one_line_error(
            invoke("analyze", str(src), "--out", str(out), "--channels", MAP), why
        )
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    # an input that fails: the output folder it would have made is not made
    (tmp_path / "empty").mkdir()
    one_line_error(
        invoke("analyze", str(tmp_path / "empty"), "--out", str(tmp_path / "o")),
        "no OME-TIFF field files",
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["link", "dangling link", "fifo"])
def test_an_output_folder_whose_ledger_is_no_file_of_its_own_is_refused(
    tmp_path: Path, kind: str
) -> None:
    # a link's records would go where it points (another analysis' ledger);
    # a pipe would hang the command
    src = _folder(tmp_path, n=1)
    other = tmp_path / "other.jsonl"
    other.write_bytes(b"")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    ledger = theirs / "ledger.jsonl"
    if kind == "fifo":
        os.mkfifo(ledger)
    else:
        ledger.symlink_to(other if kind == "link" else tmp_path / "nowhere")
    one_line_error(
        invoke("analyze", str(src), "--out", str(theirs), "--channels", MAP),
        "no file of its own",
    )
    assert other.read_bytes() == b"" and not (tmp_path / "nowhere").exists()
    assert [p.name for p in theirs.iterdir()] == ["ledger.jsonl"]


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("ledger.jsonl", b"my notes\n", "no analysis' ledger"),
        (".owner.json", b'{"mine": true}\n', "no ctcscan owner note"),
        (".owner.json", b"", "no ctcscan owner note"),
    ],
)
def test_an_output_folder_with_someone_s_file_of_ours_by_name_is_refused(
    tmp_path: Path, name: str, content: bytes, why: str
) -> None:
    # a file named as one of the analysis' own, not written by it, is someone's:
    # neither appended to nor replaced
    src = _folder(tmp_path, n=1)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / name).write_bytes(content)
    one_line_error(
        invoke("analyze", str(src), "--out", str(theirs), "--channels", MAP), why
    )
    assert (theirs / name).read_bytes() == content
    assert [p.name for p in theirs.iterdir()] == [name]


def test_an_output_folder_found_full_keeps_no_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a full disk creates the writability probe and refuses its bytes: the
    # probe must not stay behind, or the same command later finds the folder
    # holding "other files"
    import errno

    real = Path.write_bytes

    def full(self: Path, data: bytes) -> int:  # type: ignore[override]
        if self.name == ".write-probe":
            real(self, b"")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    src = _folder(tmp_path, n=1)
    out = tmp_path / "out"
    args = ("analyze", str(src), "--out", str(out), "--channels", MAP)
    monkeypatch.setattr(Path, "write_bytes", full)
    one_line_error(invoke(*args), "is not writable", "No space left on device")
    assert not (out / ".write-probe").exists()
    monkeypatch.undo()
    assert invoke(*args, "--workers", "0").exit_code == 0


@pytest.mark.parametrize("where", ["detections", "outputs"])
def test_a_full_disk_is_one_line_and_the_same_command_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    import errno
    import types

    import analysis.report
    import controller.runstore.results

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    src = _folder(tmp_path)
    out = tmp_path / "out"
    args = ("analyze", str(src), "--out", str(out), "--channels", MAP)
    if where == "outputs":  # the report's files, after every field's result
        monkeypatch.setattr(
            analysis.report, "os", types.SimpleNamespace(fsync=full, replace=os.replace)
        )
    else:  # a field's result
        monkeypatch.setattr(
            controller.runstore.results, "write_durably", lambda *a, **k: full()
        )
    r = invoke(*args, "--workers", "0")
    assert r.exit_code == 2, r.output
    last = r.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("error:") and "No space left on device" in last, last
    assert "same command" in last
    assert not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    r = invoke(*args, "--workers", "0")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "report.json").read_text())["ctc_count"] == 3


@pytest.mark.parametrize(
    ("yaml", "needle"),
    [
        ("detection: {nucleus_snr: true}", "nucleus_snr must be a number"),
        ("detection: {blur_nucleus_area_um2: [120, 12]}", "the smaller first"),
        ("detection: {blur_min_nuclei: 100, blur_max_nuclei: 2}", "blur_min_nuclei"),
        ("detection: {spillover: {PE->APC: -5}}", "a fraction from 0 to 1"),
        ("detection: {spillover: {PE->APC: 1.0e30}}", "a fraction from 0 to 1"),
        ("detection: {spillover: {garbage: 0.1}}", "SOURCE->TARGET"),
        ("detection: {spillover: {XX->APC: 0.1}}", "'XX' is not a channel"),
        ("detection: {spillover: {' PE -> APC ': 0.1}}", "SOURCE->TARGET"),
        ("detection: {spillover: {PE->APC->DAPI: 0.1}}", "SOURCE->TARGET"),
        ("detection: {spillover: {APC->PE: 0.1}}", "only the bleed-through of"),
        (
            "indications: [{name: a, cutoff: 1}, {name: a, cutoff: 2}]\nindication: a",
            "listed twice",
        ),
    ],
)
def test_an_assay_that_cannot_be_meant_is_refused(
    tmp_path: Path, yaml: str, needle: str
) -> None:
    src = _folder(tmp_path, n=1)
    assay = tmp_path / "assay.yaml"
    assay.write_text(yaml + "\n")
    args = ("analyze", str(src), "--out", str(tmp_path / "o"), "--channels", MAP)
    one_line_error(invoke(*args, "--assay", str(assay)), needle)


@pytest.mark.parametrize(("channel", "value"), [(3, 0), (3, 160), (0, 65535), (2, 0)])
def test_a_stain_channel_of_one_value_is_refused(
    tmp_path: Path, channel: int, value: int
) -> None:
    # a dead channel (CD45 all 0 had turned every leukocyte into a nucleus
    # without CD45, and cells over one into CTCs)
    folder = tmp_path / "plain"
    folder.mkdir()
    field = Canvas(size=128).field()
    field[channel] = value
    _write(folder / "f.ome.tif", field, NAMES, 0.64)
    r = invoke("analyze", str(folder), "--out", str(tmp_path / "o"), "--workers", "0")
    assert r.exit_code == 2, r.output
    flat = " ".join(r.output.split())
    assert f"channel {NAMES[channel]} holds one value ({value}) throughout" in flat
    # ...or but for a hot pixel: as dead
    field[channel, 16, 32] = value + 1 if value < 65535 else 0  # in the sample
    _write(folder / "f.ome.tif", field, NAMES, 0.64)
    r = invoke("analyze", str(folder), "--out", str(tmp_path / "o2"), "--workers", "0")
    assert r.exit_code == 2, r.output
    flat = " ".join(r.output.split())
    assert f"channel {NAMES[channel]} holds one value ({value}) in all but 1" in flat


def test_hidden_files_are_no_fields_and_a_name_too_long_is_one_line(
    tmp_path: Path,
) -> None:
    src = _folder(tmp_path, n=2)
    good = (src / "scan_001.ome.tif").read_bytes()
    (src / ".scan_001.ome.tif").write_bytes(good)  # hidden: no field
    (src / "._scan_001.ome.tif").write_bytes(b"\x00\x05\x16\x07 Mac metadata")
    out = tmp_path / "out"
    args = ("analyze", str(src), "--out", str(out), "--channels", MAP)
    r = invoke(*args, "--workers", "0")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "detections").iterdir()) == [
        "scan_000.json",
        "scan_001.json",
    ]
    # a name whose candidate pictures' names would not fit in 255 bytes
    long = "f" * 201
    (src / f"{long}.ome.tif").write_bytes(good)
    one_line_error(
        invoke("analyze", str(src), "--out", str(tmp_path / "o2"), "--channels", MAP),
        "a field name of 201 bytes is too long",
    )


def test_no_more_worker_processes_than_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import controller.runs.analyze as analyze_mod

    asked: list[int] = []
    real = analyze_mod.run_local

    def spy(carts, job_maker, workers, finished):  # type: ignore[no-untyped-def]
        asked.append(workers)
        return real(carts, job_maker, workers, finished)

    monkeypatch.setattr(analyze_mod, "run_local", spy)
    src = _folder(tmp_path, n=2)
    args = ("analyze", str(src), "--out", str(tmp_path / "o"), "--channels", MAP)
    assert invoke(*args, "--workers", "64").exit_code == 0
    assert asked == [2]


@pytest.mark.parametrize(
    ("file", "damage", "why"),
    [
        ("report.json", b"{}", "not a ctcscan report"),
        ("events.csv", b"hello", "no column 'field'"),
        ("events.csv", None, "where its report.json counts"),
    ],
)
def test_compare_of_a_damaged_analysis_is_one_line(
    tmp_path: Path, file: str, damage: bytes | None, why: str
) -> None:
    src = _folder(tmp_path)
    sides = []
    for name, assay in (("a", "{}"), ("b", "detection: {min_ctc_diameter_um: 9.0}")):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(assay + "\n")
        out = tmp_path / name
        args = ("analyze", str(src), "--out", str(out), "--channels", MAP)
        assert invoke(*args, "--assay", str(cfg), "--workers", "0").exit_code == 0
        sides.append(str(out))
    assert invoke("compare", *sides).exit_code == 0
    path = tmp_path / "b" / file
    if damage is None:  # the table cut after its second object
        damage = b"".join(path.read_bytes().splitlines(keepends=True)[:3])
    path.write_bytes(damage)
    one_line_error(invoke("compare", *sides), file, why)


def test_a_channel_the_assay_does_not_name_takes_no_part(tmp_path: Path) -> None:
    # a fifth channel (another dye, or a copy of DAPI) had turned debris
    # bright in every assay channel into OTHER, and nuclei into CK fragments
    cv = Canvas(size=256, seed=4)
    cv.blob(128, 128, 10, (3000, 2000, 2500, 2000))  # debris: bright in all
    cv.cell(60, 60)
    cv.leukocyte(200, 200)
    four = cv.field()
    results = {}
    for name, extra in (("four", None), ("zero", 0), ("dapi", four[0])):
        folder = tmp_path / name
        folder.mkdir()
        data, names = four, NAMES
        if extra is not None:
            plane = np.full_like(four[0], 0) if isinstance(extra, int) else extra
            data, names = np.concatenate([four, plane[None]]), [*NAMES, "Cy7"]
        _write(folder / "f.ome.tif", data, names, 0.64)
        out = tmp_path / f"o_{name}"
        r = invoke("analyze", str(folder), "--out", str(out), "--workers", "0")
        assert r.exit_code == 0, r.output
        with open(out / "events.csv") as f:
            rows = [
                (x["label"], x["reason"], x["row"], x["col"]) for x in csv.DictReader(f)
            ]
        results[name] = rows
    assert any(x[0] == "DEBRIS" for x in results["four"])
    assert results["zero"] == results["four"] == results["dapi"]


def test_recursive_skips_hidden_folders(tmp_path: Path) -> None:
    # a snapshot folder (".snap", ".zfs") holds copies of the archive's
    # cartridges: not cartridges of their own
    root = tmp_path / "archive"
    root.mkdir()
    src = _folder(tmp_path, n=1)
    shutil.copytree(src, root / "cart-1")
    shutil.copytree(src, root / ".snap" / "cart-1")
    out = tmp_path / "out"
    args = ("analyze", str(root), "--recursive", "--out", str(out), "--channels")
    r = invoke(*args, MAP, "--workers", "0")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "cart-1"
    ]


def test_bad_channel_map(tmp_path: Path) -> None:
    src = _folder(tmp_path, n=1)
    one_line_error(
        invoke(
            "analyze",
            str(src),
            "--out",
            str(tmp_path / "o"),
            "--channels",
            "DAPI:Hoechst",
        ),
        "ASSAY=FILE",
    )
    one_line_error(
        invoke(
            "analyze",
            str(src),
            "--out",
            str(tmp_path / "o"),
            "--channels",
            "DNA=Hoechst",
        ),
        "'DNA' is not a channel of the assay",
    )
    for mapping, why in (
        ("DAPI=Hoechst,DAPI=DNA", "'DAPI' is mapped twice"),
        ("DAPI=CK,PE=CK", "'CK' is mapped twice"),
    ):
        args = ("analyze", str(src), "--out", str(tmp_path / "o"), "--channels")
        one_line_error(invoke(*args, mapping), why)
    # a file with the assay's names, one of them given to another channel too
    plain = tmp_path / "plain"
    plain.mkdir()
    _write(plain / "f.ome.tif", Canvas(size=128).field(), NAMES, 0.64)
    args = ("analyze", str(plain), "--out", str(tmp_path / "o2"), "--channels")
    one_line_error(invoke(*args, "DAPI=FITC"), "two channels named 'DAPI' once renamed")


def test_the_detector_version_covers_every_module_a_field_s_record_comes_from() -> None:
    # a record written under one detector version must not change under the
    # same version: every analysis module the pipeline imports is hashed into it
    import subprocess
    import sys

    from analysis.pipeline import _DETECTOR_MODULES

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, analysis.pipeline; print(' '.join(sorted(m for m in "
            "sys.modules if m.startswith('analysis.'))))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout.split()
    files = {m.removeprefix("analysis.") + ".py" for m in out}
    assert "detect.py" in files
    assert files <= set(_DETECTOR_MODULES), files - set(_DETECTOR_MODULES)

"""The napari reader of run folders (analysis/napari_reader.py), without napari.

World coordinates are ``(-stage_y_um, stage_x_um)``: a pixel of the mosaic at
index ``(r, c)`` is at world ``translate + scale * (r, c)``.
"""

from __future__ import annotations

import csv
import importlib
import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest

from analysis import napari_reader
from analysis.fieldio import read_field_file
from analysis.napari_reader import (
    LABEL_COLORS,
    REVIEW_COLOR,
    napari_get_reader,
    read_run,
    world_from_stage,
)
from controller.records import AnalysisStarted
from controller.runs.scan import ScanResult
from controller.runstore.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]
CHANNELS = ["DAPI", "FITC", "PE", "APC"]


@pytest.fixture(autouse=True)
def _synchronous() -> Any:
    """Compute in this thread, so every read is seen by a patched reader."""
    with dask.config.set(scheduler="synchronous"):
        yield


def planned(run: Path) -> dict[str, dict[str, Any]]:
    scan = json.loads((run / "scan.json").read_text())
    return {f["name"]: f for f in scan["fields"]}


def images(layers: list[Any]) -> dict[str, tuple[Any, dict[str, Any]]]:
    return {k["name"]: (d, k) for d, k, t in layers if t == "image"}


def points(layers: list[Any]) -> tuple[np.ndarray, dict[str, Any]]:
    (found,) = [(d, k) for d, k, t in layers if t == "points"]
    return found


def field_index(kwargs: dict[str, Any], x_um: float, y_um: float, shape: Any) -> Any:
    """Mosaic index of a field's first pixel, from its stage centre, under the
    layer's scale and translate; it must fall on a whole pixel."""
    h, w = shape
    px = kwargs["scale"][0]
    wy, wx = world_from_stage(x_um, y_um) - np.array([(h - 1) / 2, (w - 1) / 2]) * px
    r = (wy - kwargs["translate"][0]) / px
    c = (wx - kwargs["translate"][1]) / px
    assert abs(r - round(r)) < 1e-6 and abs(c - round(c)) < 1e-6
    return round(r), round(c)


def copy_run(src: Path, dst: Path) -> Path:
    """A run folder whose field files link to `src`'s (so they can be removed
    or replaced without touching the shared scan)."""
    dst.mkdir()
    for name in ("scan.json", "events.csv"):
        shutil.copy(src / name, dst / name)
    (dst / "fields").mkdir()
    for f in (src / "fields").iterdir():
        (dst / "fields" / f.name).symlink_to(f)
    return dst


def test_reader_is_offered_for_run_folders_only(
    small_scan: ScanResult, tmp_path: Path
) -> None:
    run = small_scan.run_dir
    assert napari_get_reader(str(run)) is read_run
    assert napari_get_reader([str(run)]) is read_run
    assert napari_get_reader(str(run / "scan.json")) is read_run
    assert napari_get_reader(str(tmp_path)) is None
    assert napari_get_reader(str(run / "fields")) is None  # OME-TIFFs only
    assert napari_get_reader(str(run / "events.csv")) is None
    assert napari_get_reader(str(tmp_path / "nothing")) is None
    assert napari_get_reader([str(run), str(run)]) is None
    no_fields = tmp_path / "no-fields"
    no_fields.mkdir()
    shutil.copy(run / "scan.json", no_fields / "scan.json")
    assert napari_get_reader(str(no_fields)) is None


def test_one_lazy_image_layer_per_channel_covering_every_field(
    small_scan: ScanResult,
) -> None:
    run = small_scan.run_dir
    layers = read_run(str(run))
    assert [k["name"] for _, k, t in layers if t == "image"] == CHANNELS
    assert [t for _, _, t in layers] == ["image"] * 4 + ["points"]
    imgs = images(layers)
    cmaps = {n: k["colormap"] for n, (_, k) in imgs.items()}
    assert cmaps == {"DAPI": "blue", "FITC": "green", "PE": "yellow", "APC": "magenta"}
    first = read_field_file(run / "fields" / "field_000.ome.tif")
    _, h, w = first.data.shape
    px = first.pixel_size_um
    fields = planned(run)
    assert len(fields) == 12
    for data, kw in imgs.values():
        assert kw["multiscale"] is True and kw["blending"] == "additive"
        assert kw["scale"] == (px, px)
        lo, hi = kw["contrast_limits"]
        assert 0 <= lo < hi <= 4095
        assert all(isinstance(level, da.Array) for level in data)
        assert not any(isinstance(level, np.ndarray) for level in data)
        # the 3 x 4 test layout, fields edge to edge
        assert data[0].shape == (3 * h, 4 * w)
        assert data[0].dtype == np.uint16
        for k, level in enumerate(data[1:], start=1):
            f = napari_reader.PYRAMID_FACTOR**k
            assert level.shape == (-(-3 * h // f), -(-4 * w // f))
        assert max(data[-1].shape) <= napari_reader.PYRAMID_MAX_PX
        corners = {
            field_index(kw, f["x_um"], f["y_um"], (h, w)) for f in fields.values()
        }
        assert corners == {(i * h, j * w) for i in range(3) for j in range(4)}


def test_a_fields_region_of_the_mosaic_is_its_stored_pixels(
    small_scan: ScanResult,
) -> None:
    run = small_scan.run_dir
    imgs = images(read_run(str(run)))
    fields = planned(run)
    for name in ("field_000", "field_006"):
        ff = read_field_file(run / "fields" / f"{name}.ome.tif")
        assert ff.channel_names == CHANNELS
        _, h, w = ff.data.shape
        for c, channel in enumerate(CHANNELS):
            data, kw = imgs[channel]
            r0, c0 = field_index(kw, fields[name]["x_um"], fields[name]["y_um"], (h, w))
            region = data[0][r0 : r0 + h, c0 : c0 + w].compute()
            np.testing.assert_array_equal(region, ff.data[c])
            # the next level: means of 4 x 4 blocks (the test fields divide by 4)
            coarse = data[1][r0 // 4 : (r0 + h) // 4, c0 // 4 : (c0 + w) // 4]
            means = ff.data[c].reshape(h // 4, 4, w // 4, 4).mean(axis=(1, 3))
            np.testing.assert_array_equal(coarse.compute(), np.rint(means))


def test_computing_one_field_reads_only_that_fields_file(
    small_scan: ScanResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = small_scan.run_dir
    reads: list[tuple[str, int]] = []
    real = napari_reader._read_plane

    def counting(path: str, channel: int) -> np.ndarray:
        reads.append((Path(path).name, channel))
        return real(path, channel)

    monkeypatch.setattr(napari_reader, "_read_plane", counting)
    imgs = images(read_run(str(run)))
    assert reads == []  # opening reads no tile (the probe field is read whole)
    data, kw = imgs["PE"]
    f = planned(run)["field_007"]
    h, w = 1036, 1384
    r0, c0 = field_index(kw, f["x_um"], f["y_um"], (h, w))
    data[0][r0 : r0 + h, c0 : c0 + w].compute()
    assert reads == [("field_007.ome.tif", 2)]
    reads.clear()
    data[1][r0 // 4 + 10 : r0 // 4 + 20, c0 // 4 + 10 : c0 // 4 + 20].compute()
    assert reads == [("field_007.ome.tif", 2)]
    reads.clear()
    data[0][r0 + h - 5 : r0 + h + 5, c0 + 100 : c0 + 110].compute()  # two fields
    assert len(reads) == 2 and ("field_007.ome.tif", 2) in reads


def test_events_are_points_at_their_stage_positions(small_scan: ScanResult) -> None:
    run = small_scan.run_dir
    layers = read_run(str(run))
    data, kw = points(layers)
    with (run / "events.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) > 0 and data.shape == (len(rows), 2)
    stage_x = np.array([float(r["stage_x_um"]) for r in rows])
    stage_y = np.array([float(r["stage_y_um"]) for r in rows])
    np.testing.assert_allclose(data[:, 1], stage_x)
    np.testing.assert_allclose(data[:, 0], -stage_y)
    feats = kw["features"]
    assert list(feats["label"]) == [r["label"] for r in rows]
    assert list(feats["field"]) == [r["field"] for r in rows]
    np.testing.assert_allclose(feats["score"], [float(r["score"]) for r in rows])
    # the review column names the rule a borderline object narrowly fails
    flagged = [i for i, r in enumerate(rows) if r["review"]]
    assert list(np.flatnonzero(np.asarray(feats["review"]))) == flagged
    # each point sits on its object's pixel of the mosaic
    imgs = images(layers)
    _, ikw = imgs["DAPI"]
    px = ikw["scale"][0]
    fields = planned(run)
    for (wy, wx), r in zip(data, rows, strict=True):
        f = fields[r["field"]]
        r0, c0 = field_index(ikw, f["x_um"], f["y_um"], (1036, 1384))
        at_r = (wy - ikw["translate"][0]) / px
        at_c = (wx - ikw["translate"][1]) / px
        assert abs(at_r - (r0 + float(r["row"]))) < 0.2
        assert abs(at_c - (c0 + float(r["col"]))) < 0.2
    # colour by label; CTCs distinct (colour and size)
    labels = np.array([r["label"] for r in rows])
    ctc = labels == "CTC"
    assert ctc.any() and (~ctc).any()
    colors = np.asarray(kw["border_color"])
    borderline = np.zeros(len(rows), bool)
    borderline[flagged] = True
    for lab in set(labels):
        plain = (labels == lab) & ~borderline
        assert (colors[plain] == LABEL_COLORS[lab]).all()
    assert (colors[borderline] == REVIEW_COLOR).all()
    assert not any(np.array_equal(colors[ctc][0], c) for c in colors[~ctc])
    sizes = np.asarray(kw["size"])
    assert sizes[ctc].min() > sizes[~ctc & ~borderline].max()


def test_missing_and_unreadable_fields_are_zeros(
    small_scan: ScanResult, tmp_path: Path
) -> None:
    run = copy_run(small_scan.run_dir, tmp_path / "run")
    (run / "fields" / "field_004.ome.tif").unlink()
    broken = run / "fields" / "field_010.ome.tif"
    broken.unlink()
    broken.write_bytes(b"II*\x00" + b"\x00" * 64)
    imgs = images(read_run(str(run)))
    fields = planned(run)
    data, kw = imgs["DAPI"]
    assert data[0].shape == (3 * 1036, 4 * 1384)

    def region(name: str) -> np.ndarray:
        f = fields[name]
        r0, c0 = field_index(kw, f["x_um"], f["y_um"], (1036, 1384))
        return np.asarray(data[0][r0 : r0 + 1036, c0 : c0 + 1384].compute())

    assert not region("field_004").any()
    with pytest.warns(RuntimeWarning, match="field_010.ome.tif.*shown as zeros"):
        assert not region("field_010").any()
    kept = read_field_file(run / "fields" / "field_005.ome.tif").data[0]
    np.testing.assert_array_equal(region("field_005"), kept)


def test_a_damaged_camera_affine_is_named_not_drawn(
    small_scan: ScanResult, tmp_path: Path
) -> None:
    run = copy_run(small_scan.run_dir, tmp_path / "run")
    scan_json = run / "scan.json"
    meta = json.loads(scan_json.read_text())
    px = meta["instrument"]["pixel_size_um"]
    for bad in ("abc", [px, 0, 0, 0, px, 0], [px, 0, 0, 0, -px]):  # mirrored, short
        meta["instrument"]["pixel_affine"] = bad
        scan_json.write_text(json.dumps(meta))
        with pytest.raises(napari_reader.RunFolderError, match=r"scan\.json.*affine"):
            read_run(str(run))


def test_an_analysis_folder_shows_its_run_and_its_events(
    small_scan: ScanResult, tmp_path: Path
) -> None:
    run = small_scan.run_dir
    out = tmp_path / "analysis"
    out.mkdir()
    Ledger(out / "ledger.jsonl").append(AnalysisStarted(input=str(run), fields=12))
    with (run / "events.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    flagged = [i for i, r in enumerate(rows) if r["label"] != "CTC"][:3]
    with (out / "events.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, [*(k for k in rows[0] if k != "review"), "review"])
        writer.writeheader()
        for i, r in enumerate(rows):
            writer.writerow({**r, "review": "size" if i in flagged else ""})
    assert napari_get_reader(str(out)) is read_run
    layers = read_run(str(out))
    assert [k["name"] for _, k, t in layers if t == "image"] == CHANNELS
    _, kw = images(layers)["PE"]
    assert kw["metadata"]["run"] == str(run)
    data, pkw = points(layers)
    assert data.shape == (len(rows), 2)
    review = np.asarray(pkw["features"]["review"])
    assert list(np.flatnonzero(review)) == flagged
    colors = np.asarray(pkw["border_color"])
    assert (colors[flagged] == REVIEW_COLOR).all()
    assert set(np.asarray(pkw["symbol"])[flagged]) == {"square"}

    # the analysis of a plain folder of OME-TIFFs is not a run: no reader
    other = tmp_path / "other"
    other.mkdir()
    Ledger(other / "ledger.jsonl").append(
        AnalysisStarted(input=str(run / "fields"), fields=12)
    )
    assert napari_get_reader(str(other)) is None


def test_the_npe2_manifest_names_the_reader_and_ships() -> None:
    import npe2

    manifest = npe2.PluginManifest.from_file(ROOT / "analysis" / "napari.yaml")
    assert manifest.name == "ctcscan"
    (reader,) = manifest.contributions.readers or []
    assert reader.accepts_directories
    (command,) = [
        c for c in manifest.contributions.commands or [] if c.id == reader.command
    ]
    module, _, attr = (command.python_name or "").partition(":")
    assert getattr(importlib.import_module(module), attr) is napari_get_reader
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    entry = project["project"]["entry-points"]["napari.manifest"]
    assert entry == {"ctcscan": "analysis:napari.yaml"}
    assert "napari.yaml" in project["tool"]["setuptools"]["package-data"]["analysis"]
    assert any(
        r.startswith("napari")
        for r in project["project"]["optional-dependencies"]["napari"]
    )

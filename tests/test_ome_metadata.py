"""What a stored field file holds: its OME metadata, checked against the OME
schema, its pixels (optionally losslessly compressed), and the instrument YAML
keys both come from."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import ome_types
import pytest
import tifffile

from analysis.fieldio import read_field_file
from controller.config import InstrumentConfig, StorageSettings, load_yaml
from controller.errors import ConfigError
from controller.records import Stored
from controller.runs.scan import ScanResult
from controller.runstore.fieldstore import AssembledField, FieldStore
from controller.runstore.folder import RunFolder
from controller.runstore.omexml import NAMESPACE, OmeXml
from hardware_configs import CONFIG_DIR
from tests.conftest import SIM_YAML, invoke, run_scan, sim_instrument

# ---------------------------------------------------------------- config keys


def _instrument(**changes: Any) -> InstrumentConfig:
    data = load_yaml(SIM_YAML)
    data.update(changes)
    return InstrumentConfig.from_dict(data, source="sim.yaml", base_dir=CONFIG_DIR)


def _channel(**keys: Any) -> list[dict[str, Any]]:
    return [{"name": "DAPI", "preset": "DAPI", "exposure_ms": 20, **keys}]


def test_shipped_instruments_describe_their_channels_and_objective() -> None:
    sim = InstrumentConfig.from_file(SIM_YAML)
    template = InstrumentConfig.from_file(CONFIG_DIR / "real-scanner-template.yaml")
    for cfg in (sim, template):
        got = {c.name: (c.excitation_nm, c.emission_nm, c.color) for c in cfg.channels}
        assert got == {
            "DAPI": (358, 461, "#0000FF"),
            "FITC": (495, 519, "#00FF00"),
            "PE": (565, 578, "#FFFF00"),
            "APC": (650, 660, "#FF0000"),
        }
        assert cfg.objective is not None
        assert (cfg.objective.magnification, cfg.objective.na) == (10, 0.45)


def test_objective_defaults_for_the_simulator_only() -> None:
    data = load_yaml(SIM_YAML)
    del data["objective"]
    sim = InstrumentConfig.from_dict(data, base_dir=CONFIG_DIR)
    assert sim.objective is not None and sim.objective.na == 0.45
    demo = InstrumentConfig.from_file(CONFIG_DIR / "demo-adapters.yaml")
    assert demo.objective is None  # real adapters: nothing made up


@pytest.mark.parametrize(
    ("color", "stored"),
    [("blue", "#0000FF"), ("#00ff80", "#00FF80"), ("Magenta", "#FF00FF")],
)
def test_channel_colours_are_hex_or_names(color: str, stored: str) -> None:
    cfg = _instrument(channels=_channel(color=color), focus={"enabled": False})
    assert cfg.channels[0].color == stored


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        (
            {"channels": _channel(color=None)},
            "channels.0.color: Value error, no col",
        ),
        ({"channels": _channel(color="#00FF")}, "'#00FF' is no colour"),
        ({"channels": _channel(color="purple")}, "'purple' is no colour"),
        ({"channels": _channel(color=255)}, "a colour is a string"),
        ({"channels": _channel(excitation_nm=0)}, "channels.0.excitation_nm"),
        ({"channels": _channel(emission_nm=-5)}, "channels.0.emission_nm"),
        ({"objective": {"magnification": 10, "na": 0}}, "objective.na"),
        ({"objective": {"magnification": 0, "na": 0.45}}, "objective.magnification"),
        ({"objective": {"magnification": 10}}, "objective.na: Field required"),
        ({"objective": {"magnification": 10, "na": 0.4, "x": 1}}, "objective.x"),
    ],
)
def test_bad_metadata_keys_are_one_line_errors(
    changes: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ConfigError) as err:
        _instrument(focus={"enabled": False}, **changes)
    msg = str(err.value)
    assert msg.startswith("sim.yaml: ") and "\n" not in msg
    assert needle in msg, msg


def test_an_unquoted_hex_colour_in_yaml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        f"name: mine\nmicromanager_config: {CONFIG_DIR / 'simulated.cfg'}\n"
        "focus: {enabled: false}\n"
        "channels:\n"
        "  - name: DAPI\n"
        "    preset: DAPI\n"
        "    exposure_ms: 20\n"
        "    color: #0000FF\n"  # a YAML comment: the key is left empty
    )
    with pytest.raises(ConfigError, match=r"mine\.yaml: .*color: .*quote a hex"):
        InstrumentConfig.from_file(path)


# ---------------------------------------------------------------- stored fields

CARTRIDGE = "PT-0042 <&>"  # characters XML must escape
CHANNELS = ("DAPI", "FITC", "PE", "APC")


def _no_detection(job: Any) -> dict[str, Any]:
    return {"field": job.name, "counts": {}, "objects": []}


@pytest.fixture(scope="module")
def ome_scan(tmp_path_factory: pytest.TempPathFactory) -> ScanResult:
    """Three fields of the 12-field test layout, stored uncompressed."""
    return run_scan(
        tmp_path_factory.mktemp("ome") / "run",
        n_fields=3,
        seed=5,
        cartridge_id=CARTRIDGE,
        run_job=_no_detection,
    )


def _stored(run: Path) -> dict[str, Stored]:
    return {
        r.field: r
        for r in RunFolder(run).ledger.read()
        if isinstance(r, Stored)  # the latest record of each field
    }


def test_stored_fields_are_valid_ome_with_the_acquisition(ome_scan: ScanResult) -> None:
    cfg = sim_instrument()
    channels = {c.name: c for c in cfg.channels}
    stored = _stored(ome_scan.run_dir)
    assert ome_scan.complete
    assert sorted(stored) == [f"field_{i:03d}" for i in range(3)]
    for name, rec in stored.items():
        # the OME 2016-06 schema (lxml), then the model
        ome = ome_types.from_tiff(ome_scan.run_dir / rec.file, validate=True)
        assert ome.creator is not None and ome.creator.startswith("ctcscan ")
        (image,) = ome.images
        assert image.name == f"{CARTRIDGE} {name}"
        (ann,) = ome.structured_annotations.map_annotations
        assert ann.namespace == NAMESPACE
        assert ann.value.model_dump() == {
            "cartridge_id": CARTRIDGE,
            "field": name,
            "instrument": "simulated-scanner",
            "software": ome.creator,
        }
        assert [r.id for r in image.annotation_refs] == [ann.id]
        # acquisition date: the ledger's, in UTC
        assert image.acquisition_date is not None
        assert image.acquisition_date.utcoffset() == timedelta(0)
        assert image.acquisition_date == datetime.fromisoformat(rec.acquired_at)
        # instrument and objective
        (instrument,) = ome.instruments
        assert image.instrument_ref is not None
        assert image.instrument_ref.id == instrument.id
        assert instrument.microscope is not None
        assert instrument.microscope.model == "simulated-scanner"
        (objective,) = instrument.objectives
        assert image.objective_settings is not None
        assert image.objective_settings.id == objective.id
        assert objective.nominal_magnification == 10
        assert objective.lens_na == 0.45
        assert objective.model == "simulated 10x/0.45"
        # pixels
        px = image.pixels
        sizes = (px.size_c, px.size_y, px.size_x, px.size_z, px.size_t)
        assert sizes == (4, 1036, 1384, 1, 1)
        assert px.type.value == "uint16" and px.significant_bits == 12
        assert px.physical_size_x == px.physical_size_y == 0.64
        assert px.physical_size_x_unit.value == "µm"
        # channels: names, wavelengths, colours
        assert tuple(c.name for c in px.channels) == CHANNELS
        for ch in px.channels:
            want = channels[ch.name or ""]
            assert ch.excitation_wavelength == want.excitation_nm
            assert ch.emission_wavelength == want.emission_nm
            assert ch.excitation_wavelength_unit.value == "nm"
            assert ch.emission_wavelength_unit.value == "nm"
            assert ch.color.as_hex(format="long").upper() == want.color
        # one plane per channel: exposure and the ledger's stage
        assert [p.the_c for p in px.planes] == [0, 1, 2, 3]
        assert [p.exposure_time for p in px.planes] == [20, 150, 100, 150]
        for p in px.planes:
            assert p.exposure_time_unit.value == "ms"
            assert p.position_x == pytest.approx(rec.stage["x_um"])
            assert p.position_y == pytest.approx(rec.stage["y_um"])
            assert p.position_z == pytest.approx(rec.stage["z_um"])
            assert p.position_x_unit.value == p.position_z_unit.value == "µm"
        assert [(t.ifd, t.plane_count) for t in px.tiff_data_blocks] == [(0, 4)]


def test_analysis_still_reads_the_stored_fields(ome_scan: ScanResult) -> None:
    for name, rec in _stored(ome_scan.run_dir).items():
        ff = read_field_file(ome_scan.run_dir / rec.file, required=CHANNELS)
        assert ff.channel_names == list(CHANNELS)
        assert ff.pixel_size_um == pytest.approx(0.64)
        assert ff.stage == pytest.approx(rec.stage), name
        assert ff.data.shape == (4, 1036, 1384)


# ---------------------------------------------------------------- FieldStore


class _Sink:
    def __init__(self) -> None:
        self.records: list[Any] = []

    def emit(self, record: Any) -> None:
        self.records.append(record)


def _field(**kw: Any) -> AssembledField:
    rng = np.random.default_rng(1)
    base: dict[str, Any] = {
        "name": "field_007",
        # camera-like: offset and shot noise, 12-bit counts in 16-bit words
        "data": (100 + rng.poisson(50, (4, 70, 90))).astype(np.uint16),
        "channel_names": CHANNELS,
        "stage": {"x_um": 1.5, "y_um": -2.25, "z_um": 0.125},
        "acquired_at": "2026-03-04T05:06:07.089000+01:00",
    }
    return AssembledField(**{**base, **kw})


def _store(tmp_path: Path, cfg: InstrumentConfig, **kw: Any) -> FieldStore:
    """A FieldStore writing into a new run folder (keywords: FieldStore's and
    ``cartridge_id``)."""
    ome = OmeXml(
        cartridge_id=kw.pop("cartridge_id", "C-1"),
        instrument=cfg.name,
        pixel_size_um=cfg.pixel_size_um,
        channels=cfg.channels,
        objective=cfg.objective,
        bit_depth=cfg.camera.bit_depth,
    )
    folder = RunFolder(tmp_path / "run")
    folder.prepare()
    return FieldStore(folder, ome, _Sink(), **kw)


def test_planes_hold_each_frames_exposure_and_stage(tmp_path: Path) -> None:
    store = _store(tmp_path, sim_instrument())
    planes = [{"x_um": 1.5, "y_um": -2.25, "z_um": 0.125 + 0.5 * c} for c in range(4)]
    fld = _field(exposure_ms=(33.0, None, 7.5, 150.0), plane_stage=tuple(planes))
    stored = store.store(fld)
    ome = ome_types.from_tiff(stored.path, validate=True)
    px = ome.images[0].pixels
    # a frame's own exposure wins; a frame that reported none: the configured one
    assert [p.exposure_time for p in px.planes] == [33, 150, 7.5, 150]
    assert [p.position_z for p in px.planes] == [0.125, 0.625, 1.125, 1.625]
    assert ome.images[0].acquisition_date == datetime(
        2026, 3, 4, 4, 6, 7, 89000, tzinfo=UTC
    )
    ff = read_field_file(stored.path)
    assert np.array_equal(ff.data, fld.data)


def test_what_the_instrument_does_not_say_is_left_out(tmp_path: Path) -> None:
    cfg = InstrumentConfig.from_file(CONFIG_DIR / "demo-adapters.yaml")
    assert cfg.objective is None and cfg.channels[0].color is None
    hostile = "a\x01b\udcff <c>&"  # controls and lone surrogates: not XML
    store = _store(tmp_path, cfg, cartridge_id=hostile)
    stored = store.store(_field(channel_names=("DAPI", "FITC", "PE", "Cy7")))
    ome = ome_types.from_tiff(stored.path, validate=True)
    image = ome.images[0]
    assert ome.instruments[0].objectives == [] and image.objective_settings is None
    for ch in image.pixels.channels:
        assert ch.excitation_wavelength is None and ch.emission_wavelength is None
        assert ch.color.as_hex() == "#fff"  # the OME default, not written
    assert image.name == "a\ufffdb\ufffd <c>& field_007"
    # Cy7 is no channel of the instrument: the plane has no exposure
    assert [p.exposure_time for p in image.pixels.planes] == [1, 1, 1, None]


# ---------------------------------------------------------------- compression


def test_storage_defaults_and_levels() -> None:
    assert _instrument().storage.compression == "none"
    assert StorageSettings().tifffile_args == {}
    assert StorageSettings(compression="zstd").tifffile_args == {
        "compression": "zstd",
        "compressionargs": {"level": 1},
    }
    zlib = _instrument(storage={"compression": "zlib", "level": 9}).storage
    assert zlib.tifffile_args["compressionargs"] == {"level": 9}


@pytest.mark.parametrize(
    ("storage", "needle"),
    [
        ({"compression": "lzw"}, "storage.compression: Input should be 'none'"),
        ({"compression": "none", "level": 3}, "level needs a compression"),
        ({"level": 3}, "level needs a compression"),
        ({"compression": "zlib", "level": 12}, "zlib level must be 1 to 9, not 12"),
        ({"compression": "zstd", "level": 0}, "zstd level must be 1 to 22, not 0"),
        ({"compression": "zstd", "level": 2.5}, "storage.level: Input should be"),
        ({"compression": "zstd", "fast": True}, "storage.fast: Extra inputs"),
    ],
)
def test_bad_storage_keys_are_one_line_errors(
    storage: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ConfigError) as err:
        _instrument(storage=storage)
    msg = str(err.value)
    assert msg.startswith("sim.yaml: ") and "\n" not in msg
    assert needle in msg, msg


@pytest.mark.parametrize(
    ("compression", "tag"),
    [("none", 1), ("zlib", 8), ("zstd", 50000)],  # TIFF Compression tag values
)
def test_fields_are_stored_losslessly_compressed(
    tmp_path: Path, compression: str, tag: int
) -> None:
    fld = _field()
    storage = StorageSettings(compression=compression)  # type: ignore[arg-type]
    stored = _store(tmp_path, sim_instrument(), storage=storage).store(fld)
    with tifffile.TiffFile(stored.path) as tif:
        assert [p.compression for p in tif.pages] == [tag] * 4
    ome_types.from_tiff(stored.path, validate=True)
    ff = read_field_file(stored.path)
    assert np.array_equal(ff.data, fld.data) and ff.data.dtype == np.uint16
    assert ff.channel_names == list(CHANNELS) and ff.stage == fld.stage
    assert stored.nbytes == stored.path.stat().st_size
    if compression != "none":
        assert stored.nbytes < fld.data.nbytes * 0.8


def test_a_compressed_run_verifies_resumes_and_is_analysed(
    ome_scan: ScanResult, tmp_path: Path
) -> None:
    cfg = sim_instrument().model_copy(
        update={"storage": StorageSettings(compression="zstd", level=3)}
    )
    run = tmp_path / "zstd"
    first = run_scan(
        run,
        instrument=cfg,
        n_fields=3,
        seed=5,
        cartridge_id=CARTRIDGE,
        run_job=_no_detection,
    )
    assert first.complete and first.stored == 3
    plain = _stored(ome_scan.run_dir)
    stored = _stored(run)
    pixels = {}
    for name, rec in stored.items():
        ff = read_field_file(run / rec.file)
        # the same pixels as the uncompressed scan of the same cartridge
        assert np.array_equal(
            ff.data, read_field_file(ome_scan.run_dir / rec.file).data
        )
        assert rec.bytes < 0.8 * plain[name].bytes
        pixels[name] = ff.data
    r = invoke("verify", str(run))
    assert r.exit_code == 0 and r.stdout.startswith("ok:"), r.stdout
    # one field file lost: the resume verifies the others and takes only it again
    before = {p.name: p.read_bytes() for p in (run / "fields").iterdir()}
    (run / "fields" / "field_001.ome.tif").unlink()
    n_records = len(RunFolder(run).ledger.read())
    again = run_scan(
        run,
        instrument=cfg,
        n_fields=3,
        seed=5,
        cartridge_id=CARTRIDGE,
        run_job=_no_detection,
    )
    assert (again.resumed, again.stored, again.complete) == (2, 1, True)
    new = RunFolder(run).ledger.read()[n_records:]
    assert [r.field for r in new if isinstance(r, Stored)] == ["field_001"]
    for name, data in before.items():
        if name != "field_001.ome.tif":
            assert (run / "fields" / name).read_bytes() == data
    ff = read_field_file(run / "fields" / "field_001.ome.tif")
    assert np.array_equal(ff.data, pixels["field_001"])
    with tifffile.TiffFile(run / "fields" / "field_001.ome.tif") as tif:
        assert tif.pages[0].compression == 50000  # still zstd
    r = invoke("verify", str(run))
    assert r.exit_code == 0 and r.stdout.startswith("ok:"), r.stdout
    # ctcscan analyze reads the compressed files
    out = tmp_path / "analysis"
    r = invoke("analyze", str(run), "--out", str(out), "--workers", "0")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["fields"]["analyzed"] == 3

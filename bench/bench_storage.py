"""Benchmark: field files by compression setting, and the cost of their metadata.

Renders N fields of the simulated cartridge once (``simulated.yaml``, layout
``cellsearch-5x35``, 4 x 1036 x 1384 uint16 at the focus surface, the YAML's
exposures, fields spread over the plan so that some hold the cartridge wall),
then writes all N with each storage setting exactly as a scan stores them:
``FieldStore.encode`` (OME-XML + TIFF encoding + compression) and
``write_durably`` (temporary file, fsync, rename, fsync of the folder), into a
folder on the same disk as ``bench/out``. Each file is then read back with
``analysis.fieldio.read_field_file`` (as the detector and ``ctcscan analyze``
do; the file is still in the page cache) and compared with the rendered pixels.

Per setting it reports the bytes per field (and the ratio to uncompressed), the
median time per field of the encode, of the durable write, of both together,
and of the read.

``--metadata`` times the OME-XML of one field instead (median of many): the
metadata dict ctcscan used to hand tifffile's ``OmeXml`` (names, pixel size,
stage per plane: what ``FieldStore`` wrote before the full metadata), the
current ``OmeXml.xml`` (everything in README's table), and the same document
built with ``ome_types`` and serialised with ``ome_types.to_xml`` (needs
``ome-types``, a test dependency).

Usage::

    python bench/bench_storage.py                     # 8 fields, all settings
    python bench/bench_storage.py --fields 20 --settings none,zstd:1
    python bench/bench_storage.py --metadata

Writes ``bench/out/bench_storage-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.fieldio import read_field_file  # noqa: E402
from controller.acquisition.plan import ScanPlan  # noqa: E402
from controller.config import InstrumentConfig, StorageSettings  # noqa: E402
from controller.hardware.instrument import open_instrument  # noqa: E402
from controller.layouts import get_layout  # noqa: E402
from controller.runstore.fieldstore import AssembledField, FieldStore  # noqa: E402
from controller.runstore.folder import RunFolder, write_durably  # noqa: E402
from controller.runstore.omexml import OmeXml, PlaneInfo  # noqa: E402
from hardware_configs import CONFIG_DIR  # noqa: E402
from simulators import SimulatedSample  # noqa: E402

SETTINGS = "none,zlib:1,zlib:6,zstd:1,zstd:3,zstd:9"


class _NoSink:
    def emit(self, record: object) -> None:
        pass


def render_fields(n: int, seed: int) -> tuple[InstrumentConfig, list[AssembledField]]:
    """`n` fields of the simulated cartridge, spread over the plan."""
    cfg = InstrumentConfig.from_file(CONFIG_DIR / "simulated.yaml")
    layout = get_layout("cellsearch-5x35")
    plan = ScanPlan.build(layout, cfg)
    picks = np.linspace(0, len(plan.fields) - 1, n).round().astype(int)
    inst = open_instrument(cfg, layout, seed=seed)
    try:
        sample = inst.sample
        assert isinstance(sample, SimulatedSample)
        world = sample.world
        out = []
        for i in picks:
            f = plan.fields[int(i)]
            z = world.surface_z(f.x_um, f.y_um)
            data = np.stack(
                [
                    world.renderer.frame(f.x_um, f.y_um, z, c, ch.exposure_ms)
                    for c, ch in enumerate(cfg.channels)
                ]
            )
            stage = {"x_um": f.x_um, "y_um": f.y_um, "z_um": z}
            out.append(AssembledField(f.name, data, cfg.channel_names, stage))
        return cfg, out
    finally:
        inst.close()


def ome_of(cfg: InstrumentConfig) -> OmeXml:
    return OmeXml.for_instrument(cfg, "BENCH-0001")


def parse_setting(text: str) -> StorageSettings:
    name, _, level = text.partition(":")
    return StorageSettings.model_validate(
        {"compression": name, "level": int(level) if level else None}
    )


def bench_setting(
    store: FieldStore, fields: list[AssembledField], folder: Path
) -> dict[str, Any]:
    encode, write, read, sizes = [], [], [], []
    for fld in fields:
        path = folder / f"{fld.name}.ome.tif"
        t0 = time.perf_counter()
        data = store.encode(fld)
        t1 = time.perf_counter()
        write_durably(path, data)
        t2 = time.perf_counter()
        back = read_field_file(path)
        t3 = time.perf_counter()
        if not np.array_equal(back.data, fld.data):
            raise SystemExit(f"{path}: pixels read back differ")
        encode.append(t1 - t0)
        write.append(t2 - t1)
        read.append(t3 - t2)
        sizes.append(len(data))
        path.unlink()

    def ms(values: list[float]) -> float:
        return round(statistics.median(values) * 1000, 1)

    total = [e + w for e, w in zip(encode, write, strict=True)]
    return {
        "bytes_per_field": round(statistics.mean(sizes)),
        "encode_ms": ms(encode),
        "write_fsync_ms": ms(write),
        "store_ms": ms(total),
        "read_ms": ms(read),
    }


def _median_us(fn: Callable[[], object], n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 1)


def bench_metadata(cfg: InstrumentConfig, n: int) -> dict[str, float]:
    """Median us per field of the OME-XML, three ways (see module docstring)."""
    shape = (len(cfg.channels), cfg.camera.height, cfg.camera.width)
    st = {"x_um": -1328.64, "y_um": 663.04, "z_um": 0.147}
    acquired = datetime.now(UTC).isoformat()
    n_ch = shape[0]

    def before() -> str:
        meta = {
            "axes": "CYX",
            "Name": "field_000",
            "Channel": {"Name": list(cfg.channel_names)},
            "PhysicalSizeX": cfg.pixel_size_um,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": cfg.pixel_size_um,
            "PhysicalSizeYUnit": "µm",
            "Plane": {
                "PositionX": [st["x_um"]] * n_ch,
                "PositionXUnit": ["µm"] * n_ch,
                "PositionY": [st["y_um"]] * n_ch,
                "PositionYUnit": ["µm"] * n_ch,
                "PositionZ": [st["z_um"]] * n_ch,
                "PositionZUnit": ["µm"] * n_ch,
            },
        }
        xml = tifffile.OmeXml()
        xml.addimage(np.uint16, shape, (n_ch, 1, 1, *shape[1:], 1), **meta)
        return xml.tostring()

    ome = ome_of(cfg)

    def planes() -> list[PlaneInfo]:
        return [
            PlaneInfo(c.exposure_ms, st["x_um"], st["y_um"], st["z_um"])
            for c in cfg.channels
        ]

    def after() -> str:
        return ome.xml(
            name="field_000",
            shape=shape,
            dtype=np.dtype(np.uint16),
            channel_names=cfg.channel_names,
            acquired_at=acquired,
            planes=planes(),
        )

    out = {
        "before_tifffile_omexml_us": _median_us(before, n),
        "after_omexml_us": _median_us(after, n),
    }
    try:
        import ome_types
    except ImportError:
        return out
    reference = ome_types.from_xml(after())  # the same document, as a model

    def with_ome_types() -> str:
        model = reference.model_copy(deep=True)
        model.images[0].name = "BENCH-0001 field_000"
        for p, info in zip(model.images[0].pixels.planes, planes(), strict=True):
            p.position_x, p.position_y, p.position_z = info.x_um, info.y_um, info.z_um
        return ome_types.to_xml(model)

    out["ome_types_to_xml_us"] = _median_us(with_ome_types, max(n // 20, 20))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fields", type=int, default=8, help="fields per setting")
    p.add_argument("--settings", default=SETTINGS, help="NAME[:LEVEL],...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metadata", action="store_true", help="time the OME-XML only")
    p.add_argument("--repeats", type=int, default=2000, help="for --metadata")
    args = p.parse_args(argv)
    cfg = InstrumentConfig.from_file(CONFIG_DIR / "simulated.yaml")
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "bench": "bench_storage",
        "cores": os.cpu_count(),
        "load_avg_at_start": list(os.getloadavg()),
        "tifffile": tifffile.__version__,
    }
    if args.metadata:
        report["metadata"] = meta = bench_metadata(cfg, args.repeats)
        for key, value in meta.items():
            print(f"{key:28s} {value:10.1f}")
    else:
        settings = [parse_setting(s) for s in args.settings.split(",")]
        cfg, fields = render_fields(args.fields, args.seed)
        raw = fields[0].data.nbytes
        rows = []
        with tempfile.TemporaryDirectory(dir=out_dir, prefix="storage-") as tmp:
            RunFolder(Path(tmp)).prepare()
            for setting in settings:
                store = FieldStore(
                    RunFolder(Path(tmp)), ome_of(cfg), _NoSink(), setting
                )
                label = setting.compression
                if setting.compression != "none":
                    label += f":{setting.tifffile_args['compressionargs']['level']}"
                row = {"setting": label, **bench_setting(store, fields, Path(tmp))}
                row["ratio"] = round(row["bytes_per_field"] / raw, 3)
                rows.append(row)
        report.update(fields=args.fields, decoded_bytes_per_field=raw, rows=rows)
        head = ("setting", "MB/field", "ratio", "encode ms", "write+fsync ms",
                "store ms", "read ms")  # fmt: skip
        print(f"{args.fields} fields of {raw / 1e6:.2f} MB decoded; median per field")
        print(" ".join(f"{h:>14s}" for h in head))
        for r in rows:
            cells = (r["setting"], f"{r['bytes_per_field'] / 1e6:.2f}",
                     f"{r['ratio']:.3f}", r["encode_ms"], r["write_fsync_ms"],
                     r["store_ms"], r["read_ms"])  # fmt: skip
            print(" ".join(f"{c!s:>14s}" for c in cells))
    report["load_avg_at_end"] = list(os.getloadavg())
    path = out_dir / f"bench_storage-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"load average {report['load_avg_at_start'][0]:.2f} at start, "
          f"{report['load_avg_at_end'][0]:.2f} at end; {path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

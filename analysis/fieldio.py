"""Reading fields from OME-TIFF files: pixels, channel names, pixel size, stage.

Works on ctcscan's own field files and on OME-TIFFs from other instruments (one
field per file, axes CYX, channel names in the OME metadata). Every problem is a
`FieldReadError` naming the file.
"""

from __future__ import annotations

import contextlib
import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

__all__ = [
    "MAX_FIELD_BYTES",
    "MIN_FIELD_PX",
    "FieldFile",
    "FieldReadError",
    "field_name_of",
    "inspect_field_file",
    "read_field_file",
]


#: the largest field decoded, in bytes (a ctcscan field is 11 MiB): analysing
#: one takes about 7 times its decoded size (bench/bench_analyze_memory.py)
MAX_FIELD_BYTES = 256 * 2**20
#: the smallest field analysed, in pixels along each side
MIN_FIELD_PX = 64


class FieldReadError(ValueError):
    """A field file cannot be used; the message names the file and the reason."""

    #: line breaks from the file (a channel name, a tifffile message) are
    #: escaped: the message is one line
    _LINE_BREAKS = str.maketrans(
        {c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}
    )

    def __init__(self, message: str) -> None:
        super().__init__(str(message).translate(self._LINE_BREAKS))


@dataclass
class FieldFile:
    """One field read from disk.

    Attributes
    ----------
    data : ndarray, shape (C, Y, X)
        Pixels in the file's dtype, channels in the order of `channel_names`.
    channel_names : list of str
        Assay channel names (after any renaming).
    pixel_size_um : float or None
        From the OME metadata, if present.
    stage : dict
        ``x_um``, ``y_um``, ``z_um`` of the field from the OME Plane, if present.
    significant_bits : int or None
        The camera's bit depth from the OME ``SignificantBits`` of integer
        pixels, when it is below the pixel type's (12-bit data in 16-bit
        words): its largest value, ``2**bits - 1``, is saturation.
    """

    path: Path
    data: np.ndarray
    channel_names: list[str]
    pixel_size_um: float | None
    stage: dict[str, float] = field(default_factory=dict)
    significant_bits: int | None = None

    @property
    def saturation(self) -> float | None:
        """The saturating pixel value the file states (`significant_bits`),
        or None: then the pixel type's largest."""
        bits = self.significant_bits
        return None if bits is None else float(2**bits - 1)


def field_name_of(path: str | Path) -> str:
    """The field name of a file: its name without extensions (``field_003``)."""
    name = Path(path).name
    return name.split(".", 1)[0]


def inspect_field_file(
    path: str | Path,
    *,
    rename: Mapping[str, str] | None = None,
    required: Sequence[str] = (),
) -> FieldFile:
    """Check a field file's metadata without reading its pixels.

    Returns a `FieldFile` whose `data` is an empty array of the field's dtype.
    Raises `FieldReadError` as `read_field_file` does.
    """
    return _open(Path(path), rename, required, pixels=False)


def read_field_file(
    path: str | Path,
    *,
    rename: Mapping[str, str] | None = None,
    required: Sequence[str] = (),
) -> FieldFile:
    """Read one field.

    Parameters
    ----------
    path : path
        An OME-TIFF holding one field, axes CYX (or YX for a single channel).
    rename : mapping, optional
        Assay name -> name in the file (``{"DAPI": "Hoechst"}``).
    required : sequence of str
        Assay channel names that must be present.

    Raises
    ------
    FieldReadError
        Unreadable or corrupt file, wrong axes, missing channels.
    """
    return _open(Path(path), rename, required, pixels=True)


class _Errors(logging.Handler):
    """Collects what tifffile logs as errors (it reads past many corruptions)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tifffile_errors() -> Iterator[_Errors]:
    log = logging.getLogger("tifffile")
    handler, propagate = _Errors(), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def _open(
    path: Path,
    rename: Mapping[str, str] | None,
    required: Sequence[str],
    *,
    pixels: bool,
) -> FieldFile:
    try:
        with _tifffile_errors() as errors, tifffile.TiffFile(path) as tif:
            _check_planes(path, tif.ome_metadata, tif.pages.first.size)
            series = tif.series[0]
            shape, axes = tuple(series.shape), series.axes
            _check_size(path, shape, series.dtype)  # before a byte is decoded
            data = series.asarray() if pixels else np.empty((0,), series.dtype)
            ome = tif.ome_metadata
    except FileNotFoundError:
        raise FieldReadError(f"{path}: no such file") from None
    except FieldReadError:
        raise
    except Exception as e:  # tifffile raises assorted errors on corrupt data
        raise FieldReadError(
            f"{path}: not a readable TIFF ({type(e).__name__}: {e})"
        ) from None
    if errors.messages:
        raise FieldReadError(f"{path}: corrupt TIFF ({errors.messages[0]})")
    if len(shape) == 2:
        shape, axes = (1, *shape), "C" + axes
        data = data[None] if pixels else data
    if len(shape) != 3 or not axes.endswith("YX"):
        raise FieldReadError(f"{path}: expected axes CYX, found {axes} {shape}")
    try:
        names, px, stage, bits = _ome_info(ome) if ome else ([], None, {}, None)
    except ValueError as e:  # a pixel size or stage position that is no number
        raise FieldReadError(f"{path}: bad OME metadata ({e})") from None
    dtype = np.dtype(series.dtype)
    if bits is not None and not (dtype.kind in "ui" and bits < dtype.itemsize * 8):
        bits = None  # the type's whole range (or float pixels): its largest
    if len(names) != shape[0]:
        names = [f"C{i}" for i in range(shape[0])]
    if rename:
        back = {file_name: assay for assay, file_name in rename.items()}
        names = [back.get(n, n) for n in names]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise FieldReadError(
            f"{path}: two channels named {twice[0]!r}"
            + (" once renamed by --channels" if rename else "")
            + f" (the file has {', '.join(names)})"
        )
    missing = [c for c in required if c not in names]
    if missing:
        raise FieldReadError(
            f"{path}: channels {', '.join(missing)} not found (the file has "
            f"{', '.join(names)}); map names with --channels, e.g. DAPI=Hoechst"
        )
    return FieldFile(path, data, names, px, stage, bits)


def _check_size(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuse, from the metadata alone, a field too large to decode within
    `MAX_FIELD_BYTES` or too small to hold a cell (`MIN_FIELD_PX`)."""
    size = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    if size > MAX_FIELD_BYTES:
        raise FieldReadError(
            f"{path}: {' x '.join(map(str, shape))} {np.dtype(dtype).name} is "
            f"{size / 2**30:.1f} GiB decoded, over the {MAX_FIELD_BYTES // 2**20} MiB "
            "a field may hold; split it into fields"
        )
    if len(shape) >= 2 and min(shape[-2:]) < MIN_FIELD_PX:
        raise FieldReadError(
            f"{path}: a field of {shape[-2]} x {shape[-1]} px is too small to "
            f"analyse (at least {MIN_FIELD_PX} x {MIN_FIELD_PX})"
        )


#: the OME length units (its UnitsLength) a pixel size comes in, in um
_UM_PER_UNIT = {
    "m": 1e6,
    "dm": 1e5,
    "cm": 1e4,
    "mm": 1e3,
    "µm": 1.0,
    "um": 1.0,
    "nm": 1e-3,
    "pm": 1e-6,
    "Å": 1e-4,
    "in": 25_400.0,
}


def _length_um(el: ET.Element, attr: str) -> float:
    """A pixel size of the OME Pixels element `el` in um, from its unit
    (``<attr>Unit``; OME's default is the micrometre)."""
    value = el.get(attr, "nan")
    unit = el.get(f"{attr}Unit", "µm")
    if unit not in _UM_PER_UNIT:
        raise ValueError(
            f"{attr}Unit {unit!r} is not a unit this reader knows "
            f"({', '.join(_UM_PER_UNIT)})"
        )
    size = float(value) * _UM_PER_UNIT[unit]
    if not 0 < size < 1000:  # NaN too; the bounds of --pixel-size
        raise ValueError(f"{attr} {value} {unit} ({size:g} um) is no pixel size")
    return size


def _ome_info(
    xml: str,
) -> tuple[list[str], float | None, dict[str, float], int | None]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return [], None, {}, None
    names: list[str] = []
    px = None
    bits = None
    stage: dict[str, float] = {}
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "Pixels":
            if el.get("PhysicalSizeX"):
                px = _length_um(el, "PhysicalSizeX")
                if el.get("PhysicalSizeY"):
                    py = _length_um(el, "PhysicalSizeY")
                    if abs(py / px - 1) > 0.01:
                        raise ValueError(
                            f"PhysicalSizeY ({py:g} um) is not PhysicalSizeX "
                            f"({px:g} um): fields of oblong pixels are not analysed"
                        )
            if (sig := el.get("SignificantBits")) is not None:
                bits = int(sig) if sig.strip().isdecimal() else 0
                if not 1 <= bits <= 64:
                    raise ValueError(f"SignificantBits {sig!r} is no bit depth")
        elif tag == "Channel":
            names.append(el.get("Name", ""))
        elif tag == "Plane" and not stage:
            for axis in "XYZ":
                if (v := el.get(f"Position{axis}")) is not None:
                    if not math.isfinite(pos := float(v)):
                        raise ValueError(f"Position{axis} {v!r} is no position")
                    stage[f"{axis.lower()}_um"] = pos
    return names, px, stage, bits


#: most image planes the OME metadata of a field may declare (SizeC x SizeZ x
#: SizeT, its whole size in pages of the file, a TiffData's PlaneCount, a
#: modulo axis's labels): tifffile lists every declared plane and label
#: before anything else is checked
_MAX_PLANES = 10_000


def _check_planes(path: Path, xml: str | None, page_size: int) -> None:
    """Refuse OME metadata declaring more than `_MAX_PLANES` planes before
    tifffile spends seconds and gigabytes listing them (``SizeC="100000000"``,
    ``SizeY="10000000000"`` over pages of 64 x 64 pixels,
    ``<ModuloAlongC Start="0" End="1e8" Step="1"/>``)."""
    if not xml:
        return
    try:
        root = ET.fromstring(xml)
    except (ET.ParseError, ValueError):
        return  # left to tifffile
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "Pixels":
            sizes = [_number(el.get(f"Size{a}")) for a in "XYCZT"]
            pages = math.prod(sizes) / max(page_size, 1)
            planes = max(math.prod(sizes[2:]), pages, key=abs)
        elif tag == "TiffData":
            planes = max(_number(el.get("PlaneCount")), _number(el.get("NumPlanes")))
        elif tag.startswith("ModuloAlong") and "Start" in el.attrib:
            start, end = _number(el.get("Start")), _number(el.get("End"))
            planes = (end - start) / (_number(el.get("Step")) or 1.0)
        else:
            continue
        if (planes := abs(planes)) > _MAX_PLANES:
            raise FieldReadError(
                f"{path}: the OME metadata declares {planes:g} image planes "
                f"(a field has at most {_MAX_PLANES})"
            )


def _number(value: str | None) -> float:
    """A number from the OME metadata; 1 when absent or no number."""
    try:
        return float(value) if value is not None else 1.0
    except ValueError:
        return 1.0

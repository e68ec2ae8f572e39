"""OME-XML of a stored field: what OMERO, QuPath and Bio-Formats read from it.

One field file holds one OME Image (axes CYX, one TIFF page per channel):

* Image: ``Name`` "<cartridge id> <field>", ``AcquisitionDate`` (UTC), references
  to the instrument and its objective;
* Instrument: a Microscope named after the instrument YAML's ``name``, the
  Objective (model, nominal magnification, lens NA) when the YAML has one;
* Pixels: sizes, type, physical pixel size, ``SignificantBits`` (the camera's
  bit depth);
* Channel: name, excitation and emission wavelength (nm) and colour, where the
  channel's settings give them;
* Plane, one per channel: exposure time (ms) and stage position x, y, z (um);
* a MapAnnotation (namespace `NAMESPACE`): ``cartridge_id``, ``field``,
  ``instrument``, ``software``.

Everything but the Image name, acquisition date, planes and the annotation's
field name is the same for every field of a run; `OmeXml` renders that part
once per image shape and fills in the rest per field with string formatting
(60-140 us a field; building the same document with ``ome_types`` and its
``to_xml`` costs 14-26 ms, see ``bench/bench_storage.py --metadata``). The output
is checked against the OME 2016-06 schema by ``tests/test_ome_metadata.py``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from controller.config import ChannelSettings, InstrumentConfig, ObjectiveSettings

__all__ = ["NAMESPACE", "OmeXml", "PlaneInfo", "ome_color", "ome_date"]

#: namespace of the MapAnnotation ctcscan writes
NAMESPACE = "ctcscan.field"

_OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
_XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"

#: numpy dtype -> OME PixelType
_PIXEL_TYPES = {
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "float32": "float",
    "float64": "double",
}


@dataclass(frozen=True)
class PlaneInfo:
    """What one plane (channel frame) of a field records.

    Attributes
    ----------
    exposure_ms : float or None
        Exposure time of the frame.
    x_um, y_um, z_um : float or None
        Stage position the frame was taken at (read back where possible).
    """

    exposure_ms: float | None
    x_um: float | None
    y_um: float | None
    z_um: float | None


def ome_color(hex_rgb: str) -> int:
    """An ``#RRGGBB`` colour as OME's signed 32-bit RGBA integer (alpha 255)."""
    rgba = (int(hex_rgb.lstrip("#"), 16) << 8) | 0xFF
    return rgba - (1 << 32) if rgba >= 1 << 31 else rgba


def ome_date(iso: str) -> str:
    """An ISO 8601 time (with offset; naive means UTC) as an xsd:dateTime in UTC."""
    t = datetime.fromisoformat(iso)
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _num(value: float) -> str:
    """A number as an XML attribute value (shortest form that reads back)."""
    f = float(value)
    return str(int(f)) if f.is_integer() and abs(f) < 1e15 else repr(f)


def _attrs(**values: object) -> str:
    """`` key="value"`` for each value that is not None (in the given order)."""
    out = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, float):
            if not math.isfinite(value):
                continue
            value = _num(value)
        out.append(f" {key}={quoteattr(str(value))}")
    return "".join(out)


class OmeXml:
    """Renders the OME-XML of the fields of one run.

    Parameters
    ----------
    cartridge_id : str
        Recorded in the Image name and the MapAnnotation.
    instrument : str
        The instrument's name (the Microscope model).
    pixel_size_um : float
        Physical pixel size, x and y.
    channels : sequence of ChannelSettings
        The instrument's channels: wavelengths, colour and the configured
        exposure (used for a plane whose frame reported none), by name.
    objective : ObjectiveSettings, optional
        Recorded as the Instrument's Objective.
    bit_depth : int, optional
        The camera's ADC bit depth (``SignificantBits``).
    software : str
        Recorded as the OME ``Creator`` and in the MapAnnotation.
    """

    def __init__(
        self,
        *,
        cartridge_id: str,
        instrument: str,
        pixel_size_um: float,
        channels: Sequence[ChannelSettings] = (),
        objective: ObjectiveSettings | None = None,
        bit_depth: int | None = None,
        software: str = "ctcscan",
    ) -> None:
        self.cartridge_id = _clean(cartridge_id)
        self.instrument = _clean(instrument)
        self.pixel_size_um = pixel_size_um
        self.channels = {c.name: c for c in channels}
        self.objective = objective
        self.bit_depth = bit_depth
        self.software = _clean(software)
        # the per-shape parts, rendered once
        self._parts = lru_cache(maxsize=8)(self._render_parts)

    @classmethod
    def for_instrument(cls, cfg: InstrumentConfig, cartridge_id: str) -> OmeXml:
        """What every field file of a cartridge scanned on `cfg` records."""
        from controller import __version__

        return cls(
            cartridge_id=cartridge_id,
            instrument=cfg.name,
            pixel_size_um=cfg.pixel_size_um,
            channels=cfg.channels,
            objective=cfg.objective,
            bit_depth=cfg.camera.bit_depth,
            software=f"ctcscan {__version__}",
        )

    def default_exposure(self, channel: str) -> float | None:
        """The configured exposure of `channel`, if the instrument has it."""
        c = self.channels.get(channel)
        return c.exposure_ms if c is not None else None

    def xml(
        self,
        *,
        name: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
        channel_names: Sequence[str],
        acquired_at: str,
        planes: Sequence[PlaneInfo],
    ) -> str:
        """The OME-XML document of one field.

        Parameters
        ----------
        name : str
            The field's name.
        shape : tuple
            ``(C, Y, X)`` of the pixels.
        dtype : numpy dtype
            Of the pixels.
        channel_names : sequence of str
            One per channel, in file order.
        acquired_at : str
            ISO 8601 time of the acquisition.
        planes : sequence of PlaneInfo
            One per channel.
        """
        if len(shape) != 3 or not len(channel_names) == shape[0] == len(planes):
            raise ValueError(
                f"{name}: {len(channel_names)} channel names and {len(planes)} "
                f"planes for pixels of shape {shape}"
            )
        head, pixels, annotation = self._parts(
            tuple(int(n) for n in shape), np.dtype(dtype).name, tuple(channel_names)
        )
        name = _clean(name)
        plane_xml = "".join(
            "<Plane"
            + _attrs(
                TheZ=0,
                TheT=0,
                TheC=c,
                ExposureTime=_f(p.exposure_ms),
                ExposureTimeUnit="ms" if _ok(p.exposure_ms) else None,
                PositionX=_f(p.x_um),
                PositionXUnit="µm" if _ok(p.x_um) else None,
                PositionY=_f(p.y_um),
                PositionYUnit="µm" if _ok(p.y_um) else None,
                PositionZ=_f(p.z_um),
                PositionZUnit="µm" if _ok(p.z_um) else None,
            )
            + "/>"
            for c, p in enumerate(planes)
        )
        return (
            head
            + f'<Image ID="Image:0" Name={quoteattr(f"{self.cartridge_id} {name}")}>'
            + f"<AcquisitionDate>{ome_date(acquired_at)}</AcquisitionDate>"
            + pixels
            + plane_xml
            + "</Pixels>"
            + '<AnnotationRef ID="Annotation:0"/>'
            + "</Image>"
            + annotation.format(field=escape(name))
        )

    def _render_parts(
        self, shape: tuple[int, int, int], dtype: str, channel_names: tuple[str, ...]
    ) -> tuple[str, str, str]:
        """The OME head with the Instrument; the Image's elements from its
        InstrumentRef up to the Pixels' planes; the annotations, a format string
        with a ``{field}`` placeholder (every other brace doubled)."""
        try:
            pixel_type = _PIXEL_TYPES[dtype]
        except KeyError:
            raise ValueError(f"pixel type {dtype} cannot be stored as OME") from None
        n_c, n_y, n_x = shape
        objective = self.objective
        head = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f'<OME xmlns="{_OME_NS}" xmlns:xsi="{_XSI_NS}" '
            f'xsi:schemaLocation="{_OME_NS} {_OME_NS}/ome.xsd"'
            + _attrs(Creator=self.software)
            + '><Instrument ID="Instrument:0">'
            + "<Microscope"
            + _attrs(Model=self.instrument)
            + "/>"
        )
        if objective is not None:
            head += (
                '<Objective ID="Objective:0:0"'
                + _attrs(
                    Model=_clean(objective.model) or None,
                    LensNA=objective.na,
                    NominalMagnification=objective.magnification,
                )
                + "/>"
            )
        head += "</Instrument>"
        bits = np.dtype(dtype).itemsize * 8
        significant = (
            self.bit_depth
            if self.bit_depth is not None
            and np.dtype(dtype).kind == "u"
            and self.bit_depth <= bits
            else None
        )
        pixels = '<InstrumentRef ID="Instrument:0"/>'
        if objective is not None:
            pixels += '<ObjectiveSettings ID="Objective:0:0"/>'
        pixels += (
            '<Pixels ID="Pixels:0" DimensionOrder="XYCZT"'
            + _attrs(
                Type=pixel_type,
                SignificantBits=significant,
                SizeX=n_x,
                SizeY=n_y,
                SizeZ=1,
                SizeC=n_c,
                SizeT=1,
                PhysicalSizeX=float(self.pixel_size_um),
                PhysicalSizeXUnit="µm",
                PhysicalSizeY=float(self.pixel_size_um),
                PhysicalSizeYUnit="µm",
            )
            + ">"
        )
        for i, ch_name in enumerate(channel_names):
            ch = self.channels.get(ch_name)
            ex = ch.excitation_nm if ch is not None else None
            em = ch.emission_nm if ch is not None else None
            color = ch.color if ch is not None else None
            pixels += (
                "<Channel"
                + _attrs(
                    ID=f"Channel:0:{i}",
                    Name=_clean(ch_name),
                    SamplesPerPixel=1,
                    ExcitationWavelength=_f(ex),
                    ExcitationWavelengthUnit="nm" if ex is not None else None,
                    EmissionWavelength=_f(em),
                    EmissionWavelengthUnit="nm" if em is not None else None,
                    Color=ome_color(color) if color is not None else None,
                )
                + "/>"
            )
        pixels += f'<TiffData IFD="0" PlaneCount="{n_c}"/>'
        entries: Mapping[str, str] = {
            "cartridge_id": _braces(escape(self.cartridge_id)),
            "field": "{field}",
            "instrument": _braces(escape(self.instrument)),
            "software": _braces(escape(self.software)),
        }
        annotation = (
            "<StructuredAnnotations>"
            f'<MapAnnotation ID="Annotation:0" Namespace="{NAMESPACE}"><Value>'
            + "".join(f'<M K="{k}">{v}</M>' for k, v in entries.items())
            + "</Value></MapAnnotation></StructuredAnnotations></OME>"
        )
        return head, pixels, annotation


#: characters XML 1.0 cannot hold (controls, lone surrogates, non-characters)
_NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _clean(text: str) -> str:
    """`text` with every character XML cannot hold replaced by U+FFFD."""
    return _NOT_XML.sub("\ufffd", text)


def _braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _ok(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _f(value: float | None) -> float | None:
    """A finite float, or None (left out of the XML)."""
    return float(value) if value is not None and math.isfinite(value) else None

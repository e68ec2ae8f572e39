"""Configuration models: instrument and assay, loaded from YAML.

Config is data. Every model is a frozen pydantic model; `from_file` turns any
problem (missing file, bad YAML, invalid field) into a `ConfigError` whose one-line
message names the file and the field.
"""

from __future__ import annotations

import re
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from analysis.settings import DetectionSettings, StitchSettings
from analysis.stitch import check_affine, default_affine
from controller.errors import ConfigError, one_line

__all__ = [
    "AssayConfig",
    "CameraSettings",
    "ChannelRole",
    "ChannelSettings",
    "ConfigModel",
    "FocusSettings",
    "Indication",
    "InstrumentConfig",
    "LoaderSettings",
    "ObjectiveSettings",
    "SimulationSettings",
    "StageLimits",
    "StorageSettings",
    "load_yaml",
]


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file, raising `ConfigError` with the file name on any problem."""
    path = Path(path)
    name = one_line(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{name}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: not UTF-8 text (byte {e.start})") from None
    except ValueError as e:  # a NUL in the path
        raise ConfigError(f"{name}: cannot read ({e})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(one_line(f"{name}{where}: {problem}")) from None
    except RecursionError:
        raise ConfigError(f"{name}: YAML nested too deeply") from None
    except (ValueError, LookupError, AttributeError) as e:
        # PyYAML's constructors on a value they cannot build: a date that is
        # none (2001-13-45), an integer of 5000 digits, a tag that does not fit
        # its value (!!int 0x_, !!bool x, !!timestamp x)
        why = e if isinstance(e, ValueError) else "a tag that does not fit its value"
        raise ConfigError(one_line(f"{name}: invalid YAML value ({why})")) from None


def _has_text(path: Path) -> bool:
    """Whether the (readable, UTF-8) file holds more than white space."""
    return bool(path.read_text(encoding="utf-8").strip())


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


class ConfigModel(BaseModel):
    """Base of all config models: frozen, no unknown keys, loadable from YAML."""

    # inf and NaN are no configuration values (an infinite pixel size, a NaN
    # exposure): refused like any other invalid value
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        """Load and validate a YAML file.

        Relative paths inside the file are resolved against the file's folder by
        models that hold paths (they receive it as the `_base_dir` context).
        """
        path = Path(path)
        data = load_yaml(path)
        if data is None:
            # a document of comments alone asks for every default; a file with
            # nothing in it is more likely a copy that failed
            if not _has_text(path):
                raise ConfigError(
                    f"{one_line(str(path))}: the file is empty (write {{}} in it "
                    "for every default)"
                )
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{one_line(str(path))}: expected a mapping at the top level"
            )
        return cls.from_dict(data, source=str(path), base_dir=path.parent)

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        *,
        source: str = "<dict>",
        base_dir: Path | None = None,
    ) -> Self:
        """Validate a mapping; errors name `source` and the offending field."""
        try:
            return cls.model_validate(data, context={"base_dir": base_dir})
        except ValidationError as e:
            msg = f"{source}: {_format_validation_error(e)}"
            raise ConfigError(one_line(msg)) from None
        except UnicodeEncodeError:  # a validator's message quoting "\ud800"
            raise ConfigError(
                f"{one_line(source)}: a string holds a lone surrogate (an escape "
                "such as \\ud800; write the character itself)"
            ) from None


# ---------------------------------------------------------------- instrument


#: colour names a channel's `color` may use, with their RGB value
COLOR_NAMES: dict[str, str] = {
    "blue": "#0000FF",
    "green": "#00FF00",
    "red": "#FF0000",
    "yellow": "#FFFF00",
    "orange": "#FF8000",
    "cyan": "#00FFFF",
    "magenta": "#FF00FF",
    "white": "#FFFFFF",
}
_HEX_COLOR = re.compile(r"#[0-9A-Fa-f]{6}")


class ChannelSettings(ConfigModel):
    """One assay channel as the instrument acquires it.

    `excitation_nm`, `emission_nm` and `color` only describe the channel (they
    go into every field file's OME metadata, for viewers such as QuPath and
    OMERO); absent ones are left out of the file.
    """

    name: str = Field(min_length=1, description="assay channel name, e.g. DAPI")
    preset: str = Field(min_length=1, description="preset in the channel config group")
    exposure_ms: float = Field(ge=0, le=60_000)
    excitation_nm: float | None = Field(
        default=None, gt=0, le=10_000, description="excitation wavelength"
    )
    emission_nm: float | None = Field(
        default=None, gt=0, le=10_000, description="emission wavelength"
    )
    color: str | None = Field(
        default=None, description="display colour: '#RRGGBB' or a colour name"
    )

    @field_validator("color", mode="before")
    @classmethod
    def _color(cls, value: Any) -> Any:
        if value is None:  # `color: #0000FF` unquoted is a YAML comment
            raise ValueError(
                "no colour given (in YAML quote a hex colour: an unquoted # "
                "starts a comment)"
            )
        if not isinstance(value, str):
            raise ValueError("a colour is a string: '#RRGGBB' or a colour name")
        if _HEX_COLOR.fullmatch(value):
            return value.upper()
        if value.lower() in COLOR_NAMES:
            return COLOR_NAMES[value.lower()]
        raise ValueError(
            f"{value!r} is no colour: use '#RRGGBB' or one of " + ", ".join(COLOR_NAMES)
        )


class ObjectiveSettings(ConfigModel):
    """The objective the fields are imaged through (recorded in the metadata)."""

    model: str = Field(default="", description="e.g. Plan Apo 10x/0.45")
    magnification: float = Field(gt=0, le=1000, description="nominal magnification")
    na: float = Field(gt=0, le=2, description="lens numerical aperture")


#: the simulated scanner's optics (`simulators`) when its YAML names no objective
SIMULATED_OBJECTIVE = ObjectiveSettings(
    model="simulated 10x/0.45", magnification=10, na=0.45
)


class StageLimits(ConfigModel):
    """Travel limits of the stage in um; a plan outside them is refused."""

    x_min: float
    x_max: float
    y_min: float
    y_max: float
    z_min: float = -1e6
    z_max: float = 1e6

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        for axis in "xyz":
            lo, hi = getattr(self, f"{axis}_min"), getattr(self, f"{axis}_max")
            if lo >= hi:
                raise ValueError(f"{axis}_min must be below {axis}_max")
        return self

    def contains(self, x: float, y: float, z: float | None = None) -> bool:
        """Whether a stage position lies within the limits."""
        ok = self.x_min <= x <= self.x_max and self.y_min <= y <= self.y_max
        return ok and (z is None or self.z_min <= z <= self.z_max)


class CameraSettings(ConfigModel):
    """What the controller must know of the camera before it is opened."""

    width: int = Field(gt=0, description="frame width in pixels")
    height: int = Field(gt=0, description="frame height in pixels")
    bit_depth: int = Field(default=12, ge=8, le=16)


#: lossless compressions of field files, and the levels each takes
COMPRESSION_LEVELS: dict[str, tuple[int, int]] = {"zlib": (1, 9), "zstd": (1, 22)}


class StorageSettings(ConfigModel):
    """How field files are written: uncompressed, or losslessly compressed.

    Higher levels gain little on camera data (its noise does not compress) and
    cost many times the write time, so the default level is 1
    (``bench/bench_storage.py``).
    """

    compression: Literal["none", "zlib", "zstd"] = "none"
    level: int | None = Field(
        default=None, description="compression level; default 1 (the fastest)"
    )

    @model_validator(mode="after")
    def _level(self) -> Self:
        if self.compression == "none":
            if self.level is not None:
                raise ValueError("level needs a compression (zlib or zstd)")
            return self
        lo, hi = COMPRESSION_LEVELS[self.compression]
        if self.level is not None and not lo <= self.level <= hi:
            raise ValueError(
                f"{self.compression} level must be {lo} to {hi}, not {self.level}"
            )
        if self.compression == "zstd" and find_spec("imagecodecs") is None:
            raise ValueError("zstd compression needs the imagecodecs package")
        return self

    @property
    def tifffile_args(self) -> dict[str, Any]:
        """Keyword arguments of `tifffile.imwrite` for this setting."""
        if self.compression == "none":
            return {}
        return {
            "compression": self.compression,
            "compressionargs": {"level": 1 if self.level is None else self.level},
        }


class SimulationSettings(ConfigModel):
    """Settings of the simulated world; present only for a simulated instrument.

    Rendering parameters live in `simulators.WorldConfig`; `world` holds overrides
    for it, validated there.
    """

    seed: int = 0
    time_scale: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="fraction of exposure and stage travel time actually waited",
    )
    world: dict[str, Any] = Field(default_factory=dict)


class FocusSettings(ConfigModel):
    """How the scanner finds focus: the focus map, per-field QC and re-focus.

    All distances in um. See docs/architecture.md ("Focus").
    """

    enabled: bool = Field(
        default=True, description="false: every field at z_start_um, no QC"
    )
    channel: str = Field(default="DAPI", description="channel focus is measured on")
    anchors: tuple[int, int] = Field(
        default=(5, 2), description="anchor grid: points along x, points along y"
    )
    anchor_points: tuple[tuple[float, float], ...] | None = Field(
        default=None, description="explicit anchor stage positions (x, y) instead"
    )
    margin_um: float = Field(
        default=500.0, ge=0, description="least distance of an anchor from the wall"
    )
    z_start_um: float = Field(default=0.0, description="nominal focus")
    search_range_um: float = Field(
        default=20.0, description="first anchor: search z_start +- this"
    )
    anchor_range_um: float = Field(
        default=6.0, description="later anchors: search the predicted z +- this"
    )
    coarse_step_um: float = Field(
        default=3.0, gt=0, description="plane spacing of searches over a range"
    )
    fine_step_um: float = Field(
        default=0.5,
        gt=0,
        description="z resolution: a re-focus this close (a re-measure twice "
        "this close) finds the same z",
    )
    predicted_step_um: float = Field(
        default=3.0,
        gt=0,
        description="later anchors: planes this far apart around the predicted z",
    )
    roi_px: int | None = Field(
        default=512,
        ge=0,
        description="z-search frames from a centred camera ROI this many pixels "
        "square (clipped to the frame); 0 or null: full frames",
    )
    anchor_order: Literal["shortest", "as_given"] = Field(
        default="shortest",
        description="shortest: anchors in the order of least stage travel from "
        "where the stage is; as_given: the grid's (serpentine) or anchor_points' order",
    )
    model: Literal["auto", "plane", "quadratic"] = Field(
        default="auto",
        description="auto: quadratic with 2 anchors more than its terms, else plane",
    )
    outlier_um: float = Field(
        default=2.0, gt=0, description="anchor residual that triggers a re-measure"
    )
    max_residual_um: float = Field(
        default=1.0, gt=0, description="fit rms above this is reported"
    )
    qc: bool = Field(default=True, description="check every field's sharpness")
    qc_min_relative: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="refocus a field below this fraction of the anchors' sharpness",
    )
    refocus_range_um: float = Field(default=6.0, description="local search +- this")
    autofocus_device: str | None = Field(
        default=None, description="Micro-Manager autofocus device to use for anchors"
    )
    autofocus_retries: int = Field(default=2, ge=0, le=10)

    @model_validator(mode="after")
    def _ranges(self) -> Self:
        for name in ("search_range_um", "anchor_range_um", "refocus_range_um"):
            rng = getattr(self, name)
            if rng <= 0:
                raise ValueError(f"{name} must be above 0 (empty search range)")
            if rng < self.coarse_step_um:
                raise ValueError(
                    f"{name} ({rng}) is smaller than coarse_step_um "
                    f"({self.coarse_step_um}): the search would take one plane"
                )
        if self.predicted_step_um > self.anchor_range_um:
            raise ValueError(
                f"predicted_step_um ({self.predicted_step_um}) is larger than "
                f"anchor_range_um ({self.anchor_range_um})"
            )
        if self.fine_step_um >= self.coarse_step_um:
            raise ValueError("fine_step_um must be smaller than coarse_step_um")
        if self.anchor_points is None and min(self.anchors) < 1:
            raise ValueError("anchors needs at least 1 x 1 points")
        if self.anchor_points is not None and len(self.anchor_points) < 1:
            raise ValueError("anchor_points is empty")
        return self


_LOADER_BARCODE = re.compile(r"[A-Za-z0-9_.\-]{1,32}")


class LoaderSettings(ConfigModel):
    """The cartridge loader on a serial line (hardware_configs/loader-protocol.md)."""

    port: str = Field(
        min_length=1,
        description="device path or pyserial URL; 'emulated' for the simulator",
    )
    baudrate: int = Field(default=115200, gt=0)
    timeout_s: float = Field(default=0.5, gt=0, le=30)
    retries: int = Field(default=2, ge=0, le=10)
    reconnect_s: float = Field(default=10.0, ge=0, le=600)
    motion_timeout_s: float = Field(default=60.0, gt=0, le=600)
    #: the emulated loader's magazine: barcode per slot (simulator only)
    slots: dict[int, str | None] | None = None
    #: faults of the emulated loader by command number (simulators.loader)
    faults: dict[str, list[int]] = Field(default_factory=dict)

    @field_validator("slots")
    @classmethod
    def _magazine(cls, v: dict[int, str | None] | None) -> dict[int, str | None] | None:
        # the loader protocol's barcodes (hardware_configs/loader-protocol.md)
        if v is None:
            return v
        if not v or min(v) < 1:
            raise ValueError("slots are numbered from 1")
        for bc in v.values():
            if bc is not None and not _LOADER_BARCODE.fullmatch(bc):
                raise ValueError(
                    f"barcode {bc!r}: 1 to 32 of A-Z a-z 0-9 - _ . (the loader's)"
                )
        return v


class InstrumentConfig(ConfigModel):
    """An instrument: its Micro-Manager config and how assay channels map onto it."""

    name: str = Field(min_length=1)
    micromanager_config: Path = Field(
        description="Micro-Manager .cfg, relative to YAML"
    )
    adapter_paths: list[str] = Field(
        default_factory=list,
        description=(
            "folders with Micro-Manager device adapters; the word 'mm-test-adapters'"
            " stands for the folder of the mm-test-adapters package"
        ),
    )
    channel_group: str = "Channel"
    channels: tuple[ChannelSettings, ...] = Field(min_length=1)
    pixel_size_um: float = Field(default=0.64, gt=0, le=100)
    pixel_affine: tuple[float, float, float, float, float, float] | None = Field(
        default=None,
        description="Micro-Manager's pixel-size affine (a, b, tx, c, d, ty): a pixel "
        "(col, row) offset from the frame centre moves (a col + b row + tx, "
        "c col + d row + ty) um on the stage; default: an unrotated camera, "
        "(p, 0, 0, 0, -p, 0) (stage y shrinks with row)",
    )
    field_overlap_um: float = Field(
        default=0.0,
        ge=0,
        description="neighbouring fields overlap by this much (um); the field "
        "pitch is the field of view less it",
    )
    camera: CameraSettings = CameraSettings(width=1384, height=1036)
    stage_limits: StageLimits | None = None
    snap_retries: int = Field(default=2, ge=0, le=10)
    move_retries: int = Field(default=2, ge=0, le=10)
    watchdog_s: float = Field(
        default=60.0,
        gt=0,
        description="a hardware call (move, snap beyond its exposure) taking longer "
        "than this has hung",
    )
    focus: FocusSettings = FocusSettings()
    objective: ObjectiveSettings | None = Field(
        default=None,
        description="recorded in the fields' metadata; a simulated instrument "
        "without one has the simulator's 10x/0.45",
    )
    storage: StorageSettings = StorageSettings()
    loader: LoaderSettings | None = None
    simulation: SimulationSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _simulated_objective(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and data.get("simulation") is not None
            and "objective" not in data
        ):
            data = {**data, "objective": SIMULATED_OBJECTIVE}
        return data

    @model_validator(mode="before")
    @classmethod
    def _resolve_paths(cls, data: Any, info: Any) -> Any:
        base = (info.context or {}).get("base_dir") if info.context else None
        if isinstance(data, dict) and base is not None:
            mm = data.get("micromanager_config")
            if isinstance(mm, str) and not Path(mm).is_absolute():
                data = {**data, "micromanager_config": str(Path(base) / mm)}
        return data

    @model_validator(mode="after")
    def _unique_channels(self) -> Self:
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names):
            raise ValueError(f"channel names repeat: {names}")
        f = self.focus
        if f.enabled and f.channel not in names:
            raise ValueError(
                f"focus.channel {f.channel!r} is not one of the channels {names}"
            )
        if f.enabled and f.qc and names[0] != f.channel:
            raise ValueError(
                f"focus QC judges each field on its first frame: acquire "
                f"{f.channel!r} first (channels start with {names[0]!r})"
            )
        if (
            self.loader is not None
            and self.loader.port == "emulated"
            and self.simulation is None
        ):
            raise ValueError("loader.port 'emulated' needs a simulated instrument")
        if self.pixel_affine is not None:
            check_affine(self.pixel_affine, self.pixel_size_um)
        fov = min(self.camera.width, self.camera.height) * self.pixel_size_um
        if self.field_overlap_um >= fov / 2:
            raise ValueError(
                f"field_overlap_um ({self.field_overlap_um:g}) must be below half "
                f"the field of view ({fov / 2:g} um)"
            )
        if (lim := self.stage_limits) is not None and f.enabled:
            lo, hi = f.z_start_um - f.search_range_um, f.z_start_um + f.search_range_um
            if lo < lim.z_min or hi > lim.z_max:
                raise ValueError(
                    f"focus search {lo:g}..{hi:g} um leaves the stage's z limits "
                    f"{lim.z_min:g}..{lim.z_max:g} um"
                )
        return self

    @property
    def channel_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.channels)

    @property
    def is_simulated(self) -> bool:
        return self.simulation is not None

    @property
    def affine(self) -> tuple[float, float, float, float, float, float]:
        """The pixel-size affine: `pixel_affine`, or an unrotated camera's."""
        if self.pixel_affine is not None:
            return self.pixel_affine
        return default_affine(self.pixel_size_um)


# ---------------------------------------------------------------- assay

ChannelRole = Literal["nucleus", "epithelial", "leukocyte", "marker"]


def _default_roles() -> dict[str, ChannelRole]:
    return {"DAPI": "nucleus", "FITC": "marker", "PE": "epithelial", "APC": "leukocyte"}


class Indication(ConfigModel):
    """A clinical indication and its CTC cut-off per 7.5 mL of blood."""

    name: str
    #: CTC per sample: clinical cut-offs are single digits; a sample of
    #: 7.5 mL holds nowhere near 10,000 CTC
    cutoff: int = Field(ge=1, le=10_000)


class AssayConfig(ConfigModel):
    """The assay: which stain each channel carries and the clinical cut-off."""

    name: str = "cellsearch-ctc"
    channels: dict[str, ChannelRole] = Field(default_factory=_default_roles)
    indication: str = "metastatic-breast"
    indications: tuple[Indication, ...] = (
        Indication(name="metastatic-breast", cutoff=5),
        Indication(name="metastatic-prostate", cutoff=5),
        Indication(name="metastatic-colorectal", cutoff=3),
    )
    blood_volume_ml: float = Field(default=7.5, gt=0, le=100)
    #: every threshold of segmentation and of the CTC definition
    detection: DetectionSettings = DetectionSettings()
    #: how overlapping fields are joined so each cell counts once
    stitch: StitchSettings = StitchSettings()

    @model_validator(mode="after")
    def _check(self) -> Self:
        roles = list(self.channels.values())
        for needed in ("nucleus", "epithelial", "leukocyte"):
            if roles.count(needed) != 1:
                raise ValueError(f"exactly one channel must have role {needed!r}")
        dyes = [c for c, r in self.channels.items() if r in ("nucleus", "epithelial")]
        for key in self.detection.spillover:
            src, _, dst = key.partition("->")
            unknown = [c for c in (src, dst) if c not in self.channels]
            if unknown:
                raise ValueError(
                    f"detection.spillover {key!r}: {unknown[0]!r} is not a channel "
                    f"of the assay ({', '.join(self.channels)})"
                )
            if src not in dyes or dst in dyes:
                # the detector corrects the mask dyes' bleed into the others
                raise ValueError(
                    f"detection.spillover {key!r}: only the bleed-through of "
                    f"{' and '.join(dyes)} into another channel is corrected"
                )
        names = [i.name for i in self.indications]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"indication {dup!r} is listed twice")
        if self.indication not in {i.name for i in self.indications}:
            known = ", ".join(i.name for i in self.indications)
            raise ValueError(f"unknown indication {self.indication!r}; known: {known}")
        return self

    @property
    def cutoff(self) -> int:
        return next(i.cutoff for i in self.indications if i.name == self.indication)

    def channel_for(self, role: ChannelRole) -> str | None:
        """Name of the channel carrying `role`, or None."""
        return next((c for c, r in self.channels.items() if r == role), None)

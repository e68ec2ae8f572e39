"""Parameters of the simulated world: population, optics, focus surface."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from controller.config import ConfigModel

__all__ = ["STAINS", "OpticsConfig", "PopulationConfig", "SurfaceConfig", "WorldConfig"]

#: The stains of the default assay, in the world's plane order.
STAINS: tuple[str, ...] = ("DAPI", "FITC", "PE", "APC")


class PopulationConfig(ConfigModel):
    """How many objects of each kind a cartridge holds (whole cartridge unless
    the name says per field)."""

    ctc: int = Field(default=30, ge=0)
    #: stage positions (x, y um) of further single CTCs, drawn like the others
    #: from a random stream of their own (tests place cells on field borders)
    ctc_at: tuple[tuple[float, float], ...] = ()
    ctc_cluster_fraction: float = Field(default=0.2, ge=0, le=1)
    ctc_dim_fraction: float = Field(default=0.2, ge=0, le=1)
    #: cytokeratin (PE) amplitude range of the dim CTCs, in units of the stain
    #: rate (bright ones: 0.5-1); about 0.01 is the noise of one pixel at the
    #: default PE exposure, so (0.02, 0.06) puts them near the detection limit
    ctc_dim_ck: tuple[float, float] = (0.15, 0.3)
    #: centre distance of touching cluster members, as a fraction of the sum of
    #: their radii (below 1: they overlap and press against each other)
    ctc_cluster_spacing: float = Field(default=0.92, ge=0.6, le=1.2)
    ctc_fitc_fraction: float = Field(default=0.3, ge=0, le=1)
    ctc_median_diameter_um: float = Field(default=12.4, gt=4, le=40)
    wbc_per_field: float = Field(default=150.0, ge=0, le=600)
    wbc_cd45_dim_fraction: float = Field(default=0.5, ge=0, le=1)
    double_positive: int = Field(default=20, ge=0)
    ck_fragment: int = Field(default=400, ge=0)
    small_ck_dapi: int = Field(default=40, ge=0)
    #: diameter range (um) of the CK+DAPI+ objects under 4 um, and a factor on
    #: their stain amplitudes (3: as bright as the brightest CTCs, or brighter)
    small_ck_dapi_diameter_um: tuple[float, float] = (2.0, 3.6)
    small_ck_dapi_brightness: float = Field(default=1.0, gt=0, le=10)
    nucleus_beside_ck: int = Field(default=20, ge=0)
    free_nucleus_per_field: float = Field(default=5.0, ge=0)
    debris: int = Field(default=40, ge=0)

    @model_validator(mode="after")
    def _ranges(self) -> Self:
        lo, hi = self.ctc_dim_ck
        if not 0 < lo <= hi <= 1:
            raise ValueError(
                f"ctc_dim_ck must satisfy 0 < low <= high <= 1, got {lo}, {hi}"
            )
        lo, hi = self.small_ck_dapi_diameter_um
        if not 0.5 <= lo <= hi <= 4.0:
            raise ValueError(
                "small_ck_dapi_diameter_um must satisfy 0.5 <= low <= high <= 4 "
                f"(they are the objects under 4 um), got {lo}, {hi}"
            )
        return self


class OpticsConfig(ConfigModel):
    """Camera and light path. Rates are DN per ms of exposure at the image centre."""

    stain_rate: tuple[float, float, float, float] = (100.0, 12.0, 20.0, 8.0)
    background_rate: tuple[float, float, float, float] = (1.5, 0.6, 0.8, 0.5)
    #: crosstalk[c][s]: fraction of stain s seen in channel c
    crosstalk: tuple[tuple[float, float, float, float], ...] = (
        (1.0, 0.0, 0.0, 0.0),
        (0.01, 1.0, 0.03, 0.0),
        (0.0, 0.08, 1.0, 0.01),
        (0.0, 0.0, 0.04, 1.0),
    )
    vignetting: float = Field(default=0.3, ge=0, lt=1)
    offset_dn: float = Field(default=100.0, ge=0)
    read_noise_dn: float = Field(default=3.0, ge=0)
    electrons_per_dn: float = Field(default=2.0, gt=0)
    bit_depth: int = Field(default=12, ge=8, le=16)
    depth_of_field_um: float = Field(default=2.0, ge=0)
    blur_px_per_um: float = Field(default=0.8, ge=0)
    #: extra blur (Gaussian sigma, px) that varies from field to field (a tilted
    #: or dirty cartridge, vibration): each field draws it uniformly from this
    #: range, seeded by its position, and it adds in quadrature to the defocus
    field_blur_px: tuple[float, float] = (0.0, 0.0)
    rim_width_um: float = Field(default=40.0, gt=0)
    rim_rate: tuple[float, float, float, float] = (60.0, 25.0, 40.0, 20.0)
    outside_background: float = Field(default=0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _square(self) -> Self:
        if len(self.crosstalk) != 4 or any(len(r) != 4 for r in self.crosstalk):
            raise ValueError("crosstalk must be a 4 x 4 matrix")
        lo, hi = self.field_blur_px
        if not 0 <= lo <= hi <= 10:
            raise ValueError(
                f"field_blur_px must satisfy 0 <= low <= high <= 10, got {lo}, {hi}"
            )
        return self


class SurfaceConfig(ConfigModel):
    """The cartridge's top surface: z = z0 + tilt + bow along the long axis (um).

    `bow_um` is the height of the centre over the chamber's ends (negative: sags).
    The defaults are a mildly tilted, slightly bowed cartridge; the focus map
    follows steeper tilts and bows set here.
    """

    z0_um: float = 0.0
    tilt_x_um_per_mm: float = 0.15
    tilt_y_um_per_mm: float = -0.3
    bow_um: float = 1.0


class WorldConfig(ConfigModel):
    """Everything that determines the simulated world; the same config and seed
    give the same pixels."""

    seed: int = 0
    population: PopulationConfig = PopulationConfig()
    optics: OpticsConfig = OpticsConfig()
    surface: SurfaceConfig = SurfaceConfig()
    stage_speed_um_per_ms: float = Field(default=20.0, gt=0)
    #: a real stage lands near its target: each XY move ends up to this far
    #: (um, per axis, uniform, seeded per move) from it; the position read back
    #: is where it went
    stage_error_um: float = Field(default=0.0, ge=0, le=50)
    #: the camera turned to the stage axes (degrees, counter-clockwise)
    camera_rotation_deg: float = Field(default=0.0, ge=-5, le=5)
    focus_speed_um_per_ms: float = Field(default=1.0, gt=0)
    time_scale: float = Field(default=0.0, ge=0, le=1)
    #: snaps (0-based count of every snap of this world) that fail, for tests
    fail_snaps: tuple[int, ...] = ()
    #: snaps that come back black (lamp off), saturated, or stale (the previous
    #: frame again)
    black_snaps: tuple[int, ...] = ()
    saturated_snaps: tuple[int, ...] = ()
    stale_snaps: tuple[int, ...] = ()
    #: changes of filter position (0-based count) that stick for
    #: `stuck_filter_ms` of wall time
    stuck_filter: tuple[int, ...] = ()
    stuck_filter_ms: float = Field(default=150.0, ge=0)
    #: XY moves (0-based count) that time out without moving
    fail_xy_moves: tuple[int, ...] = ()
    #: snaps that hang for `hang_s` of wall time (a camera that stops answering)
    hang_snaps: tuple[int, ...] = ()
    hang_s: float = Field(default=3600.0, ge=0)
    #: hardware autofocus: residual error (sd, um) of a successful full focus
    autofocus_sd_um: float = Field(default=0.15, ge=0)
    #: full-focus calls (0-based count) that fail, and that land this far off
    fail_autofocus: tuple[int, ...] = ()
    wrong_autofocus: tuple[int, ...] = ()
    wrong_autofocus_um: float = 12.0

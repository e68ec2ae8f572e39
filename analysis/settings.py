"""Detection settings: every threshold of the CTC rule, in one validated model.

Intensity units: a channel's *signal* is the pixel value minus the channel's local
background (camera counts, DN); thresholds on it are given in multiples of that
channel's background noise (robust standard deviation, "SNR"), so they do not
depend on the camera offset or gain.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["CUT_REASON", "DetectionSettings", "StitchSettings"]

#: The reason of an object whose nucleus the field's edge cuts with its centre
#: beyond that edge: it is counted in the neighbouring field (`analysis.stitch`
#: knows it by this).
CUT_REASON = "nucleus centre beyond the field's edge (counted next door)"


class DetectionSettings(BaseModel):
    """Thresholds of segmentation and of the CellSearch CTC definition."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    # segmentation: a mask threshold below one noise unit segments the noise
    # itself (every pixel a region: minutes per field, nothing meaningful)
    nucleus_snr: float = Field(default=6.0, ge=1, description="DAPI mask threshold")
    ck_snr: float = Field(default=6.0, ge=1, description="cytokeratin mask threshold")
    ck_smooth_snr: float = Field(
        default=1.5,
        gt=0,
        description=(
            "dim cytokeratin: PE averaged over 6 x 6 px above this many (pixel) "
            "noise units, kept around nuclei where the smoothed peak is below "
            "ck_dim_peak_snr"
        ),
    )
    ck_dim_peak_snr: float = Field(
        default=30.0,
        gt=0,
        description=(
            "a smoothed CK region peaking below this is dim (see above), and so "
            "is a cell whose mean CK is below it: its size is measured smoothed"
        ),
    )
    min_object_area_um2: float = Field(
        default=1.5, ge=0, description="smaller specks are ignored"
    )
    background_block_px: int = Field(default=64, ge=16, le=512)
    # the CTC definition
    min_ctc_diameter_um: float = Field(
        default=4.0, ge=0, description="a CTC is larger than this"
    )
    max_ctc_diameter_um: float = Field(default=40.0, gt=0)
    blur_uncertainty: float = Field(
        default=0.1,
        ge=0,
        le=0.5,
        description=(
            "relative error allowed on a field's measured blur: a single object "
            "is larger than min_ctc_diameter_um only if it is so with the blur "
            "taken this much larger (diameter_low_um)"
        ),
    )
    # the field's blur, measured on its nuclei, that object sizes are corrected for
    blur_nucleus_area_um2: tuple[float, float] = Field(
        default=(12.0, 120.0),
        description="nuclei of this area (um^2) measure the blur: single nuclei",
    )
    blur_min_peak_snr: float = Field(
        default=20.0, gt=0, description="a nucleus measuring the blur peaks above"
    )
    blur_max_nuclei: int = Field(
        default=24, ge=1, description="at most this many nuclei measure the blur"
    )
    blur_min_nuclei: int = Field(
        default=5,
        ge=1,
        description="with fewer usable nuclei the field's blur is default_blur_px",
    )
    default_blur_px: float = Field(
        default=1.0,
        ge=0,
        description="blur (Gaussian sigma, px) of a field too sparse to measure it",
    )
    max_cluster_area_um2: float = Field(
        default=5000.0,
        gt=0,
        description=(
            "a cytokeratin region larger than this is no cell or cluster, and a "
            "nucleus blob larger than this no set of nuclei merged by blur"
        ),
    )
    min_nucleus_inside: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="fraction of the nucleus that must lie inside the CK area",
    )
    min_nucleus_area_um2: float = Field(
        default=12.0,
        gt=0,
        description=(
            "a piece of a blurred-together nucleus blob counts as a nucleus of "
            "its own only from this area (about 4 um across)"
        ),
    )
    min_cluster_nucleus_um: float = Field(
        default=2.5,
        ge=0,
        description=(
            "a cluster's part (its body cut by its neighbours) whose own nucleus "
            "is under this across, deconvolved with the field's blur taken "
            "blur_uncertainty smaller, is no cell: a small CK+DAPI object "
            "touching a cell (0: off)"
        ),
    )
    nucleus_split_um: float = Field(
        default=3.0,
        gt=0,
        description="DNA peaks of two merged nuclei lie at least this far apart",
    )
    nucleus_split_depth: float = Field(
        default=0.75,
        gt=0,
        le=1,
        description=(
            "two merged nuclei: the DNA signal between their peaks falls below "
            "this fraction of the lower peak"
        ),
    )
    max_cd45_snr: float = Field(
        default=10.0,
        gt=0,
        description="CD45-negative: CD45 signal on the cell below this",
    )
    max_cd45_dim_snr: float = Field(
        default=5.0,
        gt=0,
        description=(
            "CD45-positive also when the CD45 on the membrane (less the "
            "cytokeratin dye's bleed-through) reaches this and is at least "
            "min_cd45_ratio of the cell's cytokeratin there: a dim cell"
        ),
    )
    max_cd45_nucleus_snr: float = Field(
        default=15.0,
        gt=0,
        description=(
            "CD45-positive also when the CD45 just around the nucleus, inside "
            "the CK area (less bleed-through), reaches this: a leukocyte under "
            "a CK fragment"
        ),
    )
    min_cd45_nucleus_cover: float = Field(
        default=0.75,
        ge=0,
        le=1,
        description=(
            "...and when it does so all around the nucleus: in at least this "
            "fraction of 8 sectors about it (a leukocyte's membrane encircles "
            "its own nucleus; one pressed against a cell lights one side)"
        ),
    )
    min_cd45_encircled: float = Field(
        default=0.875,
        ge=0,
        le=1,
        description=(
            "CD45-positive also when, in a 2 px ring around the nucleus (not cut "
            "to the CK area), at least this fraction of all 8 sectors about it "
            "reach wbc_cd45_snr (CD45 less bleed-through): the nucleus is a "
            "leukocyte's, its membrane ringing it on every side, whatever "
            "cytokeratin lies over it"
        ),
    )
    min_cd45_encircled_ratio: float = Field(
        default=0.05,
        ge=0,
        description=(
            "...counting a sector only where its CD45 is also at least this "
            "fraction of the cytokeratin there: above the few percent that a "
            "cell's own cytokeratin bleeds into CD45 all around its nucleus "
            "when the field's measure of that bleed-through is off (it guards "
            "against an error in that measure below this fraction)"
        ),
    )
    min_cd45_membrane_snr: float = Field(
        default=3.0,
        gt=0,
        description=(
            "CD45-positive also when the CD45 on the cell's membrane (the band "
            "across its edge, less bleed-through) reaches this..."
        ),
    )
    min_cd45_membrane_cover: float = Field(
        default=0.75,
        ge=0,
        le=1,
        description=(
            "...in at least this fraction of all 8 sectors about the cell's "
            "centre, each also at least min_cd45_encircled_ratio of the "
            "cytokeratin there (min_cd45_ratio when the field could not "
            "measure the bleed-through), the band not read beside another "
            "cell's nucleus: a membrane stained all around (a leukocyte "
            "pressed against the cell lights one side)"
        ),
    )
    min_cd45_ratio: float = Field(
        default=0.2,
        ge=0,
        description=(
            "CD45-positive also needs the membrane CD45 signal to be at "
            "least this fraction of the cell's cytokeratin signal there, "
            "well above any dye bleed-through"
        ),
    )
    min_solidity: float = Field(
        default=0.80, ge=0, le=1, description="round to oval: solidity at least"
    )
    min_axis_ratio: float = Field(
        default=0.35, ge=0, le=1, description="round to oval: minor/major axis"
    )
    # look-alikes
    debris_all_channel_snr: float = Field(
        default=25.0,
        gt=0,
        description="a pixel at least this bright in every channel is debris-like",
    )
    debris_all_channel_fraction: float = Field(
        default=0.3,
        gt=0,
        le=1,
        description="an object with this fraction of debris-like pixels is debris",
    )
    debris_halo_snr: float = Field(
        default=5.0,
        gt=0,
        description=(
            "a CK candidate whose mean signal in every non-DNA channel is at "
            "least this, and debris_halo_fraction of its CK, is debris (the halo "
            "of debris or of the rim)"
        ),
    )
    debris_halo_fraction: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description=(
            "see debris_halo_snr; also, a part peeled off debris whose every "
            "stain's channel stands to its CK at least this fraction as high as "
            "just beyond the debris has the colour of its glow: debris"
        ),
    )
    debris_saturated_fraction: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="saturated in two or more channels over this area fraction",
    )
    wbc_cd45_snr: float = Field(
        default=8.0,
        gt=0,
        description="a CK-negative nucleus with CD45 at least this is a leukocyte",
    )
    spillover: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "bleed-through used when a field has too few single-stain "
            "objects to measure it, e.g. {'PE->APC': 0.05}"
        ),
    )
    # reporting
    review_margin: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description=(
            "an object that fails exactly one rule of the CTC definition by "
            "less than this fraction of the rule's threshold is shown for review"
        ),
    )
    marker_snr: float = Field(
        default=15.0, gt=0, description="FITC marker-positive at or above"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_booleans(cls, data: Any) -> Any:
        # YAML's true / yes would pass as 1 (a threshold of one noise unit)
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                number = field is not None and field.annotation in (int, float)
                if isinstance(value, bool) and number:
                    raise ValueError(f"{key} must be a number, got {value}")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        lo, hi = self.blur_nucleus_area_um2
        if not 0 < lo < hi:
            raise ValueError(
                f"blur_nucleus_area_um2 must be two areas, the smaller first "
                f"(um^2), got {list(self.blur_nucleus_area_um2)}"
            )
        if self.blur_min_nuclei > self.blur_max_nuclei:
            raise ValueError(
                f"blur_min_nuclei ({self.blur_min_nuclei}) must not exceed "
                f"blur_max_nuclei ({self.blur_max_nuclei}): no field could be measured"
            )
        for key, coef in self.spillover.items():
            src, sep, dst = key.partition("->")
            names_ok = all(n and n == n.strip() and "->" not in n for n in (src, dst))
            if not (sep and names_ok and src != dst):
                raise ValueError(
                    f"spillover {key!r}: expected SOURCE->TARGET, two channels, "
                    "e.g. 'PE->APC'"
                )
            if not 0 <= coef <= 1:
                raise ValueError(
                    f"spillover {key!r} must be a fraction from 0 to 1, got {coef:g}"
                )
        if self.min_ctc_diameter_um >= self.max_ctc_diameter_um:
            raise ValueError(
                f"min_ctc_diameter_um ({self.min_ctc_diameter_um:g}) must be below "
                f"max_ctc_diameter_um ({self.max_ctc_diameter_um:g}): no cell could "
                "be a CTC"
            )
        return self


class StitchSettings(BaseModel):
    """How a cartridge's fields are joined into one count (`analysis.stitch`).

    Fields overlap on a real stage (a planned overlap, the stage landing a few
    um off its target): an object whose position another field imaged deeper
    inside is left to that field, and objects of two fields that lie within
    `tolerance_um` of each other, each inside the other's field, are one cell.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    tolerance_um: float = Field(
        default=4.0,
        gt=0,
        le=20,
        description=(
            "objects of two overlapping fields this close in stage coordinates "
            "are one cell (a fraction of a cell diameter)"
        ),
    )
    margin_um: float = Field(
        default=1.5,
        ge=0,
        le=20,
        description=(
            "an object is left to another field when that field holds its "
            "position deeper inside (farther from its edges) by more than this"
        ),
    )

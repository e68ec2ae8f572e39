"""Scan plan: the fields of a cartridge in acquisition order, and its MDA sequence.

The plan is pure geometry: `plan_fields` turns a layout, the camera's field of
view and the fields' overlap into fields in serpentine order;
`ScanPlan.to_sequence` turns (a subset of) them into a `useq.MDASequence` with one
position per field and every channel at it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import useq

from controller.config import ChannelSettings, InstrumentConfig
from controller.errors import ConfigError
from controller.layouts import CartridgeLayout

__all__ = ["FieldSpec", "ScanPlan", "field_name", "plan_fields"]


def field_name(index: int) -> str:
    """The name of the field at plan index `index` (``field_000`` ...)."""
    return f"field_{index:03d}"


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of the plan.

    `x_um`, `y_um` are the stage coordinates of the field centre; `z_um` the focus
    position the field is imaged at.
    """

    index: int
    name: str
    row: int
    col: int
    x_um: float
    y_um: float
    z_um: float
    edge: bool

    def as_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "name": self.name,
            "row": self.row,
            "col": self.col,
            "x_um": self.x_um,
            "y_um": self.y_um,
            "z_um": self.z_um,
            "edge": self.edge,
        }


def plan_fields(
    layout: CartridgeLayout,
    fov_width_um: float,
    fov_height_um: float,
    *,
    z_of: Callable[[float, float], float] | None = None,
    overlap_um: float = 0.0,
) -> tuple[FieldSpec, ...]:
    """Fields covering `layout` in serpentine (row-wise snake) order.

    Parameters
    ----------
    layout : CartridgeLayout
        The grid to cover.
    fov_width_um, fov_height_um : float
        The camera's field of view.
    overlap_um : float, optional
        Neighbouring fields overlap by this much: the field pitch is the field
        of view less it (default 0: fields abut). A real stage lands a few um
        off its target, so abutting fields would leave gaps.
    z_of : callable, optional
        ``z_of(x_um, y_um)`` gives the focus position of a field (a focus map);
        default 0.

    Returns
    -------
    tuple of FieldSpec
        ``layout.rows * layout.cols`` fields; index and name follow scan order.
    """
    if fov_width_um <= 0 or fov_height_um <= 0:
        raise ConfigError(
            f"field of view must be positive, got {fov_width_um} x {fov_height_um} um"
        )
    if not 0 <= overlap_um < min(fov_width_um, fov_height_um) / 2:
        raise ConfigError(
            f"field overlap must be 0 to half the field of view, got {overlap_um} um"
        )
    # useq computes the grid; the FOV is set explicitly so it can never fall back
    # to its cached default step.
    grid = useq.GridRowsColumns(
        rows=layout.rows,
        columns=layout.cols,
        fov_width=fov_width_um,
        fov_height=fov_height_um,
        # useq's overlap is a percentage of the field of view
        overlap=(100 * overlap_um / fov_width_um, 100 * overlap_um / fov_height_um),
        mode=useq.OrderMode.row_wise_snake,
        relative_to="center",  # type: ignore[arg-type]  # coerced by pydantic
    )
    fields = []
    for i, pos in enumerate(grid):
        x = layout.center_x_um + (pos.x or 0.0)
        y = layout.center_y_um + (pos.y or 0.0)
        row, col = int(pos.grid_row or 0), int(pos.grid_col or 0)
        z = float(z_of(x, y)) if z_of is not None else 0.0
        fields.append(
            FieldSpec(i, field_name(i), row, col, x, y, z, layout.is_edge(row, col))
        )
    return tuple(fields)


def _check_coverage(layout: CartridgeLayout, overlap_um: float) -> None:
    """Overlapping fields cover less than abutting ones: (n - 1) x overlap less
    along n fields. The loss must fit in the outer fields' margin beyond the
    chamber wall (`wall_inset_um` each side), or part of the chamber would go
    unimaged."""
    n = max(layout.rows, layout.cols)
    if overlap_um <= 0 or n < 2:
        return
    lost = (n - 1) * overlap_um
    if lost > 2 * layout.wall_inset_um:
        most = 2 * layout.wall_inset_um / (n - 1)
        raise ConfigError(
            f"layout {layout.name!r}: a field overlap of {overlap_um:g} um makes "
            f"its {n} fields in a line {lost:g} um shorter than abutting ones, more "
            f"than the {2 * layout.wall_inset_um:g} um its outer fields reach beyond "
            f"the chamber: part of the chamber would not be imaged (at most "
            f"{math.floor(most * 10) / 10:g} um on this layout; a layout with more "
            "fields for more)"
        )


@dataclass(frozen=True)
class ScanPlan:
    """Everything needed to image one cartridge."""

    layout: CartridgeLayout
    fields: tuple[FieldSpec, ...]
    channels: tuple[ChannelSettings, ...]
    channel_group: str
    fov_width_um: float
    fov_height_um: float

    @classmethod
    def build(
        cls,
        layout: CartridgeLayout,
        instrument: InstrumentConfig,
        *,
        n_fields: int | None = None,
        z_of: Callable[[float, float], float] | None = None,
    ) -> ScanPlan:
        """Plan a scan of `layout` on `instrument`; `n_fields` keeps the first N."""
        fov_w = instrument.camera.width * instrument.pixel_size_um
        fov_h = instrument.camera.height * instrument.pixel_size_um
        _check_coverage(layout, instrument.field_overlap_um)
        fields = plan_fields(
            layout, fov_w, fov_h, z_of=z_of, overlap_um=instrument.field_overlap_um
        )
        if n_fields is not None:
            if n_fields < 1:
                raise ConfigError(f"--fields must be at least 1, got {n_fields}")
            fields = fields[:n_fields]
        if (lim := instrument.stage_limits) is not None:
            outside = [
                f.name
                for f in fields
                # x and y only: the fields' z comes from the focus map later
                # (`with_focus` checks it)
                if not lim.contains(f.x_um - fov_w / 2, f.y_um - fov_h / 2)
                or not lim.contains(f.x_um + fov_w / 2, f.y_um + fov_h / 2)
            ]
            if outside:
                raise ConfigError(
                    f"layout {layout.name!r}: {len(outside)} field(s) lie outside the "
                    f"stage limits of instrument {instrument.name!r} (first: "
                    f"{outside[0]})"
                )
        return cls(
            layout=layout,
            fields=fields,
            channels=instrument.channels,
            channel_group=instrument.channel_group,
            fov_width_um=fov_w,
            fov_height_um=fov_h,
        )

    def with_focus(
        self, z_of: Callable[[float, float], float], instrument: InstrumentConfig
    ) -> ScanPlan:
        """This plan with each field's z taken from a focus map ``z_of(x, y)``.

        Raises
        ------
        ConfigError
            A field's z falls outside the focus drive's limits.
        """
        fields = tuple(
            replace(f, z_um=round(float(z_of(f.x_um, f.y_um)), 3)) for f in self.fields
        )
        if (lim := instrument.stage_limits) is not None:
            out = [f for f in fields if not lim.z_min <= f.z_um <= lim.z_max]
            if out:
                raise ConfigError(
                    f"the focus map puts {len(out)} field(s) outside the focus "
                    f"limits {lim.z_min:g}..{lim.z_max:g} um (first: {out[0].name} "
                    f"at {out[0].z_um:g} um)"
                )
        return replace(self, fields=fields)

    @property
    def channel_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.channels)

    def by_name(self) -> dict[str, FieldSpec]:
        return {f.name: f for f in self.fields}

    def to_sequence(
        self, fields: Sequence[FieldSpec] | None = None
    ) -> useq.MDASequence:
        """The MDA sequence imaging `fields` (default: all), every channel per field.

        Axis order ``pc``: the stage moves once per field and all channels are
        taken there. Each position carries the field's name and z.
        """
        fields = self.fields if fields is None else fields
        return useq.MDASequence(
            stage_positions=tuple(
                useq.Position(x=f.x_um, y=f.y_um, z=f.z_um, name=f.name) for f in fields
            ),
            channels=tuple(
                useq.Channel(
                    config=c.preset, group=self.channel_group, exposure=c.exposure_ms
                )
                for c in self.channels
            ),
            axis_order=("p", "c"),
            metadata={"ctcscan": {"layout": self.layout.name}},
        )

"""Cartridge layouts: the grid of fields that covers a cartridge, by name.

A layout gives the grid (rows x columns), where the cartridge centre sits on the
stage and how far inside the outer fields the cartridge wall lies. The field pitch
is the camera's field of view less the instrument's field overlap (0 by default:
fields abut), so it comes from the instrument, not from the layout.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from controller.config import ConfigModel
from controller.errors import UnknownLayoutError

__all__ = ["LAYOUTS", "CartridgeLayout", "get_layout", "register_layout"]


class CartridgeLayout(ConfigModel):
    """A rectangular grid of fields over one cartridge.

    Rows run along the stage's y axis (row 0 at the largest y), columns along x.
    The first and last row and column are edge fields: the cartridge wall lies
    `wall_inset_um` inside their outer border.
    """

    name: str = Field(min_length=1)
    rows: int = Field(ge=1, le=200)
    cols: int = Field(ge=1, le=400)
    center_x_um: float = 0.0
    center_y_um: float = 0.0
    wall_inset_um: float = Field(default=250.0, ge=0)
    description: str = ""

    @property
    def n_fields(self) -> int:
        return self.rows * self.cols

    def is_edge(self, row: int, col: int) -> bool:
        """Whether the field at (row, col) contains the cartridge edge."""
        return row in (0, self.rows - 1) or col in (0, self.cols - 1)


def _cellsearch(rows: int, cols: int) -> CartridgeLayout:
    return CartridgeLayout(
        name=f"cellsearch-{rows}x{cols}",
        rows=rows,
        cols=cols,
        description=f"CellSearch-like cartridge, {rows} x {cols} fields, serpentine",
    )


LAYOUTS: dict[str, CartridgeLayout] = {
    lay.name: lay
    for lay in [
        _cellsearch(5, 35),
        _cellsearch(5, 36),
        _cellsearch(5, 34),
        _cellsearch(4, 35),
        _cellsearch(4, 36),
        _cellsearch(6, 35),
        CartridgeLayout(
            name="test-3x4",
            rows=3,
            cols=4,
            description="small 12-field layout for tests and demos",
        ),
    ]
}

DEFAULT_LAYOUT = "cellsearch-5x35"


def register_layout(layout: CartridgeLayout) -> None:
    """Add a layout to the registry (replacing one of the same name)."""
    LAYOUTS[layout.name] = layout


def get_layout(name_or_path: str) -> CartridgeLayout:
    """Return a registered layout by name, or load one from a YAML file.

    Raises
    ------
    UnknownLayoutError
        The name is neither registered nor a layout file; the message lists the
        known names and how to add one.
    """
    if name_or_path in LAYOUTS:
        return LAYOUTS[name_or_path]
    if name_or_path.endswith((".yaml", ".yml")) or _is_file(name_or_path):
        return CartridgeLayout.from_file(name_or_path)
    known = ", ".join(sorted(LAYOUTS))
    raise UnknownLayoutError(
        f"unknown layout {name_or_path!r}; known layouts: {known}. "
        "To add one, pass a layout YAML file (name, rows, cols, ...) to --layout."
    )


def _is_file(name: str) -> bool:
    """Whether `name` is a file; False for a name the file system refuses."""
    try:
        return Path(name).is_file()
    except OSError:  # ENAMETOOLONG
        return False

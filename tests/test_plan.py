from __future__ import annotations

import itertools

import pytest

from controller.acquisition.plan import ScanPlan, plan_fields
from controller.config import StageLimits
from controller.errors import ConfigError, UnknownLayoutError
from controller.layouts import LAYOUTS, get_layout
from tests.conftest import sim_instrument

FOV = (1384 * 0.64, 1036 * 0.64)


@pytest.mark.parametrize(
    ("name", "n", "n_edge"),
    [
        ("cellsearch-5x35", 175, 2 * 35 + 2 * 3),
        ("cellsearch-5x36", 180, 2 * 36 + 2 * 3),
        ("test-3x4", 12, 10),
    ],
)
def test_field_count_and_edges(name: str, n: int, n_edge: int) -> None:
    fields = plan_fields(get_layout(name), *FOV)
    assert len(fields) == n
    assert sum(f.edge for f in fields) == n_edge
    assert [f.index for f in fields] == list(range(n))
    assert fields[0].name == "field_000" and fields[-1].name == f"field_{n - 1:03d}"


def test_serpentine_order_and_pitch() -> None:
    lay = get_layout("cellsearch-5x35")
    fields = plan_fields(lay, *FOV)
    for row in range(lay.rows):
        in_row = [f for f in fields if f.row == row]
        cols = [f.col for f in in_row]
        assert cols == (list(range(35)) if row % 2 == 0 else list(range(34, -1, -1)))
        xs = [f.x_um for f in in_row]
        steps = {round(abs(b - a), 6) for a, b in itertools.pairwise(xs)}
        assert steps == {round(FOV[0], 6)}  # no overlap, no gap
    # consecutive fields are always neighbours: the stage never jumps a row
    for a, b in itertools.pairwise(fields):
        assert abs(a.row - b.row) + abs(a.col - b.col) == 1
    # row 0 is at the largest y; the grid is centred on the cartridge centre
    assert fields[0].y_um > fields[-1].y_um
    assert sum(f.x_um for f in fields) / len(fields) == pytest.approx(lay.center_x_um)
    assert sum(f.y_um for f in fields) / len(fields) == pytest.approx(lay.center_y_um)
    assert fields[0].y_um - fields[35].y_um == pytest.approx(FOV[1])


def test_sequence_positions_channels_and_z() -> None:
    cfg = sim_instrument()
    plan = ScanPlan.build(get_layout("test-3x4"), cfg, z_of=lambda x, y: 0.001 * x)
    assert plan.fov_width_um == pytest.approx(FOV[0])
    seq = plan.to_sequence(plan.fields[2:5])
    events = list(seq)
    assert len(events) == 3 * 4
    # every channel at a field before the stage moves on
    assert [e.index["p"] for e in events] == [0] * 4 + [1] * 4 + [2] * 4
    assert [e.channel.config for e in events[:4]] == ["DAPI", "FITC", "PE", "APC"]
    assert [e.exposure for e in events[:4]] == [c.exposure_ms for c in cfg.channels]
    for e in events:
        f = plan.fields[2 + e.index["p"]]
        assert (e.x_pos, e.y_pos, e.pos_name) == (f.x_um, f.y_um, f.name)
        assert e.z_pos == pytest.approx(0.001 * f.x_um)


def test_first_n_fields_and_stage_limits() -> None:
    cfg = sim_instrument()
    plan = ScanPlan.build(get_layout("cellsearch-5x35"), cfg, n_fields=7)
    assert [f.name for f in plan.fields] == [f"field_{i:03d}" for i in range(7)]
    with pytest.raises(ConfigError, match="at least 1"):
        ScanPlan.build(get_layout("test-3x4"), cfg, n_fields=0)
    narrow = cfg.model_copy(
        update={
            "stage_limits": StageLimits(
                x_min=-1000, x_max=1000, y_min=-1000, y_max=1000
            )
        }
    )
    with pytest.raises(ConfigError, match="outside the stage limits"):
        ScanPlan.build(get_layout("cellsearch-5x35"), narrow)


def test_unknown_layout_lists_known_ones() -> None:
    with pytest.raises(UnknownLayoutError) as e:
        get_layout("cellsearch-9x99")
    for name in LAYOUTS:
        assert name in str(e.value)
    assert isinstance(e.value, ValueError)


def test_layout_from_yaml_file(tmp_path) -> None:
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nrows: 2\ncols: 3\n")
    assert get_layout(str(p)).n_fields == 6
    p.write_text("name: mine\nrows: 0\ncols: 3\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: rows"):
        get_layout(str(p))


def test_shipped_assay_file_states_the_defaults() -> None:
    from controller.config import AssayConfig
    from hardware_configs import CONFIG_DIR

    shipped = AssayConfig.from_file(CONFIG_DIR / "assay-cellsearch.yaml")
    assert shipped == AssayConfig()
    assert shipped.cutoff == 5 and shipped.channel_for("leukocyte") == "APC"


def test_assay_threshold_errors_name_file_and_field(tmp_path) -> None:
    from controller.config import AssayConfig

    p = tmp_path / "assay.yaml"
    p.write_text("detection:\n  min_nucleus_inside: 1.5\n")
    with pytest.raises(
        ConfigError, match=r"assay\.yaml: detection\.min_nucleus_inside"
    ):
        AssayConfig.from_file(p)
    p.write_text("detection:\n  nucleus_sn: 5\n")
    with pytest.raises(ConfigError, match=r"detection\.nucleus_sn: Extra inputs"):
        AssayConfig.from_file(p)

"""What a stored field file holds: its OME metadata, checked against the OME
schema, and the instrument YAML keys it comes from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.config import InstrumentConfig, load_yaml
from controller.errors import ConfigError
from hardware_configs import CONFIG_DIR
from tests.conftest import SIM_YAML

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

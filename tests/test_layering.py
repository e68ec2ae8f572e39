"""The dependency rules of docs/architecture.md, checked by import-linter.

The contracts live in pyproject.toml: controller's layers (exhaustive: every
module of controller/ is in a layer), analysis pure, controller never importing
simulators, simulators using only the config layer, no import cycle between
siblings anywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))


def test_every_import_contract_is_kept(in_root: None) -> None:
    assert lint_imports(config_filename="pyproject.toml", no_cache=True) == 0


def test_a_layer_importing_upwards_breaks_the_contract(tmp_path: Path) -> None:
    """The contracts can fail: a copy of the tree whose ledger module reaches
    up into the runs layer is refused."""
    for pkg in ("controller", "analysis", "simulators", "hardware_configs"):
        shutil.copytree(
            ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    ledger = tmp_path / "controller" / "runstore" / "ledger.py"
    ledger.write_text(ledger.read_text() + "\nfrom controller.runs import scan\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--no-cache",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "controller.runstore.ledger -> controller.runs.scan" in proc.stdout

"""The dependency rules of docs/architecture.md, checked on the import statements."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def test_analysis_imports_neither_controller_nor_simulators() -> None:
    for path in (ROOT / "analysis").rglob("*.py"):
        assert not _imports(path) & {"controller", "simulators"}, path


def test_only_the_instrument_module_reaches_the_simulator() -> None:
    users = sorted(
        p.name
        for p in (ROOT / "controller").rglob("*.py")
        if "simulators" in _imports(p)
    )
    assert users == ["instrument.py"]


def test_simulators_use_only_config_types_of_the_controller() -> None:
    allowed = {"controller.config", "controller.layouts"}
    for path in (ROOT / "simulators").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "controller"
            ):
                assert node.module in allowed, (path, node.module)

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from analysis.fieldio import read_field_file
from analysis.pipeline import FieldJob
from controller.cli import app
from controller.config import InstrumentConfig, load_yaml
from controller.layouts import get_layout
from controller.runs.scan import Scan, ScanRequest, ScanResult
from hardware_configs import CONFIG_DIR

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

SIM_YAML = CONFIG_DIR / "simulated.yaml"
DEMO_YAML = CONFIG_DIR / "demo-adapters.yaml"


def sim_instrument(
    *, focus: dict[str, Any] | None = None, **world: Any
) -> InstrumentConfig:
    """The shipped simulated instrument, with focus settings and WorldConfig
    overrides."""
    data = load_yaml(SIM_YAML)
    data["simulation"]["world"] = {**data["simulation"].get("world", {}), **world}
    data["focus"] = {**data.get("focus", {}), **(focus or {})}
    return InstrumentConfig.from_dict(data, base_dir=CONFIG_DIR)


def run_scan(
    out: Path,
    *,
    instrument: InstrumentConfig | None = None,
    layout: str = "test-3x4",
    **kw: Any,
) -> ScanResult:
    scan_kw = {k: kw.pop(k) for k in ("run_job", "detector_workers") if k in kw}
    scan_kw.setdefault("detector_workers", 0)  # in-thread: no process start-up
    req = ScanRequest(
        instrument=instrument or sim_instrument(),
        layout=get_layout(layout),
        out=out,
        instrument_file=str(SIM_YAML),
        **kw,
    )
    return Scan(req, **scan_kw).run()


def read_field(path: Path) -> tuple[Any, list[str], float | None]:
    """Pixels, channel names and pixel size of a stored field file."""
    ff = read_field_file(path)
    return ff.data, ff.channel_names, ff.pixel_size_um


def read_back_only(job: FieldJob) -> dict[str, Any]:
    """A detection job that reads the stored field back and finds nothing.

    For scans on the C++ demo adapters: the demo camera's pattern holds no
    cells, and detecting on it takes minutes a field while asserting nothing.
    Module level, so a detector worker process can run it too."""
    data, names, _px = read_field(Path(job.path))
    assert data.ndim == 3 and names == ["DAPI", "FITC", "PE", "APC"], names
    return {"field": job.name, "counts": {}, "objects": []}


@pytest.fixture(scope="session")
def small_scan(tmp_path_factory: pytest.TempPathFactory) -> ScanResult:
    """One complete scan of the 12-field test layout, shared by read-only tests."""
    return run_scan(tmp_path_factory.mktemp("scan") / "cart-A", seed=3)


def invoke(*args: str) -> Any:
    """Run the ctcscan CLI in-process; it must never end in a traceback."""
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output + (result.stderr or "")
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), result.exception
    return result


def one_line_error(result: Any, *needles: str) -> str:
    """Assert a bad-input exit: code 2, one 'error:' message holding `needles`."""
    assert result.exit_code == 2, result.output
    text = result.stderr.strip()
    assert text.startswith("error:")
    flat = " ".join(text.split())
    for n in needles:
        assert n in flat, flat
    return flat


@pytest.fixture
def browser(tmp_path: Path) -> Any:
    """Headless Chromium driven by Selenium (tests using it skip without it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM or ""
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-sync",
        "--disable-background-networking",
        "--disable-component-update",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--allow-file-access-from-files",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()

"""The command line, through typer's CliRunner: the happy path and every bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hardware_configs import CONFIG_DIR
from tests.conftest import SIM_YAML, invoke, one_line_error


def test_scan_shows_progress_summary_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "cart-7"
    args = ["scan", "--out", str(out), "--layout", "test-3x4", "--seed", "7"]
    r = invoke(*args, "--fields", "3")
    assert r.exit_code == 0, r.output
    assert "3/3" in r.stderr and "ETA" in r.stderr  # progress bar with ETA
    assert "complete" in r.stdout and "cart-7" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert "Partial scan: 3 of 12 fields" in report["statement"]
    assert len(list((out / "fields").glob("*.ome.tif"))) == 3
    scan = json.loads((out / "scan.json").read_text())
    assert scan["request"]["seed"] == 7 and scan["request"]["cartridge_id"] == "cart-7"
    r = invoke(*args, "--fields", "4")
    assert r.exit_code == 0
    assert "already stored" in r.stdout
    records = [
        json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()
    ]
    stored = [r for r in records if r["event"] == "stored"]
    assert len(stored) == 4  # only the new field was acquired


def test_layouts_are_listed() -> None:
    r = invoke("layouts")
    assert r.exit_code == 0 and "cellsearch-5x35" in r.stdout and "175" in r.stdout


def test_missing_instrument_yaml(tmp_path: Path) -> None:
    r = invoke(
        "scan",
        "--out",
        str(tmp_path / "x"),
        "--instrument",
        str(tmp_path / "nope.yaml"),
    )
    one_line_error(r, "nope.yaml", "not found")


def test_invalid_yaml_syntax(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    one_line_error(
        invoke("scan", "--out", str(tmp_path / "x"), "--instrument", str(bad)),
        "bad.yaml",
    )


def test_invalid_field_names_file_and_field(tmp_path: Path) -> None:
    text = (
        (CONFIG_DIR / "simulated.yaml")
        .read_text()
        .replace("exposure_ms: 100", "exposure_ms: -5")
    )
    bad = tmp_path / "neg.yaml"
    bad.write_text(text)
    shutil.copy(CONFIG_DIR / "simulated.cfg", tmp_path)
    one_line_error(
        invoke("scan", "--out", str(tmp_path / "x"), "--instrument", str(bad)),
        "neg.yaml",
        "channels.2.exposure_ms",
    )


def test_invalid_assay(tmp_path: Path) -> None:
    bad = tmp_path / "assay.yaml"
    bad.write_text("indication: metastatic-lung\n")
    one_line_error(
        invoke("scan", "--out", str(tmp_path / "x"), "--assay", str(bad)),
        "assay.yaml",
        "metastatic-lung",
        "metastatic-breast",
    )


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_an_empty_assay_file_is_refused(tmp_path: Path, text: str) -> None:
    # an empty file (a copy that failed) had silently meant the default assay
    empty = tmp_path / "assay.yaml"
    empty.write_text(text)
    one_line_error(
        invoke("scan", "--out", str(tmp_path / "x"), "--assay", str(empty)),
        "assay.yaml",
        "the file is empty",
    )
    assert not (tmp_path / "x").exists()


def test_an_assay_of_comments_alone_is_every_default(tmp_path: Path) -> None:
    from controller.config import AssayConfig

    commented = tmp_path / "assay.yaml"
    commented.write_text("# every default\n")
    assert AssayConfig.from_file(commented) == AssayConfig()


def _tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def test_scan_and_queue_never_take_over_someone_s_folder(tmp_path: Path) -> None:
    # a scan had overwritten a user's events.csv, report.html and field file,
    # removed their .write-probe and appended to their audit.log
    theirs = tmp_path / "theirs"
    (theirs / "fields").mkdir(parents=True)
    for name in ("events.csv", "report.html", "fields/field_000.ome.tif", "audit.log"):
        (theirs / name).write_text("mine\n")
    (theirs / ".write-probe").write_text("keep\n")
    before = _tree(theirs)
    scan = ("scan", "--layout", "test-3x4", "--fields", "1", "--out")
    one_line_error(invoke(*scan, str(theirs)), "did not write", "events.csv")
    queue = ("queue", "--layout", "test-3x4", "--fields", "1", "--slots", "1")
    one_line_error(invoke(*queue, "--out", str(theirs)), "did not write")
    assert _tree(theirs) == before  # not a byte written, nothing removed
    # a run folder is no queue folder, nor the other way round
    run = tmp_path / "run"
    assert invoke(*scan, str(run)).exit_code == 0
    one_line_error(invoke(*queue, "--out", str(run)), "is a run folder")
    q = tmp_path / "q"
    assert invoke(*queue, "--out", str(q)).exit_code == 0
    one_line_error(invoke(*scan, str(q)), "is a queue folder")
    # what a refused start, or one killed at any moment, leaves (a lock, its
    # note's temporary, the probe, an audit log, empty folders) is ours
    left = tmp_path / "left"
    (left / "fields").mkdir(parents=True)
    for name in ("audit.log", ".owner.json.tmp", ".write-probe", "scan.json.tmp"):
        (left / name).write_text("")
    assert invoke(*scan, str(left)).exit_code == 0


@pytest.mark.parametrize(
    ("slots", "why"),
    [("{1: ../evil}", "barcode '../evil'"), ("{0: A1}", "numbered from 1")],
)
def test_an_emulated_magazine_the_loader_could_not_hold_is_refused(
    tmp_path: Path, slots: str, why: str
) -> None:
    # a barcode outside the loader's protocol had ended in a traceback
    text = SIM_YAML.read_text()
    text = re.sub(r"(?m)^  slots: .*$", f"  slots: {slots}", text)
    text = text.replace(
        "micromanager_config: simulated.cfg",
        f"micromanager_config: {SIM_YAML.parent / 'simulated.cfg'}",
    )
    inst = tmp_path / "inst.yaml"
    inst.write_text(text)
    q = tmp_path / "q"
    args = ("queue", "--out", str(q), "--instrument", str(inst), "--fields", "1")
    one_line_error(invoke(*args), "inst.yaml", why)
    assert not q.exists()


def test_no_scan_starts_without_its_audit_trail(tmp_path: Path) -> None:
    # an audit log that could not be written had left the run unaudited
    run = tmp_path / "run"
    scan = ("scan", "--layout", "test-3x4", "--out", str(run))
    assert invoke(*scan, "--fields", "1").exit_code == 0
    (run / "audit.log").unlink()
    (run / "audit.log").mkdir()
    one_line_error(invoke(*scan, "--fields", "2"), "audit log", "not writable")
    assert len(list((run / "fields").iterdir())) == 1  # nothing acquired


@pytest.mark.parametrize(
    ("option", "value", "why"),
    [
        ("--seed", "-1", "--seed must be 0 or more"),  # had named simulated.cfg
        ("--cartridge-id", "a\nb", "1 to 64 printable"),
        ("--cartridge-id", "x" * 65, "1 to 64 printable"),
    ],
)
def test_a_seed_or_cartridge_id_no_scan_can_take_is_refused(
    tmp_path: Path, option: str, value: str, why: str
) -> None:
    out = tmp_path / "x"
    one_line_error(invoke("scan", "--out", str(out), option, value), why)
    assert not out.exists()  # no lock, no folders left behind


def test_unknown_layout_lists_known(tmp_path: Path) -> None:
    one_line_error(
        invoke("scan", "--out", str(tmp_path / "x"), "--layout", "5x99"),
        "unknown layout '5x99'",
        "cellsearch-5x35",
        "test-3x4",
    )


def test_devices_that_fail_to_load_are_all_named(tmp_path: Path) -> None:
    cfg = (CONFIG_DIR / "demo-adapters.cfg").read_text()
    cfg = cfg.replace("Device,Camera,DemoCamera,DCam", "Device,Camera,NoSuchLib,Cam9")
    cfg = cfg.replace("Device,Focus,DemoCamera,DStage", "Device,Focus,DemoCamera,DWarp")
    (tmp_path / "broken.cfg").write_text(cfg)
    yaml = (
        (CONFIG_DIR / "demo-adapters.yaml")
        .read_text()
        .replace("demo-adapters.cfg", "broken.cfg")
    )
    (tmp_path / "broken.yaml").write_text(yaml)
    flat = one_line_error(
        invoke(
            "scan",
            "--out",
            str(tmp_path / "x"),
            "--instrument",
            str(tmp_path / "broken.yaml"),
            "--fields",
            "1",
        ),
        "devices failed to load",
        "Camera",
        "NoSuchLib",
        "Focus",
        "DWarp",
    )
    assert "XYStage" not in flat  # only the failing ones


def test_missing_channel_preset(tmp_path: Path) -> None:
    yaml = (
        (CONFIG_DIR / "simulated.yaml")
        .read_text()
        .replace("preset: APC", "preset: Cy5")
    )
    (tmp_path / "sim.yaml").write_text(yaml)
    shutil.copy(CONFIG_DIR / "simulated.cfg", tmp_path)
    one_line_error(
        invoke(
            "scan",
            "--out",
            str(tmp_path / "x"),
            "--instrument",
            str(tmp_path / "sim.yaml"),
            "--fields",
            "1",
        ),
        "Cy5",
        "Channel",
    )


def test_output_folder_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("not a folder")
    one_line_error(invoke("scan", "--out", str(blocker / "run")), "not writable")


def test_not_enough_disk_is_refused_before_anything_moves(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    field_bytes = 4 * 1384 * 1036 * 2
    cols = 400
    rows = min(200, free // (field_bytes * cols) + 2)
    if rows * cols * field_bytes <= free:
        pytest.skip("this disk is too large to fill with the largest layout")
    huge = tmp_path / "huge.yaml"
    huge.write_text(f"name: huge\nrows: {rows}\ncols: {cols}\n")
    unlimited = tmp_path / "sim.yaml"  # a stage that can reach the huge layout
    unlimited.write_text(
        "\n".join(
            line
            for line in (CONFIG_DIR / "simulated.yaml").read_text().splitlines()
            if not line.startswith("stage_limits")
        )
    )
    shutil.copy(CONFIG_DIR / "simulated.cfg", tmp_path)
    out = tmp_path / "run"
    one_line_error(
        invoke(
            "scan",
            "--out",
            str(out),
            "--layout",
            str(huge),
            "--instrument",
            str(unlimited),
        ),
        "not enough free disk",
        "GB",
    )
    # nothing was planned, no instrument was opened, nothing was written
    assert not (out / "ledger.jsonl").exists() and not (out / "scan.json").exists()
    assert not any((out / "fields").iterdir())


def test_seed_on_real_hardware_is_refused(tmp_path: Path) -> None:
    one_line_error(
        invoke(
            "scan",
            "--out",
            str(tmp_path / "x"),
            "--instrument",
            str(CONFIG_DIR / "demo-adapters.yaml"),
            "--seed",
            "3",
        ),
        "--seed",
    )


@pytest.mark.parametrize("option", ["--instrument", "--assay", "--layout"])
def test_a_yaml_file_that_is_not_utf8_is_one_line(tmp_path: Path, option: str) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    one_line_error(
        invoke("scan", "--out", str(tmp_path / "run"), option, str(bad)),
        "latin1.yaml",
        "not UTF-8",
    )


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (
            "detection: {min_ctc_diameter_um: 100, max_ctc_diameter_um: 1}",
            ["min_ctc_diameter_um (100) must be below max_ctc_diameter_um (1)"],
        ),
        ("detection: {ck_snr: 1.0e-300}", ["detection.ck_snr", "1"]),
        ("detection: {nucleus_snr: .inf}", ["detection.nucleus_snr", "finite"]),
        (
            "indications: [{name: metastatic-breast, cutoff: 1000000000000000000000}]",
            ["indications.0.cutoff", "10000"],
        ),
        ("blood_volume_ml: .nan", ["blood_volume_ml", "finite"]),
    ],
)
def test_a_contradictory_or_absurd_assay_is_refused_by_field(
    tmp_path: Path, text: str, needles: list[str]
) -> None:
    bad = tmp_path / "assay.yaml"
    bad.write_text(text + "\n")
    one_line_error(
        invoke("scan", "--out", str(tmp_path / "x"), "--assay", str(bad)),
        "assay.yaml",
        *needles,
    )
    assert not (tmp_path / "x").exists()  # refused before anything is written


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1"])
def test_an_absurd_pixel_size_is_refused(tmp_path: Path, value: str) -> None:
    (tmp_path / "in").mkdir()
    one_line_error(
        invoke("analyze", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
               "--pixel-size", value),
        "--pixel-size",
    )  # fmt: skip


def test_ctrl_c_while_the_command_line_loads_is_one_line() -> None:
    # the modules take a second or more to load: Ctrl-C then (here raised by
    # the import itself) ends as it does later, one line and status 130
    code = (
        "import builtins\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name == 'controller.cli':\n"
        "        raise KeyboardInterrupt\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        "from controller.__main__ import main\n"
        "main()\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 130, r.stderr
    assert r.stderr == "error: interrupted\n"

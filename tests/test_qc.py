"""Per-field image quality figures (`analysis.qc.channel_qc`), and the ones a
field's record carries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from analysis.pipeline import FieldJob, analyze_field_file
from analysis.qc import channel_qc
from tests.test_analyze import _write
from tests.test_detect import Canvas

NAMES = ["DAPI", "FITC", "PE", "APC"]


def _field(seed: int = 0) -> np.ndarray:
    """Four 256 x 256 planes: background 300 + 20 * k, noise sigma 20, and in
    the last channel 100 saturated pixels (4095)."""
    rng = np.random.default_rng(seed)
    planes = [300 + 20 * k + rng.normal(0, 20, (256, 256)) for k in range(4)]
    f = np.clip(np.round(np.stack(planes)), 0, 4095).astype(np.uint16)
    f[3, 100, 50:150] = 4095
    return f


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_background_noise_and_saturation_are_estimated_from_the_pixels(
    dtype: type,
) -> None:
    f = _field().astype(dtype)
    qc = channel_qc(f, NAMES, saturation=4095)
    for k, name in enumerate(NAMES):
        assert qc[name]["background"] == pytest.approx(300 + 20 * k, abs=1)
        assert qc[name]["noise"] == pytest.approx(20, rel=0.05)
    assert qc["APC"]["saturated_fraction"] == 100 / 256**2
    assert qc["APC"]["max"] == 4095
    assert qc["DAPI"]["saturated_fraction"] == 0


def test_given_background_and_noise_are_reported_and_saturation_still_counted() -> None:
    f = _field()
    bg = {n: 1000.0 + k for k, n in enumerate(NAMES)}
    noise = {n: 2.34567 + k for k, n in enumerate(NAMES)}
    qc = channel_qc(f, NAMES, saturation=4095, background=bg, noise=noise)
    assert {n: q["background"] for n, q in qc.items()} == bg
    assert {n: q["noise"] for n, q in qc.items()} == {
        n: round(v, 3) for n, v in noise.items()
    }
    assert qc["APC"]["saturated_fraction"] == 100 / 256**2
    # one of the two alone is not enough: both are estimated
    assert channel_qc(f, NAMES, saturation=4095, background=bg)["DAPI"][
        "background"
    ] == pytest.approx(300, abs=1)


def test_a_record_s_qc_holds_the_background_and_noise_its_detection_used(
    tmp_path: Path,
) -> None:
    cv = Canvas(size=256, seed=3)
    cv.cell(80, 90)
    cv.leukocyte(180, 170)
    path = tmp_path / "f.ome.tif"
    _write(path, cv.field(), NAMES, 0.64)
    rec = analyze_field_file(
        FieldJob(path=str(path), name="f", out_dir=str(tmp_path / "out"))
    )
    assert rec["counts"]["CTC"] == 1
    for name in NAMES:
        assert rec["qc"][name]["background"] == rec["background"][name]
        assert rec["qc"][name]["noise"] == round(rec["noise"][name], 3)
        assert rec["qc"][name]["saturated_fraction"] == 0

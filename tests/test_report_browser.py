"""report.html in a real browser (headless Chromium driven by Selenium).

Skipped, with the reason, where no Chromium and chromedriver are installed;
.ci/run installs Debian's chromium and chromium-driver.
"""

from __future__ import annotations

import json

import pytest

from controller.runs.scan import ScanResult
from tests.conftest import CHROMIUM, DRIVER

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver"
)


def test_report_page_shows_count_statement_and_gallery(
    small_scan: ScanResult, browser
) -> None:
    run = small_scan.run_dir
    report = json.loads((run / "report.json").read_text())
    browser.get((run / "report.html").as_uri())
    count = browser.find_element("id", "count").text
    assert f"CTC count: {report['ctc_count']}" in count
    assert browser.find_element("id", "statement").text == report["statement"]
    figures = browser.find_elements("css selector", "#gallery figure")
    assert len(figures) == report["ctc_count"] > 0
    scores = [float(f.get_attribute("data-score")) for f in figures]
    assert scores == sorted(scores, reverse=True)
    # every candidate image was found and decoded by the browser
    sizes = browser.execute_script(
        "return Array.from(document.querySelectorAll('#gallery img'))"
        ".map(i => [i.complete, i.naturalWidth, i.naturalHeight]);"
    )
    assert sizes and all(ok and w > 100 and h > 50 for ok, w, h in sizes)
    rows = browser.find_elements("css selector", "#counts tr")
    shown = {
        r.find_elements("tag name", "td")[0].text: int(
            r.find_elements("tag name", "td")[1].text
        )
        for r in rows[1:]
    }
    assert shown == report["counts"]


def test_report_page_draws_the_focus_map(small_scan: ScanResult, browser) -> None:
    run = small_scan.run_dir
    focus = json.loads((run / "report.json").read_text())["focus"]
    fmap = json.loads((run / "focus_map.json").read_text())
    browser.get((run / "report.html").as_uri())
    summary = browser.find_element("id", "focus-summary").text
    assert fmap["fit"]["model"] in summary and "Time on focus" in summary
    for panel in ("focus-z_um", "focus-sharpness"):
        rects = browser.find_elements("css selector", f"#{panel} svg rect.field")
        assert len(rects) == len(focus["fields"]) == small_scan.planned
        circles = browser.find_elements("css selector", f"#{panel} svg circle.anchor")
        assert len(circles) == len(fmap["anchors"])
        # drawn at a real size, inside the picture
        box = browser.execute_script(
            f"const s = document.querySelector('#{panel} svg').getBoundingClientRect();"
            "return [s.width, s.height];"
        )
        assert box[0] > 300 and box[1] > 50
    shown = {
        r.get_attribute("data-field"): r.get_attribute("data-value")
        for r in browser.find_elements("css selector", "#focus-z_um svg rect.field")
    }
    for f in focus["fields"]:
        assert shown[f["name"]] == f"{f['z_um']:.2f} um"

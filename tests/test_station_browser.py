"""The station's pages in a real browser (headless Chromium, Selenium) against
a real server on loopback: a reader reviews with the keyboard; the live page,
the cartridge picture and the overview show what the run folder holds, with
every string from the files shown as text.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from controller.records import Finished, Started, dump_line
from controller.runs.scan import ScanResult
from controller.runstore.chain import append_sealed
from controller.runstore.review import REVIEW_FILE, read_lines
from controller.station.server import running_station
from tests.conftest import CHROMIUM, DRIVER

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver"
)

EVIL = "<img src=x onerror=\"document.title='pwned'\">"


def wait(driver: Any, cond: Any, timeout: float = 20) -> Any:
    """`cond` once it holds, asked every 50 ms (Selenium's default is 0.5 s,
    paid on every keypress of the review)."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: cond(d))


def left(driver: Any) -> int:
    from selenium.webdriver.common.by import By

    t = driver.find_element(By.ID, "left").text  # "· 3 left"
    return int(t.split()[1])


@pytest.fixture
def root(tmp_path: Path, small_scan: ScanResult) -> Path:
    """A root with a copy of the small scan, whose cartridge id would run
    script if it were ever put into a page as markup."""
    run = tmp_path / "root" / "cart-A"
    shutil.copytree(small_scan.run_dir, run)
    for rec in (Started(cartridge_id=EVIL, planned=12), Finished()):
        append_sealed(run / "ledger.jsonl", dump_line(rec).rstrip())
    return tmp_path / "root"


def test_a_reader_reviews_every_candidate_with_the_keyboard(
    root: Path, browser: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    run = root / "cart-A"
    with running_station(root) as url:
        browser.get(f"{url}/runs/cart-A/review")
        browser.find_element(By.ID, "reviewer").send_keys("ann", Keys.ENTER)
        wait(browser, lambda d: d.find_element(By.ID, "candidate").is_displayed())
        n = left(browser)
        assert n >= 2
        first = browser.find_element(By.ID, "position").text
        # the tiles are pictures that loaded, the plots mark this candidate
        imgs = browser.find_elements(By.CSS_SELECTOR, "#tiles img")
        assert len(imgs) == 5
        wait(
            browser,
            lambda d: all(
                d.execute_script("return arguments[0].naturalWidth", i) > 0
                for i in imgs
            ),
        )
        assert len(browser.find_elements(By.CSS_SELECTOR, "#plots .me")) == 2
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("y")
        wait(browser, lambda d: left(d) == n - 1)
        assert browser.find_element(By.ID, "position").text != first
        body.send_keys(Keys.ARROW_LEFT)
        wait(browser, lambda d: d.find_element(By.ID, "position").text == first)
        body.send_keys("n")  # changes the first decision: still n - 1 left
        wait(browser, lambda d: d.find_element(By.ID, "position").text != first)
        assert left(browser) == n - 1
        for k in range(n - 1):
            body.send_keys("u" if k == 0 else "y")
            wait(browser, lambda d, k=k: left(d) == n - 2 - k)
        wait(
            browser,
            lambda d: f"{n} / {n}" in d.find_element(By.ID, "progress-table").text,
        )
    lines, _, _ = read_lines(run / REVIEW_FILE)
    assert [x.reviewer for x in lines] == ["ann"] * (n + 1)
    latest = {x.object_id: x.decision for x in lines}
    assert len(latest) == n
    assert sorted(latest.values()).count("not_ctc") == 1
    assert list(latest.values()).count("unsure") == 1


def test_live_cartridge_and_overview_pages_show_the_run(
    root: Path, small_scan: ScanResult, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    with running_station(root) as url:
        browser.get(f"{url}/")
        row = wait(
            browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
        )[0]
        assert EVIL in row.text  # shown as text
        assert browser.title != "pwned"
        assert not browser.find_elements(By.CSS_SELECTOR, "#runs img")

        browser.get(f"{url}/runs/{quote('cart-A')}")
        wait(browser, lambda d: d.find_element(By.ID, "state").text == "finished")
        assert "12 of 12 fields stored" in browser.find_element(By.ID, "fields").text
        last = browser.find_element(By.ID, "last")
        wait(
            browser,
            lambda d: d.execute_script("return arguments[0].naturalWidth", last) > 0,
        )
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#focus-picture svg"))
        assert browser.find_element(By.ID, "cartridge").text == EVIL
        assert browser.title != "pwned"

        browser.get(f"{url}/runs/cart-A/cartridge")
        marks = wait(
            browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#marks circle")
        )
        n_ctc = small_scan.report.ctc_count if small_scan.report else 0
        assert len([m for m in marks if "CTC" in m.get_attribute("class")]) == n_ctc
        target = marks[0].get_attribute("data-object")
        browser.execute_script(
            "arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))",
            marks[0],
        )
        wait(browser, lambda d: "/review#" in d.current_url)
        assert d_hash(browser) == target


def d_hash(driver: Any) -> str:
    from urllib.parse import unquote

    return unquote(driver.current_url.split("#", 1)[1])

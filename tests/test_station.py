"""The bench station (`ctcscan serve`): a real uvicorn server on loopback over
real run folders, asked over HTTP.

The session's scan of the 12-field test layout (`small_scan`) is shared; tests
that write (decisions, sign-offs) work on a copy of it without its field files,
except where pictures or a resumed scan need them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from analysis.report import read_report
from analysis.review import review_flag
from analysis.settings import DetectionSettings
from controller.records import Finished, QueueStarted, Started, dump_line
from controller.runs.scan import ScanResult
from controller.runs.verify import verify_folder
from controller.runstore.chain import append_sealed
from controller.runstore.review import REVIEW_FILE, cohen_kappa, read_lines
from controller.station.app import Tokens
from controller.station.server import running_station
from tests.conftest import invoke, one_line_error, run_scan

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def copy_run(src: Path, dst: Path, *, fields: bool = False) -> Path:
    """A copy of a run folder (its field files only if asked)."""
    ignore = None if fields else shutil.ignore_patterns("fields")
    shutil.copytree(src, dst, ignore=ignore)
    return dst


@pytest.fixture(scope="module")
def scanned(small_scan: ScanResult) -> ScanResult:
    """The session's scan of the 12-field layout (read only: tests copy it)."""
    return small_scan


@pytest.fixture
def root(tmp_path: Path, scanned: ScanResult) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    copy_run(scanned.run_dir, r / "cart-S")
    return r


@pytest.fixture
def station(root: Path):
    with running_station(root) as url:
        yield url


def problems(run: Path) -> list[str]:
    """`ctcscan verify`'s problems, but for the field files a copy left out."""
    return [p for p in verify_folder(run).problems if not p.startswith("fields/")]


def get(url: str, **kw: Any) -> requests.Response:
    return requests.get(url, timeout=20, **kw)


def post(url: str, body: Any, **kw: Any) -> requests.Response:
    return requests.post(url, json=body, timeout=20, **kw)


def decide(station: str, run: str, who: str, oid: str, what: str, **kw: Any):
    return post(
        f"{station}/api/runs/{quote(run, safe='')}/decisions",
        {"reviewer": who, "object_id": oid, "decision": what, **kw},
    )


# ------------------------------------------------------------ review flag


def test_the_review_flag_marks_objects_failing_exactly_one_rule_narrowly() -> None:
    st = DetectionSettings()  # 4 um, inside 0.5, CD45 10, margin 0.2
    ctc = {
        "label": "CTC",
        "reason": "meets the CTC definition",
        "nucleus_inside": 0.9,
        "diameter_um": 10.0,
        "cd45_snr": 1.0,
        "solidity": 0.95,
        "axis_ratio": 0.8,
        "cluster_size": 1,
    }
    assert review_flag(ctc, st) == ""  # a CTC call is a candidate anyway
    other = {**ctc, "label": "OTHER"}
    assert review_flag({**other, "nucleus_inside": 0.45}, st) == "nucleus_inside"
    assert review_flag({**other, "nucleus_inside": 0.30}, st) == ""  # not narrow
    small = {**ctc, "label": "CK_FRAGMENT", "diameter_um": 3.6}
    assert review_flag(small, st) == "size"
    assert review_flag({**small, "diameter_um": 2.0}, st) == ""
    dp = {**ctc, "label": "DOUBLE_POSITIVE", "reason": "CD45 positive"}
    assert review_flag({**dp, "cd45_snr": 11.0}, st) == "cd45"
    assert review_flag({**dp, "cd45_snr": 30.0}, st) == ""
    # double positive by a rule without a margin (CD45 all around the nucleus,
    # band CD45 low): it fails that rule outright, so a narrow miss of another
    # rule does not make it borderline
    ringed = {**dp, "reason": "CD45 all around the nucleus (a leukocyte's)"}
    assert review_flag({**ringed, "cd45_snr": 3.0, "nucleus_inside": 0.45}, st) == ""
    assert review_flag({**ringed, "cd45_snr": 3.0}, st) == ""
    # the weak membrane all around the cell: 6 or 7 of 8 sectors are narrow
    membrane = {**dp, "reason": "CD45 on the membrane all around the cell"}
    assert review_flag({**membrane, "cd45_membrane_cover": 0.75}, st) == "cd45"
    assert review_flag({**membrane, "cd45_membrane_cover": 0.875}, st) == "cd45"
    assert review_flag({**membrane, "cd45_membrane_cover": 1.0}, st) == ""
    # failing the weak-membrane rule outright is a second rule failed
    lit = {"cd45_membrane_cover": 1.0}
    assert review_flag({**other, "nucleus_inside": 0.45, **lit}, st) == ""
    assert review_flag({**small, **lit}, st) == ""
    assert review_flag({**dp, "cd45_snr": 11.0, **lit}, st) == ""
    assert review_flag({**dp, "cd45_snr": 11.0, "cd45_membrane_cover": 0.75}, st) == (
        "cd45"
    )
    assert review_flag({**other, "solidity": 0.75}, st) == "shape"
    # two rules failed: the machine is clearly right
    two = {**other, "nucleus_inside": 0.45, "diameter_um": 3.6}
    assert review_flag(two, st) == ""
    # no nucleus, debris, cut by the edge: never
    assert review_flag({**small, "reason": "no nucleus"}, st) == ""
    assert review_flag({**other, "label": "DEBRIS", "nucleus_inside": 0.45}, st) == ""
    cut = {**other, "nucleus_inside": 0.45, "reason": "nucleus cut by the top edge"}
    assert review_flag(cut, st) == ""
    assert review_flag(small, st.model_copy(update={"review_margin": 0.05})) == ""


def test_events_csv_names_each_object_and_its_review_flag(
    scanned: ScanResult,
) -> None:
    import csv

    rows = list(csv.DictReader((scanned.run_dir / "events.csv").open()))
    assert rows and {"object_id", "review"} <= set(rows[0])
    ids = [r["object_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith(r["field"] + "-") for i, r in zip(ids, rows, strict=True))
    assert {r["review"] for r in rows} <= {
        "",
        "nucleus_inside",
        "size",
        "cd45",
        "shape",
    }


def test_cohen_kappa_matches_the_textbook_value() -> None:
    a = ["ctc", "ctc", "not_ctc", "not_ctc"]
    b = ["ctc", "not_ctc", "not_ctc", "not_ctc"]
    assert cohen_kappa(a, b) == pytest.approx(0.5)  # po .75, pe .5
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert cohen_kappa(["ctc"] * 3, ["ctc"] * 3) is None  # chance agreement total


# ------------------------------------------------------------ API


def test_the_api_lists_runs_with_their_status(station: str, root: Path) -> None:
    runs = get(f"{station}/api/runs").json()
    assert [r["run"] for r in runs] == ["cart-S"]
    report = read_report(root / "cart-S" / "report.json")
    r = get(f"{station}/api/runs/cart-S").json()
    assert r["state"] == "finished"
    assert r["fields"] == {
        "planned": 12,
        "stored": 12,
        "failed": 0,
        "detected": 12,
        "detect_failed": 0,
    }
    assert r["machine_count"] == report.ctc_count
    assert r["eta_s"] is None and r["reviewed_count"] is None
    cands = get(f"{station}/api/runs/cart-S/candidates").json()
    assert cands["machine_count"] == report.ctc_count
    ctc = [c for c in cands["candidates"] if c["label"] == "CTC"]
    assert len(ctc) == report.ctc_count >= 2
    c = ctc[0]
    assert set(c["tiles"]) == {"overlay", "DAPI", "FITC", "PE", "APC"}
    assert {"diameter_um", "nucleus_inside", "ck_snr", "cd45_snr"} <= set(c["features"])
    for page in ("/", "/runs/cart-S", "/runs/cart-S/review", "/runs/cart-S/cartridge"):
        resp = get(station + page)
        assert resp.status_code == 200 and "text/html" in resp.headers["content-type"]


def test_pictures_are_pngs_of_the_stored_pixels(
    tmp_path: Path, scanned: ScanResult
) -> None:
    root = tmp_path / "root"
    copy_run(scanned.run_dir, root / "cart-S", fields=True)
    with running_station(root) as url:
        base = f"{url}/api/runs/cart-S"
        cands = get(f"{base}/candidates").json()["candidates"]
        for path in (
            "/pictures/last.png",
            "/pictures/cartridge.png",
            *(u.removeprefix("/api/runs/cart-S") for u in cands[0]["tiles"].values()),
        ):
            r = get(base + path)
            assert r.status_code == 200, path
            assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
        from io import BytesIO

        from PIL import Image

        mosaic = get(f"{base}/cartridge").json()
        img = Image.open(BytesIO(get(f"{base}/pictures/cartridge.png").content))
        assert img.size == (mosaic["width"], mosaic["height"])
        assert len(mosaic["candidates"]) == len(cands)
        assert all(
            0 <= m["x"] <= mosaic["width"] and 0 <= m["y"] <= mosaic["height"]
            for m in mosaic["candidates"]
        )
        # a tile of something that is not a candidate's panel
        assert (
            get(f"{base}/tiles/{cands[0]['object_id']}/nothing.png").status_code == 404
        )
        assert get(f"{base}/tiles/field_000-9999/overlay.png").status_code == 404
        focus = get(f"{base}/pictures/focus.svg")
        assert focus.status_code == 200 and "<svg" in focus.text


def test_two_readers_blind_then_adjudication_then_a_signed_count(
    station: str, root: Path
) -> None:
    run = root / "cart-S"
    base = f"{station}/api/runs/cart-S"
    ids = [c["object_id"] for c in get(f"{base}/candidates").json()["candidates"]]
    n = len(ids)
    assert n >= 2
    # reader 1 calls all CTC; reader 2 all but the first two (not CTC, unsure)
    for oid in ids:
        assert decide(station, "cart-S", "ann", oid, "ctc").status_code == 201
    blind = get(f"{base}/candidates", params={"reviewer": "bob"}).json()
    assert all(
        c["decision"] is None and "readers" not in c for c in blind["candidates"]
    )
    review = get(f"{base}/review").json()
    assert review["state"] == "open" and review["disagreements"] == []
    assert review["progress"]["ann"] == {"role": "reader", "done": n, "total": n}
    assert '"ctc"' not in json.dumps(review)  # no decision leaks
    second = {ids[0]: "not_ctc", ids[1]: "unsure"}
    for oid in ids:
        r = decide(station, "cart-S", "bob", oid, second.get(oid, "ctc"))
        assert r.status_code == 201, r.text
    # a third person may not read; a reader may not change a final decision
    assert decide(station, "cart-S", "ann", ids[0], "not_ctc").status_code == 409
    review = get(f"{base}/review").json()
    assert review["state"] == "adjudication"
    assert review["disagreements"] == ids[:2] == review["pending"]
    assert review["kappa"] == cohen_kappa(
        ["ctc"] * n, [second.get(o, "ctc") for o in ids]
    )
    assert not review["ready_to_sign"]
    assert post(f"{base}/signoff", {"reviewer": "cy"}).status_code == 409
    assert decide(station, "cart-S", "cy", ids[2], "ctc").status_code == 409  # agreed
    r = decide(station, "cart-S", "cy", ids[0], "unsure")
    assert r.status_code == 422 and "decision" in r.text
    assert decide(station, "cart-S", "cy", ids[0], "not_ctc").status_code == 201
    assert decide(station, "cart-S", "cy", ids[1], "ctc").status_code == 201
    seen = get(f"{base}/candidates", params={"reviewer": "cy"}).json()["candidates"]
    assert seen[0]["readers"] == {"ann": "ctc", "bob": "not_ctc"}
    signed = post(f"{base}/signoff", {"reviewer": "cy"})
    assert signed.status_code == 201, signed.text
    expect = n - 1  # the agreed n - 2, and the adjudicated second
    assert signed.json()["reviewed_count"] == expect
    # locked
    assert decide(station, "cart-S", "ann", ids[0], "ctc").status_code == 409
    assert post(f"{base}/signoff", {"reviewer": "cy"}).status_code == 409
    assert get(base).json()["reviewed_count"] == expect
    # the report shows both counts, the readers, kappa and the sign-off
    rep = read_report(run / "report.json")
    assert rep.review is not None
    assert rep.review["reviewed_count"] == expect
    assert rep.review["machine_count"] == rep.ctc_count
    assert rep.review["readers"] == ["ann", "bob"] and rep.review["adjudicator"] == "cy"
    assert rep.review["signoff"]["sha256"] == signed.json()["sha256"]
    page = (run / "report.html").read_text()
    assert 'id="reviewed-count">' + str(expect) in page and "Cohen" in page
    # every decision is a line of review.jsonl and of the audit log
    lines, _, _ = read_lines(run / REVIEW_FILE)
    assert len(lines) == 2 * n + 2 + 1
    audit = (run / "audit.log").read_text()
    assert audit.count('"verb": "REVIEW"') == 2 * n + 2 and '"verb": "SIGN"' in audit
    assert problems(run) == []
    # a changed decision breaks the chain and the signature
    raw = (run / REVIEW_FILE).read_bytes().replace(b'"not_ctc"', b'"ctc"', 1)
    (run / REVIEW_FILE).write_bytes(raw)
    found = problems(run)
    assert any(REVIEW_FILE in p and "line" in p for p in found), found
    assert any("decisions differ from those signed" in p for p in found), found


def test_a_signed_result_survives_a_resumed_scan_and_a_reanalysis(
    tmp_path: Path, scanned: ScanResult
) -> None:
    root = tmp_path / "root"
    run = copy_run(scanned.run_dir, root / "cart-S", fields=True)
    with running_station(root) as url:
        base = f"{url}/api/runs/cart-S"
        ids = [c["object_id"] for c in get(f"{base}/candidates").json()["candidates"]]
        for who in ("ann", "bob"):
            for oid in ids:
                assert decide(url, "cart-S", who, oid, "not_ctc").status_code == 201
        assert post(f"{base}/signoff", {"reviewer": "ann"}).status_code == 201
    signed = {p: (run / p).read_bytes() for p in ("events.csv", "report.json")}
    assert read_report(run / "report.json").review["reviewed_count"] == 0
    # the scan again (every field already stored): the outputs stay as signed
    run_scan(run, seed=3, cartridge_id=scanned.cartridge_id)  # the folder's copy
    assert {p: (run / p).read_bytes() for p in signed} == signed
    # a re-analysis lands beside it
    result = invoke("analyze", str(run), "--workers", "0")
    assert result.exit_code == 0, result.output
    assert {p: (run / p).read_bytes() for p in signed} == signed
    assert list((run / "analyses").iterdir())
    assert verify_folder(run).ok


def test_two_readers_posting_at_once_lose_nothing(station: str, root: Path) -> None:
    base = f"{station}/api/runs/cart-S"
    ids = [c["object_id"] for c in get(f"{base}/candidates").json()["candidates"]]
    jobs = [(who, oid) for oid in ids for who in ("ann", "bob")]
    with ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(
                lambda j: decide(station, "cart-S", j[0], j[1], "ctc").status_code, jobs
            )
        )
    assert codes == [201] * len(jobs)
    lines, _, _ = read_lines(root / "cart-S" / REVIEW_FILE)
    assert len(lines) == len(jobs)
    assert sorted((x.reviewer, x.object_id) for x in lines) == sorted(jobs)
    review = get(f"{base}/review").json()
    assert review["state"] == "adjudication" and review["pending"] == []
    assert problems(root / "cart-S") == []  # the chain holds


def test_malformed_decisions_get_422_naming_the_field(station: str) -> None:
    base = f"{station}/api/runs/cart-S"
    oid = get(f"{base}/candidates").json()["candidates"][0]["object_id"]
    cases = {
        "reviewer": {"object_id": oid, "decision": "ctc"},
        "decision": {"reviewer": "ann", "object_id": oid, "decision": "yes"},
        "object_id": {
            "reviewer": "ann",
            "object_id": "field_000-9999",
            "decision": "ctc",
        },
        "extra": {"reviewer": "ann", "object_id": oid, "decision": "ctc", "x": 1},
        "comment": {
            "reviewer": "ann",
            "object_id": oid,
            "decision": "ctc",
            "comment": 5,
        },
    }
    for name, body in cases.items():
        r = post(f"{base}/decisions", body)
        assert r.status_code == 422, (name, r.text)
        assert name in r.text, (name, r.text)
    blank = post(
        f"{base}/decisions", {"reviewer": " \t", "object_id": oid, "decision": "ctc"}
    )
    assert blank.status_code == 422 and "reviewer" in blank.text
    # no JSON body: no form post from another site can decide anything
    form = requests.post(
        f"{base}/decisions",
        data={"reviewer": "ann", "object_id": oid, "decision": "ctc"},
        timeout=20,
    )
    assert form.status_code == 415
    cross = post(
        f"{base}/decisions",
        {"reviewer": "ann", "object_id": oid, "decision": "ctc"},
        headers={"Origin": "http://evil.example"},
    )
    assert cross.status_code == 403
    valid = {"reviewer": "ann", "object_id": oid, "decision": "ctc"}
    assert post(f"{station}/api/runs/nothing/decisions", valid).status_code == 404
    assert get(f"{base}/review").json()["progress"] == {}  # nothing was written


def test_nothing_outside_the_root_is_served(
    tmp_path: Path, scanned: ScanResult
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = copy_run(scanned.run_dir, tmp_path / "outside", fields=True)
    (root / "link").symlink_to(outside)
    inside = copy_run(scanned.run_dir, root / "cart-S", fields=True)
    secret = tmp_path / "secret.ome.tif"
    shutil.copy(inside / "fields" / "field_000.ome.tif", secret)
    (inside / "fields" / "field_000.ome.tif").unlink()
    (inside / "fields" / "field_000.ome.tif").symlink_to(secret)
    with running_station(root) as url:
        assert [r["run"] for r in get(f"{url}/api/runs").json()] == ["cart-S"]
        for path in (
            "/api/runs/link",
            "/api/runs/link/candidates",
            "/runs/link/review",
            "/api/runs/%2e%2e%2foutside",
            "/api/runs/..%2Foutside/candidates",
            "/api/runs/cart-S%2F..%2F..%2Foutside",
            "/api/runs/%2Ftmp",
            "/api/runs/cart-S%2Ffields",
        ):
            assert get(url + path).status_code == 404, path
        raw = subprocess.run(  # a path the client does not normalise
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--path-as-is",
                f"{url}/api/runs/../../outside",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert raw.stdout in ("404", ""), raw.stdout
        cands = get(f"{url}/api/runs/cart-S/candidates").json()["candidates"]
        on_linked = [c for c in cands if c["field"] == "field_000"]
        others = [c for c in cands if c["field"] != "field_000"]
        for c in on_linked:
            assert get(url + c["tiles"]["overlay"]).status_code == 404
        if others:
            assert get(url + others[0]["tiles"]["overlay"]).status_code == 200


def test_strings_from_files_and_people_are_escaped(
    tmp_path: Path, scanned: ScanResult
) -> None:
    root = tmp_path / "root"
    name = "<script>alert(1)<\\script>"
    run = copy_run(scanned.run_dir, root / name)
    ledger = run / "ledger.jsonl"
    for rec in (
        Started(cartridge_id="<script>alert(2)</script>", planned=12),
        Finished(),
    ):
        append_sealed(ledger, dump_line(rec).rstrip())
    with running_station(root) as url:
        q = quote(name, safe="")
        for page in ("review", "cartridge", ""):
            html = get(f"{url}/runs/{q}/{page}".rstrip("/")).text
            assert "<script>alert" not in html and "&lt;script&gt;alert(1)" in html
        status = get(f"{url}/api/runs/{q}").json()
        assert status["cartridge_id"] == "<script>alert(2)</script>"  # data, in JSON
        ids = [
            c["object_id"]
            for c in get(f"{url}/api/runs/{q}/candidates").json()["candidates"]
        ]
        for who in ("<b>ann</b>", "bob"):
            for oid in ids:
                r = decide(url, name, who, oid, "ctc", comment="<script>x</script>")
                assert r.status_code == 201, r.text
        assert (
            post(f"{url}/api/runs/{q}/signoff", {"reviewer": "<i>cy</i>"}).status_code
            == 201
        )
    report = (run / "report.html").read_text()
    assert "<b>ann</b>" not in report and "&lt;b&gt;ann&lt;/b&gt;" in report
    assert "<i>cy</i>" not in report and "&lt;i&gt;cy&lt;/i&gt;" in report
    audit = [json.loads(x) for x in (run / "audit.log").read_text().splitlines()]
    assert any(e.get("text", "").endswith("(<script>x</script>)") for e in audit)


def test_a_token_guards_every_request_off_loopback(tmp_path: Path, root: Path) -> None:
    token = "s3cret-token-0123456789"
    with running_station(root, host="127.0.0.2", token=token) as url:
        assert get(f"{url}/api/runs").status_code == 401
        assert get(f"{url}/").status_code == 401
        assert get(f"{url}/static/station.js").status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert get(f"{url}/api/runs", headers=bad).status_code == 401
        ok = {"Authorization": f"Bearer {token}"}
        assert get(f"{url}/api/runs", headers=ok).status_code == 200
        # a link with the token sets a cookie for the pages' own requests
        s = requests.Session()
        r = s.get(f"{url}/runs/cart-S?token={token}", timeout=20)
        assert r.status_code == 200 and r.url.endswith("/runs/cart-S")
        assert s.get(f"{url}/api/runs/cart-S", timeout=20).status_code == 200
        oid = s.get(f"{url}/api/runs/cart-S/candidates", timeout=20).json()[
            "candidates"
        ][0]["object_id"]
        body = {"reviewer": "ann", "object_id": oid, "decision": "ctc"}
        assert (
            requests.post(
                f"{url}/api/runs/cart-S/decisions", json=body, timeout=20
            ).status_code
            == 401
        )
        assert (
            s.post(
                f"{url}/api/runs/cart-S/decisions", json=body, timeout=20
            ).status_code
            == 201
        )
    with pytest.raises(ValueError, match="token"):
        running_station(root, host="0.0.0.0").__enter__()
    one_line_error(
        invoke("serve", "--root", str(root), "--host", "0.0.0.0"), "--token-file"
    )
    short = tmp_path / "short"
    short.write_text("abc\n")
    one_line_error(
        invoke("serve", "--root", str(root), "--token-file", str(short)), "16 or more"
    )
    one_line_error(invoke("serve", "--root", str(tmp_path / "none")), "no folder")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        one_line_error(
            invoke("serve", "--root", str(root), "--port", port), "cannot listen"
        )


def test_loopback_answers_only_loopback_host_names(station: str) -> None:
    assert (
        get(f"{station}/api/runs", headers={"Host": "evil.example"}).status_code == 400
    )


def test_the_stop_button_stops_a_queue_after_its_cartridge(
    station: str, root: Path
) -> None:
    queue = root / "q1"
    queue.mkdir()
    append_sealed(queue / "queue.jsonl", dump_line(QueueStarted()).rstrip())
    # a queue is running when another process owns its folder
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from controller.runstore.lock import FolderLock\n"
            f"lock = FolderLock({str(queue)!r}); lock.acquire()\n"
            "print('held', flush=True)\n"
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline() == "held\n"
        status = get(f"{station}/api/runs/q1").json()
        assert status["kind"] == "queue" and status["state"] == "running"
        assert not status["stop_requested"]
        assert post(f"{station}/api/runs/q1/stop", {}).status_code == 202
        assert (queue / "STOP").exists()
        assert get(f"{station}/api/runs/q1").json()["stop_requested"]
    finally:
        owner.kill()
        owner.wait()
    assert post(f"{station}/api/runs/q1/stop", {}).status_code == 409  # not running
    assert post(f"{station}/api/runs/cart-S/stop", {}).status_code == 409


def test_a_scan_in_another_process_appears_live(tmp_path: Path) -> None:
    """The live stream of a scan running in another process: every stored
    field arrives while the scan runs, in order, soon after its ledger line."""
    root = tmp_path / "root"
    root.mkdir()
    with running_station(root) as url:
        scan = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controller",
                "scan",
                "--out",
                str(root / "live"),
                "--layout",
                "test-3x4",
                "--fields",
                "6",
                "--seed",
                "5",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "COLUMNS": "120"},
        )
        try:
            deadline = time.monotonic() + 60
            while not (root / "live" / "ledger.jsonl").exists():
                assert scan.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            got: list[tuple[dict[str, Any], float]] = []
            states = set()
            with requests.get(
                f"{url}/api/runs/live/events", stream=True, timeout=60
            ) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                event = None
                for raw in r.iter_lines(decode_unicode=True):
                    if raw.startswith("event:"):
                        event = raw.split(":", 1)[1].strip()
                    elif raw.startswith("data:") and event:
                        data = json.loads(raw.split(":", 1)[1])
                        if event == "record":
                            got.append((data, time.time()))
                            if data["event"] in ("finished", "stopped"):
                                break
                        else:
                            states.add(data["state"])
        finally:
            rc = scan.wait(120)
        assert rc == 0, scan.stderr.read() if scan.stderr else ""
    stored = [d["field"] for d, _ in got if d["event"] == "stored"]
    assert stored == [f"field_{i:03d}" for i in range(6)]
    assert "scanning" in states
    lag = sorted(
        t - datetime.fromisoformat(d["t"]).timestamp()
        for d, t in got
        if d["event"] == "stored"
    )
    assert lag[len(lag) // 2] < 1.0, lag  # polled four times a second


# ------------------------------------------------------------ hostile input


def test_each_reviewer_with_their_own_token_acts_only_as_themselves(
    root: Path,
) -> None:
    tokens = Tokens.from_text(
        "# readers\nAnn Smith ann-token-0123456789\nbob  bob-token-0123456789ab\n"
    )
    with running_station(root, host="127.0.0.2", tokens=tokens) as url:
        base = f"{url}/api/runs/cart-S"
        ann = {"Authorization": "Bearer ann-token-0123456789"}
        bob = {"Authorization": "Bearer bob-token-0123456789ab"}
        cands = get(f"{base}/candidates", headers=ann).json()["candidates"]
        oid = cands[0]["object_id"]
        body = {"reviewer": "Ann Smith", "object_id": oid, "decision": "ctc"}
        assert post(f"{base}/decisions", body, headers=ann).status_code == 201
        # bob cannot decide as ann, nor read her decisions
        assert post(f"{base}/decisions", body, headers=bob).status_code == 403
        peek = get(f"{base}/candidates", params={"reviewer": "Ann Smith"}, headers=bob)
        assert peek.status_code == 403
        own = get(f"{base}/candidates", headers=bob).json()["candidates"]
        assert own[0]["decision"] is None
        mine = get(f"{base}/candidates", headers=ann).json()["candidates"]
        assert mine[0]["decision"] == "ctc"
        # the same name in another case or Unicode form is the same person
        again = {**body, "reviewer": "ANN  SMITH", "decision": "not_ctc"}
        assert post(f"{base}/decisions", again, headers=ann).status_code == 201
        review = get(f"{base}/review", headers=ann).json()
        assert review["readers"] == ["Ann Smith"]
        assert get(f"{url}/?token=%C3%A9").status_code == 401  # not a 500
    with pytest.raises(ValueError, match="16 or more"):
        Tokens.from_text("ann short\n")


def test_the_token_file_is_enforced_by_the_command(tmp_path: Path, root: Path) -> None:
    tok = tmp_path / "token"
    tok.write_text("abcdefghijklmnop1234\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controller",
            "serve",
            "--root",
            str(root),
            "--port",
            str(port),
            "--token-file",
            str(tok),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert serve.stdout is not None and "?token=" in serve.stdout.readline()
        url = f"http://127.0.0.1:{port}/api/runs"
        deadline = time.monotonic() + 30
        while True:
            try:
                r = get(url)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert r.status_code == 401
        ok = get(url, headers={"Authorization": "Bearer abcdefghijklmnop1234"})
        assert ok.status_code == 200
    finally:
        serve.terminate()
        serve.wait(10)


def test_damaged_review_files_stop_the_review_and_say_why(
    station: str, root: Path, tmp_path: Path
) -> None:
    run = root / "cart-S"
    base = f"{station}/api/runs/cart-S"
    oid = get(f"{base}/candidates").json()["candidates"][0]["object_id"]
    assert decide(station, "cart-S", "ann", oid, "ctc").status_code == 201
    # a line written by hand: no seal
    sha = get(f"{base}/review").json()["events_sha256"]
    forged = {
        "kind": "decision",
        "reviewer": "Q",
        "object_id": oid,
        "decision": "ctc",
        "events_sha256": sha,
    }
    with (run / REVIEW_FILE).open("a") as f:
        f.write(json.dumps(forged) + "\n")
    review = get(f"{base}/review").json()
    assert review["readers"] == ["ann"] and "not sealed" in review["problems"][0]
    r = decide(station, "cart-S", "bob", oid, "ctc")
    assert r.status_code == 409 and "not sealed" in r.text
    assert post(f"{base}/signoff", {"reviewer": "ann"}).status_code == 409
    # review.jsonl a symlink out of the run: never written through
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched\n")
    (run / REVIEW_FILE).unlink()
    (run / REVIEW_FILE).symlink_to(victim)
    assert decide(station, "cart-S", "ann", oid, "ctc").status_code == 409
    assert victim.read_text() == "untouched\n"
    (run / REVIEW_FILE).unlink()
    # an unreadable events.csv: that run says so, the overview still lists all
    good = copy_run(run, root / "cart-T")
    (run / "events.csv").write_text(
        'object_id,field,label\n"' + "x" * 200_000 + '",f,CTC\n'
    )
    r = get(f"{base}/candidates")
    assert r.status_code == 409 and "events.csv" in r.text
    assert post(f"{base}/signoff", {"reviewer": "ann"}).status_code == 409
    (run / "events.csv").unlink()
    os.mkfifo(run / "events.csv")  # would block whoever opened it
    rows = requests.get(f"{station}/api/runs", timeout=10).json()
    assert {r["run"] for r in rows} == {"cart-S", good.name}
    r = requests.get(f"{base}/candidates", timeout=10)
    assert r.status_code == 409 and "regular file" in r.text


def test_a_signed_review_stays_signed_when_its_events_change(
    station: str, root: Path
) -> None:
    run = root / "cart-S"
    base = f"{station}/api/runs/cart-S"
    ids = [c["object_id"] for c in get(f"{base}/candidates").json()["candidates"]]
    for who in ("ann", "bob"):
        for oid in ids:
            assert decide(station, "cart-S", who, oid, "ctc").status_code == 201
    assert post(f"{base}/signoff", {"reviewer": "ann"}).status_code == 201
    with (run / "events.csv").open("a") as f:
        f.write("\n")
    review = get(f"{base}/review").json()
    assert review["state"] == "signed"
    assert "changed since the review was signed" in review["problems"][0]
    assert decide(station, "cart-S", "cy", ids[0], "ctc").status_code == 409
    assert post(f"{base}/signoff", {"reviewer": "cy"}).status_code == 409
    assert any("events.csv" in p for p in problems(run))


def test_a_run_without_candidates_is_signed_whole(station: str, root: Path) -> None:
    run = root / "cart-S"
    lines = (run / "events.csv").read_text().splitlines(keepends=True)
    head = lines[0].split(",")
    label, review = head.index("label"), head.index("review")
    keep = [
        ln
        for ln in lines[1:]
        if ln.split(",")[label] != "CTC" and not ln.split(",")[review]
    ]
    (run / "events.csv").write_text(lines[0] + "".join(keep))
    base = f"{station}/api/runs/cart-S"
    assert get(f"{base}/review").json()["ready_to_sign"]
    r = post(f"{base}/signoff", {"reviewer": "ann"})
    assert r.status_code == 201, r.text
    assert r.json()["reviewed_count"] == 0
    assert 'id="reviewed-count">0' in (run / "report.html").read_text()
    assert [p for p in problems(run) if "events.csv" not in p] == []


def test_oversized_or_odd_bodies_are_refused_without_echo(station: str) -> None:
    base = f"{station}/api/runs/cart-S"
    oid = get(f"{base}/candidates").json()["candidates"][0]["object_id"]
    big = {
        "reviewer": "ann",
        "object_id": oid,
        "decision": "ctc",
        "comment": "x" * 100_000,
    }
    assert post(f"{base}/decisions", big).status_code == 413
    for odd in ("\u202eevil", "a\x00b"):
        r = post(
            f"{base}/decisions",
            {"reviewer": "ann", "object_id": oid, "decision": "ctc", "comment": odd},
        )
        assert r.status_code == 422 and "comment" in r.text
    r = requests.post(
        f"{base}/decisions",
        data=b'{"reviewer": "ann", "object_id": "x", "decision": "ctc", '
        b'"comment": "\\ud800"}',
        headers={"Content-Type": "application/json"},
        timeout=20,
    )
    assert r.status_code == 422
    r = post(
        f"{base}/decisions",
        {"reviewer": "ann", "object_id": oid, "decision": "y" * 1000},
    )
    assert r.status_code == 422 and "y" * 100 not in r.text
    assert get(f"{base}/review").json()["progress"] == {}

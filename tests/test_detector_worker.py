"""The on-line detector's worker processes: what they import at start-up."""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from analysis.pipeline import FieldJob, analyze_field_file
from controller.runs.detector import (
    _needs_main,
    _spawn_context,
    _WorkerContext,
)


@pytest.fixture
def main_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The process's ``__main__`` is a script that leaves a file when it runs
    (as the ``ctcscan`` script or a benchmark is, when the scanning process
    starts from one); returns that file's path."""
    ran = tmp_path / "main-ran"
    script = tmp_path / "main_script.py"
    script.write_text(
        f"from pathlib import Path\nPath({str(ran)!r}).write_text('ran')\n"
    )
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "__spec__", None)
    monkeypatch.setattr(main, "__file__", str(script), raising=False)
    return ran


def _start_one(context: Any) -> int:
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(os.getpid).result(timeout=60)


def test_a_plain_spawned_process_runs_the_parents_main_script(
    main_script: Path,
) -> None:
    # what the workers avoid: spawn re-runs the main script in every child
    assert _start_one(multiprocessing.get_context("spawn")) != os.getpid()
    assert main_script.read_text() == "ran"


def test_a_detection_worker_starts_without_the_parents_main_script(
    main_script: Path,
) -> None:
    main = sys.modules["__main__"]
    before = (main.__spec__, main.__file__)
    assert _start_one(_WorkerContext()) != os.getpid()
    assert not main_script.exists()
    assert (main.__spec__, main.__file__) == before  # put back after the start


def _in_main(job: FieldJob) -> dict[str, Any]:
    return {}


def test_a_job_defined_in_the_main_script_keeps_it_in_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    main = sys.modules["__main__"]
    monkeypatch.setattr(_in_main, "__module__", "__main__")
    monkeypatch.setattr(main, "_in_main", _in_main, raising=False)
    assert _needs_main(_in_main)
    assert not _needs_main(analyze_field_file)
    for run_job, lean in ((analyze_field_file, True), (_in_main, False)):
        assert isinstance(_spawn_context(run_job), _WorkerContext) is lean

"""Supervised threads: the first thread of a run to die stops the run.

A run has several threads (acquisition, storage, detection dispatch, the
watchdog). An exception that ends any of them is recorded here (the first one
wins), every stop hook runs (cancel the acquisition), and the run's main thread,
waiting in `Supervisor.join`, raises it: a run whose storage or detection died
can never end "complete".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Supervisor"]

logger = logging.getLogger("ctcscan.supervise")


class Supervisor:
    """The threads of one run and the first error among them."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.failed = threading.Event()
        self._hooks: list[Callable[[BaseException], None]] = []
        self._lock = threading.Lock()

    def add_stop_hook(self, fn: Callable[[BaseException], None]) -> None:
        """`fn(error)` runs once, on the failing thread, when a thread fails."""
        self._hooks.append(fn)

    def fail(self, error: BaseException, where: str = "") -> None:
        """Record `error` (the first one wins) and run the stop hooks."""
        with self._lock:
            if self.error is not None:
                logger.warning(
                    "also failed after the run stopped (%s): %s", where, error
                )
                return
            self.error = error
        logger.error("%s failed: %s", where or "a run thread", error)
        self.failed.set()
        for fn in self._hooks:
            try:
                fn(error)
            except Exception:  # stopping must go on
                logger.exception("stop hook failed")

    def spawn(self, name: str, target: Callable[[], None]) -> threading.Thread:
        """Start `target` on a daemon thread whose death stops the run."""

        def run() -> None:
            try:
                target()
            except BaseException as e:  # whatever ends the thread ends the run
                self.fail(e, name)

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        return thread

    def join(
        self, thread: threading.Thread, *, abandon: Callable[[], bool] = lambda: False
    ) -> None:
        """Wait for `thread`; stop waiting when `abandon()` turns true (a call
        that hung: the thread can never be joined). Signal handlers run
        between the waits."""
        while thread.is_alive():
            thread.join(timeout=0.1)
            if abandon():
                return

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

"""The one watchdog of a run: a hardware call that does not return stops it.

Every hardware call of a run goes through its `Hardware` facade, which marks
the call in progress (`Hardware.busy`). The watchdog polls that marker on its
own supervised thread; a call older than ``watchdog_s`` (plus the longest
exposure) fails the run with `HardwareHangError`. The call itself cannot be
interrupted, so the run's main thread stops waiting for it, records the stop,
and the process leaves without touching the device (exit code 3).
"""

from __future__ import annotations

import threading
import time

from controller.errors import HardwareHangError
from controller.hardware.facade import Hardware
from controller.supervise import Supervisor

__all__ = ["Watchdog"]


class Watchdog:
    """Watches `hw.busy` from a thread of `supervisor`.

    Parameters
    ----------
    hw : Hardware
        The run's hardware facade.
    limit_s : float
        How long a call may take (the config's ``watchdog_s``).
    allowance_s : float
        Added to the limit: the longest exposure a call may legitimately wait.
    """

    def __init__(
        self,
        hw: Hardware,
        supervisor: Supervisor,
        *,
        limit_s: float,
        allowance_s: float = 0.0,
        poll_s: float = 0.1,
    ) -> None:
        self.hw = hw
        self.supervisor = supervisor
        self.limit_s = limit_s
        self.allowance_s = allowance_s
        self.poll_s = poll_s
        #: a call hung: the device must not be touched again by this process
        self.hung = threading.Event()
        self.error: HardwareHangError | None = None
        self._stop = threading.Event()
        self._thread = supervisor.spawn("ctcscan-watchdog", self._run)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            busy = self.hw.busy
            if busy is None:
                continue
            waited = time.monotonic() - busy.since
            if waited <= self.limit_s + self.allowance_s:
                continue
            self.error = HardwareHangError(
                f"{busy.what} has not returned after {waited:.0f} s "
                f"(watchdog {self.limit_s:g} s): check the instrument, then "
                "run the same command again to resume"
            )
            self.hung.set()
            # the hang is the run's error even when another came first: the
            # instrument must be left alone, whatever else went wrong
            self.supervisor.fail(self.error, "watchdog")
            return

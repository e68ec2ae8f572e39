"""`Hardware`: the one way a run talks to its devices.

Every call the engine and the focus code make goes through `Hardware.call`:

* it is **marked** (`busy`: what, since when) for the run's one watchdog, which
  stops the run when a call does not return;
* it is **retried** under one policy (`RetryPolicy`: moves and settings
  ``move_retries`` times, snaps ``snap_retries`` times, a short growing pause
  before each retry), and a call still failing raises `HardwareError` naming
  what failed and how often it was tried;
* failures and recoveries are **reported** as `DeviceEvent` records to the
  run's record sink (ledger, audit log, viewers);
* settings are **validated**: a channel preset is read back after it is
  applied, a frame is passed to the caller's check (black, saturated, stale)
  inside the retry, so a bad frame is taken again like a failed snap.

The core is held weakly, like pymmcore-plus's engine does: the C++ core must be
destroyable as soon as the instrument is closed (see `Instrument.close`).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

from controller.errors import AcquisitionError
from controller.events import RecordSink
from controller.records import DeviceEvent

__all__ = [
    "Busy",
    "FrameCheck",
    "Hardware",
    "HardwareError",
    "RetryPolicy",
    "needs_manual_shutter",
]

T = TypeVar("T")

#: a frame check raises (any Exception) for a frame that cannot be right
FrameCheck = Callable[[np.ndarray], None]


class HardwareError(AcquisitionError):
    """A hardware call still failed after its retries."""

    def __init__(self, what: str, cause: BaseException | None, attempts: int) -> None:
        self.what = what
        self.attempts = attempts
        self.cause = cause
        self.reason = short(cause) if cause else "?"
        super().__init__(f"{what} failed: {self.reason}")


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failing call is tried again, and how long to pause first."""

    move_retries: int = 2
    snap_retries: int = 2
    backoff_s: float = 0.25

    def retries(self, kind: Literal["move", "snap"]) -> int:
        return self.snap_retries if kind == "snap" else self.move_retries


@dataclass(frozen=True)
class Busy:
    """A hardware call in progress."""

    since: float  # time.monotonic()
    what: str


def short(e: BaseException) -> str:
    """`Type: first line` of an exception, for one-line reports."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def needs_manual_shutter(core: Any) -> bool:
    """Whether snaps must open the shutter themselves.

    A Python camera under `UniMMCore` skips Micro-Manager's auto-shutter.
    """
    from pymmcore_plus.experimental.unicore import UniMMCore

    cam = core.getCameraDevice()
    return bool(
        isinstance(core, UniMMCore)
        and cam
        and core.isPyDevice(cam)
        and core.getShutterDevice()
        and core.getAutoShutter()
    )


class Hardware:
    """Marked, retried, reported and validated device calls on one core.

    Parameters
    ----------
    core : CMMCorePlus
        The opened core (held weakly).
    policy : RetryPolicy
        Retries of moves, settings and snaps.
    sink : RecordSink, optional
        Receives a `DeviceEvent` for every failed call and every recovery.
    channel_group : str
        The config group of the channel presets.
    """

    def __init__(
        self,
        core: Any,
        policy: RetryPolicy | None = None,
        *,
        sink: RecordSink | None = None,
        channel_group: str = "Channel",
    ) -> None:
        self._core_ref = weakref.ref(core)
        self.policy = policy or RetryPolicy()
        self.sink = sink
        self.channel_group = channel_group
        self.manual_shutter = needs_manual_shutter(core)
        #: the call in progress (read by the watchdog on another thread)
        self.busy: Busy | None = None
        self.snaps = 0

    @property
    def core(self) -> Any:
        core = self._core_ref()
        if core is None:
            raise AcquisitionError("the instrument is closed")
        return core

    # ------------------------------------------------------------------ the one path

    @contextlib.contextmanager
    def mark(self, what: str) -> Iterator[None]:
        """Mark a call in progress for the watchdog (calls do not nest)."""
        self.busy = Busy(time.monotonic(), what)
        try:
            yield
        finally:
            self.busy = None

    def call(
        self,
        what: str,
        action: Callable[[], T],
        *,
        kind: Literal["move", "snap"] = "move",
    ) -> T:
        """Run `action` marked, retried under the policy, failures reported.

        Raises
        ------
        HardwareError
            Still failing after the policy's retries.
        """
        retries = self.policy.retries(kind)
        last: BaseException | None = None
        for attempt in range(retries + 1):
            if attempt:  # give a device that just failed a moment to settle
                time.sleep(self.policy.backoff_s * attempt)
            try:
                with self.mark(what):
                    out = action()
            except Exception as e:  # device errors come as RuntimeError or others
                last = e
                self._report(what, short(e), recovered=False)
                continue
            if attempt:
                self._report(what, f"recovered on try {attempt + 1}", recovered=True)
            return out
        raise HardwareError(what, last, retries + 1)

    def _report(self, what: str, message: str, *, recovered: bool) -> None:
        if self.sink is not None:
            self.sink.emit(DeviceEvent(what=what, message=message, recovered=recovered))

    # ------------------------------------------------------------------ devices

    def move_xy(self, x: float, y: float, *, where: str = "") -> tuple[float, float]:
        """Move the XY stage and wait; returns the position read back."""
        core = self.core

        def act() -> tuple[float, float]:
            core.setXYPosition(x, y)
            core.waitForDevice(core.getXYStageDevice())
            px, py = core.getXYPosition()
            return float(px), float(py)

        return self.call(_at("XY move", where), act)

    def move_z(self, z: float, *, where: str = "") -> float:
        """Move the focus drive and wait; returns the z read back."""
        core = self.core

        def act() -> float:
            core.setZPosition(z)
            core.waitForDevice(core.getFocusDevice())
            return float(core.getZPosition())

        return self.call(_at("focus move", where), act)

    def read_xy(self) -> tuple[float, float]:
        """The XY stage's position."""
        core = self.core

        def act() -> tuple[float, float]:
            x, y = core.getXYPosition()
            return float(x), float(y)

        return self.call("XY position", act)

    def read_z(self) -> float:
        """The focus drive's position."""
        core = self.core
        return self.call("focus position", lambda: float(core.getZPosition()))

    def set_channel(self, preset: str, *, where: str = "") -> None:
        """Apply a channel preset and check the devices report it."""
        core, group = self.core, self.channel_group

        def act() -> None:
            core.setConfig(group, preset)
            core.waitForConfig(group, preset)
            now = core.getCurrentConfig(group)
            if now != preset:
                raise RuntimeError(
                    f"channel devices report {now or 'no preset'!r}, not {preset!r}"
                )

        self.call(_at(f"channel {preset}", where), act)

    def set_exposure(self, ms: float, *, where: str = "") -> None:
        core = self.core
        self.call(_at(f"exposure {ms:g} ms", where), lambda: core.setExposure(ms))

    def snap(self, *, where: str = "", check: FrameCheck | None = None) -> np.ndarray:
        """One frame (shutter opened around it when the camera needs that);
        `check` rejects a bad frame, which is then taken again."""
        core = self.core

        def act() -> np.ndarray:
            self.snaps += 1
            if self.manual_shutter:
                core.setShutterOpen(True)
            try:
                core.snapImage()
            finally:
                if self.manual_shutter:
                    core.setShutterOpen(False)
            img = np.asarray(core.getImage())
            if check is not None:
                check(img)
            return img

        return self.call(_at("snap", where), act, kind="snap")

    def set_roi(
        self, x: int, y: int, width: int, height: int, *, where: str = ""
    ) -> None:
        """Read out only this region of the camera (pixels, Micro-Manager's
        x, y, width, height); checked by reading the frame size back."""
        core = self.core

        def act() -> None:
            core.setROI(x, y, width, height)
            got = (core.getImageWidth(), core.getImageHeight())
            if got != (width, height):
                raise RuntimeError(f"camera frame is {got[0]} x {got[1]} after setROI")

        self.call(_at(f"camera ROI {width} x {height}", where), act)

    def clear_roi(self, full: tuple[int, int], *, where: str = "") -> None:
        """Back to the camera's full frame, `full` (width, height), checked."""
        core = self.core

        def act() -> None:
            core.clearROI()
            got = (core.getImageWidth(), core.getImageHeight())
            if got != full:
                raise RuntimeError(
                    f"camera frame is {got[0]} x {got[1]} after clearROI, "
                    f"not {full[0]} x {full[1]}"
                )

        self.call(_at("camera full frame", where), act)

    def dark_frame(self) -> np.ndarray:
        """One frame with the shutter closed (auto-shutter off for it)."""
        core = self.core

        def act() -> np.ndarray:
            auto = core.getAutoShutter()
            try:
                core.setAutoShutter(False)
                if core.getShutterDevice():
                    core.setShutterOpen(False)
                core.snapImage()
                return np.asarray(core.getImage())
            finally:
                core.setAutoShutter(auto)

        return self.call("dark frame", act, kind="snap")

    def full_focus(self, *, where: str = "") -> float:
        """The autofocus device's full focus (not retried here: the focus
        code decides between retrying and falling back); returns z."""
        core = self.core

        def act() -> float:
            core.fullFocus()
            core.waitForDevice(core.getFocusDevice())
            return float(core.getZPosition())

        with self.mark(_at("hardware autofocus", where)):
            return act()


def _at(what: str, where: str) -> str:
    return f"{what} at {where}" if where else what

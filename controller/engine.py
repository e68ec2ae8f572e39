"""`ScanEngine`: pymmcore-plus's MDA engine with explicit failures.

Differences from `MDAEngine`, each for a measured reason:

* the stage moves once per field, not before every channel
  (``force_set_xy_position=False``), and its position is read back once per field
  and put into every frame's metadata (``ctcscan_stage``);
* a failed move, channel change or snap is retried a bounded number of times and
  then reported through `on_failure` and skipped: it never yields a frame late or
  in the wrong slot, and the field's remaining events are skipped without touching
  the hardware;
* a Python camera under `UniMMCore` skips auto-shutter, so the shutter is opened
  and closed around each snap explicitly;
* the channel device's state is read back after each change (the channel
  group's current preset must be the requested one), and every frame is
  checked before it is used: a black frame (no brighter than the camera's dark
  frame), a saturated one (most pixels at full scale) or a stale one (identical
  to the previous frame) counts as a failed snap and is taken again;
* device errors and recoveries are reported through `on_event` (the audit log);
* with a `FocusQC`, the first frame of each field (the focus channel) is judged
  for sharpness; a poor field is re-focused locally, its first frame re-taken at
  the new z, and its other channels taken there too. Every frame carries the
  field's focus record in its metadata (``ctcscan_focus``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import useq
from pymmcore_plus import CMMCorePlus
from pymmcore_plus.mda import MDAEngine
from pymmcore_plus.mda._engine import ImagePayload
from pymmcore_plus.mda._runner import SkipEvent

from controller.focus import FieldFocus, FocusQC
from controller.instrument import HardwareCalls, needs_manual_shutter, snap

if TYPE_CHECKING:
    from pymmcore_plus.mda._protocol import PImagePayload

__all__ = ["EventHook", "FailureHook", "FocusHook", "FrameError", "ScanEngine"]

#: pause before the n-th retry of a hardware setting: n times this
RETRY_BACKOFF_S = 0.25
#: a frame with more than this fraction of pixels at full scale is a bad frame
SATURATED_FRACTION = 0.5


class FrameError(RuntimeError):
    """A frame that came back but cannot be right (black, saturated, stale)."""


logger = logging.getLogger("ctcscan.engine")

#: on_failure(event, reason, attempts): a field could not be acquired.
FailureHook = Callable[[useq.MDAEvent, str, int], None]
#: on_event(kind, message): a device error or a recovery, for the audit log.
EventHook = Callable[[str, str], None]
#: on_focus(event, record): a field's focus QC is done.
FocusHook = Callable[[useq.MDAEvent, FieldFocus], None]


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _noise(a: np.ndarray) -> float:
    """Pixel noise of `a` from neighbour differences (robust to edges)."""
    d = np.diff(a.astype(np.float32), axis=1)
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2))


def _where(event: useq.MDAEvent) -> str:
    channel = event.channel.config if event.channel else ""
    return f"{event.pos_name or 'field'} {channel}".strip()


class ScanEngine(MDAEngine):
    """MDA engine for cartridge scans.

    Parameters
    ----------
    mmc : CMMCorePlus
        The core (a `UniMMCore` for simulated or mixed instruments).
    snap_retries, move_retries : int
        Extra attempts after a failed snap / hardware setting, before the field is
        reported failed.
    on_failure : FailureHook, optional
        Called once per failed field with the event, the reason and the attempts.
    focus_qc : FocusQC, optional
        Judges (and re-focuses) each field on its focus-channel frame.
    on_focus : FocusHook, optional
        Called once per field judged by `focus_qc`.
    on_event : EventHook, optional
        Called with ``("DEVICE-ERROR", message)`` on every failed hardware call
        or bad frame and ``("RECOVERED", message)`` when a retry succeeds.
    check_frames : bool
        Check every frame for black, saturated and stale (default on).
    saturation : float, optional
        The camera's full-scale value (default: from the core's bit depth).
    """

    def __init__(
        self,
        mmc: CMMCorePlus,
        *,
        snap_retries: int = 2,
        move_retries: int = 2,
        on_failure: FailureHook | None = None,
        focus_qc: FocusQC | None = None,
        on_focus: FocusHook | None = None,
        on_event: EventHook | None = None,
        check_frames: bool = True,
        saturation: float | None = None,
    ) -> None:
        super().__init__(
            mmc,
            use_hardware_sequencing=False,
            force_set_xy_position=False,
            restore_initial_state=False,
        )
        self.snap_retries = snap_retries
        self.move_retries = move_retries
        self.on_failure = on_failure
        self.focus_qc = focus_qc
        self.on_focus = on_focus
        self.on_event = on_event
        self.check_frames = check_frames
        self._dark: tuple[float, float] | None = None  # median, noise of a dark frame
        #: the hardware call in progress, for the scan's watchdog
        self.calls = HardwareCalls()
        self._saturation = saturation
        self._full_scale = saturation or 0.0
        self._last: np.ndarray | None = None
        self._z_override: dict[int, float] = {}
        self._focus: tuple[int, dict[str, Any]] | None = None
        self._failed_p: set[int] = set()
        self._xy: tuple[float, float] | None = None
        self._z: float | None = None
        self._channel: tuple[str, str] | None = None
        self._exposure: float | None = None
        self._stage: dict[str, float] = {}
        self._manual_shutter = False

    # ------------------------------------------------------------------ hooks

    def setup_sequence(self, sequence: useq.MDASequence) -> Any:
        self._failed_p.clear()
        self._z_override.clear()
        self._focus = None
        self._xy = self._z = self._channel = self._exposure = None
        self._manual_shutter = needs_manual_shutter(self.mmcore)
        self._last = None
        out = super().setup_sequence(sequence)
        if self.check_frames:
            self._measure_dark()
        return out

    def setup_single_event(self, event: useq.MDAEvent) -> None:
        p = event.index.get("p", 0)
        if p in self._failed_p:
            raise SkipEvent(reason="field already failed")
        core = self.mmcore
        if event.x_pos is not None and event.y_pos is not None:
            xy = (event.x_pos, event.y_pos)
            if xy != self._xy:
                self._attempt(event, "XY move", lambda: self._move_xy(*xy))
                self._xy = xy
                x, y = core.getXYPosition()
                self._stage.update(x_um=x, y_um=y)
        z_target = self._z_override.get(p, event.z_pos)
        if z_target is not None and z_target != self._z:
            z = z_target
            self._attempt(event, "focus move", lambda: self._move_z(z))
            self._z = z
            self._stage["z_um"] = core.getZPosition()
        if (ch := event.channel) is not None and (ch.group, ch.config) != self._channel:
            self._attempt(
                event,
                f"channel {ch.config}",
                lambda: self._set_channel(ch.group, ch.config),
            )
            self._channel = (ch.group, ch.config)
        if event.exposure is not None and event.exposure != self._exposure:
            exp = event.exposure
            self._attempt(event, "exposure", lambda: core.setExposure(exp))
            self._exposure = exp

    def exec_single_event(self, event: useq.MDAEvent) -> Iterator[PImagePayload | None]:
        core = self.mmcore
        last: BaseException | None = None
        img = None
        for attempt in range(self.snap_retries + 1):
            try:
                with self.calls.mark(f"snap at {_where(event)}"):
                    img = snap(core, self._manual_shutter)
                if self.check_frames:
                    self._check_frame(img)
                if attempt:
                    self._event(
                        "RECOVERED", f"snap at {_where(event)}, try {attempt + 1}"
                    )
                break
            except Exception as e:  # any device error: retry, then report
                last, img = e, None
                logger.warning("snap failed at %s: %s", event.index, _short(e))
                self._event("DEVICE-ERROR", f"snap at {_where(event)}: {_short(e)}")
        if img is None:
            self._fail(
                event,
                f"snap failed: {_short(last) if last else '?'}",
                self.snap_retries + 1,
            )
            return
        self._last = img
        qc = self.focus_qc
        p = event.index.get("p", 0)
        if (
            qc is not None
            and event.channel is not None
            and event.channel.config == qc.preset
        ):
            img = self._check_focus(event, p, img)
        t0 = event.metadata.get("runner_t0") or time.perf_counter()
        meta = self.get_frame_metadata(
            event,
            runner_time_ms=(time.perf_counter() - t0) * 1000,
            camera_device=core.getCameraDevice(),
            include_position=False,
        )
        meta["ctcscan_stage"] = dict(self._stage)  # type: ignore[typeddict-unknown-key]
        if self._focus is not None and self._focus[0] == p:
            meta["ctcscan_focus"] = dict(self._focus[1])  # type: ignore[typeddict-unknown-key]
        yield ImagePayload(img, event, meta)  # type: ignore[misc]

    def teardown_event(self, event: useq.MDAEvent) -> None:
        """Nothing to restore per event; shutter is handled around each snap."""

    # ------------------------------------------------------------------ helpers

    def _check_focus(self, event: useq.MDAEvent, p: int, img: Any) -> Any:
        """Focus QC of this field's first frame; later channels follow its z."""
        core = self.mmcore
        planned = self._z if self._z is not None else float(core.getZPosition())
        img, info = self.focus_qc.check(img, planned)  # type: ignore[union-attr]
        if info.z_um != planned:  # the re-focused frame is kept: so is its z
            self._z_override[p] = info.z_um
            self._stage["z_um"] = core.getZPosition()
        if info.search_snaps:
            # the drive moved during the search: command the field's z again
            # before the next channel, whatever the search left it at
            self._z = None
        self._focus = (p, info.as_dict())
        if self.on_focus is not None:
            self.on_focus(event, info)
        return img

    def _move_xy(self, x: float, y: float) -> None:
        core = self.mmcore
        core.setXYPosition(x, y)
        core.waitForDevice(core.getXYStageDevice())

    def _set_channel(self, group: str, preset: str) -> None:
        """Apply a channel preset and check the devices really are there."""
        core = self.mmcore
        core.setConfig(group, preset)
        core.waitForConfig(group, preset)
        now = core.getCurrentConfig(group)
        if now != preset:
            raise RuntimeError(
                f"channel devices report {now or 'no preset'!r}, not {preset!r}"
            )

    def _measure_dark(self) -> None:
        """One frame with the shutter closed: the level of a black frame."""
        core = self.mmcore
        auto = core.getAutoShutter()
        try:
            core.setAutoShutter(False)
            if core.getShutterDevice():
                core.setShutterOpen(False)
            core.snapImage()
            dark = np.asarray(core.getImage(), dtype=np.float32)[::8, ::8]
        except Exception as e:  # no dark frame: skip the black check, say so
            logger.warning("no dark frame (%s): black frames go unchecked", e)
            self._dark = None
            return
        finally:
            core.setAutoShutter(auto)
        self._dark = (float(np.median(dark)), max(_noise(dark), 1.0))
        if self._saturation is None:
            bits = core.getImageBitDepth() or 16
            self._full_scale = float(2**bits - 1)

    def _check_frame(self, img: Any) -> None:
        """Raise `FrameError` for a black, saturated or stale frame.

        Black: flat (no structure beyond noise, where any lit field shows at
        least its vignetted background) and no brighter than the dark frame.
        """
        a = np.asarray(img)
        sub = a[::8, ::8]
        last = self._last
        if (
            last is not None
            and a.shape == last.shape
            and np.array_equal(sub, last[::8, ::8])
            and np.array_equal(a, last)
        ):
            raise FrameError("stale frame (identical to the previous one)")
        if self._dark is not None:
            level, dark_noise = self._dark
            f = sub.astype(np.float32)
            lo, hi = np.percentile(f, (0.1, 99.9))
            flat = hi - lo <= 10 * max(_noise(f), dark_noise)
            if flat and float(np.median(f)) <= level + 10 * dark_noise:
                raise FrameError("black frame (flat, at the dark frame's level)")
        if self._full_scale and np.mean(sub >= self._full_scale) > SATURATED_FRACTION:
            raise FrameError("saturated frame (most pixels at full scale)")

    def _event(self, kind: str, message: str) -> None:
        if self.on_event is not None:
            self.on_event(kind, message)

    def _move_z(self, z: float) -> None:
        core = self.mmcore
        core.setZPosition(z)
        core.waitForDevice(core.getFocusDevice())

    def _attempt(
        self, event: useq.MDAEvent, what: str, action: Callable[[], Any]
    ) -> None:
        last: BaseException | None = None
        for attempt in range(self.move_retries + 1):
            if attempt:  # give a device that just failed a moment to settle
                time.sleep(RETRY_BACKOFF_S * attempt)
            try:
                with self.calls.mark(f"{what} at {_where(event)}"):
                    action()
                if attempt:
                    self._event(
                        "RECOVERED", f"{what} at {_where(event)}, try {attempt + 1}"
                    )
                return
            except Exception as e:  # device errors come as RuntimeError or others
                last = e
                logger.warning("%s failed at %s: %s", what, event.index, _short(e))
                self._event("DEVICE-ERROR", f"{what} at {_where(event)}: {_short(e)}")
        self._fail(
            event,
            f"{what} failed: {_short(last) if last else '?'}",
            self.move_retries + 1,
        )
        # force a fresh command next time: the hardware state is unknown now
        self._xy = self._z = self._channel = self._exposure = None
        raise SkipEvent(reason=what)

    def _fail(self, event: useq.MDAEvent, reason: str, attempts: int) -> None:
        p = event.index.get("p", 0)
        if p in self._failed_p:
            return
        self._failed_p.add(p)
        if self.on_failure is not None:
            self.on_failure(event, reason, attempts)

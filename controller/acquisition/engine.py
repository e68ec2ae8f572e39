"""`ScanEngine`: pymmcore-plus's MDA engine with explicit failures.

Differences from `MDAEngine`, each for a measured reason:

* every hardware call goes through the run's `Hardware` facade: marked for
  the one watchdog, retried under one policy, failures and recoveries
  reported as `DeviceEvent` records, the channel preset read back after each
  change;
* the stage moves once per field, not before every channel
  (``force_set_xy_position=False``); its position is read back once per field
  and put into every frame's metadata (``ctcscan_stage``);
* a move, setting or snap still failing after its retries fails the field: a
  `Failed` record (reason, attempts) goes to the run's sink and the field's
  remaining events are skipped without touching the hardware; a frame is
  never yielded late or in the wrong slot;
* every frame is checked (`FrameChecker`: black, saturated, stale) inside the
  snap's retry, against a dark frame taken at the start of the sequence;
* with a `FocusQC`, the first frame of each field (the focus channel) is judged
  for sharpness; a poor field is re-focused locally (a `Refocused` record), its
  first frame re-taken at the new z, and its other channels taken there too.
  Every frame carries the field's focus record in its metadata
  (``ctcscan_focus``). The judging is off the critical path: when the field's
  next event is another channel, the focus frame is held back, judged on a
  helper thread while the camera takes that channel, and both frames are
  handed on after it; a poor field is re-focused then, and the channel just
  taken is taken again at the kept z if that moved (the stored frames are those
  of judging first: same z, same pixels).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import useq
from pymmcore_plus import CMMCorePlus
from pymmcore_plus.core._sequencing import SequencedEvent
from pymmcore_plus.mda import MDAEngine
from pymmcore_plus.mda._engine import ImagePayload
from pymmcore_plus.mda._runner import SkipEvent

from controller.acquisition.frames import FrameChecker
from controller.events import RecordSink
from controller.focus.qc import FieldFocus, FocusQC
from controller.hardware.facade import Hardware, HardwareError
from controller.records import Failed, FocusTry, Refocused

if TYPE_CHECKING:
    from pymmcore_plus.mda._protocol import PImagePayload

    from analysis.focus import FieldSharpness

__all__ = ["ScanEngine"]

logger = logging.getLogger("ctcscan.engine")


@dataclass
class _Held:
    """A field's focus frame held back while it is judged on the helper thread."""

    p: int
    event: useq.MDAEvent
    image: np.ndarray
    meta: dict[str, Any]
    z: float
    judged: Future[tuple[FieldSharpness, float]]


def _where(event: useq.MDAEvent) -> str:
    channel = event.channel.config if event.channel else ""
    return f"{event.pos_name or 'field'} {channel}".strip()


class ScanEngine(MDAEngine):
    """MDA engine for cartridge scans.

    Parameters
    ----------
    mmc : CMMCorePlus
        The core (a `UniMMCore` for simulated or mixed instruments).
    hw : Hardware
        The run's hardware facade on that core.
    sink : RecordSink
        Receives `Failed` and `Refocused` records.
    focus_qc : FocusQC, optional
        Judges (and re-focuses) each field on its focus-channel frame.
    check_frames : bool
        Check every frame for black, saturated and stale (default on).
    saturation : float, optional
        The camera's full-scale value (default: from the core's bit depth).
    """

    def __init__(
        self,
        mmc: CMMCorePlus,
        hw: Hardware,
        sink: RecordSink,
        *,
        focus_qc: FocusQC | None = None,
        check_frames: bool = True,
        saturation: float | None = None,
    ) -> None:
        super().__init__(
            mmc,
            use_hardware_sequencing=False,
            force_set_xy_position=False,
            restore_initial_state=False,
        )
        self.hw = hw
        self.sink = sink
        self.focus_qc = focus_qc
        self.check_frames = check_frames
        self._saturation = saturation
        self._frames: FrameChecker | None = None
        self._z_override: dict[int, float] = {}
        self._focus: tuple[int, dict[str, Any]] | None = None
        self._failed_p: set[int] = set()
        self._xy: tuple[float, float] | None = None
        self._z: float | None = None
        self._channel: str | None = None
        self._exposure: float | None = None
        self._stage: dict[str, float] = {}
        self._next: useq.MDAEvent | None = None
        self._held: _Held | None = None
        self._judge: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ hooks

    def setup_sequence(self, sequence: useq.MDASequence) -> Any:
        self._failed_p.clear()
        self._z_override.clear()
        self._focus = None
        self._held = None
        self._forget_state()
        out = super().setup_sequence(sequence)
        self._frames = self._frame_checker() if self.check_frames else None
        if self.focus_qc is not None and self._judge is None:
            self._judge = ThreadPoolExecutor(1, thread_name_prefix="ctcscan-focus-qc")
        return out

    def teardown_sequence(self, sequence: useq.MDASequence) -> None:
        self._held = None  # a stop between a field's frames: it is incomplete
        self._next = None
        if self._judge is not None:
            self._judge.shutdown(wait=True)
            self._judge = None
        super().teardown_sequence(sequence)

    def event_iterator(
        self, events: Iterable[useq.MDAEvent]
    ) -> Iterator[useq.MDAEvent]:
        """The events, one looked ahead (`_next`: whether a field's focus frame
        can be judged while its next channel is taken)."""
        it = iter(super().event_iterator(events))
        nxt = next(it, None)
        while nxt is not None:
            event, nxt = nxt, next(it, None)
            self._next = nxt
            yield event

    def setup_event(self, event: useq.MDAEvent) -> None:
        """As the base engine, but waits for the devices only when one of them
        says it is busy: every move here already returns when it is done, and
        `UniMMCore.waitForSystem` starts a thread pool on every call (7 ms an
        event, 30 ms a field at real exposure times)."""
        if isinstance(event, SequencedEvent):
            super().setup_event(event)
            return
        self.setup_single_event(event)
        core = self.mmcore
        if core.systemBusy():
            core.waitForSystem()

    def setup_single_event(self, event: useq.MDAEvent) -> None:
        p = event.index.get("p", 0)
        if self._held is not None and self._held.p != p:
            self._held = None  # its field ended without its next frame (failed)
        if p in self._failed_p:
            raise SkipEvent(reason="field already failed")
        where = _where(event)
        try:
            if event.x_pos is not None and event.y_pos is not None:
                xy = (event.x_pos, event.y_pos)
                if xy != self._xy:
                    x, y = self.hw.move_xy(*xy, where=where)
                    self._xy = xy
                    self._stage.update(x_um=x, y_um=y)
            z = self._z_override.get(p, event.z_pos)
            if z is not None and z != self._z:
                self._stage["z_um"] = self.hw.move_z(z, where=where)
                self._z = z
            if (ch := event.channel) is not None and ch.config != self._channel:
                self.hw.set_channel(ch.config, where=where)
                self._channel = ch.config
            if event.exposure is not None and event.exposure != self._exposure:
                self.hw.set_exposure(event.exposure, where=where)
                self._exposure = event.exposure
        except HardwareError as e:
            self._fail(event, str(e), e.attempts)
            self._forget_state()  # the hardware state is unknown now
            raise SkipEvent(reason=e.what) from None

    def exec_single_event(self, event: useq.MDAEvent) -> Iterator[PImagePayload | None]:
        check = self._frames.check if self._frames is not None else None
        try:
            img = self.hw.snap(where=_where(event), check=check)
        except HardwareError as e:
            self._fail(event, f"snap failed: {e.reason}", e.attempts)
            return
        qc = self.focus_qc
        p = event.index.get("p", 0)
        ch = event.channel
        if qc is not None and ch is not None and ch.config == qc.preset:
            if self._judge is not None and self._next_is_other_channel(p, qc.preset):
                self._hold(event, p, img)
                return
            img = self._check_focus(event, p, img)
        elif (held := self._held) is not None and held.p == p:
            self._held = None
            out = self._release(held, event, p, img, check)
            if out is None:  # the field failed on the way
                return
            focus, img = out
            meta = self._finish_meta(held.meta, p)
            yield ImagePayload(focus, held.event, meta)  # type: ignore[misc]
        meta = self._finish_meta(self._frame_meta(event), p)
        yield ImagePayload(img, event, meta)  # type: ignore[misc]

    def teardown_event(self, event: useq.MDAEvent) -> None:
        """Nothing to restore per event; shutter is handled around each snap."""

    # ------------------------------------------------------------------ helpers

    def _frame_checker(self) -> FrameChecker:
        """Frame checks against one dark frame (shutter closed)."""
        try:
            dark: np.ndarray | None = self.hw.dark_frame()
        except HardwareError as e:  # no dark frame: skip the black check, say so
            logger.warning("no dark frame (%s): black frames go unchecked", e)
            dark = None
        full = self._saturation
        if full is None:
            full = float(2 ** (self.mmcore.getImageBitDepth() or 16) - 1)
        return FrameChecker(dark, full)

    def _forget_state(self) -> None:
        self._xy = self._z = self._channel = self._exposure = None

    def _frame_meta(self, event: useq.MDAEvent) -> dict[str, Any]:
        t0 = event.metadata.get("runner_t0") or time.perf_counter()
        return dict(
            self.get_frame_metadata(
                event,
                runner_time_ms=(time.perf_counter() - t0) * 1000,
                camera_device=self.mmcore.getCameraDevice(),
                include_position=False,
            )
        )

    def _finish_meta(self, meta: dict[str, Any], p: int) -> Any:
        """A frame's metadata with the field's stage and focus record as they
        are now (after its focus QC)."""
        meta["ctcscan_stage"] = dict(self._stage)
        if self._focus is not None and self._focus[0] == p:
            meta["ctcscan_focus"] = dict(self._focus[1])
        return meta

    def _next_is_other_channel(self, p: int, preset: str) -> bool:
        nxt = self._next
        return (
            nxt is not None
            and not isinstance(nxt, SequencedEvent)
            and nxt.index.get("p", 0) == p
            and nxt.channel is not None
            and nxt.channel.config != preset
        )

    def _hold(self, event: useq.MDAEvent, p: int, img: np.ndarray) -> None:
        """Hold the focus frame back; judge it on the helper thread."""
        qc, judge = self.focus_qc, self._judge
        assert qc is not None and judge is not None
        planned = self._z if self._z is not None else self.hw.read_z()
        self._held = _Held(
            p, event, img, self._frame_meta(event), planned, judge.submit(qc.judge, img)
        )

    def _release(
        self,
        held: _Held,
        event: useq.MDAEvent,
        p: int,
        img: np.ndarray,
        check: Any,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The held focus frame's QC, now that the next channel's frame `img`
        is taken: the focus frame to keep and this channel's frame, taken again
        at the kept z when the re-focus moved it; None if the field failed."""
        focus = self._apply_focus(
            held.event, p, held.image, held.z, held.judged.result()
        )
        if self._z_override.get(p, held.z) == held.z:
            return focus, img
        try:  # taken at the planned z: again at the kept one, same settings
            self.setup_single_event(event)
            img = self.hw.snap(where=_where(event), check=check)
        except SkipEvent:  # the move or setting failed: the field is failed
            return None
        except HardwareError as e:
            self._fail(event, f"snap failed: {e.reason}", e.attempts)
            return None
        return focus, img

    def _check_focus(self, event: useq.MDAEvent, p: int, img: Any) -> Any:
        """Focus QC of this field's first frame; later channels follow its z."""
        planned = self._z if self._z is not None else self.hw.read_z()
        return self._apply_focus(event, p, img, planned, None)

    def _apply_focus(
        self,
        event: useq.MDAEvent,
        p: int,
        img: Any,
        planned: float,
        judged: tuple[FieldSharpness, float] | None,
    ) -> Any:
        qc = self.focus_qc
        assert qc is not None
        img, info = qc.check(img, planned, judged)
        if info.z_um != planned:  # the re-focused frame is kept: so is its z
            self._z_override[p] = info.z_um
            self._stage["z_um"] = self.hw.read_z()
        if info.search_snaps or (judged is not None and qc.poor(judged[0])):
            # the drive moved during the search, the focus channel may have
            # been selected again: command the field's z, channel and exposure
            # again before the next frame, whatever the search left them at
            self._z = self._channel = self._exposure = None
        self._focus = (p, info.as_dict())
        if info.refocused:
            self.sink.emit(_refocused(event.pos_name or f"p{p}", info))
        return img

    def _fail(self, event: useq.MDAEvent, reason: str, attempts: int) -> None:
        p = event.index.get("p", 0)
        if self._held is not None and self._held.p == p:
            self._held = None
        if p in self._failed_p:
            return
        self._failed_p.add(p)
        self.sink.emit(
            Failed(field=event.pos_name or f"p{p}", reason=reason, attempts=attempts)
        )


def _refocused(name: str, info: FieldFocus) -> Refocused:
    """The record of a field's two acquisitions of its focus channel (values
    rounded as in the field's focus record)."""
    d = info.as_dict()
    return Refocused(
        field=name,
        first=FocusTry(z_um=d["z_planned_um"], sharpness=d["first_sharpness"]),
        second=FocusTry(z_um=d["second_z_um"], sharpness=d["second_sharpness"]),
        kept="first" if d["z_um"] == d["z_planned_um"] else "second",
        reason=d["reason"],
        search_snaps=d["search_snaps"],
        seconds=d["seconds"],
    )

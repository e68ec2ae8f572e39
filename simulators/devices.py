"""Micro-Manager Python devices of the simulated scanner (for `UniMMCore`).

Each device attaches, when created, to the `World` bound by
`simulators.open_simulated_core` and reads or sets only the world's state, so the
camera sees what the stage, focus drive, filter cube and shutter were told.
Waiting (exposure, travel) is counted on the world's `clock_ms` and slept scaled
by its `time_scale` (0 never sleeps). The camera renders only its ROI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import DTypeLike
from pymmcore_plus.experimental.unicore import (
    GenericDevice,
    ShutterDevice,
    SimpleCameraDevice,
    StageDevice,
    StateDevice,
    XYStageDevice,
)

from simulators.config import STAINS
from simulators.world import World, current_world

__all__ = [
    "SimAutofocus",
    "SimCamera",
    "SimFilterCube",
    "SimFocus",
    "SimShutter",
    "SimXYStage",
]


def _wait(world: World, ms: float, since: float | None = None) -> None:
    """Spend `ms` of instrument time: counted on the world's clock, slept when
    the time scale says so; `since` (a `time.perf_counter` reading): the time
    already spent since then counts towards it (a camera integrates while the
    simulator renders what it sees)."""
    if ms <= 0:
        return
    with world.lock:
        world.clock_ms += ms
    if world.config.time_scale > 0:
        s = ms * world.config.time_scale / 1000
        if since is not None:
            s -= time.perf_counter() - since
        if s > 0:
            time.sleep(s)


class SimCamera(SimpleCameraDevice):
    """A 12-bit monochrome camera looking at the simulated cartridge."""

    def __init__(self) -> None:
        super().__init__()
        self.world = current_world()
        self._exposure = 10.0

    def sensor_shape(self) -> tuple[int, int]:
        return (self.world.height, self.world.width)

    def dtype(self) -> Any:
        return np.uint16

    def get_exposure(self) -> float:
        return self._exposure

    def set_exposure(self, exposure: float) -> None:
        if exposure < 0:
            raise ValueError(f"exposure must be >= 0 ms, got {exposure}")
        self._exposure = float(exposure)

    def snap(self, buffer: np.ndarray) -> Mapping:
        """A full frame into `buffer`: rendered during the exposure."""
        start = time.perf_counter()
        self.world.snap(self._exposure, out=buffer)
        _wait(self.world, self._exposure, since=start)
        return {"SimWorldSeed": str(self.world.config.seed)}

    def start_sequence(
        self,
        n: int | None,
        get_buffer: Callable[[Sequence[int], DTypeLike], np.ndarray],
    ) -> Iterator[Mapping]:
        """Frames of the ROI (set with Micro-Manager's ``setROI``), rendered
        alone rather than cropped from a full frame, as a sensor reads out only
        its ROI; the full frame when there is none."""
        roi = self._roi
        shape = self.shape()
        limit = n if n is not None else 2**63
        for _ in range(limit):
            buf = get_buffer(shape, np.uint16)
            start = time.perf_counter()
            self.world.snap(self._exposure, out=buf, roi=roi)
            _wait(self.world, self._exposure, since=start)
            yield {"SimWorldSeed": str(self.world.config.seed)}


class SimXYStage(XYStageDevice):
    """XY stage with travel limits around the cartridge and a travel time.

    With `stage_error_um` each move lands up to that far off its target (per
    axis, drawn from the seed and the move's number); the position read back
    is where it landed, as a stage with encoders reports it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.world = current_world()

    @property
    def limits(self) -> tuple[float, float, float, float]:
        return self.world.travel

    def set_position_um(self, x: float, y: float) -> None:
        x_lo, x_hi, y_lo, y_hi = self.limits
        if not (x_lo <= x <= x_hi and y_lo <= y <= y_hi):
            raise ValueError(f"XY target ({x:.1f}, {y:.1f}) um outside stage travel")
        w = self.world
        with w.lock:
            ox, oy = w.xy
            n = w.xy_moves
            w.xy_moves += 1
        if n in w.config.fail_xy_moves:  # the controller times out; nothing moved
            raise TimeoutError(f"simulated XY stage: move {n} timed out")
        if (err := w.config.stage_error_um) > 0:
            ex, ey = np.random.default_rng([w.config.seed, 9, n]).uniform(-err, err, 2)
            x, y = x + float(ex), y + float(ey)
        start = time.perf_counter()
        if w.config.time_scale > 0:
            # the scene where it lands is drawn while the stage travels there
            w.renderer.prepare(x, y)
        _wait(
            w,
            max(abs(x - ox), abs(y - oy)) / w.config.stage_speed_um_per_ms,
            since=start,
        )
        with w.lock:
            w.xy = (float(x), float(y))
        self.core.events.XYStagePositionChanged.emit(self.get_label(), x, y)

    def get_position_um(self) -> tuple[float, float]:
        with self.world.lock:
            return self.world.xy

    def set_origin_x(self) -> None:
        raise NotImplementedError("the simulated stage has a fixed origin")

    def set_origin_y(self) -> None:
        raise NotImplementedError("the simulated stage has a fixed origin")

    def home(self) -> None:
        lay = self.world.layout
        self.set_position_um(lay.center_x_um, lay.center_y_um)

    def stop(self) -> None:
        """Moves complete synchronously; nothing to stop."""


class SimFocus(StageDevice):
    """Focus drive (z, um) with a +/- 200 um range."""

    def __init__(self) -> None:
        super().__init__()
        self.world = current_world()

    def set_position_um(self, val: float) -> None:
        if not -200.0 <= val <= 200.0:
            raise ValueError(f"focus target {val:.2f} um outside the focus range")
        w = self.world
        with w.lock:
            dz = abs(val - w.z)
        _wait(w, dz / w.config.focus_speed_um_per_ms)
        with w.lock:
            w.z = float(val)
        self.core.events.stagePositionChanged.emit(self.get_label(), val)

    def get_position_um(self) -> float:
        with self.world.lock:
            return self.world.z

    def home(self) -> None:
        self.set_position_um(0.0)

    def stop(self) -> None:
        """Moves complete synchronously; nothing to stop."""

    def set_origin(self) -> None:
        raise NotImplementedError("the simulated focus drive has a fixed origin")


class SimFilterCube(StateDevice):
    """Filter cube / LED selector: one position per stain."""

    def __init__(self) -> None:
        super().__init__(dict(enumerate(STAINS)))
        self.world = current_world()

    def get_state(self) -> int:
        return self.world.filter_position()

    def set_state(self, position: int) -> None:
        if not 0 <= int(position) < len(STAINS):
            raise ValueError(f"no filter position {position}")
        self.world.move_filter(int(position))


class SimShutter(ShutterDevice):
    """Excitation shutter; a closed shutter gives dark frames."""

    def __init__(self) -> None:
        super().__init__()
        self.world = current_world()

    def get_open(self) -> bool:
        with self.world.lock:
            return self.world.shutter_open

    def set_open(self, open: bool) -> None:
        with self.world.lock:
            self.world.shutter_open = bool(open)


class SimAutofocus(GenericDevice):
    """Hardware autofocus (reflection type): finds the surface and moves the focus
    drive there. `simulators.core.SimCore` routes Micro-Manager's autofocus calls
    (``fullFocus``, ``getLastFocusScore`` ...) to it."""

    def __init__(self) -> None:
        super().__init__()
        self.world = current_world()
        self.last_score = 0.0
        self.offset_um = 0.0

    def full_focus(self) -> None:
        start = self.world.z
        z = self.world.autofocus()
        _wait(self.world, 50 + abs(z - start) / self.world.config.focus_speed_um_per_ms)
        self.last_score = 1.0

    def current_score(self) -> float:
        w = self.world
        x, y = w.xy
        return float(np.exp(-abs(w.z - w.surface_z(x, y))))

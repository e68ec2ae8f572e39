"""Device contracts: one suite per device kind, run on every implementation here.

In the style of python-microscope's ``microscope/testsuite/test_devices.py``: a
mixin class of contract tests per device kind (camera, XY stage, focus drive,
channel device, cartridge loader), mixed into one test class per
implementation. The class says which implementation it is (`CONFIG`, or its
own ``loader`` fixture) and what that implementation is known not to do
(`XY_TRAVEL_LIMITS`, `CAMERA_SEES_SHUTTER`); a contract an implementation
cannot meet is skipped with the reason, never silently passed.

Implementations:

* the simulated scanner (``hardware_configs/simulated.yaml``: Python devices
  under UniMMCore);
* Micro-Manager's C++ demo adapters (``hardware_configs/demo-adapters.yaml``:
  DemoCamera & co. from the mm-test-adapters wheel);
* the cartridge loader driver (`CartridgeLoader`) on the emulated loader
  (`LoaderEmulator` on a pty), built directly and through `open_loader` from
  the simulated instrument's ``loader`` section.

The instrument devices are driven through the one hardware facade
(`Hardware`: marked, retried, validated calls), and read back from the core.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from controller.config import InstrumentConfig
from controller.hardware.facade import Busy, Hardware, HardwareError, RetryPolicy
from controller.hardware.instrument import Instrument, open_instrument
from controller.hardware.loader import (
    CartridgeLoader,
    LoaderFault,
    LoaderStatus,
    open_loader,
)
from controller.layouts import CartridgeLayout, get_layout
from hardware_configs import CONFIG_DIR
from simulators.loader import LoaderEmulator

LAYOUT = "test-3x4"
#: a stage target 10 m away: outside the travel of any stage
FAR_XY = (1e7, 1e7)
#: a focus target 1 m away: outside the range of any focus drive
FAR_Z = 1e6
XY_TOLERANCE_UM = 1.0
Z_TOLERANCE_UM = 0.1


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="class")
def instrument(request: pytest.FixtureRequest) -> Iterator[Instrument]:
    """The implementation's instrument (``CONFIG`` of the test class), opened
    once per class and closed at its end."""
    cfg = InstrumentConfig.from_file(CONFIG_DIR / request.cls.CONFIG)
    inst = open_instrument(cfg, get_layout(LAYOUT))
    try:
        yield inst
    finally:
        inst.close()


@pytest.fixture
def cfg(instrument: Instrument) -> InstrumentConfig:
    return instrument.config


@pytest.fixture
def core(instrument: Instrument) -> Any:
    return instrument.core


@pytest.fixture
def hw(instrument: Instrument) -> Hardware:
    """A fresh facade per test (its `snaps` count and `busy` marker start clean)."""
    return Hardware(
        instrument.core, RetryPolicy(), channel_group=instrument.config.channel_group
    )


def field_centres(
    cfg: InstrumentConfig, layout: CartridgeLayout
) -> list[tuple[float, float]]:
    """Stage targets inside the cartridge: the centre fields of its four corners
    and the cartridge centre (field pitch = the camera's field of view)."""
    fov_w = cfg.camera.width * cfg.pixel_size_um
    fov_h = cfg.camera.height * cfg.pixel_size_um
    dx = (layout.cols - 1) / 2 * fov_w
    dy = (layout.rows - 1) / 2 * fov_h
    cx, cy = layout.center_x_um, layout.center_y_um
    return [
        (cx, cy),
        (cx - dx, cy + dy),
        (cx + dx, cy + dy),
        (cx + dx, cy - dy),
        (cx - dx, cy - dy),
    ]


def restore(action: Callable[[], object]) -> None:
    """Put a device back after a contract test, whatever that test found (a
    broken contract must fail its own test, not poison the following ones)."""
    with contextlib.suppress(Exception):
        action()


def assert_idle(hw: Hardware) -> None:
    assert hw.busy is None, f"facade still marked busy after the call: {hw.busy}"


# ---------------------------------------------------------------------- camera


class CameraContract:
    """A camera snaps 2-D integer frames of the configured size, keeps the
    exposure it is given, and a snap is marked busy while it runs."""

    #: whether the camera's pixels depend on the shutter (dark frames are dark)
    CAMERA_SEES_SHUTTER: ClassVar[bool] = True

    def test_snap_is_a_2d_integer_frame_of_the_configured_size(
        self, hw: Hardware, cfg: InstrumentConfig
    ) -> None:
        img = hw.snap()
        assert isinstance(img, np.ndarray)
        assert img.ndim == 2
        assert img.shape == (cfg.camera.height, cfg.camera.width)
        assert np.issubdtype(img.dtype, np.integer), img.dtype
        assert_idle(hw)

    def test_pixels_fit_the_configured_bit_depth(
        self, hw: Hardware, cfg: InstrumentConfig
    ) -> None:
        ch = max(cfg.channels, key=lambda c: c.exposure_ms)
        hw.set_channel(ch.preset)
        hw.set_exposure(ch.exposure_ms)
        img = hw.snap()
        assert int(img.min()) >= 0
        assert int(img.max()) <= 2**cfg.camera.bit_depth - 1

    @pytest.mark.parametrize("ms", [1.0, 12.5, 150.0])
    def test_exposure_set_is_read_back(
        self, hw: Hardware, core: Any, ms: float
    ) -> None:
        hw.set_exposure(ms)
        assert core.getExposure() == pytest.approx(ms)
        assert_idle(hw)

    def test_a_snap_is_marked_busy_while_it_runs_and_not_after(
        self, hw: Hardware
    ) -> None:
        assert_idle(hw)
        seen: list[Busy | None] = []
        t0 = time.monotonic()
        hw.snap(where="r0c0", check=lambda img: seen.append(hw.busy))
        assert len(seen) == 1
        busy = seen[0]
        assert busy is not None, "no busy marker inside the snap"
        assert busy.what == "snap at r0c0"
        assert t0 <= busy.since <= time.monotonic()
        assert_idle(hw)

    def test_a_rejected_frame_is_snapped_again_then_fails(self, hw: Hardware) -> None:
        def reject(img: np.ndarray) -> None:
            raise ValueError("black frame")

        with pytest.raises(HardwareError, match="black frame") as info:
            hw.snap(check=reject)
        tries = hw.policy.snap_retries + 1
        assert info.value.attempts == tries
        assert hw.snaps == tries
        assert_idle(hw)

    def test_a_dark_frame_is_snapped_with_the_shutter_closed(
        self, hw: Hardware, core: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        lit = hw.snap()
        auto = core.getAutoShutter()
        during: list[tuple[bool, bool]] = []
        snap_image = core.snapImage

        def spy(*args: Any) -> Any:
            during.append((core.getAutoShutter(), core.getShutterOpen()))
            return snap_image(*args)

        monkeypatch.setattr(core, "snapImage", spy)
        dark = hw.dark_frame()
        monkeypatch.undo()
        assert during == [(False, False)], "(auto-shutter, shutter open) at the snap"
        assert core.getAutoShutter() == auto, "auto-shutter not restored"
        assert not core.getShutterOpen()
        assert dark.shape == lit.shape and dark.dtype == lit.dtype
        assert_idle(hw)

    def test_a_dark_frame_is_darker_than_a_lit_one(
        self, hw: Hardware, cfg: InstrumentConfig
    ) -> None:
        if not self.CAMERA_SEES_SHUTTER:
            pytest.skip(
                f"{cfg.name}: the camera's pixels do not depend on the shutter "
                "(DemoCamera's test pattern is the same with the shutter closed)"
            )
        ch = cfg.channels[0]
        hw.set_channel(ch.preset)
        hw.set_exposure(max(ch.exposure_ms, 10.0))
        lit = hw.snap()
        dark = hw.dark_frame()
        assert float(dark.mean()) < float(lit.mean())


# ---------------------------------------------------------------------- XY stage


class XYStageContract:
    """An XY stage reaches targets inside the cartridge within 1 um and refuses
    targets outside its travel (as a `HardwareError`, after the retries)."""

    #: whether the stage refuses targets outside its travel
    XY_TRAVEL_LIMITS: ClassVar[bool] = True

    def test_move_xy_reaches_targets_inside_the_cartridge(
        self, hw: Hardware, core: Any, cfg: InstrumentConfig
    ) -> None:
        for x, y in field_centres(cfg, get_layout(LAYOUT)):
            gx, gy = hw.move_xy(x, y, where="contract")
            assert abs(gx - x) <= XY_TOLERANCE_UM and abs(gy - y) <= XY_TOLERANCE_UM, (
                f"target ({x:.1f}, {y:.1f}) um, read back ({gx:.3f}, {gy:.3f})"
            )
            cx, cy = core.getXYPosition()
            assert (cx, cy) == pytest.approx((gx, gy), abs=XY_TOLERANCE_UM)
            assert_idle(hw)

    def test_a_target_far_outside_travel_raises_hardware_error(
        self, hw: Hardware, core: Any, cfg: InstrumentConfig
    ) -> None:
        start = hw.move_xy(0.0, 0.0)
        if not self.XY_TRAVEL_LIMITS:
            stage = core.getXYStageDevice()
            try:
                core.setXYPosition(*FAR_XY)
                accepted = True
            except Exception:
                accepted = False
            finally:  # the demo stage starts a long journey: stop it, go back
                core.stop(stage)
                core.waitForDevice(stage)
                hw.move_xy(*start)
            if accepted:
                pytest.skip(
                    f"{cfg.name}: the XY stage ({core.getDeviceName(stage)}) accepts "
                    f"any target, {FAR_XY} um included (no travel limits); it only "
                    "times out in waitForDevice after the core's 5 s timeout"
                )
        try:
            with pytest.raises(HardwareError) as info:
                hw.move_xy(*FAR_XY, where="far away")
            assert info.value.what == "XY move at far away"
            assert info.value.attempts == hw.policy.move_retries + 1
            assert core.getXYPosition() == pytest.approx(start, abs=XY_TOLERANCE_UM)
            assert_idle(hw)
        finally:  # a stage that did go (contract broken) must not stay 10 m away
            restore(lambda: hw.move_xy(*start))


# ---------------------------------------------------------------------- focus drive


class FocusContract:
    """A focus drive reaches its target within 0.1 um, reads it back, and
    refuses a target outside its range."""

    @pytest.mark.parametrize("z", [0.0, 12.34, -50.1, 150.0, 0.05])
    def test_move_z_reaches_the_target_and_read_z_agrees(
        self, hw: Hardware, core: Any, z: float
    ) -> None:
        got = hw.move_z(z)
        assert abs(got - z) <= Z_TOLERANCE_UM, f"target {z} um, read back {got}"
        assert hw.read_z() == pytest.approx(got, abs=0.01)
        assert core.getZPosition() == pytest.approx(got, abs=0.01)
        assert_idle(hw)

    def test_a_target_outside_the_range_raises_hardware_error(
        self, hw: Hardware
    ) -> None:
        start = hw.move_z(5.0)
        try:
            with pytest.raises(HardwareError) as info:
                hw.move_z(FAR_Z)
            assert info.value.what == "focus move"
            assert info.value.attempts == hw.policy.move_retries + 1
            assert hw.read_z() == pytest.approx(start, abs=Z_TOLERANCE_UM)
            assert_idle(hw)
        finally:  # a drive that did go (contract broken) must not stay there
            restore(lambda: hw.move_z(start))


# ---------------------------------------------------------------------- channels


class ChannelContract:
    """Every channel preset of the instrument config can be applied and is read
    back from the channel devices; an unknown preset is a `HardwareError`."""

    def test_every_channel_preset_is_applied_and_read_back(
        self, hw: Hardware, core: Any, cfg: InstrumentConfig
    ) -> None:
        presets = [c.preset for c in cfg.channels]
        assert len(presets) >= 2
        for preset in [*presets, *reversed(presets)]:  # every change, both ways
            hw.set_channel(preset)
            assert core.getCurrentConfig(cfg.channel_group) == preset
            assert_idle(hw)

    def test_an_unknown_preset_raises_hardware_error(
        self, hw: Hardware, core: Any, cfg: InstrumentConfig
    ) -> None:
        before = cfg.channels[0].preset
        hw.set_channel(before)
        with pytest.raises(HardwareError) as info:
            hw.set_channel("no-such-preset")
        assert info.value.what == "channel no-such-preset"
        assert info.value.attempts == hw.policy.move_retries + 1
        assert core.getCurrentConfig(cfg.channel_group) == before
        assert_idle(hw)


# ---------------------------------------------------------------------- instruments


class InstrumentContract(
    CameraContract, XYStageContract, FocusContract, ChannelContract
):
    CONFIG: ClassVar[str]

    def test_the_instrument_has_every_device_kind(self, core: Any) -> None:
        for device in (
            core.getCameraDevice(),
            core.getXYStageDevice(),
            core.getFocusDevice(),
            core.getShutterDevice(),
        ):
            assert device, "a device kind is not set in the core"


class TestSimulatedInstrument(InstrumentContract):
    CONFIG = "simulated.yaml"


class TestDemoAdaptersInstrument(InstrumentContract):
    CONFIG = "demo-adapters.yaml"
    XY_TRAVEL_LIMITS = False
    CAMERA_SEES_SHUTTER = False


# ---------------------------------------------------------------------- loader


class LoaderContract:
    """The loader identifies itself, reports its state and magazine, loads a
    slot's cartridge (whose barcode is the inventory's) and unloads it, and
    survives a garbled reply. Test classes provide a ``loader`` fixture whose
    loader has its emulator as ``.emulator`` and the expected magazine as
    ``.magazine``."""

    def test_identify(self, loader: CartridgeLoader) -> None:
        words = loader.identify().split()
        assert len(words) == 3 and words[0] == "CTL8", words

    def test_status_of_an_idle_loader(self, loader: CartridgeLoader) -> None:
        assert loader.status() == LoaderStatus("IDLE", None, 0)

    def test_inventory_is_the_magazine(self, loader: CartridgeLoader) -> None:
        magazine = loader.magazine  # type: ignore[attr-defined]
        inv = loader.inventory()
        assert sorted(inv) == list(range(1, len(inv) + 1))
        assert inv == magazine

    def test_load_gives_the_inventory_barcode_then_unload(
        self, loader: CartridgeLoader
    ) -> None:
        inv = loader.inventory()
        full = [slot for slot, bc in inv.items() if bc is not None]
        for slot in (full[0], full[-1]):
            assert loader.load(slot) == inv[slot]
            assert loader.status() == LoaderStatus("IDLE", slot, 0)
            assert loader.barcode() == inv[slot]
            assert loader.inventory()[slot] is None  # on the stage now
            loader.unload()
            assert loader.status() == LoaderStatus("IDLE", None, 0)
            assert loader.inventory() == inv

    def test_a_slot_out_of_range_is_refused(self, loader: CartridgeLoader) -> None:
        n = len(loader.inventory())
        with pytest.raises(LoaderFault) as info:
            loader.load(n + 1)
        assert info.value.code == 2
        assert loader.status() == LoaderStatus("IDLE", None, 0)

    def test_a_garbled_reply_to_a_query_is_survived(
        self, loader: CartridgeLoader
    ) -> None:
        emu: LoaderEmulator = loader.emulator  # type: ignore[attr-defined]
        emu.inject("garble")
        assert loader.inventory() == loader.magazine  # type: ignore[attr-defined]
        assert emu.commands.count("INV?") == 2  # asked once more, not more
        assert loader.identify().startswith("CTL8 ")

    def test_a_garbled_reply_to_a_motion_is_survived(
        self, loader: CartridgeLoader
    ) -> None:
        emu: LoaderEmulator = loader.emulator  # type: ignore[attr-defined]
        inv = loader.inventory()
        slot = next(s for s, bc in inv.items() if bc is not None)
        emu.inject("garble")
        assert loader.load(slot) == inv[slot]
        assert emu.commands.count(f"LOAD {slot}") == 1  # never sent twice
        loader.unload()
        assert loader.status() == LoaderStatus("IDLE", None, 0)


class TestLoaderDriverOnEmulator(LoaderContract):
    """Built as in test_loader.py, with an empty slot in the magazine."""

    SLOTS: ClassVar[dict[int, str | None]] = {
        1: "CS-0001",
        2: None,
        3: "CS-0003",
        4: "CS-0004",
    }

    @pytest.fixture
    def loader(self, tmp_path: Path) -> Iterator[CartridgeLoader]:
        with (
            LoaderEmulator(self.SLOTS, tmp_path / "loader") as emu,
            CartridgeLoader(emu.port, timeout_s=0.25, retries=2, reconnect_s=3.0) as ld,
        ):
            ld.emulator = emu  # type: ignore[attr-defined]
            ld.magazine = dict(self.SLOTS)  # type: ignore[attr-defined]
            yield ld


class TestLoaderOfSimulatedInstrument(LoaderContract):
    """Opened by `open_loader` from simulated.yaml's ``loader`` section (port
    ``emulated``), with that section's timeouts and magazine."""

    @pytest.fixture
    def loader(self, tmp_path: Path) -> Iterator[CartridgeLoader]:
        cfg = InstrumentConfig.from_file(CONFIG_DIR / "simulated.yaml")
        assert cfg.loader is not None and cfg.loader.slots
        with open_loader(cfg, tmp_path) as ld:
            ld.magazine = dict(cfg.loader.slots)  # type: ignore[attr-defined]
            yield ld

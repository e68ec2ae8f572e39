"""Opening an instrument: a Micro-Manager core loaded from the instrument config.

This is the one module of the controller that knows about the simulator: an
instrument config with a ``simulation`` section gets the simulated world bound
to its Python devices; any other config is loaded as real (or C++ demo) hardware.
Device load failures are collected and reported together, by label.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymmcore_plus import CMMCorePlus
from pymmcore_plus.experimental.unicore import UniMMCore

from controller.config import InstrumentConfig
from controller.errors import ConfigError, DeviceLoadError
from controller.layouts import CartridgeLayout
from controller.loader import CartridgeLoader
from hardware_configs import CONFIG_DIR

__all__ = [
    "DEFAULT_INSTRUMENT",
    "HardwareCalls",
    "Instrument",
    "needs_manual_shutter",
    "open_instrument",
    "open_loader",
    "snap",
]

logger = logging.getLogger("ctcscan.instrument")


#: The simulated scanner, used when no instrument is given.
DEFAULT_INSTRUMENT = CONFIG_DIR / "simulated.yaml"


@dataclass
class Instrument:
    """An opened instrument."""

    config: InstrumentConfig
    core: CMMCorePlus
    world: Any = None  # simulators.World for a simulated instrument

    @property
    def simulated(self) -> bool:
        return self.world is not None

    def ground_truth(self, fields: list[tuple[str, float, float]]) -> dict | None:
        """Ground truth of the given fields, for a simulated instrument."""
        return None if self.world is None else self.world.ground_truth(fields)

    def close(self) -> None:
        """Unload every device and destroy the core now.

        The C++ core must be destroyed while Python is fully alive: left to
        interpreter shutdown, its destructor calls back into Python and the
        process aborts (pymmcore-plus issue #570; measured: exit 134 in 3 of 6
        CLI runs before this).
        """
        core, self.core = self.core, None  # type: ignore[assignment]
        if core is None:
            return
        try:
            core.unloadAllDevices()
        except Exception as e:  # closing must not hide the scan's own outcome
            logger.warning("unloading devices failed: %s", e)
        del core
        gc.collect()


def _adapter_paths(cfg: InstrumentConfig) -> list[str]:
    out = []
    for p in cfg.adapter_paths:
        if p == "mm-test-adapters":
            import mm_test_adapters

            out.append(mm_test_adapters.device_adapter_path())
        else:
            out.append(p)
    return out


def _device_lines(text: str) -> list[tuple[str, str, str, bool]]:
    """(label, library or module, device name, is_python) of each device line."""
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        is_py = line.startswith("#py ")
        if is_py:
            line = line[4:].strip()
        parts = line.split(",")
        if len(parts) == 4 and parts[0] in ("Device", "pyDevice"):
            out.append((parts[1], parts[2], parts[3], is_py or parts[0] == "pyDevice"))
    return out


def _diagnose(core: CMMCorePlus, text: str) -> dict[str, str]:
    """Which devices of a config cannot be loaded, and why (all of them)."""
    failures: dict[str, str] = {}
    adapters = set(core.getDeviceAdapterNames())
    for label, lib, name, is_py in _device_lines(text):
        if is_py or lib not in adapters:
            try:
                module = importlib.import_module(lib)
            except ImportError:
                failures[label] = f"no device adapter or Python module {lib!r}"
                continue
            if not hasattr(module, name):
                failures[label] = f"{lib} has no device {name!r}"
            continue
        try:
            available = core.getAvailableDevices(lib)
        except Exception as e:
            failures[label] = f"adapter {lib!r} unusable: {e}"
            continue
        if name not in available:
            failures[label] = f"adapter {lib!r} has no device {name!r}"
    return failures


def open_instrument(
    cfg: InstrumentConfig,
    layout: CartridgeLayout,
    *,
    seed: int | None = None,
    source: str = "",
) -> Instrument:
    """Load the instrument's Micro-Manager config and check it fits the YAML.

    Raises
    ------
    ConfigError
        The .cfg file is missing, or channel presets named in the YAML are not in
        the channel group.
    DeviceLoadError
        Devices failed to load; every failing device is named.
    """
    mm_path = Path(cfg.micromanager_config)
    if not mm_path.is_file():
        raise ConfigError(
            f"{source or cfg.name}: micromanager_config {mm_path} not found"
        )
    text = mm_path.read_text(encoding="utf-8", errors="replace")
    world = None
    core: CMMCorePlus | None = None
    try:
        if cfg.simulation is not None:
            from simulators import World, WorldConfig, open_simulated_core

            sim = cfg.simulation
            overrides = {
                **sim.world,
                "seed": sim.seed if seed is None else seed,
                "time_scale": sim.time_scale,
            }
            wcfg = WorldConfig.from_dict(overrides, source=f"{source}: simulation")
            world = World(
                wcfg,
                layout,
                width=cfg.camera.width,
                height=cfg.camera.height,
                pixel_size_um=cfg.pixel_size_um,
            )
            core = open_simulated_core(mm_path, world)
        else:
            core = UniMMCore()
            if paths := _adapter_paths(cfg):
                core.setDeviceAdapterSearchPaths(paths)
            core.loadSystemConfiguration(str(mm_path))
    except Exception as e:
        if core is not None:  # release whatever did load (serial ports, cameras)
            core.unloadAllDevices()
        if isinstance(e, ConfigError):
            raise
        probe = UniMMCore()
        if paths := _adapter_paths(cfg):
            probe.setDeviceAdapterSearchPaths(paths)
        failures = _diagnose(probe, text)
        if failures:
            raise DeviceLoadError(failures, str(mm_path)) from None
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        why = " / ".join(lines[-2:]) if lines else type(e).__name__
        raise ConfigError(f"{mm_path}: {why}") from None

    missing = [
        c.preset
        for c in cfg.channels
        if not core.isConfigDefined(cfg.channel_group, c.preset)
    ]
    if missing:
        have = ", ".join(core.getAvailableConfigs(cfg.channel_group)) or "none"
        core.unloadAllDevices()
        raise ConfigError(
            f"{source or cfg.name}: channel presets {missing} not in config group "
            f"{cfg.channel_group!r} of {mm_path.name} (it has: {have})"
        )
    _apply_pixel_size(core, cfg, source or cfg.name)
    _select_autofocus(core, cfg, source or cfg.name)
    return Instrument(cfg, core, world)


def _select_autofocus(core: CMMCorePlus, cfg: InstrumentConfig, source: str) -> None:
    """Make the YAML's autofocus device (if any) the core's autofocus device."""
    label = cfg.focus.autofocus_device
    if not cfg.focus.enabled or not label:
        return
    if label not in core.getLoadedDevices():
        core.unloadAllDevices()
        raise ConfigError(
            f"{source}: focus.autofocus_device {label!r} is not a device of "
            f"{Path(cfg.micromanager_config).name}"
        )
    try:
        core.setAutoFocusDevice(label)
    except Exception as e:
        core.unloadAllDevices()
        raise ConfigError(
            f"{source}: focus.autofocus_device {label!r} is not an autofocus "
            f"device ({str(e).strip().splitlines()[-1] if str(e).strip() else e})"
        ) from None


@contextlib.contextmanager
def open_loader(
    cfg: InstrumentConfig,
    workdir: Path,
    *,
    source: str = "",
    on_event: Callable[[str, str], None] | None = None,
) -> Iterator[CartridgeLoader]:
    """The instrument's cartridge loader, open for the duration of the block.

    ``port: emulated`` (simulated instruments) runs the simulator's loader on a
    pseudo-terminal whose state lives in `workdir`; any other port is opened
    as a serial device or pyserial URL.
    """
    lc = cfg.loader
    if lc is None:
        raise ConfigError(f"{source or cfg.name}: the instrument has no loader section")
    kw: dict[str, Any] = {
        "baudrate": lc.baudrate,
        "timeout_s": lc.timeout_s,
        "retries": lc.retries,
        "reconnect_s": lc.reconnect_s,
        "motion_timeout_s": lc.motion_timeout_s,
        "on_event": on_event,
    }
    if lc.port != "emulated":
        with CartridgeLoader(lc.port, **kw) as loader:
            yield loader
        return
    from simulators.loader import LoaderEmulator

    slots = lc.slots or {1: "SIM-0001"}
    with tempfile.TemporaryDirectory(prefix="ctcscan-loader-") as tmp:
        emu = LoaderEmulator(
            slots,
            Path(tmp) / "port",
            state_file=workdir / ".loader-emulator.json",
            script=lc.faults,
        )
        with emu, CartridgeLoader(str(emu.port), **kw) as loader:
            loader.emulator = emu  # type: ignore[attr-defined]
            yield loader


class HardwareCalls:
    """Marks the hardware call in progress, for a watchdog on another thread.

    ``with calls.mark("snap at field_003"): core.snapImage()``; `busy` is the
    (monotonic start, description) of the call in progress, or None.
    """

    def __init__(self) -> None:
        self.busy: tuple[float, str] | None = None

    @contextlib.contextmanager
    def mark(self, what: str) -> Iterator[None]:
        self.busy = (time.monotonic(), what)
        try:
            yield
        finally:
            self.busy = None


def needs_manual_shutter(core: CMMCorePlus) -> bool:
    """Whether snaps must open the shutter themselves.

    A Python camera under `UniMMCore` skips Micro-Manager's auto-shutter.
    """
    cam = core.getCameraDevice()
    return bool(
        isinstance(core, UniMMCore)
        and cam
        and core.isPyDevice(cam)
        and core.getShutterDevice()
        and core.getAutoShutter()
    )


def snap(core: CMMCorePlus, manual_shutter: bool) -> Any:
    """Snap one image (shutter opened around it when `manual_shutter`)."""
    if manual_shutter:
        core.setShutterOpen(True)
    try:
        core.snapImage()
    finally:
        if manual_shutter:
            core.setShutterOpen(False)
    return core.getImage()


def _apply_pixel_size(core: CMMCorePlus, cfg: InstrumentConfig, source: str) -> None:
    """Make the core report the YAML's pixel size (MDA metadata, OME writers).

    A .cfg pixel size that disagrees with the YAML is a configuration error. A
    .cfg without one (the Python-device case: the C++ core cannot key a pixel
    size preset on Python devices) gets a preset keyed on the Core's channel
    group, which the scan never changes.
    """
    have = core.getPixelSizeUm()
    if have:
        if abs(have - cfg.pixel_size_um) > 0.01 * cfg.pixel_size_um:
            core.unloadAllDevices()
            raise ConfigError(
                f"{source}: pixel_size_um is {cfg.pixel_size_um} but the active "
                f"pixel size preset of {Path(cfg.micromanager_config).name} says "
                f"{have} um"
            )
        return
    preset = "ctcscan"
    core.definePixelSizeConfig(preset, "Core", "ChannelGroup", core.getChannelGroup())
    core.setPixelSizeUm(preset, cfg.pixel_size_um)
    core.setPixelSizeConfig(preset)

"""Opening and closing an instrument: a Micro-Manager core and its checks.

`open_instrument` loads the instrument config's Micro-Manager .cfg (collecting
every device that fails to load, by label) and checks that it fits the YAML
(channel presets, pixel size, autofocus device). `Instrument.on_core` wraps a
core that the caller already opened (a GUI, a notebook) with the same checks;
such an instrument is never unloaded by ctcscan.

An instrument config with a ``simulation`` section is opened by the simulator,
reached by module name (`SIMULATOR`) so that no controller module imports it:
the simulated devices are plugged in at the device level, like a .cfg's
``#py pyDevice`` lines name Python device modules.
"""

from __future__ import annotations

import gc
import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pymmcore_plus import CMMCorePlus
from pymmcore_plus.experimental.unicore import UniMMCore

from controller.config import InstrumentConfig
from controller.errors import ConfigError, DeviceLoadError
from controller.layouts import CartridgeLayout
from hardware_configs import CONFIG_DIR

__all__ = [
    "DEFAULT_INSTRUMENT",
    "SIMULATOR",
    "Instrument",
    "SimulatedSample",
    "open_instrument",
]

logger = logging.getLogger("ctcscan.instrument")


#: The simulated scanner, used when no instrument is given.
DEFAULT_INSTRUMENT = CONFIG_DIR / "simulated.yaml"
#: The module that opens simulated instruments (``open_simulated``).
SIMULATOR = "simulators"


class SimulatedSample(Protocol):
    """What a simulated instrument offers beyond its devices."""

    def load_cartridge(self, seed: int, layout: CartridgeLayout) -> None: ...

    def ground_truth(
        self, fields: Sequence[tuple[str, float, float]]
    ) -> dict[str, Any]: ...


@dataclass
class Instrument:
    """An opened instrument: its config, its core, and (simulated only) the
    sample on its stage.

    ``owns_core`` is False for a core the caller opened (`on_core`): closing
    the instrument then leaves the core and its devices to the caller.
    """

    config: InstrumentConfig
    core: CMMCorePlus
    sample: SimulatedSample | None = None
    owns_core: bool = True

    @property
    def simulated(self) -> bool:
        return self.sample is not None

    @classmethod
    def on_core(
        cls, core: CMMCorePlus, config: InstrumentConfig, *, source: str = ""
    ) -> Instrument:
        """An instrument on a core that is already open (checked like a loaded
        one: channel presets, pixel size, autofocus device)."""
        _check(core, config, source or config.name, unload_on_error=False)
        return cls(config, core, None, owns_core=False)

    def close(self) -> None:
        """Unload every device and destroy the core now (own cores only).

        The C++ core must be destroyed while Python is fully alive: left to
        interpreter shutdown, its destructor calls back into Python and the
        process aborts (pymmcore-plus issue #570; measured: exit 134 in 3 of 6
        CLI runs before this).
        """
        core, self.core = self.core, None  # type: ignore[assignment]
        if core is None or not self.owns_core:
            return
        try:
            core.unloadAllDevices()
        except Exception as e:  # closing must not hide the scan's own outcome
            logger.warning("unloading devices failed: %s", e)
        del core
        gc.collect()

    def __enter__(self) -> Instrument:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    sample = None
    core: CMMCorePlus | None = None
    try:
        if cfg.simulation is not None:
            simulator = importlib.import_module(SIMULATOR)
            core, sample = simulator.open_simulated(
                cfg, layout, seed=seed, source=source
            )
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
    assert core is not None
    _check(core, cfg, source or cfg.name, unload_on_error=True)
    return Instrument(cfg, core, sample)


def _check(
    core: CMMCorePlus, cfg: InstrumentConfig, source: str, *, unload_on_error: bool
) -> None:
    """The core fits the YAML: channel presets, camera frame, pixel size,
    autofocus device (made the core's)."""
    try:
        missing = [
            c.preset
            for c in cfg.channels
            if not core.isConfigDefined(cfg.channel_group, c.preset)
        ]
        if missing:
            have = ", ".join(core.getAvailableConfigs(cfg.channel_group)) or "none"
            raise ConfigError(
                f"{source}: channel presets {missing} not in config group "
                f"{cfg.channel_group!r} of {Path(cfg.micromanager_config).name} "
                f"(it has: {have})"
            )
        cam = cfg.camera
        got = (core.getImageWidth(), core.getImageHeight())
        if got != (cam.width, cam.height):
            raise ConfigError(
                f"{source}: camera delivers {got[0]} x {got[1]} px, config says "
                f"{cam.width} x {cam.height}"
            )
        _apply_pixel_size(core, cfg, source)
        _select_autofocus(core, cfg, source)
    except ConfigError:
        if unload_on_error:
            core.unloadAllDevices()
        raise


def _select_autofocus(core: CMMCorePlus, cfg: InstrumentConfig, source: str) -> None:
    """Make the YAML's autofocus device (if any) the core's autofocus device."""
    label = cfg.focus.autofocus_device
    if not cfg.focus.enabled or not label:
        return
    if label not in core.getLoadedDevices():
        raise ConfigError(
            f"{source}: focus.autofocus_device {label!r} is not a device of "
            f"{Path(cfg.micromanager_config).name}"
        )
    try:
        core.setAutoFocusDevice(label)
    except Exception as e:
        raise ConfigError(
            f"{source}: focus.autofocus_device {label!r} is not an autofocus "
            f"device ({str(e).strip().splitlines()[-1] if str(e).strip() else e})"
        ) from None


def _apply_pixel_size(core: CMMCorePlus, cfg: InstrumentConfig, source: str) -> None:
    """Make the core report the YAML's pixel size (MDA metadata, OME writers).

    A .cfg pixel size that disagrees with the YAML is a configuration error. A
    .cfg without one (the Python-device case: the C++ core cannot key a pixel
    size preset on Python devices) gets a preset keyed on the Core's channel
    group, which the scan never changes, and the YAML's pixel-size affine
    (`InstrumentConfig.affine`; pymmcore-plus records it in frame metadata).
    """
    have = core.getPixelSizeUm()
    if have:
        if abs(have - cfg.pixel_size_um) > 0.01 * cfg.pixel_size_um:
            raise ConfigError(
                f"{source}: pixel_size_um is {cfg.pixel_size_um} but the active "
                f"pixel size preset of {Path(cfg.micromanager_config).name} says "
                f"{have} um"
            )
        return
    preset = "ctcscan"
    core.definePixelSizeConfig(preset, "Core", "ChannelGroup", core.getChannelGroup())
    core.setPixelSizeUm(preset, cfg.pixel_size_um)
    core.setPixelSizeAffine(preset, list(cfg.affine))
    core.setPixelSizeConfig(preset)

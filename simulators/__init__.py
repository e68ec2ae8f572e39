"""Simulated CTC scanner: a seeded synthetic cartridge behind Micro-Manager devices.

`open_simulated_core` is the one entry point runtime code uses: it builds the
world, binds it, and loads a Micro-Manager config whose ``#py pyDevice`` lines
name the devices in `simulators.devices`.
"""

from __future__ import annotations

from pathlib import Path

from pymmcore_plus.experimental.unicore import UniMMCore

from simulators.config import STAINS, WorldConfig
from simulators.world import KINDS, World

__all__ = ["KINDS", "STAINS", "World", "WorldConfig", "open_simulated_core"]


def open_simulated_core(mm_config: str | Path, world: World) -> UniMMCore:
    """Load `mm_config` into a new `UniMMCore` whose simulated devices share `world`."""
    core = UniMMCore()
    with world.bound():
        core.loadSystemConfiguration(str(mm_config))
    return core

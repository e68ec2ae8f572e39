"""Simulated CTC scanner: a seeded synthetic cartridge behind Micro-Manager devices.

`open_simulated_core` is the one entry point runtime code uses: it builds the
world, binds it, and loads a Micro-Manager config whose ``#py pyDevice`` lines
name the devices in `simulators.devices`.
"""

from __future__ import annotations

from pathlib import Path

from simulators.config import STAINS, WorldConfig
from simulators.core import SimCore
from simulators.world import KINDS, World

__all__ = ["KINDS", "STAINS", "SimCore", "World", "WorldConfig", "open_simulated_core"]


def open_simulated_core(mm_config: str | Path, world: World) -> SimCore:
    """Load `mm_config` into a new `SimCore` whose simulated devices share `world`."""
    core = SimCore()
    with world.bound():
        core.loadSystemConfiguration(str(mm_config))
    return core

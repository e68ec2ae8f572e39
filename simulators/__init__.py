"""Simulated CTC scanner: a seeded synthetic cartridge behind Micro-Manager devices.

`open_simulated` is the one entry point the controller uses (by name, from
`controller.hardware.instrument`, so no controller module imports this
package): it builds the world from an instrument config, binds it, and loads a
Micro-Manager config whose ``#py pyDevice`` lines name the devices in
`simulators.devices`. `open_simulated_core` does the last step for tests that
build their own world.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from controller.config import InstrumentConfig
from controller.layouts import CartridgeLayout
from simulators.config import STAINS, WorldConfig
from simulators.core import SimCore
from simulators.world import KINDS, World

__all__ = [
    "KINDS",
    "STAINS",
    "SimCore",
    "SimulatedSample",
    "World",
    "WorldConfig",
    "open_simulated",
    "open_simulated_core",
]


def open_simulated_core(mm_config: str | Path, world: World) -> SimCore:
    """Load `mm_config` into a new `SimCore` whose simulated devices share `world`."""
    core = SimCore()
    with world.bound():
        core.loadSystemConfiguration(str(mm_config))
    return core


class SimulatedSample:
    """The simulator's side of an opened simulated instrument: which cartridge
    lies on the stage, and its ground truth."""

    def __init__(self, world: World) -> None:
        self.world = world

    def load_cartridge(self, seed: int, layout: CartridgeLayout) -> None:
        """Put the cartridge drawn from `seed` (at `layout`) on the stage."""
        w = self.world
        if w.config.seed == seed and w.layout == layout:
            return
        w.load_cartridge(w.config.model_copy(update={"seed": seed}), layout)

    def ground_truth(
        self, fields: Sequence[tuple[str, float, float]]
    ) -> dict[str, Any]:
        return self.world.ground_truth(fields)


def open_simulated(
    cfg: InstrumentConfig,
    layout: CartridgeLayout,
    *,
    seed: int | None = None,
    source: str = "",
) -> tuple[SimCore, SimulatedSample]:
    """A `SimCore` loaded from the instrument's .cfg, on a world drawn from its
    ``simulation`` section (`seed` overrides the section's)."""
    sim = cfg.simulation
    if sim is None:
        raise ValueError(f"{source or cfg.name}: not a simulated instrument")
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
    return open_simulated_core(cfg.micromanager_config, world), SimulatedSample(world)

"""The cartridge loader driver against the emulated loader on a real pty.

pyserial opens the pty's slave side like any serial port; the emulator answers
on the master side and injects faults there, so every byte crosses the kernel's
tty layer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.hardware.loader import CartridgeLoader, LoaderError, LoaderFault
from controller.records import DeviceEvent
from simulators.loader import LoaderEmulator, checksum, frame

SLOTS = {1: "CS-0001", 2: None, 3: "CS-0003", 4: "CS-0004"}


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[LoaderEmulator]:
    with LoaderEmulator(SLOTS, tmp_path / "loader", late_s=0.5) as e:
        yield e


@pytest.fixture
def loader(emu: LoaderEmulator) -> Iterator[CartridgeLoader]:
    events: list[tuple[str, str]] = []

    class Sink:
        def emit(self, r: DeviceEvent) -> None:
            events.append((r.what, r.message))

    ld = CartridgeLoader(
        emu.port, timeout_s=0.25, retries=2, reconnect_s=3.0, sink=Sink()
    )
    ld.events = events  # type: ignore[attr-defined]
    with ld:
        yield ld


def test_framing_checksum_matches_the_documented_example() -> None:
    assert checksum("OK IDLE 3 0") == "23"
    assert frame("OK IDLE 3 0") == b"OK IDLE 3 0*23\r\n"
    doc = (
        Path(__file__).parents[1] / "hardware_configs" / "loader-protocol.md"
    ).read_text()
    assert "`OK IDLE 3 0*23\\r\\n`" in doc


def test_inventory_load_barcode_unload(
    loader: CartridgeLoader, emu: LoaderEmulator
) -> None:
    assert loader.identify().startswith("CTL8 ")
    assert loader.inventory() == SLOTS
    assert loader.load(3) == "CS-0003"
    st = loader.status()
    assert (st.state, st.slot, st.code) == ("IDLE", 3, 0)
    assert loader.inventory()[3] is None  # on the stage, not in its slot
    assert loader.barcode() == "CS-0003"
    loader.unload()
    assert loader.status().slot is None and loader.inventory() == SLOTS
    assert not loader.events  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("setup", "code", "words"),
    [
        (lambda ld: ld.load(2), 3, "SLOT-EMPTY"),
        (lambda ld: ld.load(9), 2, "BAD-ARGUMENT"),
        (lambda ld: ld.unload(), 7, "NO-CARTRIDGE"),
        (lambda ld: ld.barcode(), 7, "NO-CARTRIDGE"),
    ],
)
def test_refusals_carry_the_loader_error_code(
    loader: CartridgeLoader, setup: object, code: int, words: str
) -> None:
    with pytest.raises(LoaderFault, match=words) as info:
        setup(loader)  # type: ignore[operator]
    assert info.value.code == code


def test_load_while_occupied_is_refused(loader: CartridgeLoader) -> None:
    loader.load(1)
    with pytest.raises(LoaderFault) as info:
        loader.load(3)
    assert info.value.code == 4


def test_a_jam_is_a_fault_until_reset(
    loader: CartridgeLoader, emu: LoaderEmulator
) -> None:
    emu.inject("jam")
    with pytest.raises(LoaderFault, match="JAM") as info:
        loader.load(1)
    assert info.value.code == 5
    assert loader.status().state == "FAULT"
    with pytest.raises(LoaderFault) as refused:
        loader.load(3)
    assert refused.value.code == 8
    loader.reset()
    assert loader.status().state == "IDLE"
    assert loader.load(1) == "CS-0001"
    assert ("fault", "LOAD 1: error 05") in loader.events  # type: ignore[attr-defined]


@pytest.mark.parametrize("fault", ["garble", "truncate", "late", "silence"])
def test_a_bad_reply_to_a_query_is_retried(
    loader: CartridgeLoader, emu: LoaderEmulator, fault: str
) -> None:
    emu.inject(fault)
    assert loader.inventory() == SLOTS
    assert emu.commands.count("INV?") == 2  # asked once more, not more
    kinds = [k for k, _ in loader.events]  # type: ignore[attr-defined]
    assert kinds == ["retry"]


@pytest.mark.parametrize("fault", ["garble", "truncate", "silence"])
def test_a_motion_is_never_sent_twice_after_an_unclear_reply(
    loader: CartridgeLoader, emu: LoaderEmulator, fault: str
) -> None:
    emu.inject(fault)
    assert loader.load(4) == "CS-0004"
    # the loader heard the first LOAD; the driver asked its state instead
    assert emu.commands.count("LOAD 4") == 1
    assert "STAT?" in emu.commands[emu.commands.index("LOAD 4") + 1 :]


def test_too_many_bad_replies_give_up_with_the_reason(
    loader: CartridgeLoader, emu: LoaderEmulator
) -> None:
    emu.inject("garble", 3)
    with pytest.raises(LoaderError, match=r"checksum mismatch.*3 attempts"):
        loader.identify()


def test_a_busy_motion_is_polled_to_its_end(
    loader: CartridgeLoader, emu: LoaderEmulator
) -> None:
    emu.busy_s = 0.6
    emu.inject("busy")
    t0 = time.monotonic()
    assert loader.load(1) == "CS-0001"
    assert time.monotonic() - t0 >= 0.6
    assert emu.commands.count("STAT?") >= 3


def test_the_port_vanishing_and_coming_back_is_survived(
    loader: CartridgeLoader, emu: LoaderEmulator
) -> None:
    loader.load(1)
    emu.unplug()
    assert not Path(emu.port).exists()
    threading.Timer(0.8, emu.replug).start()
    assert loader.barcode() == "CS-0001"  # waited for the port, then asked
    assert [k for k, _ in loader.events] == ["reconnect"]  # type: ignore[attr-defined]


def test_a_port_that_stays_away_is_an_error_naming_it(
    loader: CartridgeLoader, emu: LoaderEmulator
) -> None:
    loader.reconnect_s = 0.6
    emu.unplug()
    t0 = time.monotonic()
    with pytest.raises(LoaderError, match=r"loader port .*loader gone for 0.6 s"):
        loader.status()
    assert time.monotonic() - t0 < 3.0


def test_a_missing_port_is_a_clear_error(tmp_path: Path) -> None:
    ld = CartridgeLoader(str(tmp_path / "nothing-here"), reconnect_s=0.0)
    with pytest.raises(LoaderError, match="nothing-here unavailable"):
        ld.open()
